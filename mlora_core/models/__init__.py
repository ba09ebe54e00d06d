"""The shared base model: loading through a backend, quantization, activation recompute, saved adapters."""
