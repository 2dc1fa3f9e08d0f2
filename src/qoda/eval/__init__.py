"""Sample-quality metrics for generators: FID through torchmetrics with offline feature extractors."""
