"""Built-in JSON-lines metrics monitor for mlora."""
