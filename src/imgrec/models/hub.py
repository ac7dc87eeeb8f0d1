"""Pretrained weights by name, through the Hugging Face Hub's cache.

A name is a timm pretrained tag (``resnet50.a1_in1k``; a bare architecture, ``resnet50``, means
timm's default tag for it) or ``hf-hub:ORG/REPO[@REVISION]`` (a repository in timm's layout:
``config.json`` naming the architecture and its pretrained config, beside ``model.safetensors``
or ``pytorch_model.bin``). ``fetch_weights`` finds the file with ``huggingface_hub``, so the
hub's own rules hold: the cache under ``HF_HOME`` (or ``HF_HUB_CACHE``), ``HF_HUB_OFFLINE=1``,
tokens, mirrors. Offline and not cached is a ``WeightsError`` naming the weights and the command
that fetches them; every other failure of the hub is one too.

What comes back (``HubWeights``) is the local file, the architecture it loads into, its
preprocessing (timm's pretrained config: size, crop_pct, interpolation, mean, std) as a model
card, and where it came from (name, repository, revision, SHA-256) for the run's own card.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgrec.card import PREPROCESSING, ModelCard
from imgrec.config import INTERPOLATIONS, DataConfig
from imgrec.utils import file_sha256

HF_PREFIX = "hf-hub:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what a timm repository holds, preferred first


class WeightsError(ValueError):
    """Weights that cannot be found, fetched or loaded into the requested model."""


@dataclass
class HubWeights:
    name: str  # as the user gave it, a bare architecture completed with its default tag
    architecture: str  # the timm architecture the file loads into
    repo: str  # the hub repository
    path: Path  # the file in the local cache
    revision: str  # the repository's commit the file comes from
    card: ModelCard  # the architecture and the weights' preprocessing
    sha256: str = field(default="", repr=False)

    @property
    def source(self) -> dict[str, str]:
        """Where the weights came from, as the model card records it."""
        return {"name": self.name, "repo": self.repo, "revision": self.revision, "file": self.path.name, "sha256": self.sha256}


def is_weights_name(value: str | os.PathLike) -> bool:
    """Whether ``value`` names hub weights (and is not a local file or folder)."""
    text = str(value)
    if Path(text).exists():
        return False
    if text.startswith(HF_PREFIX):
        return True
    return _timm_cfg(text) is not None


def fetch_weights(name: str, *, cache_dir: str | os.PathLike | None = None, offline: bool | None = None) -> HubWeights:
    """The weights called ``name`` in the local hub cache, downloaded first unless offline."""
    offline = _offline() if offline is None else offline
    where = _hub_repository(name, cache_dir, offline) if name.startswith(HF_PREFIX) else _timm_tag(name)
    label, repo, revision, cfg, filenames = where
    if offline:  # the cached one of the candidate files, if any (the hub cannot be asked which exist)
        filenames = tuple(f for f in filenames if _cached_file(repo, f, revision, cache_dir)) or filenames[:1]
    for filename in filenames:
        try:
            path = Path(_download(label, repo, filename, revision, cache_dir, offline))
            break
        except _Missing:
            continue
    else:
        raise WeightsError(f"{label}: {repo} holds none of {', '.join(filenames)}")
    data = preprocessing_of(cfg)
    card = ModelCard(architecture=cfg["architecture"], data_config=DataConfig(**data), pretrained=label, stated=tuple(data))
    return HubWeights(label, cfg["architecture"], repo, path, _revision(path), card, file_sha256(path))


def _hub_repository(name: str, cache_dir: Any, offline: bool) -> tuple[str, str, str | None, dict[str, Any], tuple[str, ...]]:
    """``hf-hub:ORG/REPO[@REVISION]``: (label, repo, revision, pretrained config, weight files)."""
    repo, _, revision = name[len(HF_PREFIX) :].partition("@")
    try:
        config_file = _download(name, repo, "config.json", revision or None, cache_dir, offline)
    except _Missing:
        raise WeightsError(f"{name}: {repo} has no config.json, so its architecture is unknown: it is not a timm model repository") from None
    try:
        config = json.loads(Path(config_file).read_text(encoding="utf-8"))
        cfg = {**dict(config.get("pretrained_cfg") or {}), "architecture": str(config["architecture"])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise WeightsError(f"{name}: {repo}'s config.json is not a timm model config ({exc}); it needs 'architecture' and 'pretrained_cfg'") from None
    return name, repo, revision or None, cfg, WEIGHT_FILES


def _timm_tag(name: str) -> tuple[str, str, str | None, dict[str, Any], tuple[str, ...]]:
    """A timm tag or bare architecture: (label, repo, revision, pretrained config, weight files)."""
    found = _timm_cfg(name)
    if found is None:
        raise WeightsError(f"no pretrained weights called {name!r}: `imgrec weights list PATTERN` lists timm's tags (e.g. resnet50.a1_in1k), or pass a local file")
    label, cfg = found
    repo = cfg.get("hf_hub_id") or ""
    if not repo:
        raise WeightsError(f"{label}'s weights are not on the Hugging Face Hub (timm fetches them from {cfg.get('url') or 'elsewhere'}): download the file and pass its path")
    return label, repo, None, cfg, (cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename") else WEIGHT_FILES


def preprocessing_of(cfg: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing fields of a timm pretrained config (those it states)."""
    out: dict[str, Any] = {}
    if cfg.get("input_size"):
        out["img_size"] = int(cfg["input_size"][-1])
    if cfg.get("crop_pct") is not None:
        out["crop_pct"] = float(cfg["crop_pct"])
    if cfg.get("interpolation"):
        out["interpolation"] = cfg["interpolation"] if cfg["interpolation"] in INTERPOLATIONS else "bicubic"
    for key in ("mean", "std"):
        if cfg.get(key) is not None:
            out[key] = tuple(float(v) for v in cfg[key])
    return {k: v for k, v in out.items() if k in PREPROCESSING}


@dataclass
class TagInfo:
    name: str  # architecture.tag
    repo: str  # its hub repository ("" where timm fetches it from a URL)
    cached: bool  # its weights are in the local hub cache


def list_weights(pattern: str = "*", cache_dir: str | os.PathLike | None = None) -> list[TagInfo]:
    """timm's pretrained tags matching the glob (or substring) ``pattern``, each marked cached or
    not; no network."""
    import timm
    from timm.models import get_pretrained_cfg

    names = timm.list_pretrained(pattern if any(c in pattern for c in "*?[") else f"*{pattern}*")
    cached = cached_repos(cache_dir)
    out = []
    for name in names:
        cfg = get_pretrained_cfg(name)
        repo = (cfg.hf_hub_id or "") if cfg is not None else ""
        out.append(TagInfo(name, repo, bool(repo) and repo in cached))
    return out


def cached_repos(cache_dir: str | os.PathLike | None = None) -> set[str]:
    """The model repositories with at least one weights file in the local hub cache."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return set()
    return {
        repo.repo_id
        for repo in info.repos
        if repo.repo_type == "model" and any(f.file_name in WEIGHT_FILES or f.file_name.endswith((".safetensors", ".bin")) for r in repo.revisions for f in r.files)
    }


# -- the hub ------------------------------------------------------------------------------------------
class _Missing(Exception):
    """The repository exists but lacks this file (try the next name)."""


def _timm_cfg(name: str) -> tuple[str, dict[str, Any]] | None:
    """(architecture.tag, timm's pretrained config as a dict) for a tag or a bare architecture
    (its default tag), or None if timm knows no such weights."""
    from timm.models import get_pretrained_cfg, is_model

    if not name or any(c in name for c in "/\\*?[ "):
        return None
    architecture = name.split(".", 1)[0]
    if not is_model(architecture):
        return None
    try:
        cfg = get_pretrained_cfg(name)
    except (RuntimeError, ValueError):
        return None
    if cfg is None or (("." in name) and cfg.tag != name.split(".", 1)[1]):
        return None
    return f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture, cfg.to_dict() | {"architecture": cfg.architecture}


def _download(label: str, repo: str, filename: str, revision: str | None, cache_dir: Any, offline: bool) -> str:
    """``hf_hub_download``, with the hub's failures turned into errors that say what to do."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return hf_hub_download(repo, filename, revision=revision, cache_dir=cache_dir, local_files_only=offline)
    except LocalEntryNotFoundError:
        where = cache_dir or constants.HF_HUB_CACHE
        why = "offline mode is on (HF_HUB_OFFLINE)" if offline else "the Hugging Face Hub cannot be reached"
        raise WeightsError(
            f"pretrained weights {label} ({repo}) are not in the hub cache at {where} and {why}. "
            f"Fetch them where the network is reachable: `imgrec weights fetch {label}` (then copy that "
            f"machine's cache, HF_HOME, here), or pass a local weights file"
        ) from None
    except EntryNotFoundError:
        raise _Missing() from None
    except GatedRepoError:
        raise WeightsError(f"{label}: {repo} is gated: accept its terms on huggingface.co and log in (`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise WeightsError(f"{label}: no repository {repo} on the Hugging Face Hub (or it is private: log in with HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise WeightsError(f"{label}: {repo} has no revision {revision!r}") from None
    except (HfHubHTTPError, OSError) as exc:
        raise WeightsError(f"{label}: could not fetch {filename} from {repo}: {exc}") from None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _cached_file(repo: str, filename: str, revision: str | None, cache_dir: Any) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir, revision=revision)
    return found if isinstance(found, str) else None


def _revision(path: Path) -> str:
    """The commit of a file in the cache's layout (``.../snapshots/COMMIT/FILE``)."""
    return path.parent.name if path.parent.parent.name == "snapshots" else ""


__all__ = ["HF_PREFIX", "HubWeights", "TagInfo", "WeightsError", "cached_repos", "fetch_weights", "is_weights_name", "list_weights", "preprocessing_of"]
