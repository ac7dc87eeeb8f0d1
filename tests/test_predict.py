"""Predict and evaluate on a model directory trained once by the CLI: the numbers checked by hand.

One tiny synthetic dataset and one 2-epoch ``test_resnet`` run serve the whole module. The
model is barely trained (its probabilities sit near 1/3), which is fine: every check compares
imgrec's numbers with the same numbers computed another way, not with an expected accuracy.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import imgrec
from imagefiles import jpeg_bytes, photo
from imgrec.cli import main as cli_main
from imgrec.data.decode import load_rgb
from imgrec.data.synth import SynthSpec, write_synth_dataset
from imgrec.data.transforms import EvalTransform

CLASSES = ["circle", "square", "triangle"]  # the first three synth shapes, as sorted class folders
SPEC = SynthSpec(classes=3, train_per_class=8, val_per_class=4, seed=0, min_side=32, max_side=48)


def imgrec_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "imgrec", *args], capture_output=True, text=True, cwd=cwd, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset root, model directory), trained once through the console script."""
    tmp = tmp_path_factory.mktemp("predict")
    root, run = tmp / "data", tmp / "run"
    write_synth_dataset(root, SPEC, workers=1)
    result = imgrec_cli(
        "train", "--data", str(root), "--model", "test_resnet", "--out", str(run), "--epochs", "2",
        "--batch-size", "8", "--img-size", "32", "--workers", "0", "--no-tensorboard",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"model directory: {run}" in result.stdout
    assert (run / "model.json").is_file() and (run / "model.safetensors").is_file()
    return root, run


@pytest.fixture(scope="module")
def clf(trained) -> imgrec.Classifier:
    return imgrec.load(trained[1], precision="fp32")


@pytest.fixture(scope="module")
def val_reference(trained, clf) -> dict:
    """The val images, their labels and logits, computed without evaluate(): load_rgb + transform + logits."""
    root = trained[0]
    paths, labels = [], []
    for index, name in enumerate(CLASSES):
        files = sorted((root / "val" / name).glob("*.jpg"))
        assert len(files) == SPEC.val_per_class
        paths += files
        labels += [index] * len(files)
    batch = torch.stack([clf.transform(load_rgb(p)) for p in paths])
    assert batch.dtype == torch.uint8 and batch.shape == (len(paths), 3, 32, 32)
    logits = clf.logits(batch)
    labels_t = torch.tensor(labels)
    predicted = logits.argmax(dim=1)
    confusion = [[int(((labels_t == t) & (predicted == p)).sum()) for p in range(len(CLASSES))] for t in range(len(CLASSES))]
    return {
        "paths": paths,
        "labels": labels_t,
        "logits": logits,
        "n": len(paths),
        "top1": 100.0 * float((predicted == labels_t).float().mean()),
        "loss": float(F.cross_entropy(logits, labels_t)),
        "confusion": confusion,
    }


def first_val_image(root: Path) -> Path:
    return min((root / "val" / "circle").glob("*.jpg"))


def check_row(p: imgrec.Prediction, k: int) -> None:
    """A good row: k distinct class names matching their indices, probabilities in (0, 1], best first."""
    assert p.error is None
    assert len(p.labels) == len(p.probs) == len(p.indices) == k
    assert len(set(p.labels)) == k and all(label in CLASSES for label in p.labels)
    assert [CLASSES[i] for i in p.indices] == p.labels
    assert all(0.0 < q <= 1.0 for q in p.probs)
    assert p.probs == sorted(p.probs, reverse=True)
    assert p.label == p.labels[0] and p.prob == p.probs[0]


# --- Python API ---------------------------------------------------------------------------------


def test_load_reads_classes_and_preprocessing(trained, clf) -> None:
    info = json.loads((trained[1] / "model.json").read_text())
    assert clf.classes == info["classes"] == CLASSES
    assert clf.precision == "fp32" and clf.device.type in ("cpu", "cuda")
    assert (clf.data_config.img_size, clf.data_config.crop_pct, clf.data_config.interpolation) == (
        info["img_size"], info["crop_pct"], info["interpolation"],
    )  # fmt: skip
    assert list(clf.data_config.mean) == info["mean"] and list(clf.data_config.std) == info["std"]
    assert clf.info == {**info, "format_version": clf.card.format_version}  # model.json as the Classifier read it


def test_a_classifier_built_from_model_json_as_a_dict_predicts_like_load(trained, clf, tmp_path: Path) -> None:
    from imgrec.inference.predict import Classifier
    from imgrec.models.directory import load_model_dir

    model, _ = load_model_dir(trained[1])
    info = json.loads((trained[1] / "model.json").read_text())
    by_hand = Classifier(model, info, device="cpu", precision="fp32", backend="eager")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    [a], [b] = by_hand.predict([tmp_path / "red.png"]), clf.predict([tmp_path / "red.png"])
    assert a.labels == b.labels and a.probs == pytest.approx(b.probs, abs=1e-5)


def test_a_backend_on_a_device_it_does_not_run_on_is_refused() -> None:
    from imgrec.inference.backends import get_backend

    with pytest.raises(ValueError, match="backend fp16 runs on cuda only, not cpu"):
        get_backend("fp16").load(torch.nn.Linear(2, 2), torch.device("cpu"))
    with pytest.raises(ValueError, match="backend onnx runs on cpu only, not meta"):
        get_backend("onnx").load(None, torch.device("meta"), path="model.onnx")


def test_predict_paths_images_and_tensors(trained, clf) -> None:
    path = first_val_image(trained[0])
    [by_path] = clf.predict(path)
    assert by_path.source == str(path)
    check_row(by_path, 3)  # default topk 5, capped at the 3 classes
    assert sum(by_path.probs) == pytest.approx(1.0, abs=1e-5)
    assert sorted(by_path.indices) == [0, 1, 2]

    # The same image as the PIL image it decodes to: identical numbers.
    [by_image] = clf.predict(load_rgb(path))
    assert by_image.probs == by_path.probs and by_image.indices == by_path.indices

    other = photo(56, 40, 7)  # another size than the model's 32x32: gets the eval resize and crop
    tensor = torch.from_numpy(np.array(photo(50, 44, 8))).permute(2, 0, 1).contiguous()
    batch = torch.from_numpy(np.random.default_rng(9).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    rows = clf.predict([other, tensor, batch], topk=2)
    assert len(rows) == 4  # the batch counts as two images
    assert len({r.source for r in rows}) == 4
    for row in rows:
        check_row(row, 2)
    # In input order: each row is what that image gives on its own.
    alone = [
        clf.predict(other, topk=2)[0],
        clf.predict(photo(50, 44, 8), topk=2)[0],  # the tensor's pixels as a PIL image
        clf.predict(batch[0], topk=2)[0],
        clf.predict(batch[1], topk=2)[0],
    ]
    for row, single in zip(rows, alone, strict=True):
        assert row.indices == single.indices
        assert row.probs == pytest.approx(single.probs, abs=1e-5)
    assert max(abs(a.probs[0] - b.probs[0]) for a, b in itertools.pairwise(alone)) > 1e-4  # distinct images, so order is tested

    full = clf.predict([other, tensor, batch], topk=3)
    for row in full:
        assert sum(row.probs) == pytest.approx(1.0, abs=1e-5)


def test_bad_inputs_become_error_rows_not_exceptions(trained, clf) -> None:
    good = load_rgb(first_val_image(trained[0]))
    rows = clf.predict([torch.rand(3, 32, 32), good, torch.zeros(4, 32, 32, dtype=torch.uint8), 42], topk=2)
    assert len(rows) == 4
    assert rows[0].error is not None and "uint8" in rows[0].error and "float32" in rows[0].error
    assert rows[0].labels == rows[0].probs == rows[0].indices == [] and rows[0].label is None and rows[0].prob is None
    check_row(rows[1], 2)
    assert rows[2].error is not None and "[4, 32, 32]" in rows[2].error
    assert rows[3].error is not None and "int" in rows[3].error
    assert rows[0].to_dict() == {"source": rows[0].source, "error": rows[0].error}


def test_predict_matches_a_hand_computed_forward_pass(trained) -> None:
    run = trained[1]
    clf = imgrec.load(run, device="cpu", precision="fp32", loader="standard")  # the reference transform, computed by hand below
    path = first_val_image(trained[0])
    info = json.loads((run / "model.json").read_text())
    pixels = EvalTransform.from_config(clf.data_config)(load_rgb(path))
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, info["img_size"], info["img_size"])
    mean = torch.tensor(info["mean"]).view(3, 1, 1)
    std = torch.tensor(info["std"]).view(3, 1, 1)
    x = (pixels.float() / 255.0 - mean) / std
    with torch.no_grad():
        logits = clf.model(x[None].to(clf.device)).float().cpu()[0]
    probs = torch.softmax(logits, dim=0)
    expected_probs, expected_indices = probs.sort(descending=True)

    [p] = clf.predict(path, topk=3)
    assert p.indices == expected_indices.tolist()
    assert p.probs == pytest.approx(expected_probs.tolist(), abs=1e-4)
    assert p.labels == [info["classes"][i] for i in expected_indices.tolist()]


@pytest.mark.parametrize("kind", ["rgba", "grey16"])
def test_pil_image_as_opened_predicts_like_its_file(tmp_path: Path, clf, kind: str) -> None:
    if kind == "rgba":
        pixels = np.asarray(photo(40, 30, 4).convert("RGBA")).copy()
        pixels[:, :20, 3] = 0  # left half transparent
        image = Image.fromarray(pixels)
    else:
        image = Image.fromarray((np.arange(1200).reshape(30, 40) * 50).astype(np.uint16))
    path = tmp_path / f"{kind}.png"
    image.save(path)
    with Image.open(path) as opened:
        opened.load()
        [from_image] = clf.predict(opened, topk=3)
    [from_path] = clf.predict(path, topk=3)
    assert from_image.indices == from_path.indices
    assert from_image.probs == pytest.approx(from_path.probs, abs=1e-6)


# --- predict on the command line ----------------------------------------------------------------


@pytest.fixture
def mixed_inputs(tmp_path: Path, trained) -> tuple[list[str], list[str], dict[str, str]]:
    """(command-line arguments, expected sources in order, {bad source: expected error words})."""
    val = trained[0] / "val"
    here = tmp_path / "inputs"
    folder = here / "folder"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(val / "circle" / "circle_00000.jpg", here / "good1.jpg")
    full = jpeg_bytes(photo(64, 48, 11), quality=90)
    (here / "bad.jpg").write_bytes(full[: len(full) // 2])  # a truncated JPEG
    shutil.copy(val / "square" / "square_00001.jpg", folder / "b.jpg")  # written before a.jpg: the output is sorted anyway
    shutil.copy(val / "triangle" / "triangle_00002.jpg", folder / "a.jpg")
    (folder / "notes.jpg").write_bytes(b"this is not an image, just some notes\n" * 20)  # a text file named .jpg
    shutil.copy(val / "circle" / "circle_00003.jpg", folder / "sub" / "c.jpg")
    shutil.copy(val / "square" / "square_00002.jpg", here / "glob_2.jpg")
    shutil.copy(val / "triangle" / "triangle_00001.jpg", here / "glob_1.jpg")
    args = [str(here / "good1.jpg"), str(here / "bad.jpg"), f"{folder}/", str(here / "glob*.jpg"), str(here / "missing.jpg")]
    sources = [
        str(here / "good1.jpg"), str(here / "bad.jpg"),
        str(folder / "a.jpg"), str(folder / "b.jpg"), str(folder / "notes.jpg"), str(folder / "sub" / "c.jpg"),
        str(here / "glob_1.jpg"), str(here / "glob_2.jpg"), str(here / "missing.jpg"),
    ]  # fmt: skip
    errors = {
        str(here / "bad.jpg"): "truncated",
        str(folder / "notes.jpg"): "not an image",
        str(here / "missing.jpg"): "no such file",
    }
    return args, sources, errors


def test_cli_predict_json_keeps_order_and_reports_bad_files(trained, clf, mixed_inputs) -> None:
    run = trained[1]
    args, sources, errors = mixed_inputs
    result = imgrec_cli("predict", str(run), *args, "--format", "json", "--precision", "fp32")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["source"] for r in rows] == sources
    assert f"3 of {len(sources)} input(s) could not be predicted" in result.stderr
    good = [s for s in sources if s not in errors]
    expected_rows = dict(zip(good, clf.predict(good, topk=3), strict=True))
    for row in rows:
        if row["source"] in errors:
            assert set(row) == {"source", "error"}
            assert errors[row["source"]] in row["error"]
        else:
            assert "error" not in row and len(row["top"]) == 3  # min(topk 5, 3 classes)
            expected = expected_rows[row["source"]]
            assert [t["class"] for t in row["top"]] == expected.labels
            assert [t["index"] for t in row["top"]] == expected.indices
            assert [t["prob"] for t in row["top"]] == pytest.approx(expected.probs, abs=1e-5)


def test_cli_predict_only_bad_inputs_exits_1(trained, mixed_inputs, capsys) -> None:
    args, _, _ = mixed_inputs
    assert cli_main(["predict", str(trained[1]), args[1], args[4], "--format", "json"]) == 1
    out, err = capsys.readouterr()
    assert [r["source"] for r in json.loads(out)] == [args[1], args[4]]
    assert "2 of 2 input(s) could not be predicted" in err


def test_cli_predict_csv(trained, clf, mixed_inputs, capsys) -> None:
    args, sources, errors = mixed_inputs
    assert cli_main(["predict", str(trained[1]), *args, "--format", "csv", "--topk", "2", "--precision", "fp32"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["source", "rank", "class", "prob", "error"]
    good = [s for s in sources if s not in errors]
    api = dict(zip(good, clf.predict(good, topk=2), strict=True))
    expected_rows = []
    for source in sources:
        if source in errors:
            expected_rows.append([source, "", "", "", errors[source]])
        else:
            p = api[source]
            for rank, (label, prob) in enumerate(zip(p.labels, p.probs, strict=True), start=1):
                expected_rows.append([source, str(rank), label, prob, ""])
    assert len(rows) - 1 == len(expected_rows) == 2 * len(good) + len(errors)
    for row, expected in zip(rows[1:], expected_rows, strict=True):
        assert row[:3] == expected[:3]
        if expected[1]:
            assert float(row[3]) == pytest.approx(expected[3], abs=1e-5) and row[4] == ""
        else:
            assert row[3] == "" and expected[4] in row[4]


def test_cli_predict_table_shows_class_names(trained, mixed_inputs, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # the paths are long; keep each row on one line
    args, _, _ = mixed_inputs
    assert cli_main(["predict", str(trained[1]), args[0], args[1], "--topk", "3", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    good_line = next(line for line in out.splitlines() if "good1.jpg" in line)
    for name in CLASSES:  # best class plus the other two in the top-3 column
        assert name in good_line
    bad_line = next(line for line in out.splitlines() if "bad.jpg" in line)
    assert "error" in bad_line and "truncated" in bad_line
    assert "top-3" in out


# --- evaluate -----------------------------------------------------------------------------------


def test_evaluate_agrees_with_hand_computation(tmp_path: Path, trained, val_reference) -> None:
    root, run = trained
    json_path, png = tmp_path / "out" / "metrics.json", tmp_path / "out" / "confusion.png"
    metrics = imgrec.evaluate(run, root / "val", precision="fp32", workers=0, json_path=json_path, confusion_png=png)
    for key in ("top1", "top5", "loss", "per_class", "confusion", "n", "images_per_s"):
        assert key in metrics
    ref = val_reference
    assert metrics["n"] == ref["n"] == 12
    assert metrics["top1"] == pytest.approx(ref["top1"], abs=1e-4)
    assert metrics["top5"] == pytest.approx(100.0, abs=1e-4)  # k = min(5, 3): every label is in the top 3
    assert metrics["loss"] == pytest.approx(ref["loss"], abs=1e-4)
    assert metrics["confusion"] == ref["confusion"]
    per_class = [(row["class"], row["n"], row["top1"]) for row in metrics["per_class"]]
    expected = [(name, 4, 100.0 * ref["confusion"][i][i] / 4) for i, name in enumerate(CLASSES)]
    assert [(c, n) for c, n, _ in per_class] == [(c, n) for c, n, _ in expected]
    assert [t for _, _, t in per_class] == pytest.approx([t for _, _, t in expected], abs=1e-4)
    assert metrics["images_per_s"] > 0 and metrics["skipped"] == [] and metrics["precision"] == "fp32"

    saved = json.loads(json_path.read_text())
    assert saved["top1"] == metrics["top1"] and saved["top5"] == metrics["top5"]
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_cli_evaluate_on_a_dataset_root(tmp_path: Path, trained, val_reference) -> None:
    root, run = trained
    out = tmp_path / "metrics.json"
    result = imgrec_cli(
        "evaluate", str(run), "--data", str(root), "--json", str(out), "--confusion", str(tmp_path / "c.png"),
        "--workers", "0", "--precision", "fp32",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "top-1" in result.stdout
    for name in CLASSES:
        assert name in result.stdout
    saved = json.loads(out.read_text())
    assert 0.0 <= saved["top1"] <= 100.0
    assert saved["n"] == val_reference["n"]  # val/ only, not train/
    assert saved["top1"] == pytest.approx(val_reference["top1"], abs=1e-4)
    assert (tmp_path / "c.png").is_file() and not (run / "confusion.png").exists()


def test_evaluate_flat_folder_with_labels_files(tmp_path: Path, trained, val_reference) -> None:
    run = trained[1]
    ref = val_reference
    flat = tmp_path / "flat"
    flat.mkdir()
    n = ref["n"]
    # New names in an order unrelated to the classes: image i becomes img_{(5 i) mod 12}.
    names = [f"img_{(5 * i) % n:02d}.jpg" for i in range(n)]
    assert len(set(names)) == n
    for path, name in zip(ref["paths"], names, strict=True):
        shutil.copy(path, flat / name)
    labels = ref["labels"].tolist()
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("filename,class\n" + "".join(f"{name},{CLASSES[label]}\n" for name, label in zip(names, labels)))
    by_name = dict(zip(names, labels, strict=True))
    int_list = tmp_path / "ground_truth.txt"
    int_list.write_text("".join(f"{by_name[name] + 1}\n" for name in sorted(names)))

    folder = imgrec.evaluate(run, trained[0] / "val", precision="fp32", workers=0)
    # The loss tells a right labelling from a shuffled one even when top-1 would not (a barely trained model).
    assert abs(float(F.cross_entropy(ref["logits"], (ref["labels"] + 1) % 3)) - ref["loss"]) > 1e-4
    for labels_file in (csv_file, int_list):
        metrics = imgrec.evaluate(run, flat, labels=labels_file, precision="fp32", workers=0)
        assert metrics["n"] == folder["n"] == n
        assert metrics["top1"] == pytest.approx(folder["top1"], abs=1e-9)
        assert metrics["confusion"] == folder["confusion"]
        assert metrics["loss"] == pytest.approx(folder["loss"], abs=1e-5)


# --- errors and safety --------------------------------------------------------------------------


def test_load_without_model_json_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "not_a_run").mkdir()
    with pytest.raises(FileNotFoundError, match="model.json"):
        imgrec.load(tmp_path / "not_a_run")


def test_cli_predict_with_a_missing_run_exits_2(tmp_path: Path) -> None:
    result = imgrec_cli("predict", "nonexistent_run", "x.jpg", cwd=tmp_path)
    assert result.returncode == 2
    assert "error:" in result.stderr and "nonexistent_run" in result.stderr and "model.json" in result.stderr
    assert result.stdout == ""


def test_load_and_predict_never_unpickle(tmp_path: Path, trained, clf, monkeypatch) -> None:
    root, run = trained
    calls: list[str] = []

    def forbidden(name: str):
        def fail(*args, **kwargs):
            calls.append(name)
            pytest.fail(f"{name} was called while loading or predicting")

        return fail

    for owner, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(owner, name, forbidden(f"{owner.__name__}.{name}"))

    # A directory holding only the two files a model directory is made of loads and predicts alike.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.safetensors", "model.json"):
        shutil.copy(run / name, bare / name)
    path = first_val_image(root)
    [expected] = clf.predict(path, topk=3)
    for directory in (run, bare):
        loaded = imgrec.load(directory, precision="fp32")
        [p] = loaded.predict(path, topk=3)
        assert p.indices == expected.indices
        assert p.probs == pytest.approx(expected.probs, abs=1e-6)
    assert calls == []


def test_evaluate_leaves_bad_files_out_and_lists_them(tmp_path: Path, trained, val_reference) -> None:
    """An unreadable val image counts nowhere (not as its neighbour) and is reported; the temporary
    skip log goes away both after success and after a failure."""
    root, run = trained
    val = shutil.copytree(root / "val", tmp_path / "val")
    (val / "circle" / "aaa_broken.jpg").write_bytes(b"not an image")  # sorts first: its neighbour would be a circle
    before = set(Path(tempfile.gettempdir()).glob("imgrec-skipped-*"))
    metrics = imgrec.evaluate(run, val, precision="fp32", workers=0, max_bad_fraction=0.1)
    assert metrics["n"] == val_reference["n"] and metrics["top1"] == pytest.approx(val_reference["top1"])
    assert [Path(s["path"]).name for s in metrics["skipped"]] == ["aaa_broken.jpg"]
    for name in ("bbb.jpg", "ccc.jpg"):  # 3 bad of 15: over a 10% limit -> DatasetError
        (val / "circle" / name).write_bytes(b"junk")
    with pytest.raises(imgrec.DatasetError):
        imgrec.evaluate(run, val, precision="fp32", workers=0, max_bad_fraction=0.1)
    assert set(Path(tempfile.gettempdir()).glob("imgrec-skipped-*")) == before


def test_the_bf16_backend_casts_its_own_copy_of_the_weights_once(run_dir):
    """The bf16 forward runs on a copy whose convolutions and linear layers hold bf16 weights (no
    cast at every call); the classifier's own model stays float32 for explanations and search."""
    import torch

    from imgrec.inference.backends.pytorch import torch_forward
    from imgrec.inference.predict import load

    classifier = load(run_dir, device="cpu", backend="bf16")
    assert all(p.dtype == torch.float32 for p in classifier.model.parameters())
    model = classifier.model
    forward = torch_forward(model, torch.device("cpu"), "bf16")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        reference = model.float()(x)
    torch.testing.assert_close(forward(x), reference, atol=0.15, rtol=0.05)
    inner = getattr(forward, "__wrapped__", forward)  # under torch.inference_mode's wrapper
    (cell,) = [c.cell_contents for c in inner.__closure__ if isinstance(c.cell_contents, torch.nn.Module) and c.cell_contents is not model]
    assert {p.dtype for m in cell.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for p in m.parameters()} == {torch.bfloat16}
