"""mlora-plugin-example: DoRA adapters, a shortest-job-first scheduler and a chat JSONL loader."""
