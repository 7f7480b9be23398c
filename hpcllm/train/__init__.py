"""Training: the step loop (trainer), checkpoints, metrics, LR schedule, precision, stop requests."""
