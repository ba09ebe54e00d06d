"""Held-out loss and exact-match accuracy of several adapters at once."""
