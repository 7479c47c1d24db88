"""Classifiers trained with PyTorch Lightning: models, data and the command line."""
