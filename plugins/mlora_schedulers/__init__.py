"""Built-in batch schedulers for mlora."""
