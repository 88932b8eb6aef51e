"""Training: arguments, the Trainer subclass and the optimizer groups (train.py is the command)."""
