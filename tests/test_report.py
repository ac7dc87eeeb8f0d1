"""The HTML run report: one offline file whose images decode, whose tables name every class, and which escapes user strings."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import pytest
from PIL import Image

from imgrec.report import THUMBNAIL_PX, write_report

SPECIAL = "a<b&c"  # a class name (a folder name) that would break the page if written raw
CLASSES = ["cat", "dog", SPECIAL]
DATA_URI = re.compile(r'src="data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)"')


def history(epochs: int = 3, ema: bool = True) -> list[dict]:
    rows = []
    for epoch in range(1, epochs + 1):
        row = {
            "epoch": epoch,
            "train_loss": 2.0 / epoch,
            "val_loss": 2.2 / epoch,
            "val_top1": 30.0 + 10 * epoch,
            "val_top5": 70.0 + 5 * epoch,
            "lr": 0.1 / epoch,
            "seconds": 1.5,
            "images_per_s": 1234.0,
        }
        if ema:
            row["ema_top1"] = 28.0 + 10 * epoch
        rows.append(row)
    return rows


def metrics() -> dict:
    confusion = [[3, 1, 0], [0, 2, 2], [1, 0, 4]]
    per_class = [
        {"class": name, "n": sum(row), "top1": 100.0 * row[i] / sum(row)} for i, (name, row) in enumerate(zip(CLASSES, confusion))
    ]
    return {
        "n": 13,
        "top1": 69.23,
        "top5": 100.0,
        "loss": 0.8123,
        "per_class": per_class,
        "confusion": confusion,
        "images_per_s": 900.0,
    }


@pytest.fixture
def jpegs(tmp_path: Path) -> list[Path]:
    """Four small JPEGs; the first is larger than a thumbnail so that downscaling is exercised."""
    sizes = [(400, 300), (32, 24), (24, 32), (20, 20)]
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]
    paths = []
    for i, (size, colour) in enumerate(zip(sizes, colours)):
        path = tmp_path / "images" / f"img{i}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", size, colour).save(path, "JPEG")
        paths.append(path)
    return paths


def predictions(paths: list[Path]) -> list[dict]:
    """Two right, two wrong (one of them on the HTML-special class)."""
    return [
        {"image": str(paths[0]), "true": "cat", "pred": "cat", "prob": 0.91},
        {"image": str(paths[1]), "true": "dog", "pred": SPECIAL, "prob": 0.55},
        {"image": str(paths[2]), "true": SPECIAL, "pred": SPECIAL, "prob": 0.77},
        {"image": str(paths[3]), "true": "cat", "pred": "dog", "prob": 0.40},
    ]


def embedded_images(text: str) -> list[Image.Image]:
    images = []
    for _kind, payload in DATA_URI.findall(text):
        image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        image.load()
        images.append(image)
    return images


def test_report_holds_charts_tables_and_predictions(tmp_path: Path, jpegs: list[Path]) -> None:
    out = tmp_path / "run" / "report.html"
    summary = {"model": "resnet18", "device": "cpu", "time": "12.3 s"}
    written = write_report(
        out,
        title="imgrec demo: resnet18 on synth",
        history=history(),
        metrics=metrics(),
        predictions=predictions(jpegs),
        summary=summary,
    )
    assert written == out and out.is_file()
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "<title>imgrec demo: resnet18 on synth</title>" in text and "<h1>imgrec demo: resnet18 on synth</h1>" in text
    for key, value in summary.items():
        assert f"<td><b>{key}</b></td><td>{value}</td>" in text
    assert "69.23 %" in text and "0.8123" in text and "EMA top-1" in text
    # Offline: nothing is fetched from anywhere.
    assert "http://" not in text and "https://" not in text and "<script" not in text and "<link" not in text

    for name in ("cat", "dog", "a&lt;b&amp;c"):
        assert re.search(rf"<tr><td>{re.escape(name)}</td><td class=\"num\">\d+</td>", text), name
    assert text.count("<img") == 2 + 1 + 4
    assert text.count('class="pred correct"') == 2
    assert text.count('class="pred wrong"') == 2

    images = embedded_images(text)
    assert len(images) == 7
    assert [image.format for image in images].count("PNG") == 3  # loss, accuracy, confusion
    thumbnails = [image for image in images if image.format == "JPEG"]
    assert len(thumbnails) == 4
    assert all(max(image.size) <= THUMBNAIL_PX for image in thumbnails)
    assert thumbnails[0].size == (THUMBNAIL_PX, 120)  # 400x300 shrunk, aspect kept
    assert thumbnails[1].size == (32, 24)  # small images are not blown up


def test_html_special_strings_are_escaped(tmp_path: Path, jpegs: list[Path]) -> None:
    out = write_report(
        tmp_path / "r.html",
        title="run <script>alert(1)</script>",
        history=history(2),
        metrics=metrics(),
        predictions=predictions(jpegs),
        summary={"data": "x&y <z>"},
    )
    text = out.read_text(encoding="utf-8")
    assert SPECIAL not in text
    assert "a&lt;b&amp;c" in text
    assert "<script>" not in text and "run &lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "x&amp;y &lt;z&gt;" in text


def test_unreadable_image_gets_a_placeholder(tmp_path: Path, jpegs: list[Path]) -> None:
    garbage = tmp_path / "images" / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg at all")
    items = predictions(jpegs)
    items[1]["image"] = str(garbage)
    items[2]["image"] = str(tmp_path / "images" / "moved_away.jpg")
    text = write_report(tmp_path / "r.html", title="t", history=history(), metrics=metrics(), predictions=items).read_text()
    assert text.count("<img") == 2 + 1 + 2
    assert text.count('class="missing"') == 2
    assert "cannot open garbage.jpg" in text and "cannot open moved_away.jpg" in text
    assert "not an image" in text and "file not found" in text
    # The verdict still shows for a cell without its picture.
    assert text.count('class="pred correct"') == 2 and text.count('class="pred wrong"') == 2
    assert len(embedded_images(text)) == 5


def test_empty_history_and_unlabelled_predictions(tmp_path: Path, jpegs: list[Path]) -> None:
    items = [{"image": str(jpegs[0]), "true": None, "pred": "cat", "prob": 0.6}]
    out = write_report(tmp_path / "a" / "b" / "r.html", title="no training", history=[], metrics=metrics(), predictions=items)
    text = out.read_text(encoding="utf-8")
    assert "no epochs recorded" in text
    assert text.count("<img") == 1 + 1  # confusion + one thumbnail, no charts
    assert 'class="pred unlabelled"' in text
    assert 'class="pred correct"' not in text and 'class="pred wrong"' not in text
    assert "60.0%" in text
    assert not list(out.parent.glob(".*tmp*"))  # the temporary file was renamed away
