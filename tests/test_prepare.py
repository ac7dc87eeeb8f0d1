"""`imgrec prepare imagenet` on a miniature ILSVRC-2012: the real archive structure, 3 classes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from archives import TRAIN_PER_CLASS, VAL_LABELS, WNID_OF, build_archives, tar_bytes
from imgrec.cli import main
from imgrec.data.folder import DatasetError
from imgrec.data.prepare import COMPLETE_MARKER, DEVKIT_ARCHIVE, TRAIN_ARCHIVE, VAL_ARCHIVE, prepare_imagenet
from imgrec.data.splits import load_splits


# Leaves get ids 1..3 in an order unlike wnid order, so a mapping by position would misfile them.
def prepare(src: Path, out: Path):
    return prepare_imagenet(src, out, console=Console(file=io.StringIO()), progress=False)


def snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*")) if p.is_file()}


def test_prepare_writes_the_standard_layout(tmp_path: Path) -> None:
    expected = build_archives(tmp_path / "src")
    out = tmp_path / "data"
    result = prepare(tmp_path / "src", out)

    assert (result.train_images, result.val_images, result.classes, result.already_present) == (9, 7, 3, 0)
    assert result.skipped_splits == () and result.written == 16
    for wnid, files in expected["train"].items():
        assert sorted(p.name for p in (out / "train" / wnid).glob("*.JPEG")) == sorted(files)
        for name, data in files.items():
            assert (out / "train" / wnid / name).read_bytes() == data
        assert json.loads((out / "train" / wnid / COMPLETE_MARKER).read_text()) == {"images": TRAIN_PER_CLASS}
    assert sorted(p.name for p in (out / "train").iterdir()) == ["n01000001", "n02000003", "n03000002"]
    for name, (wnid, data) in expected["val"].items():
        assert (out / "val" / wnid / name).read_bytes() == data
    assert {wnid: len(list((out / "val" / wnid).iterdir())) for wnid in WNID_OF.values()} == {
        "n03000002": 3, "n01000001": 2, "n02000003": 2,
    }  # fmt: skip
    names_file = out / "class_names.json"
    assert list(json.loads(names_file.read_text())) == ["n01000001", "n02000003", "n03000002"]  # sorted by wnid
    assert json.loads(names_file.read_text()) == {
        "n01000001": "tench, Tinca tinca", "n02000003": "goldfish, Carassius auratus", "n03000002": "church, church building",
    }  # fmt: skip
    assert not list(out.rglob("*.tmp"))

    splits = load_splits(out)
    assert splits.classes == ["n01000001", "n02000003", "n03000002"]
    assert (len(splits.train), len(splits.val)) == (9, 7)
    first_val = out / "val" / "n02000003" / "ILSVRC2012_val_00000001.JPEG"  # ground truth line 1 is id 3
    assert (str(first_val), 1) in splits.val.samples


def test_rerun_is_idempotent(tmp_path: Path) -> None:
    build_archives(tmp_path / "src")
    out = tmp_path / "data"
    prepare(tmp_path / "src", out)
    before = snapshot(out)
    again = prepare(tmp_path / "src", out)
    assert snapshot(out) == before  # same bytes, same mtimes, nothing added
    assert (again.train_images, again.val_images, again.already_present, again.written) == (9, 7, 16, 0)


def test_interrupted_run_is_finished_by_a_rerun(tmp_path: Path) -> None:
    build_archives(tmp_path / "src")
    out = tmp_path / "data"
    prepare(tmp_path / "src", out)
    complete = snapshot(out)
    # As if a run had stopped inside one class: no marker, one image missing, one left as .tmp.
    folder = out / "train" / "n02000003"
    (folder / COMPLETE_MARKER).unlink()
    (folder / "n02000003_1.JPEG").unlink()
    (folder / "n02000003_2.JPEG").rename(folder / "n02000003_2.JPEG.tmp")
    (out / "val" / "n01000001" / "stray.JPEG.tmp").write_bytes(b"half an image")
    cut = out / "val" / "n03000002" / "ILSVRC2012_val_00000002.JPEG"
    cut.write_bytes(cut.read_bytes()[:20])  # a copy cut short under its final name (power loss)
    untouched = out / "train" / "n01000001" / "n01000001_1.JPEG"
    untouched_mtime = untouched.stat().st_mtime_ns

    result = prepare(tmp_path / "src", out)
    after = snapshot(out)
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in complete.items()}
    assert not list(out.rglob("*.tmp"))
    assert result.already_present == 16 - 3 and result.written == 3
    assert untouched.stat().st_mtime_ns == untouched_mtime


def test_only_val_archive_skips_train(tmp_path: Path) -> None:
    build_archives(tmp_path / "src")
    (tmp_path / "src" / TRAIN_ARCHIVE).unlink()
    log = io.StringIO()
    result = prepare_imagenet(tmp_path / "src", tmp_path / "data", console=Console(file=log, width=300), progress=False)
    assert result.skipped_splits == ("train",)
    assert (result.train_images, result.val_images) == (0, 7)
    assert not (tmp_path / "data" / "train").exists()
    assert f"skipped train: {tmp_path / 'src' / TRAIN_ARCHIVE} is not there" in log.getvalue()


def test_missing_archives_are_named(tmp_path: Path) -> None:
    build_archives(tmp_path / "src")
    (tmp_path / "src" / DEVKIT_ARCHIVE).unlink()
    with pytest.raises(DatasetError, match=rf"missing from .*src: {DEVKIT_ARCHIVE}\..*https://image-net.org/download-images"):
        prepare(tmp_path / "src", tmp_path / "data")
    build_archives(tmp_path / "src")
    (tmp_path / "src" / TRAIN_ARCHIVE).unlink()
    (tmp_path / "src" / VAL_ARCHIVE).unlink()
    with pytest.raises(DatasetError, match=f"missing from .*: {TRAIN_ARCHIVE}, {VAL_ARCHIVE}"):
        prepare(tmp_path / "src", tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_devkit_without_meta_or_ground_truth(tmp_path: Path) -> None:
    build_archives(tmp_path / "a", devkit_files=("gt",))
    with pytest.raises(DatasetError, match="has no data/meta.mat"):
        prepare(tmp_path / "a", tmp_path / "data")
    build_archives(tmp_path / "b", devkit_files=("meta",))
    with pytest.raises(DatasetError, match="has no data/ILSVRC2012_validation_ground_truth.txt"):
        prepare(tmp_path / "b", tmp_path / "data")


def test_ground_truth_must_match_the_val_images(tmp_path: Path) -> None:
    build_archives(tmp_path / "short", val_labels=VAL_LABELS[:-1])
    with pytest.raises(DatasetError, match="holds 7 images but the devkit's ground truth has 6 lines"):
        prepare(tmp_path / "short", tmp_path / "out1")
    assert not (tmp_path / "out1" / "val").exists()  # checked before anything is written
    build_archives(tmp_path / "bad_id", val_labels=[*VAL_LABELS[:-1], 4])  # 4 is a synset, not a leaf class
    with pytest.raises(DatasetError, match="line 7 names class id 4, outside the 3 classes"):
        prepare(tmp_path / "bad_id", tmp_path / "out2")


def test_unsafe_and_unknown_member_names_are_refused(tmp_path: Path) -> None:
    build_archives(tmp_path / "evil", inner_names={"n01000001_1.JPEG": "../../escaped.JPEG"})
    with pytest.raises(DatasetError, match=r"member named '../../escaped.JPEG'.*refusing"):
        prepare(tmp_path / "evil", tmp_path / "out" / "data")
    assert not list(tmp_path.rglob("escaped.JPEG"))
    assert not (tmp_path / "out" / "data" / "train" / "n01000001" / COMPLETE_MARKER).exists()

    build_archives(tmp_path / "unknown", extra_train={"n09999999.tar": tar_bytes({"n09999999_1.JPEG": b"x"})})
    with pytest.raises(DatasetError, match="holds 'n09999999.tar', not <wnid>.tar for a class"):
        prepare(tmp_path / "unknown", tmp_path / "out2")
    assert not (tmp_path / "out2" / "train").exists()  # all names checked before any write


def test_cli_prepare_imagenet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_archives(tmp_path / "src")
    assert main(["prepare", "imagenet", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "data")]) == 0
    assert len(list((tmp_path / "data" / "train").rglob("*.JPEG"))) == 9
    assert "val: 7 images" in capsys.readouterr().out

    assert main(["prepare", "imagenet", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "d2")]) == 2
    err = capsys.readouterr().err
    assert f"error: source folder {tmp_path / 'nowhere'} does not exist" in err
    assert "https://image-net.org/download-images" in err
