"""Built-in LLaMA-family model backend for mlora."""
