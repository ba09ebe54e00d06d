"""Built-in ``mlora eval``: saved adapters measured again on their held-out data."""
