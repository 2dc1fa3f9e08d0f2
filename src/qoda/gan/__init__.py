"""WGAN-GP models: the ResNet pair of the published experiments, a CPU-sized DCGAN pair, the gradient penalty."""
