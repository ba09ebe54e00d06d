"""Built-in ``mlora serve``: a fine-tuning service over one loaded base, and its client commands."""
