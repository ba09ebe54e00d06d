"""Built-in terminal progress monitor for mlora."""
