"""Built-in ``mlora generate``: text from saved adapters, many adapters per batch over one base."""
