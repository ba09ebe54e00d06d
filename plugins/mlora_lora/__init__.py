"""Built-in LoRA adapter type for mlora."""
