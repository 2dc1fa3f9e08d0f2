"""Averaging over a torch.distributed ProcessGroup with layer-wise quantization."""
