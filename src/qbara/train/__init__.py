"""Training: run configuration, data preparation with prompt masking, and the Trainer."""
