"""Inference backends: one module per backend, named here.

A backend turns the trained model into a ``Forward``: a function from a normalised float32 NCHW
batch to float32 logits on the CPU. ``imgrec benchmark`` times each backend that runs on the
machine, ``imgrec export`` writes the files the file-based ones run from, and ``imgrec predict``
and ``imgrec serve`` run the one ``imgrec.inference.choice`` picks. To add a backend, write
``backends/<name>.py`` with a ``Backend`` subclass (``base.py``) and add a line to ``REGISTRY``.
The names are listed without importing torch, so the command line shows them at once.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> "module:class"; the class is imported on first use.
REGISTRY = {
    "eager": "imgrec.inference.backends.pytorch:Eager",
    "channels_last": "imgrec.inference.backends.pytorch:ChannelsLast",
    "bf16": "imgrec.inference.backends.pytorch:BFloat16",
    "fp16": "imgrec.inference.backends.pytorch:Float16",
    "compile": "imgrec.inference.backends.compiled:Compiled",
    "onnx": "imgrec.inference.backends.onnx:Onnx",
    "onnx-int8": "imgrec.inference.backends.onnx_int8:OnnxInt8",
    "openvino": "imgrec.inference.backends.openvino:OpenVino",
    "openvino-int8": "imgrec.inference.backends.openvino:OpenVinoInt8",
}
BACKENDS = tuple(REGISTRY)


def backend_class(name: str) -> Any:
    """The ``Backend`` subclass called ``name``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}: choose from auto, {', '.join(BACKENDS)}")
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def get_backend(name: str) -> Any:
    """An instance of the backend called ``name``."""
    return backend_class(name)()


__all__ = ["BACKENDS", "REGISTRY", "backend_class", "get_backend"]
