"""Training over several processes on torch.distributed: the world, the strategies, the launcher."""
