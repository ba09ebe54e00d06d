"""Built-in TensorBoard monitor for mlora."""
