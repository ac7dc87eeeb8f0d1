"""Grad-CAM explanations: where a trained model looks (a property, not a picture), the three
feature paths (timm CNN, timm ViT, any module with a Conv2d), and the command, predict --explain,
the server's /explain and the report's most confident mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from imgrec.inference.explain import gradcam

PNG = b"\x89PNG\r\n\x1a\n"


def quadrant_image(kind: str, quadrant: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Noise, and a yellow cross or ring (the class) somewhere inside quadrant 0-3 (row-major)."""
    image = Image.fromarray((rng.random((size, size, 3)) * 80 + 60).astype(np.uint8))
    draw, half, r = ImageDraw.Draw(image), size // 2, 9
    row, column = divmod(quadrant, 2)
    cx, cy = column * half + int(rng.integers(r + 2, half - r - 2)), row * half + int(rng.integers(r + 2, half - r - 2))
    if kind == "cross":
        draw.line([cx - r, cy, cx + r, cy], fill=(250, 250, 40), width=4)
        draw.line([cx, cy - r, cx, cy + r], fill=(250, 250, 40), width=4)
    else:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(250, 250, 40), width=4)
    return image


@pytest.fixture(scope="module")
def quadrant_run(tmp_path_factory, one_thread) -> tuple[Path, Path]:
    """test_resnet trained 8 epochs at 64 px on crosses and rings placed in random quadrants."""
    from imgrec.engine.tasks.classify import train
    from runs import quiet

    root, rng = tmp_path_factory.mktemp("quadrants"), np.random.default_rng(0)
    for split, count in (("train", 40), ("val", 12)):
        for kind in ("cross", "ring"):
            folder = root / "data" / split / kind
            folder.mkdir(parents=True)
            for i in range(count):
                quadrant_image(kind, i % 4, rng).save(folder / f"q{i % 4}_{i}.png")
    run = train(
        data=str(root / "data"), out=str(root / "run"), model="test_resnet", epochs=8, batch_size=16, device="cpu", precision="fp32",
        workers=0, tensorboard=False, data_config={"img_size": 64, "scale": (0.9, 1.0)}, console=quiet(),
    )  # fmt: skip
    return run, root / "data"


def test_the_heatmap_lies_in_the_quadrant_that_holds_the_object(quadrant_run) -> None:
    from imgrec.data.decode import load_sample
    from imgrec.inference.explain import explain
    from imgrec.inference.predict import load

    run, data = quadrant_run
    classifier = load(run, device="cpu", backend="eager")
    paths = sorted((data / "val").rglob("*.png"))
    rows = explain(classifier, [load_sample(p, classifier.transform) for p in paths])
    shares = []
    for path, row in zip(paths, rows):
        row_index, column = divmod(int(path.name[1]), 2)
        heatmap = row["heatmap"]
        half = heatmap.shape[0] // 2
        inside = heatmap[row_index * half : (row_index + 1) * half, column * half : (column + 1) * half].sum()
        shares.append(float(inside / heatmap.sum()))
        assert heatmap.shape == (64, 64) and float(heatmap.max()) == pytest.approx(1.0) and float(heatmap.min()) >= 0
        assert row["overlay"].shape == (64, 64, 3) and row["overlay"].dtype == np.uint8
    # a quarter of the mass would be chance; most of it must sit on the object's quadrant
    assert sum(share > 0.5 for share in shares) >= 0.8 * len(shares), shares
    assert float(np.median(shares)) > 0.5, shares


def test_a_vit_gets_a_token_map_and_a_custom_module_its_last_conv() -> None:
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("test_vit", num_classes=3)
    heatmaps, logits = gradcam(vit, torch.randn(2, 3, 160, 160))
    assert heatmaps.shape == (2, 160, 160) and logits.shape == (2, 3)
    assert torch.allclose(heatmaps.flatten(1).amax(1), torch.ones(2)) and heatmaps.min() >= 0  # not a blank map: the tokens reach the class token
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3),
    )  # fmt: skip
    x = torch.randn(1, 3, 32, 32)
    heatmaps, logits = gradcam(net, x, classes=[2])
    assert heatmaps.shape == (1, 32, 32) and torch.allclose(logits, net(x))
    # by hand: the last conv's output (before its ReLU), weighted by the mean gradient of logit 2, summed over channels, kept positive
    features = net[:3](x).detach().requires_grad_(True)
    net[3:](features)[0, 2].backward()
    cam = torch.relu((features.grad.mean(dim=(2, 3), keepdim=True) * features).sum(1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(heatmaps, cam / cam.max(), atol=1e-5)
    with pytest.raises(ValueError, match="no Conv2d and no forward_features"):
        gradcam(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2)), torch.randn(1, 3, 2, 2))


def test_the_command_and_predict_write_heatmaps(quadrant_run, tmp_path, capsys) -> None:
    from imgrec.cli import main

    run, data = quadrant_run
    images = sorted((data / "val" / "ring").glob("*.png"))[:2]
    out = tmp_path / "why"
    assert main(["explain", str(run), *map(str, images), str(tmp_path / "missing.png"), "--out", str(out), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}.png" for p in images)
    assert all((out / f"{p.stem}.png").read_bytes()[:8] == PNG for p in images)
    assert "missing.png: no such file or folder" in captured.err and f"-> {out / images[0].stem}.png" in captured.out
    assert main(["explain", str(run), str(images[0]), "--class", "cross", "--out", str(tmp_path / "cross"), "--device", "cpu"]) == 0
    assert "q" in capsys.readouterr().out and (tmp_path / "cross" / f"{images[0].stem}.png").is_file()
    assert main(["explain", str(run), str(images[0]), "--class", "square", "--device", "cpu"]) == 2
    assert "--class 'square' is not one of the model's classes: cross, ring" in capsys.readouterr().err
    assert main(["predict", str(run), str(images[0]), "--explain", str(tmp_path / "p"), "--device", "cpu", "--backend", "eager"]) == 0
    assert (tmp_path / "p" / f"{images[0].stem}.png").read_bytes()[:8] == PNG


def test_the_server_explains_its_answer(quadrant_run) -> None:
    from starlette.testclient import TestClient

    from imgrec.inference.predict import load
    from imgrec.serve.app import create_app

    run, data = quadrant_run
    classifier = load(run, device="cpu", backend="eager")
    image = sorted((data / "val" / "cross").glob("*.png"))[0]
    with TestClient(create_app(classifier)) as client:
        answer = client.post("/explain", files={"file": (image.name, image.read_bytes(), "image/png")})
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png" and answer.content[:8] == PNG
        top = client.post("/predict", files={"file": (image.name, image.read_bytes(), "image/png")}).json()["top"][0]
        assert answer.headers["x-class"] == top["class"] and float(answer.headers["x-probability"]) == pytest.approx(top["prob"], abs=1e-4)
        assert Image.open(__import__("io").BytesIO(answer.content)).size == (64, 64)
        other = client.post("/explain?class=ring", content=image.read_bytes(), headers={"content-type": "image/png"})
        assert other.status_code == 200 and other.headers["x-class"] == "ring"
        assert answer.headers["x-class-index"] == str(classifier.classes.index(top["class"]))
        wrong = client.post("/explain?class=square", content=image.read_bytes(), headers={"content-type": "image/png"})
        assert wrong.status_code == 400 and "class must be one of the model's classes" in wrong.json()["error"]
        broken = client.post("/explain", content=b"not an image", headers={"content-type": "image/png"})
        assert broken.status_code == 400


def test_the_report_shows_the_most_confident_mistakes_with_heatmaps(quadrant_run, tmp_path) -> None:
    from imgrec.inference.explain import explain_files
    from imgrec.inference.predict import load
    from imgrec.report import write_report

    run, data = quadrant_run
    image = sorted((data / "val" / "cross").glob("*.png"))[0]
    heatmap = explain_files(load(run, device="cpu", backend="eager"), [image], tmp_path / "h")[0]["heatmap"]
    mistakes = [{"image": str(image), "heatmap": heatmap, "true": "ring", "pred": "cross", "prob": 0.93}]
    metrics = json.loads((run / "model.json").read_text())
    page = write_report(tmp_path / "r.html", title="t", history=[], metrics=metrics, predictions=[], mistakes=mistakes).read_text()
    section = page[page.index("<h2>The most confident mistakes</h2>") :]
    assert "Grad-CAM" in section and section.count('class="pred wrong"') == 1 and "93.0%" in section
    assert "data:image/jpeg;base64," in section
    empty = write_report(tmp_path / "e.html", title="t", history=[], metrics=metrics, predictions=[], mistakes=[]).read_text()
    assert "no mistakes on the images shown" in empty


def test_channels_last_feature_maps_and_token_models_without_a_grid() -> None:
    """A stage that gives NHWC maps (MambaOut, Swin) is laid out as channels first before weighing;
    features that are neither a map nor ViT tokens on a grid are refused, saying so."""
    import timm

    torch.manual_seed(0)
    net = timm.create_model("test_mambaout", num_classes=3).eval()
    x = torch.randn(1, 3, 160, 160)
    heatmaps, _ = gradcam(net, x, classes=[1])
    features = net.forward_features(x).detach().requires_grad_(True)  # [1, h, w, C]
    net.forward_head(features)[0, 1].backward()
    cam = torch.relu((features.grad.mean(dim=(1, 2), keepdim=True) * features).sum(-1))[:, None]
    cam = torch.nn.functional.interpolate(cam, size=(160, 160), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(heatmaps, cam / cam.max(), atol=1e-5)
    levit = timm.create_model("levit_128s", num_classes=3).eval()
    with pytest.raises(ValueError, match="not a map or ViT tokens on a grid"):
        gradcam(levit, torch.randn(1, 3, 224, 224))


def test_each_image_can_be_explained_for_its_own_class(quadrant_run, tmp_path) -> None:
    from imgrec.inference.explain import explain_files
    from imgrec.inference.predict import load

    run, data = quadrant_run
    images = sorted((data / "val" / "cross").glob("*.png"))[:2]
    rows = explain_files(load(run, device="cpu", backend="eager"), images, tmp_path, ["ring", "cross"])
    assert [r["class"] for r in rows] == ["ring", "cross"]


def test_the_server_explains_classes_whose_names_are_not_latin1(quadrant_run, tmp_path) -> None:
    """Headers are latin-1: the class name goes percent-encoded, with its index beside it."""
    import shutil
    from urllib.parse import unquote

    from starlette.testclient import TestClient

    from imgrec.inference.predict import load
    from imgrec.serve.app import create_app

    run, data = quadrant_run
    renamed = tmp_path / "run"
    shutil.copytree(run, renamed)
    card = json.loads((renamed / "model.json").read_text())
    card["classes"] = ["十字", "环"]
    (renamed / "model.json").write_text(json.dumps(card))
    image = sorted((data / "val" / "ring").glob("*.png"))[0]
    with TestClient(create_app(load(renamed, device="cpu", backend="eager"))) as client:
        answer = client.post("/explain", content=image.read_bytes(), headers={"content-type": "image/png"})
        assert answer.status_code == 200 and unquote(answer.headers["x-class"]) in ("十字", "环")
        assert ["十字", "环"].index(unquote(answer.headers["x-class"])) == int(answer.headers["x-class-index"])
