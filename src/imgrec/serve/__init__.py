"""Serving a model directory over HTTP: the Open Inference Protocol v2, /predict, a page, metrics."""

from imgrec.serve.app import ServeConfig, create_app, serve

__all__ = ["ServeConfig", "create_app", "serve"]
