"""Image data sets read from local files only (nothing is downloaded) and per-worker batching."""
