"""WGAN-GP models (the trainer is still to come)."""
