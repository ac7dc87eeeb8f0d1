"""Self-supervised pretraining methods: one file per method, one interface (``base.SSLMethod``).

A method owns its views (the augmentation of its paper), its heads and its loss; the loop in
``imgrec.engine.pretrain`` owns everything else (data, optimiser, schedule, precision,
checkpoints, the kNN monitor). To add a method, write ``ssl/<name>.py`` with a subclass of
``SSLMethod`` and name it here.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> "module:class"; imported on first use so that listing the names costs nothing.
METHODS = {
    "simclr": "imgrec.ssl.simclr:SimCLR",
    "byol": "imgrec.ssl.byol:BYOL",
    "moco": "imgrec.ssl.moco:MoCoV3",
}


def method_class(name: str) -> Any:
    """The ``SSLMethod`` subclass called ``name``."""
    if name not in METHODS:
        raise ValueError(f"unknown pretraining method {name!r}: use one of {', '.join(METHODS)}")
    module, _, cls = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["METHODS", "method_class"]
