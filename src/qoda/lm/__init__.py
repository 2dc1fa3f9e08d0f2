"""A small byte-level transformer language model and its offline corpus."""
