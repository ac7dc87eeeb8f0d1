"""Training tasks: what the trainer (``imgrec.engine.trainer``) trains, one file each.

``classify.py`` is supervised classification (``imgrec.train``), ``pretrain.py`` self-supervised
pretraining (``imgrec.pretrain``) with one file per method (``simclr.py``, ``moco.py``,
``byol.py``, ``dino.py``, ``distill.py``, on the interface of ``ssl.SSLMethod``). A method owns its views (the augmentation of
its paper), its heads and its loss; the pretraining task owns its data and the kNN monitor; the
trainer owns the loop. To add a method, write ``tasks/<name>.py`` with a subclass of ``SSLMethod``
and name it in ``METHODS``; a new kind of task subclasses ``base.Task``.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> "module:class"; imported on first use so that listing the names costs nothing.
METHODS = {
    "simclr": "imgrec.engine.tasks.simclr:SimCLR",
    "byol": "imgrec.engine.tasks.byol:BYOL",
    "moco": "imgrec.engine.tasks.moco:MoCoV3",
    "dino": "imgrec.engine.tasks.dino:DINO",
    "distill": "imgrec.engine.tasks.distill:Distill",
}


# Tasks a run becomes by its config (a classification run with a teacher is a distillation), by
# name: imported on first use, so that the task they refine need not import them.
VARIANTS = {"distill-classify": "imgrec.engine.tasks.kd:DistillClassifyTask"}


def variant_class(name: str) -> Any:
    module, _, cls = VARIANTS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def method_class(name: str) -> Any:
    """The ``SSLMethod`` subclass called ``name``."""
    if name not in METHODS:
        raise ValueError(f"unknown pretraining method {name!r}: use one of {', '.join(METHODS)}")
    module, _, cls = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["METHODS", "VARIANTS", "method_class", "variant_class"]
