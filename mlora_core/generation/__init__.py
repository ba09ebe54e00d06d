"""Batched generation with several adapters per batch over the one shared base."""
