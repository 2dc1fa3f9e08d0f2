"""The distributed WGAN-GP trainer (``qoda train``): config, compression, checkpoints, loop, launcher."""
