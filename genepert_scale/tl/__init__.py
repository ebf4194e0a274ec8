"""Models and evaluation: gene embeddings, ridge, fit/predict, splits, metrics."""
