"""`qoda report`: a quantization report on real gradients (a digits CNN), with exact variances and wire bits."""
