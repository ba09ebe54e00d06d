"""Built-in ``mlora bench``: the same LoRA jobs trained by PEFT and by mlora, measured side by side."""
