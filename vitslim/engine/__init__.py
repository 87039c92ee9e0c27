"""The training engine shared by search and retrain: the trainer (loop, losses, stop signals, resume checks) and
the checkpoints it writes and resumes from."""
