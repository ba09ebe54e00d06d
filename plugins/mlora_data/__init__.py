"""Built-in data loaders and prompt templates for mlora."""
