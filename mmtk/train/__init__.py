"""Training: a recipe turned into a run (data, model, loss), the loop, batches, memory, optimizer, checkpoints."""
