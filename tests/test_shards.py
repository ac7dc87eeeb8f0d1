"""WebDataset shards: writing an ImageFolder, reading it back exactly once per epoch, shuffling, URLs, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader
from webdataset import TarWriter

from imagefiles import jpeg_bytes
from imgrec.cli import main
from imgrec.data import shards as shards_module
from imgrec.data.decode import load_rgb
from imgrec.data.decode_crop import CenterCropDecode
from imgrec.data.folder import DatasetError, SkipLog, read_class_index, scan_image_folder, write_class_index
from imgrec.data.shard_writer import parse_size, shrink, write_shards
from imgrec.data.shards import ShardDataset, is_shard_source, list_shards

CLASSES = ("apple", "boat", "cat")
MAX_SIDE = 64
SHARD_SIZE = 12_000  # a tar is at least 10 KiB: this holds two or three 64 px JPEGs


def smooth_image(width: int, height: int, seed: int) -> Image.Image:
    """A distinct, smooth picture: JPEG re-encoding changes it by about a grey level, not more."""
    coarse = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BICUBIC)


def make_folder(root: Path) -> tuple[Path, Path]:
    """3 classes, 20 images of 40-90 px (JPEGs, a PNG, a CMYK JPEG) and one broken file (returned)."""
    sizes = [(90, 60), (40, 30), (70, 90), (64, 50), (85, 85), (50, 80), (90, 45)]
    for i in range(20):
        folder = root / CLASSES[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        image = smooth_image(*sizes[i % len(sizes)], seed=i)
        if i == 4:
            image.save(folder / f"img{i:02d}.png")
        elif i == 5:
            image.convert("CMYK").save(folder / f"img{i:02d}.jpg", quality=95)
        else:
            image.save(folder / f"img{i:02d}.jpg", quality=95)
    broken = root / CLASSES[1] / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all\n" * 10)
    return root, broken


class SourceName:
    """A transform that does not decode: it returns the sample's name (shard URL, key, member)."""

    takes_source = True

    def __call__(self, source, max_pixels):
        return source.name


class KeyAndDigest:
    """The member name without the shard URL, and a digest of the stored bytes."""

    takes_source = True

    def __call__(self, source, max_pixels):
        return source.name.rsplit(":", 1)[1], hashlib.md5(source.data).hexdigest()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    base = tmp_path_factory.mktemp("shards")
    src, broken = make_folder(base / "folder")
    info = write_shards(src, base / "out", max_side=MAX_SIDE, shard_size=SHARD_SIZE, workers=1)
    return src, base / "out", info, broken


def stored_samples(urls: list[str]) -> list[tuple[str, int]]:
    """(``url:key.jpg``, label) of every sample in the tars, in stored order, read with plain tarfile."""
    samples = []
    for url in urls:
        with tarfile.open(url) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(members):
            if name.endswith(".jpg"):
                key = name[: -len(".jpg")]
                samples.append((f"{url}:{name}", int(members[key + ".cls"])))
    return samples


# ----------------------------------------------------------------------------- writing


def test_round_trip_matches_the_folder(written):
    src, out, _, broken = written
    samples, classes = scan_image_folder(src)
    good = [(path, label) for path, label in samples if path != str(broken)]
    expected = [(np.asarray(shrink(load_rgb(path), MAX_SIDE), dtype=np.int16), label) for path, label in good]

    dataset = ShardDataset(out)
    assert dataset.classes == classes and dataset.class_to_idx == {name: i for i, name in enumerate(classes)}
    assert len(dataset) == len(good) == 20
    yielded = list(dataset)
    assert len(yielded) == len(good)
    matched = set()
    for image, label in yielded:
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        array = np.asarray(image, dtype=np.int16)
        diffs = [np.abs(array - e).mean() if e.shape == array.shape else np.inf for e, _ in expected]
        best = int(np.argmin(diffs))
        assert diffs[best] < 3, f"no folder image matches within 3 grey levels (best {diffs[best]:.1f})"
        assert label == expected[best][1]
        matched.add(best)
    assert matched == set(range(len(good)))  # every folder image exactly once
    assert len(dataset.skip_log) == 0


def test_metadata_files(written, tmp_path):
    _, out, info, broken = written
    meta = json.loads((out / "shards.json").read_text())
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert meta["classes"] == 3 and meta["samples"] == 20 == info.samples
    assert [s["name"] for s in meta["shards"]] == tars == [f"shard-{i:06d}.tar" for i in range(len(tars))]
    assert len(tars) >= 6  # shard_size split the 20 images
    for shard in meta["shards"]:
        size = (out / shard["name"]).stat().st_size
        assert shard["bytes"] == size and (size <= SHARD_SIZE or shard["samples"] == 1)
        assert len(stored_samples([str(out / shard["name"])])) == shard["samples"]
    assert (meta["max_side"], meta["quality"]) == (MAX_SIDE, 90)
    assert [s["path"] for s in meta["skipped"]] == [str(broken)] and meta["skipped"][0]["reason"]
    write_class_index(tmp_path / "expected.json", list(CLASSES))
    assert (out / "classes.json").read_bytes() == (tmp_path / "expected.json").read_bytes()
    assert not list(out.glob(".*"))  # no temporary files left behind
    # each shard mixes classes (written in a seeded random order, not class by class)
    assert sum(len({label for _, label in stored_samples([str(out / s["name"])])}) > 1 for s in meta["shards"]) >= len(tars) // 2


def test_output_does_not_depend_on_workers_and_stale_shards_go(written, tmp_path):
    src, out, info, _ = written
    stale = tmp_path / "out" / "shard-000099.tar"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    parallel = write_shards(src, tmp_path / "out", max_side=MAX_SIDE, shard_size=SHARD_SIZE, workers=2)
    assert parallel.shards == info.shards and not stale.exists()
    for shard in info.shards:
        assert (tmp_path / "out" / shard["name"]).read_bytes() == (out / shard["name"]).read_bytes()


def test_max_side_shrinks_and_never_enlarges(written):
    assert shrink(Image.new("RGB", (200, 100)), 64).size == (64, 32)
    assert shrink(Image.new("RGB", (2000, 20)), 64).size == (64, 1)
    small = Image.new("RGB", (40, 30))
    assert shrink(small, 64) is small
    sizes = {image.size for image, _ in ShardDataset(written[1])}
    assert max(max(size) for size in sizes) == MAX_SIDE
    assert (40, 30) in sizes and (64, 50) in sizes  # left as they were


def test_class_index_fixes_the_indices(written, tmp_path):
    src = shutil.copytree(written[0], tmp_path / "folder")
    write_class_index(tmp_path / "classes.json", ["cat", "boat", "apple", "zebra"])
    (src / "zebra").mkdir()
    smooth_image(50, 50, 99).save(src / "zebra" / "z.jpg")
    info = write_shards(src, tmp_path / "out", max_side=MAX_SIDE, classes=tmp_path / "classes.json", workers=1)
    assert info.classes == read_class_index(tmp_path / "out" / "classes.json") == ["cat", "boat", "apple", "zebra"]
    labels = Counter(label for _, label in stored_samples(list_shards(tmp_path / "out")))
    assert labels == {0: 6, 1: 7, 2: 7, 3: 1}  # img02, img05... are cats, index 0 now; the broken boat is skipped


@pytest.mark.parametrize(
    "text, size",
    [
        ("1GB", 10**9),
        ("500MB", 500 * 10**6),
        ("64KiB", 65536),
        ("20KB", 20_000),
        ("1.5 GiB", 3 * 2**29),
        ("4096", 4096),
        ("2mb", 2 * 10**6),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "1 GBB", "-5MB", "0", "ten MB", "1e9"])
def test_parse_size_errors_name_the_value(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_size(text)


# ----------------------------------------------------------------------------- reading: exactly once


def read_epoch(dataset: ShardDataset, workers: int) -> list[tuple[str, int]]:
    return [(name, int(label)) for name, label in DataLoader(dataset, batch_size=None, num_workers=workers)]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine
@pytest.mark.parametrize("few", [False, True], ids=["many-shards", "fewer-shards-than-splits"])
@pytest.mark.parametrize("shuffle", [0, 4])
def test_every_sample_exactly_once(written, monkeypatch, few, shuffle):
    out = written[1]
    source = str(out / "shard-{000000..000001}.tar") if few else str(out)
    everything = Counter(stored_samples(list_shards(source)))
    dataset = ShardDataset(source, SourceName(), shuffle=shuffle, seed=3)
    assert len(dataset) == sum(everything.values())
    dataset.set_epoch(1)
    for workers in (0, 1, 2, 3):
        assert Counter(read_epoch(dataset, workers)) == everything, f"{workers} workers"
    for world in (2, 3):  # simulated ranks x 2 workers: with 2 shards, 4 and 6 splits
        union: Counter = Counter()
        for rank in range(world):
            monkeypatch.setattr(shards_module, "distributed_rank_world", lambda rank=rank, world=world: (rank, world))
            part = Counter(read_epoch(dataset, 2))
            assert part, f"rank {rank} of {world} got nothing"
            union += part
        assert union == everything, f"{world} ranks"


def test_shuffle_is_seeded_by_epoch_and_zero_keeps_stored_order(written):
    out = written[1]
    stored = [name for name, _ in stored_samples(list_shards(out))]
    assert [name for name, _ in ShardDataset(out, SourceName())] == stored

    def order(epoch: int, seed: int = 0) -> list[str]:
        dataset = ShardDataset(out, SourceName(), shuffle=5, seed=seed)
        dataset.set_epoch(epoch)
        return [name for name, _ in dataset]

    first = order(0)
    assert sorted(first) == sorted(stored) and first != stored
    assert order(0) == first
    assert order(1) != first and sorted(order(1)) == sorted(stored)
    assert order(0, seed=1) != first


def test_brace_pattern_pipe_and_fsspec_url_read_the_same_samples(written):
    out = written[1]
    count = len(list(out.glob("*.tar")))
    pattern = str(out / f"shard-{{000000..{count - 1:06d}}}.tar")
    folder = list(ShardDataset(out, KeyAndDigest()))
    memory = fsspec.filesystem("memory")  # stands in for s3:// or gs://: opened through fsspec
    for path in out.iterdir():
        memory.pipe(f"/imgrec-test/{path.name}", path.read_bytes())
    remote = f"memory://imgrec-test/shard-{{000000..{count - 1:06d}}}.tar"
    for source in (pattern, f"pipe:cat {pattern}", f"file://{pattern}", remote):
        assert is_shard_source(source)
        dataset = ShardDataset(source, KeyAndDigest())
        assert len(list_shards(source)) == count and len(dataset) == len(folder) and dataset.classes == list(CLASSES)
        assert list(dataset) == folder, source
    memory.rm("/imgrec-test", recursive=True)


def test_source_detection(written, tmp_path):
    src, out = written[0], written[1]
    assert is_shard_source(out) and is_shard_source(str(out / "shard-000000.tar"))
    assert is_shard_source("s3://bucket/train/shard-{000000..000099}.tar") and is_shard_source("pipe:curl -s http://x/a.tar")
    assert not is_shard_source(src) and not is_shard_source(tmp_path / "nothing-here")
    assert list_shards("a/shard-{000..002}.tar::b/x.tar") == ["a/shard-000.tar", "a/shard-001.tar", "a/shard-002.tar", "b/x.tar"]
    with pytest.raises(DatasetError, match="do not exist"):
        ShardDataset(str(tmp_path / "shard-{0..3}.tar"))


def test_bad_and_incomplete_samples_are_skipped_and_logged(tmp_path):
    good = io.BytesIO()
    smooth_image(30, 20, 1).save(good, "PNG")
    with TarWriter(str(tmp_path / "odd.tar"), encoder=False) as tar:
        tar.write({"__key__": "a", "png": good.getvalue(), "label": b"1"})
        tar.write({"__key__": "b", "jpg": b"garbage" * 20, "cls": b"0"})
        tar.write({"__key__": "c", "jpg": good.getvalue()})  # no label
        tar.write({"__key__": "d", "cls": b"0"})  # no image
        tar.write({"__key__": "e", "jpeg": good.getvalue(), "cls": b"7"})  # out of range
        tar.write({"__key__": "f", "webp": good.getvalue(), "cls": b"x"})  # not a number
    url = str(tmp_path / "odd.tar")
    with pytest.raises(DatasetError, match="classes="):
        ShardDataset(url)
    log = SkipLog(tmp_path / "skipped.jsonl")
    dataset = ShardDataset(url, classes=["x", "y"], length=6, skip_log=log)
    ((image, label),) = list(dataset)
    assert label == 1 and image.size == (30, 20)
    reasons = log.entries()
    assert set(reasons) == {f"{url}:b.jpg", f"{url}:c", f"{url}:d", f"{url}:e", f"{url}:f"}
    assert "not an image" in reasons[f"{url}:b.jpg"] and "label" in reasons[f"{url}:c"]
    assert "image" in reasons[f"{url}:d"] and "out of range" in reasons[f"{url}:e"]


def write_tar(path: Path, samples: list[tuple[str, bytes, int]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, jpg, label in samples:
            for ext, data in (("jpg", jpg), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_a_truncated_shard_is_logged_and_skipped_not_fatal(tmp_path: Path) -> None:
    jpg = jpeg_bytes(smooth_image(24, 20, 0), quality=95)
    folder = tmp_path / "shards"
    folder.mkdir()
    write_tar(folder / "shard-000000.tar", [(f"{i:04d}", jpg, i % 2) for i in range(3)])
    write_tar(folder / "shard-000001.tar", [(f"{i:04d}", jpg, i % 2) for i in range(3, 6)])
    damaged = folder / "shard-000001.tar"
    damaged.write_bytes(damaged.read_bytes()[:700])  # cut inside the first member's data
    dataset = ShardDataset(folder, CenterCropDecode(8), classes=["a", "b"], length=6)
    items = list(dataset)  # raises tarfile.ReadError today
    assert len(items) >= 3 and len(dataset.skip_log) >= 1


# ----------------------------------------------------------------------------- resuming mid-epoch


def names(batch):
    return [name for name, _ in batch]


@pytest.fixture(scope="module")
def synth_shards(tmp_path_factory) -> Path:
    from imgrec.data.synth import SynthSpec, write_synth_dataset

    data = write_synth_dataset(tmp_path_factory.mktemp("synth"), SynthSpec(classes=3, train_per_class=16, val_per_class=5, seed=6, min_side=40, max_side=60), workers=1)
    out = tmp_path_factory.mktemp("skip-shards") / "train"
    write_shards(data / "train", out, max_side=48, shard_size=12_000, workers=1)
    return out


def test_shard_skip_with_two_workers_continues_the_straight_order(synth_shards):
    dataset = ShardDataset(synth_shards, SourceName(), shuffle=4, seed=3)

    def epoch(skipped: int) -> list[list[str]]:
        dataset.set_epoch(1)
        if skipped:
            dataset.skip(skipped, 4)
        loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=names, drop_last=True)
        return list(loader)

    straight = epoch(0)
    assert len(straight) >= 6
    resumed = epoch(3)  # a checkpoint after step 3 (accum_steps 1)
    assert resumed[:3] == straight[3:6]


# ----------------------------------------------------------------------------- CLI


def test_cli_writes_shards_and_reports_errors(written, tmp_path, capsys):
    src = written[0]
    assert main(["shards", str(src), str(tmp_path / "out"), "--max-side", "64", "--shard-size", "20KB"]) == 0
    meta = json.loads((tmp_path / "out" / "shards.json").read_text())
    assert meta["samples"] == 20 and len(meta["shards"]) == len(list((tmp_path / "out").glob("shard-*.tar"))) > 1
    printed = capsys.readouterr().out
    assert "20 images" in printed and "broken.jpg" in printed
    assert main(["shards", str(tmp_path / "missing"), str(tmp_path / "out2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["shards", str(src), str(tmp_path / "out3"), "--shard-size", "lots"]) == 2
    assert "'lots'" in capsys.readouterr().err
    for split in ("train", "val"):
        (tmp_path / "root" / split / "a").mkdir(parents=True)
        smooth_image(20, 20, 0).save(tmp_path / "root" / split / "a" / "x.jpg")
    assert main(["shards", str(tmp_path / "root"), str(tmp_path / "out4")]) == 2
    assert "dataset root" in capsys.readouterr().err and not (tmp_path / "out4").exists()
