"""Several models in one server: each under its name on the v2 routes and /predict?model=, the
repository extension's index, load and unload, and a model that fails to load reported while the
others serve."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from serving import running_server


@pytest.fixture(scope="module")
def two_models(tiny_run, run_dir, tmp_path_factory):
    """A server of "shapes" (the tiny run) and "other" (the export fixture's run), with a third,
    "broken", in its repository that never loaded."""
    from imgrec.inference.predict import load

    broken = tmp_path_factory.mktemp("broken") / "run"
    shutil.copytree(tiny_run[0], broken)
    (broken / "model.safetensors").write_bytes(b"not weights")

    def loader(run: Path):
        return load(run, device="cpu", backend="eager")

    repository = {"shapes": tiny_run[0], "other": run_dir, "broken": broken}
    classifiers = {"shapes": loader(tiny_run[0]), "other": loader(run_dir)}
    failed = {"broken": "load failed: the weights are not safetensors"}
    with running_server(classifiers, repository=repository, failed=failed, loader=loader) as (base_url, server):
        with httpx.Client(base_url=base_url, timeout=60) as client:
            yield client, classifiers, server


def image(tiny_run) -> Path:
    return next(p for p in sorted((tiny_run[1] / "val").rglob("*")) if p.is_file())


def predict(client, path: Path, model: str | None = None) -> httpx.Response:
    params = {"model": model} if model else {}
    return client.post("/predict", params=params, content=path.read_bytes(), headers={"content-type": "image/jpeg"})


def test_each_model_answers_under_its_name(two_models, tiny_run) -> None:
    client, classifiers, _ = two_models
    path = image(tiny_run)
    for name, classifier in classifiers.items():
        expected = classifier.predict(path, topk=3)[0]
        answer = predict(client, path, name).json()
        assert answer["model"] == name and [t["class"] for t in answer["top"]] == expected.labels
        assert [t["prob"] for t in answer["top"]] == pytest.approx(expected.probs, abs=1e-5)
        assert client.get(f"/v2/models/{name}").json()["name"] == name
        assert client.get(f"/v2/models/{name}/ready").json() == {"name": name, "ready": True}
    assert predict(client, path).json()["model"] == "shapes"  # the first is the default
    missing = predict(client, path, "nosuch")
    assert missing.status_code == 404 and "this server has 'shapes', 'other'" in missing.json()["error"]


def test_the_repository_lists_unloads_and_loads(two_models, tiny_run) -> None:
    client, _, _ = two_models
    index = {row["name"]: row for row in client.post("/v2/repository/index").json()}
    assert {n: r["state"] for n, r in index.items()} == {"shapes": "READY", "other": "READY", "broken": "UNAVAILABLE"}
    assert "not safetensors" in index["broken"]["reason"]
    assert client.post("/v2/repository/models/other/unload").json() == {"name": "other", "state": "UNAVAILABLE"}
    gone = client.get("/v2/models/other")
    assert gone.status_code == 404 and "unloaded" in gone.json()["error"]
    assert predict(client, image(tiny_run)).status_code == 200  # the others serve on
    assert client.post("/v2/repository/models/other/load").json() == {"name": "other", "state": "READY"}
    assert predict(client, image(tiny_run), "other").status_code == 200
    assert client.post("/v2/repository/models/other/load").status_code == 200  # a reload replaces it in place
    assert {r["name"]: r["state"] for r in client.post("/v2/repository/index").json()}["other"] == "READY"


def test_a_model_that_fails_to_load_is_reported_and_the_others_serve(two_models, tiny_run) -> None:
    client, _, _ = two_models
    answer = client.post("/v2/repository/models/broken/load")
    assert answer.status_code == 400 and answer.json()["kind"] == "load_failed" and "broken" in answer.json()["error"]
    assert client.post("/v2/repository/models/nosuch/load").status_code == 404
    assert client.post("/v2/repository/models/nosuch/unload").status_code == 404
    assert predict(client, image(tiny_run), "shapes").status_code == 200


def test_model_names_from_the_command_line(tmp_path) -> None:
    from imgrec.serve.app import model_names

    assert model_names([tmp_path / "r50", f"small={tmp_path / 'x'}"]) == {"r50": tmp_path / "r50", "small": tmp_path / "x"}
    assert model_names(str(tmp_path / "r50"), "given") == {"given": tmp_path / "r50"}
    with pytest.raises(ValueError, match="two models named 'r50'"):
        model_names([tmp_path / "a" / "r50", tmp_path / "b" / "r50"])
