"""Any ``nn.Module`` as the model: a class named by import path, or a module object.

A spec names a class: ``path/to/file.py:Net`` (a file, imported under a private name) or
``package.module:Net`` (imported as usual); ``model_args`` (a JSON object) are its constructor's
keyword arguments, with ``num_classes`` added where the constructor takes it and it is not given.
The model directory records the spec and the arguments beside the weights, so ``imgrec.load``,
predict, evaluate, export, benchmark and serve rebuild the same module.

A module object (``imgrec.train(model=Net(...))``) is trained as it is; its spec is its class's
import path (a script run as ``__main__`` is named by its file), and ``model_args`` say how to
build it again. A class built by ``nn.Sequential(...)`` or with arguments imgrec cannot know is
recorded as what it is: ``nn.Sequential`` layers are described layer by layer (``sequential_spec``),
any other needs ``model_args``; a module that cannot be rebuilt is refused before training.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import torch

SEQUENTIAL = "torch.nn:Sequential"


class ModelSpecError(ValueError):
    """A model spec that cannot be imported or built, or a module that does not give logits."""


def is_custom_spec(name: str) -> bool:
    """Whether ``name`` names a class (``file.py:Class`` or ``module:Class``) rather than a timm model."""
    return isinstance(name, str) and ":" in name and not name.startswith(("hf-hub:", "hf_hub:", "timm/"))


def import_class(spec: str) -> type:
    """The class ``spec`` names, or a ``ModelSpecError`` saying why it cannot be had."""
    where, _, qualname = spec.rpartition(":")
    if not where or not qualname:
        raise ModelSpecError(f"model {spec!r}: expected path/to/file.py:ClassName or package.module:ClassName")
    if where.endswith(".py"):
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise ModelSpecError(f"model {spec!r}: no file {path}")
        name = f"imgrec_user_model_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
        module = sys.modules.get(name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            try:
                loader_spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[name]
                raise ModelSpecError(f"model {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise ModelSpecError(f"model {spec!r}: cannot import {where} ({type(exc).__name__}: {exc}); is it on PYTHONPATH?") from None
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise ModelSpecError(f"model {spec!r}: {where} has no {qualname}")
    if not (isinstance(found, type) and issubclass(found, torch.nn.Module)):
        raise ModelSpecError(f"model {spec!r}: {qualname} is not a torch.nn.Module class")
    return found


def build_custom(spec: str, num_classes: int, model_args: dict[str, Any] | None = None) -> torch.nn.Module:
    """The module ``spec`` with ``model_args`` (``num_classes`` added where its constructor takes it)."""
    args = dict(model_args or {})
    if spec == SEQUENTIAL:
        return sequential_from_layers(args.get("layers") or [])
    cls = import_class(spec)
    try:
        parameters = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        parameters = {}
    if "num_classes" in parameters and "num_classes" not in args:
        args["num_classes"] = num_classes
    try:
        return cls(**args)
    except Exception as exc:
        raise ModelSpecError(f"model {spec!r} with arguments {json.dumps(args)} could not be built: {type(exc).__name__}: {exc}") from None


def describe(module: torch.nn.Module, model_args: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(spec, model_args) that rebuild ``module``'s architecture in another process."""
    cls = type(module)
    if cls is torch.nn.Sequential:
        return SEQUENTIAL, {"layers": sequential_layers(module)}
    if cls.__module__ == "__main__":
        main_file = getattr(sys.modules["__main__"], "__file__", None)
        if not main_file:
            raise ModelSpecError(
                f"{cls.__qualname__} is defined in an interactive session: move it to a file and pass model='that_file.py:{cls.__qualname__}'"
            )
        spec = f"{Path(main_file).resolve()}:{cls.__qualname__}"
    elif cls.__module__.startswith("imgrec_user_model_"):
        spec = f"{Path(sys.modules[cls.__module__].__file__).resolve()}:{cls.__qualname__}"
    else:
        spec = f"{cls.__module__}:{cls.__qualname__}"
    if "<locals>" in cls.__qualname__:
        raise ModelSpecError(f"{cls.__qualname__} is defined inside a function: define it at the top level of a module so it can be rebuilt")
    args = dict(model_args or {})
    if not args:
        required = [
            name for name, p in inspect.signature(cls.__init__).parameters.items()
            if name != "self" and p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]  # fmt: skip
        if required:
            raise ModelSpecError(f"{cls.__qualname__}({', '.join(required)}) takes arguments: pass them as model_args={{...}} so the model can be rebuilt")
    return spec, args


# -- nn.Sequential of standard layers, layer by layer ----------------------------------------------------
def sequential_layers(module: torch.nn.Sequential) -> list[dict[str, Any]]:
    """Each layer of a Sequential as {"type": import path, "args": constructor arguments}."""
    layers = []
    for layer in module:
        if isinstance(layer, torch.nn.Sequential):
            layers.append({"type": SEQUENTIAL, "layers": sequential_layers(layer)})
            continue
        args = _layer_args(layer)
        if args is None:
            raise ModelSpecError(
                f"layer {type(layer).__name__} of the nn.Sequential cannot be described: write the model as a class in a file and pass model='file.py:Net'"
            )
        layers.append({"type": f"{type(layer).__module__}:{type(layer).__qualname__}", "args": args})
    return layers


def sequential_from_layers(layers: list[dict[str, Any]]) -> torch.nn.Sequential:
    built = []
    for layer in layers:
        if layer["type"] == SEQUENTIAL:
            built.append(sequential_from_layers(layer["layers"]))
        else:
            built.append(import_class(layer["type"])(**layer["args"]))
    return torch.nn.Sequential(*built)


def _layer_args(layer: torch.nn.Module) -> dict[str, Any] | None:
    """The constructor arguments of a torch.nn layer, read back from its attributes (those that
    keep their argument's name, as torch.nn's layers do); None if one cannot be read."""
    if not type(layer).__module__.startswith("torch.nn"):
        return None
    args: dict[str, Any] = {}
    for name, p in inspect.signature(type(layer).__init__).parameters.items():
        if name in ("self", "device", "dtype") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name == "bias" and hasattr(layer, "bias"):
            args["bias"] = layer.bias is not None if isinstance(layer.bias, torch.Tensor | type(None)) else bool(layer.bias)
            continue
        if not hasattr(layer, name):
            if p.default is inspect.Parameter.empty:
                return None
            continue
        value = getattr(layer, name)
        if isinstance(value, torch.Tensor | torch.nn.Module) or callable(value):
            if p.default is inspect.Parameter.empty:
                return None
            continue
        args[name] = list(value) if isinstance(value, tuple) else value
    return args


# Module objects handed to ``imgrec.train``, by spec, until the run builds its model (the object
# itself is trained, not a rebuilt copy; a later process rebuilds it from the spec).
_INSTANCES: dict[str, torch.nn.Module] = {}


def register_instance(module: torch.nn.Module, model_args: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(spec, model_args) of ``module``, which ``take_instance(spec)`` then hands to the run."""
    spec, args = describe(module, model_args)
    _INSTANCES[spec] = module
    return spec, args


def take_instance(spec: str) -> torch.nn.Module | None:
    return _INSTANCES.pop(spec, None)


def check_logits(model: torch.nn.Module, num_classes: int, size: int, name: str) -> None:
    """A clear error before training when ``model`` does not map [2, 3, size, size] to [2, num_classes]."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, 3, size, size))
    except Exception as exc:
        raise ModelSpecError(f"model {name} failed on a [2, 3, {size}, {size}] batch: {type(exc).__name__}: {exc}") from None
    finally:
        model.train(was_training)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != (2, num_classes):
        raise ModelSpecError(
            f"model {name} maps a [2, 3, {size}, {size}] batch to {shape}; a classifier of these {num_classes} classes must give "
            f"[2, {num_classes}] logits (one per class, before softmax)"
        )


__all__ = [
    "SEQUENTIAL", "ModelSpecError", "build_custom", "check_logits", "describe", "import_class", "is_custom_spec", "register_instance",
    "sequential_from_layers", "sequential_layers", "take_instance",
]  # fmt: skip
