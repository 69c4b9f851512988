"""Training: losses, the train step, the loop."""
