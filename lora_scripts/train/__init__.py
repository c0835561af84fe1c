"""The training loop and what it writes: checkpoints, logs, batch plans."""
