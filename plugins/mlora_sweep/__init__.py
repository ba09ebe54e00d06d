"""Built-in ``mlora sweep``: hyper-parameter search as concurrent jobs over one base (Optuna)."""
