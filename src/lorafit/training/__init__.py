"""Training: the loop, its learning-rate schedule, loss and precision policy."""
