"""WebDataset tar shards: write an ImageFolder as shards, read them back exactly once per epoch.

At scale, a million small files is the slow part of a dataset: every one costs an open and a
seek, and object stores charge per request. Shards are plain tar files of a few hundred MB to a
GB, read front to back (local disk, ``pipe:`` commands, s3://, gs://, http:// through fsspec).
The layout is WebDataset's, as timm and OpenCLIP read it: sample ``KEY`` is the members
``KEY.jpg`` (the image, re-encoded) and ``KEY.cls`` (the class index as ASCII text).
``OUT/classes.json`` holds the class names and ``OUT/shards.json`` the sample count per shard.

Reading splits the work exactly: in one epoch every sample is yielded by exactly one (rank,
DataLoader worker) pair, so an epoch is one pass over the data whatever the number of GPUs and
workers (see ``ShardDataset``). Shuffling is a seeded shard order plus a per-process shuffle
buffer, both fixed by (seed, epoch), so a run can be repeated and resumed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import braceexpand
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen, gopen_schemes
from webdataset.tariterators import group_by_keys, tar_file_expander

from imgrec import distributed
from imgrec.data.decode import DEFAULT_MAX_PIXELS, BadImageError, EncodedImage, load_sample
from imgrec.data.folder import DatasetError, SkipLog, seeded_augmentation

SHARD_NAME = "shard-{:06d}.tar"
SHARD_NAME_RE = re.compile(r"shard-\d{6}\.tar")
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
LABEL_MEMBERS = ("cls", "label")


# --- finding shards ------------------------------------------------------------------------------


def _scheme(url: str) -> str:
    """The URL scheme, or "" for a local path (a one-letter scheme is a Windows drive)."""
    scheme = urlparse(url).scheme
    return scheme if len(scheme) > 1 else ""


def is_shard_source(source: str | os.PathLike | Sequence[str]) -> bool:
    """Whether ``source`` names shards rather than an ImageFolder: a folder holding shards.json or
    ``*.tar`` files, a ``.tar`` path, a brace pattern, a ``pipe:`` command or a URL with a scheme."""
    if isinstance(source, (list, tuple)):
        return bool(source) and all(is_shard_source(s) for s in source)
    text = os.fspath(source)
    if "::" in text:
        return all(is_shard_source(part) for part in text.split("::"))
    if _scheme(text) or re.search(r"\{[^{}]*(\.\.|,)[^{}]*\}", text) or text.lower().endswith((".tar", ".tgz", ".tar.gz")):
        return True
    folder = Path(text)
    return folder.is_dir() and ((folder / "shards.json").is_file() or any(_local_tars(folder)))


def _local_tars(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.tar") if not p.name.startswith(".") and p.is_file())


def list_shards(source: str | os.PathLike | Sequence[str]) -> list[str]:
    """The shard URLs or paths of ``source``, sorted: a folder's shards (as listed in its
    shards.json, else its ``*.tar`` files), or the brace-expanded pattern(s) (``::`` separates several)."""
    if isinstance(source, (list, tuple)):
        return sorted(url for item in source for url in list_shards(item))
    text = os.fspath(source)
    folder = Path(text)
    if not _scheme(text) and folder.is_dir():
        meta = _read_json(str(folder / "shards.json"))
        urls = [str(folder / s["name"]) for s in meta["shards"]] if meta else [str(p) for p in _local_tars(folder)]
        if not urls:
            raise DatasetError(f"no shards in {folder}: expected shard-NNNNNN.tar files (write them with `imgrec shards`)")
        return sorted(urls)
    return sorted(url for part in text.split("::") for url in braceexpand.braceexpand(part))


def open_url(url: str) -> IO[bytes]:
    """A binary stream of a local path, ``file:`` or ``pipe:`` URL (webdataset's ``gopen``), or
    any URL fsspec can open (s3://, gs://, ...); where fsspec lacks the backend (s3fs, gcsfs,
    aiohttp), webdataset's own handler if it has one (curl for http(s), gsutil for gs)."""
    scheme = _scheme(url)
    if scheme in ("", "file", "pipe"):
        return gopen(url, "rb")
    import fsspec

    try:
        return fsspec.open(url, "rb").open()
    except ImportError:  # fsspec's message names the package to install
        if scheme in gopen_schemes:
            return gopen(url, "rb")
        raise


def _shard_location(url: str) -> tuple[str, str] | None:
    """(folder or URL prefix, file name) of a shard; for a ``pipe:`` command, of the ``.tar`` in it."""
    if url.startswith("pipe:"):
        tars = [t for t in shlex.split(url[5:]) if re.search(r"\.(tar|tgz|tar\.gz)$", t)]
        if not tars:
            return None
        url = tars[-1]
    if _scheme(url) in ("", "file"):
        path = Path(url.removeprefix("file://"))
        return str(path.parent), path.name
    prefix, _, name = url.rpartition("/")
    return prefix, name


def _read_json(url: str) -> dict[str, Any] | None:
    """A JSON file next to the shards, or None if it is not there (or cannot be reached)."""
    try:
        if not _scheme(url):
            return json.loads(Path(url).read_text(encoding="utf-8")) if Path(url).is_file() else None
        with open_url(url) as f:
            return json.loads(f.read())
    except (OSError, ValueError, ImportError):
        return None


def _join(prefix: str, name: str) -> str:
    return str(Path(prefix, name)) if not _scheme(prefix) else f"{prefix}/{name}"


# --- reading -------------------------------------------------------------------------------------


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, or (0, 1) when it is not initialised: how this
    module splits its shards (the tests stand in for it to simulate several ranks)."""
    return distributed.rank(), distributed.world_size()


def _rng(*parts: Any) -> random.Random:
    # A string seed is hashed with SHA-512: the same stream in every process and Python run.
    return random.Random("imgrec-shards/" + "/".join(map(str, parts)))


def shuffle_buffer(samples: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """``samples`` shuffled through a buffer of ``size``: each output is a random pick of the buffer."""
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = sample
    rng.shuffle(buffer)
    yield from buffer


class ShardDataset(IterableDataset):
    """(image, label) samples of WebDataset shards, each sample once per epoch across all processes.

    ``source``: a folder written by ``write_shards``, a brace pattern (``dir/shard-{000000..000099}.tar``),
    a ``pipe:`` command, an fsspec URL, or a list of these. Class names and sample counts come
    from classes.json and shards.json next to the shards; pass ``classes`` and ``length`` where
    there are none. ``transform`` gets the RGB PIL image (or, if it ``takes_source``, the encoded
    bytes: images stay bytes until then). A bad image or an incomplete sample is recorded in
    ``skip_log`` and left out.

    Exactly once: with R ranks (torch.distributed) and W DataLoader workers there are S = R*W
    splits; this process is split ``rank*W + worker``. With at least S shards, the shard list
    (shuffled by (seed, epoch) the same way in every process) is dealt round-robin, shard i to
    split i % S. With fewer shards, every split reads every shard and keeps the samples whose
    index in the stream is its own modulo S (each process then reads all the bytes: write at
    least as many shards as ranks x workers). Either way the splits partition the epoch; they
    may differ in size by up to a shard, so a DDP loop must stop all ranks at the same step.

    ``shuffle`` > 0 shuffles the shard order and then the samples through a buffer of that many
    samples, seeded by (seed, epoch, split); 0 reads the shards in stored order. Call
    ``set_epoch`` before each epoch's ``iter(loader)``; with persistent workers the workers keep
    the epoch they started with, so use ``persistent_workers=False`` for a new order per epoch.
    """

    def __init__(
        self,
        source: str | os.PathLike | Sequence[str],
        transform: Callable[[Any], Any] | None = None,
        *,
        classes: list[str] | None = None,
        shuffle: int = 0,
        seed: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        skip_log: SkipLog | None = None,
        length: int | None = None,
    ):
        self.source = source if isinstance(source, (list, tuple)) else os.fspath(source)
        self.shards = list_shards(source)
        if not self.shards:
            raise DatasetError(f"no shards in {source!r}")
        missing = [url for url in self.shards if not _scheme(url) and not Path(url).is_file()]
        if missing:
            raise DatasetError(f"{len(missing)} shard file(s) do not exist, e.g. {missing[0]}: check the path or pattern")
        names, self.shard_samples = self._read_metadata() if classes is None or length is None else (None, {})
        counted = all(url in self.shard_samples for url in self.shards)
        self.classes = list(classes) if classes is not None else names
        self.length = length if length is not None else sum(map(self.shard_samples.get, self.shards)) if counted else None
        if self.classes is None or self.length is None:
            what = " and ".join(n for n, v in (("classes=[names...]", self.classes), ("length=N", self.length)) if v is None)
            raise DatasetError(
                f"no classes.json/shards.json next to the shards of {source!r}: pass {what}, "
                f"or put the files `imgrec shards` writes next to the shards"
            )
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.transform = transform
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.skipped_batches, self.batch_size = 0, 1
        self.max_pixels = max_pixels
        self.skip_log = skip_log if skip_log is not None else SkipLog()

    def _read_metadata(self) -> tuple[list[str] | None, dict[str, int]]:
        """Class names (from classes.json) and the samples per shard (shards.json), where the files say."""
        folders: dict[str, tuple[list[str] | None, dict[str, int]]] = {}
        samples: dict[str, int] = {}
        for url in self.shards:
            location = _shard_location(url)
            if location is None:
                continue
            prefix, name = location
            if prefix not in folders:
                index, meta = _read_json(_join(prefix, "classes.json")), _read_json(_join(prefix, "shards.json"))
                counts = {s["name"]: int(s["samples"]) for s in meta["shards"]} if meta else {}
                folders[prefix] = (index["classes"] if index else None, counts)
            if name in folders[prefix][1]:
                samples[url] = folders[prefix][1][name]
        class_lists = {tuple(names) for names, _ in folders.values() if names is not None}
        if len(class_lists) > 1:
            raise DatasetError(f"the shards of {self.source!r} come with different classes.json files: pass classes=[...]")
        return (list(class_lists.pop()) if class_lists else None), samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.skipped_batches = epoch, 0

    def __len__(self) -> int:
        return self.length

    def _split(self) -> tuple[int, int]:
        """(this process' split, number of splits) over distributed ranks and DataLoader workers."""
        rank, world = distributed_rank_world()
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return rank * workers + worker, world * workers

    def epoch_shards(self, epoch: int) -> list[str]:
        """The shard order of ``epoch``: shuffled by (seed, epoch) when shuffling, identical in every process."""
        shards = list(self.shards)
        if self.shuffle > 0:
            _rng("shards", self.seed, epoch).shuffle(shards)
        return shards

    def split_sizes(self, epoch: int, splits: int) -> list[int]:
        """Samples each of ``splits`` readers gets in ``epoch`` (bad samples aside), from the shards'
        counts in shards.json; an even share of ``len(self)`` where the counts are unknown."""
        counts = [self.shard_samples.get(url) for url in self.epoch_shards(epoch)]
        if None in counts or len(counts) < splits:
            total = sum(counts) if None not in counts else self.length
            return [total // splits + (1 if i < total % splits else 0) for i in range(splits)]
        return [sum(counts[i::splits]) for i in range(splits)]

    def full_batches(self, batch_size: int, workers: int, epochs: range) -> int:
        """Batches that every rank gets in every epoch of ``epochs``, when each of its ``workers``
        DataLoader workers drops its own last partial batch: the steps an epoch can promise."""
        _, world = distributed_rank_world()
        workers = max(1, workers)
        fewest = None
        for epoch in epochs:
            sizes = self.split_sizes(epoch, world * workers)
            for rank in range(world):
                batches = sum(n // batch_size for n in sizes[rank * workers : (rank + 1) * workers])
                fewest = batches if fewest is None else min(fewest, batches)
        return fewest or 0

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        split, splits = self._split()
        workers = splits // distributed_rank_world()[1]
        if self.skipped_batches:  # see ``skip``: this worker continues the stream of worker (id + skipped) mod W
            split = split - split % workers + (split % workers + self.skipped_batches) % workers
        shards = self.epoch_shards(self.epoch)
        if len(shards) >= splits:
            samples: Iterable[dict[str, Any]] = read_shards(shards[split::splits], self._skip_shard)
        else:
            samples = islice(read_shards(shards, self._skip_shard), split, None, splits)
        if self.shuffle > 0:
            samples = shuffle_buffer(samples, self.shuffle, _rng("samples", self.seed, self.epoch, split))
        skip = len(range(split % workers, self.skipped_batches, workers)) * self.batch_size
        for position, sample in enumerate(samples):
            if position < skip:  # read before a mid-epoch resume: left out undecoded
                continue
            with seeded_augmentation(self.seed, self.epoch, split, position):
                item = self._load(sample)
            if item is not None:
                yield item

    def skip(self, batches: int, batch_size: int) -> None:
        """Leave out, this epoch, the samples of the first ``batches`` batches this rank's loader
        gave before a mid-epoch resume. The loader takes batch i from worker i mod W, starting
        with worker 0: so a resumed worker w reads the stream of worker (w + batches) mod W, and
        each skips its own share, counted in samples read. Exact unless some of those samples
        were unreadable or a worker's split ran dry before the resume point (then a few samples
        are read twice or not at all; the epoch goes on)."""
        self.skipped_batches, self.batch_size = batches, batch_size

    def _skip_shard(self, url: str, exc: Exception) -> None:
        self.skip_log.record(url, f"unreadable shard, the rest of it skipped: {type(exc).__name__}: {exc}")

    def _load(self, sample: dict[str, Any]) -> tuple[Any, int] | None:
        name = f"{sample['__url__']}:{sample['__key__']}"
        image_ext = next((ext for ext in IMAGE_MEMBERS if ext in sample), None)
        label_ext = next((ext for ext in LABEL_MEMBERS if ext in sample), None)
        if image_ext is None or label_ext is None:
            missing = "an image (.jpg/.jpeg/.png/.webp)" if image_ext is None else "a label (.cls/.label)"
            self.skip_log.record(name, f"incomplete sample: no {missing} member in the shard")
            return None
        try:
            label = int(sample[label_ext].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            self.skip_log.record(name, f"label {sample[label_ext][:20]!r} is not an integer class index")
            return None
        if not 0 <= label < len(self.classes):
            self.skip_log.record(name, f"label {label} is out of range for {len(self.classes)} classes")
            return None
        try:
            image = load_sample(EncodedImage(f"{name}.{image_ext}", sample[image_ext]), self.transform, self.max_pixels)
        except BadImageError as exc:
            self.skip_log.record(exc.path, exc.reason)
            return None
        return image, label

    def __repr__(self) -> str:
        return f"ShardDataset({self.source!r}, {len(self.shards)} shards, {self.length} samples, {len(self.classes)} classes)"


def read_shards(urls: Iterable[str], on_error: Callable[[str, Exception], None] | None = None) -> Iterator[dict[str, Any]]:
    """The raw samples ({"__key__", "__url__", ext: bytes}) of each shard in turn; nothing is decoded.

    A shard that cannot be opened or read to the end (truncated, corrupt, a dropped connection)
    is passed to ``on_error`` with the exception and the next shard is read; without
    ``on_error`` the exception propagates.
    """
    for url in urls:
        try:
            with open_url(url) as stream:
                yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
        except (tarfile.TarError, OSError, ValueError) as exc:
            if on_error is None:
                raise
            on_error(url, exc)
