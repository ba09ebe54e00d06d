"""The training engine: jobs, multi-job batches, per-job losses, the loop, checkpoints and the summary."""
