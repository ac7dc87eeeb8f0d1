"""Models: timm architectures by name, weights from local files."""
