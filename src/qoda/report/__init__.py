"""The default job: a quantization report on real gradients."""
