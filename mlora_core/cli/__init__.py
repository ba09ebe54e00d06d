"""The ``mlora`` command line: the entry point, and the core's own commands."""
