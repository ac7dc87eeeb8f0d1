"""Similarity search: an image finds itself first and its near-copies (resized, re-encoded) next;
the index on disk, the chunked exact search, the command and the server's /search."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from imgrec.inference import search as search_module
from imgrec.inference.search import Index, build_index, search


@pytest.fixture(scope="module")
def gallery(run_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(a folder of the shapes' val and train images plus two near-copies of one of them, that image)."""
    data = run_dir.parent / "data"
    folder = tmp_path_factory.mktemp("gallery") / "images"
    for split in ("train", "val"):
        shutil.copytree(data / split, folder / split)
    original = sorted((folder / "val").rglob("*.*"))[5]
    image = Image.open(original).convert("RGB")
    copies = folder / "copies"
    copies.mkdir()
    image.resize((int(image.width * 0.8), int(image.height * 0.8)), Image.BICUBIC).save(copies / "resized.png")
    image.save(copies / "reencoded.jpg", quality=60)
    (copies / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return folder, original


def test_an_image_finds_itself_then_its_near_copies(run_dir, gallery, tmp_path) -> None:
    folder, original = gallery
    info = build_index(run_dir, folder, tmp_path / "index", device="cpu")
    assert info["count"] == sum(1 for p in folder.rglob("*") if p.is_file()) - 1  # all but the broken file
    assert [s["path"] for s in info["skipped"]] == [str(folder / "copies" / "broken.jpg")]
    (result,) = search(run_dir, [original], index=tmp_path / "index", k=5, device="cpu")
    files = [hit["file"] for hit in result["neighbours"]]
    assert files[0] == original.relative_to(folder).as_posix() and result["neighbours"][0]["similarity"] == pytest.approx(1.0, abs=2e-3)
    assert set(files[1:3]) == {"copies/resized.png", "copies/reencoded.jpg"}, result
    similarities = [hit["similarity"] for hit in result["neighbours"]]
    assert similarities == sorted(similarities, reverse=True) and result["neighbours"][0]["path"] == str(original)


def test_the_chunked_search_is_the_exact_one(tmp_path, monkeypatch) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    rows = torch.nn.functional.normalize(torch.randn(1000, 16), dim=1)
    save_file({"embeddings": rows.half()}, str(tmp_path / "embeddings.safetensors"))
    (tmp_path / "index.json").write_text(json.dumps({"root": str(tmp_path), "architecture": "x", "files": [f"{i}.png" for i in range(1000)]}))
    monkeypatch.setattr(search_module, "CHUNK_ROWS", 97)  # many chunks, the last one short
    queries = torch.nn.functional.normalize(torch.randn(3, 16), dim=1)
    found = Index(tmp_path).nearest(queries, k=7)
    exact = (queries @ rows.half().float().T).topk(7, dim=1)
    for hits, scores, indices in zip(found, exact.values, exact.indices):
        assert [f for f, _ in hits] == [f"{i}.png" for i in indices.tolist()]
        assert [s for _, s in hits] == pytest.approx(scores.tolist(), abs=1e-6)


def test_a_damaged_or_missing_index_is_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="is not an index.*imgrec index RUN --data DIR"):
        Index(tmp_path)


def test_the_commands_and_the_server(run_dir, gallery, tmp_path, capsys) -> None:
    from starlette.testclient import TestClient

    from imgrec.cli import main
    from imgrec.inference.predict import load
    from imgrec.serve.app import create_app

    folder, original = gallery
    assert main(["index", str(run_dir), "--data", str(folder), "--out", str(tmp_path / "ix"), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "indexed" in captured.out and "broken.jpg" in captured.err
    assert main(["search", str(run_dir), str(original), "--index", str(tmp_path / "ix"), "--k", "3", "--json", "--device", "cpu"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["neighbours"]
    assert len(hits) == 3 and hits[0]["path"] == str(original)
    assert main(["search", str(run_dir), str(original), "--device", "cpu"]) == 2  # no RUN/index
    assert "is not an index" in capsys.readouterr().err
    classifier = load(run_dir, device="cpu", backend="eager")
    with TestClient(create_app(classifier, index=Index(tmp_path / "ix"))) as client:
        answer = client.post("/search?k=3", files={"file": (original.name, original.read_bytes(), "image/png")})
        assert answer.status_code == 200 and [h["file"] for h in answer.json()["neighbours"]][0] == original.relative_to(folder).as_posix()
        assert client.post("/search?k=0", content=original.read_bytes()).status_code == 400
    with TestClient(create_app(classifier)) as client:
        missing = client.post("/search", content=original.read_bytes())
        assert missing.status_code == 404 and "--index" in missing.json()["error"]


def test_an_index_refuses_other_weights_of_the_same_architecture(run_dir, gallery, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    folder, original = gallery
    build_index(run_dir, folder / "val", tmp_path / "index", device="cpu")
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    weights = load_file(str(other / "model.safetensors"))
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}, str(other / "model.safetensors"))
    with pytest.raises(ValueError, match="built with other weights"):
        search(other, [original], index=tmp_path / "index", device="cpu")


def test_a_reloaded_model_keeps_its_index_only_while_the_weights_match(run_dir, gallery, tmp_path) -> None:
    from safetensors.torch import load_file, save_file
    from starlette.testclient import TestClient

    from imgrec.inference.predict import load
    from imgrec.inference.search import Index
    from imgrec.serve.app import create_app

    folder, original = gallery
    build_index(run_dir, folder / "val", tmp_path / "index", device="cpu")
    served = tmp_path / "served"
    shutil.copytree(run_dir, served)

    def loader(run: Path):
        return load(run, device="cpu", backend="eager")

    app = create_app({"m": loader(served)}, index=Index(tmp_path / "index"), repository={"m": served}, loader=loader)
    with TestClient(app) as client:
        assert client.post("/v2/repository/models/m/load").json() == {"name": "m", "state": "READY"}  # the same weights: kept
        assert client.post("/search", content=original.read_bytes()).status_code == 200
        weights = load_file(str(served / "model.safetensors"))
        save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}, str(served / "model.safetensors"))
        answer = client.post("/v2/repository/models/m/load").json()
        assert answer["state"] == "READY" and answer["index"].startswith("dropped:") and "other weights" in answer["index"]
        assert client.post("/search", content=original.read_bytes()).status_code == 404
