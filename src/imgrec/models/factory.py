"""timm models by name, with pretrained weights from a local file, a run or the hub by name.

``create_model("resnet50", num_classes=10, pretrained="resnet50.safetensors")`` builds the timm
architecture and loads the file, in timm's key layout or torchvision's (timm ships converters for
the architectures whose layouts differ). ``pretrained`` may also name weights (``resnet50.a1_in1k``,
``hf-hub:ORG/REPO``), found through the Hugging Face Hub's cache (``imgrec.models.hub``). A
classifier whose class count differs from the file's is re-initialised; every other missing or
unexpected key is an error that lists them, because a silently half-loaded backbone trains, but
badly.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch

from imgrec.card import BACKBONE_CARD, BACKBONE_WEIGHTS, MODEL_CARD, MODEL_WEIGHTS, ModelCard
from imgrec.models.custom import build_custom, is_custom_spec, take_instance
from imgrec.models.hub import WeightsError, fetch_weights, is_weights_name
from imgrec.utils import file_sha256

# Names under which timm's model modules keep their converters from other key layouts.
_FILTER_FUNCTIONS = ("checkpoint_filter_fn", "_filter_fn", "_filter_torchvision_pretrained")


@dataclass
class Weights:
    """Pretrained weights found: the file, its card (a run's, or the hub config's preprocessing;
    None for a bare file) and where they came from, as the run's model card records it."""

    path: Path
    card: ModelCard | None
    source: dict[str, str] = field(default_factory=dict)

    def card_for(self, model: str) -> ModelCard | None:
        """The card, checked to describe weights of ``model`` (the architecture being built)."""
        if self.card is not None and self.card.architecture != model:
            name = self.source.get("name", self.path)
            raise WeightsError(f"{name} holds {self.card.architecture} weights, not {model}: pass --model {self.card.architecture}")
        return self.card


def create_model(
    name: str, num_classes: int, pretrained: str | os.PathLike | Weights | None = None, *, model_args: dict[str, Any] | None = None, **kwargs: Any
) -> torch.nn.Module:
    """A timm model ``name`` with a ``num_classes``-way head, optionally loaded with weights.

    ``pretrained`` is a .safetensors file, or a .pth/.pt file holding a state dict or a
    checkpoint dict with one (under ``state_dict``, ``model``, ``state_dict_ema``...), a run
    directory of ``imgrec pretrain`` (its backbone) or ``imgrec train`` (its model), a weights
    name (``locate_weights``) or what ``locate_weights`` found. Other keyword arguments go to
    ``timm.create_model`` (``drop_rate``, ``drop_path_rate``...).

    ``name`` may also name any ``nn.Module`` class, ``path/to/file.py:Net`` or ``package.module:Net``,
    built with ``model_args`` (``imgrec.models.custom``); a module object handed to
    ``imgrec.train`` comes back here under its spec.
    """
    if is_custom_spec(name):
        model = take_instance(name) or build_custom(name, num_classes, model_args)
    else:
        known = timm.list_models()
        if name not in known:
            # Names containing the given one, then spelling neighbours (typos, wrong case).
            close = list(dict.fromkeys(timm.list_models(f"*{name.lower()}*") + difflib.get_close_matches(name.lower(), known, n=8, cutoff=0.6)))[:8]
            hint = f" Close matches: {', '.join(close)}." if close else " `imgrec models PATTERN` lists them."
            raise ValueError(f"unknown model {name!r}.{hint}")
        if "dynamic_img_size" not in kwargs and _fixed_size_vit(name, num_classes, kwargs):
            # A ViT takes any input size (its position embedding resampled to the input's grid), as
            # the recipe's sizes and DINO's local views need; built for one size, it would refuse them.
            kwargs = {**kwargs, "dynamic_img_size": True}
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    if pretrained is not None:
        load_pretrained(model, (pretrained if isinstance(pretrained, Weights) else locate_weights(pretrained)).path)
    return model


@functools.cache
def _module_takes_dynamic_size(module_name: str) -> bool:
    """Whether a class of timm's model module ``module_name`` takes ``dynamic_img_size`` (ViTs, Swin...)."""
    module = sys.modules[module_name]
    classes = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, torch.nn.Module)]
    return any("dynamic_img_size" in inspect.signature(c.__init__).parameters for c in classes)


def _fixed_size_vit(name: str, num_classes: int, kwargs: dict[str, Any]) -> bool:
    """Whether timm's ``name`` is a ViT with an absolute position embedding built for one input size
    (found on the meta device, nothing allocated, and only for the model modules that know the option)."""
    if not _module_takes_dynamic_size(timm.models.model_entrypoint(name).__module__):
        return False
    try:
        with torch.device("meta"):
            probe = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except Exception:  # an architecture that cannot be built on the meta device: left as it is
        return False
    return getattr(probe, "dynamic_img_size", None) is False and isinstance(getattr(probe, "pos_embed", None), torch.nn.Parameter)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, never unpickling anything but tensors and plain containers."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist (pretrained weights must be a local file)")
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path), use_ema=True, weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"cannot read weights from {path}: {exc}. Expected a .safetensors file or a .pth/.pt "
            f"state dict saved with torch.save(model.state_dict(), ...)"
        ) from None
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{path} holds no tensors: expected a state dict of model weights")
    return tensors


def load_pretrained(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a local weights file into ``model`` in place; see ``create_model`` for the rules."""
    state = _match_layout(read_state_dict(path), model)
    expected = model.state_dict()
    head = classifier_keys(model)
    # A different class count, or a backbone without classifier (``imgrec pretrain``): the model
    # keeps its freshly initialised head. A model without head drops the file's.
    reset = [k for k in head if k not in state or state[k].shape != expected[k].shape]
    for key in [k for k in state if k in reset or (k not in expected and _is_head_key(model, k))]:
        del state[key]
    wrong_shape = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}" for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    missing = [k for k in expected if k not in state and k not in reset]
    unexpected = [k for k in state if k not in expected]
    if wrong_shape or missing or unexpected:
        raise WeightsError(_mismatch_message(path, model, missing, unexpected, wrong_shape))
    model.load_state_dict(state, strict=not reset)


def classifier_keys(model: torch.nn.Module) -> list[str]:
    """The state-dict keys of the model's classifier head(s), from its timm config."""
    return [k for k in model.state_dict() if _is_head_key(model, k)]


def _is_head_key(model: torch.nn.Module, key: str) -> bool:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    prefixes = (names,) if isinstance(names, str) else tuple(names)
    return any(key == p or key.startswith(p + ".") for p in prefixes)


# What a run directory holds, in the order ``resolve_weights`` looks: pretraining, then training.
RUN_WEIGHTS = ((BACKBONE_WEIGHTS, BACKBONE_CARD), (MODEL_WEIGHTS, MODEL_CARD))


def resolve_weights(path: str | os.PathLike) -> tuple[Path, ModelCard | None]:
    """(weights file, its card or None) for a weights file, a run directory or a weights name."""
    found = locate_weights(path)
    return found.path, found.card


def locate_weights(spec: str | os.PathLike) -> Weights:
    """The weights ``spec`` stands for: a local file or run directory, else hub weights by name
    (``resnet50.a1_in1k``, a bare ``resnet50`` for timm's default tag, ``hf-hub:ORG/REPO``; see
    ``imgrec.models.hub``).

    A directory of ``imgrec pretrain`` gives its backbone.safetensors, one of ``imgrec train``
    its model.safetensors, with the card (architecture, preprocessing) beside it; such a file
    named directly comes with its card too, any other file with none; hub weights come with the
    preprocessing of their pretrained config.
    """
    path = Path(spec)
    if path.is_dir():
        for weights, card in RUN_WEIGHTS:
            if (path / weights).is_file():
                file = path / weights
                return Weights(file, ModelCard.read(path / card) if (path / card).is_file() else None, _file_source(spec, file))
        raise WeightsError(f"{path} holds no {BACKBONE_WEIGHTS} (imgrec pretrain) or {MODEL_WEIGHTS} (imgrec train): pass a run directory or a weights file")
    if not path.is_file():
        if is_weights_name(spec):
            hub = fetch_weights(str(spec))
            return Weights(hub.path, hub.card, hub.source)
        raise WeightsError(
            f"weights {spec} does not exist: not a local file or run directory, nor a name of pretrained weights "
            f"(a timm tag such as resnet50.a1_in1k, `imgrec weights list PATTERN`, or hf-hub:ORG/REPO)"
        )
    beside = dict(RUN_WEIGHTS).get(path.name)  # RUN/backbone.safetensors named as a file: its backbone.json still counts
    card = ModelCard.read(path.parent / beside) if beside and (path.parent / beside).is_file() else None
    return Weights(path, card, _file_source(spec, path))


def _file_source(spec: str | os.PathLike, file: Path) -> dict[str, str]:
    return {"name": str(spec), "file": str(file.resolve()), "sha256": file_sha256(file)}


def _match_layout(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``state`` as is if its keys fit the model, else converted by timm's filter for that model."""
    expected = set(model.state_dict())
    if set(state) == expected:
        return state
    module = importlib.import_module(type(model).__module__)
    best, best_overlap = state, len(set(state) & expected)
    for fn_name in _FILTER_FUNCTIONS:
        fn = getattr(module, fn_name, None)
        if fn is None:
            continue
        try:
            takes_model = len(inspect.signature(fn).parameters) >= 2
            converted = fn(dict(state), model) if takes_model else fn(dict(state))
        except Exception:  # a converter for another layout than this file's
            continue
        overlap = len(set(converted) & expected)
        if overlap > best_overlap:
            best, best_overlap = converted, overlap
    return best


def _mismatch_message(path: Any, model: torch.nn.Module, missing: list[str], unexpected: list[str], wrong_shape: list[str]) -> str:
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
    lines = [f"weights in {path} do not fit {arch}:"]
    for title, keys in (("missing from the file", missing), ("in the file but not in the model", unexpected), ("different shapes", wrong_shape)):
        if keys:
            shown = ", ".join(keys[:12]) + (f" ... ({len(keys)} in all)" if len(keys) > 12 else "")
            lines.append(f"  {title}: {shown}")
    lines.append("Check that the file was saved from the same architecture (and variant) as --model.")
    return "\n".join(lines)


@dataclass
class ModelInfo:
    name: str
    params: int  # all parameters, with the default 1000-class head


def list_architectures(pattern: str = "*", with_params: bool | None = None) -> list[ModelInfo]:
    """timm architectures whose name matches the glob (or substring) ``pattern``.

    Parameter counts come from building each model on the "meta" device (shapes only, no memory,
    no weights); that still takes about 0.1 s a model, so by default (``with_params=None``) they
    are counted only when 100 or fewer architectures match, and left at -1 otherwise.
    """
    names = timm.list_models(pattern if any(c in pattern for c in "*?[") else f"*{pattern}*")
    if with_params is None:
        with_params = len(names) <= 100
    return [ModelInfo(name, count_params(name) if with_params else -1) for name in names]


def count_params(name: str) -> int:
    """Parameters of timm's ``name`` with its default head; -1 if it cannot be built on meta."""
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
    except Exception:  # a few architectures cannot be built on meta; they are listed without a count
        return -1


__all__ = ["ModelInfo", "Weights", "WeightsError", "classifier_keys", "create_model", "count_params", "list_architectures", "load_pretrained", "locate_weights", "read_state_dict", "resolve_weights"]
