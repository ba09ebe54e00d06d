"""Built-in training objectives: supervised fine-tuning and preference tuning (DPO, CPO, ORPO)."""
