"""Datasets, decoding, transforms and loaders: everything between image files and a batch."""
