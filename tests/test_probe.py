"""Frozen-feature probes (kNN, linear) and fine-tuning from a pretraining run.

Hand-built toys check ``knn_scores`` and ``linear_probe`` value by value; ``probe`` and the CLI
run timm's ``resnet10t`` at 32 px on a 3-class synthetic set (24 train, 12 val images). Torch
runs on one thread (a shared 2-core machine); every feature cache lives under tmp_path.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

import imgrec.engine.probe as probe_module
from imgrec.cli import main
from imgrec.data.folder import ImageFolderDataset, take_fraction
from imgrec.data.splits import load_splits
from imgrec.engine.checkpoint import load_checkpoint
from imgrec.engine.evaluate import classification_metrics
from imgrec.engine.knn import PROBE_LRS, choose_probe_lr, knn_scores, linear_probe
from imgrec.engine.probe import extract_features, load_backbone, probe
from imgrec.engine.tasks.pretrain import pretrain
from imgrec.recipe import resolve_data_config
from runs import quiet

N_TRAIN, N_VAL, CLASSES = 24, 12, ["circle", "square", "triangle"]
SMALL = {"data_config": {"img_size": 32}, "workers": 0, "precision": "fp32"}


def train_cli(data: Path, out: Path, *extra: str) -> int:
    """``imgrec train``'s exit status (argparse's own errors, such as a value out of range, included)."""
    try:
        return main(
            [
                "train", "--data", str(data), "--model", "resnet10t", "--out", str(out), "--epochs", "1", "--batch-size", "8",
                "--img-size", "32", "--workers", "0", "--no-tensorboard", *extra,
            ]
        )  # fmt: skip
    except SystemExit as exc:
        return int(exc.code)


def backbone_keys_equal(model_file: Path, backbone_file: Path) -> None:
    """Every tensor of ``backbone_file`` is in ``model_file``, bitwise equal; the model adds only fc.*."""
    model = safetensors.torch.load_file(str(model_file))
    backbone = safetensors.torch.load_file(str(backbone_file))
    assert set(model) - set(backbone) == {"fc.weight", "fc.bias"}
    assert set(backbone) <= set(model)
    for key, value in backbone.items():
        assert torch.equal(model[key], value), key
    assert model["fc.weight"].shape == (3, 512)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """No test writes features to the home folder's cache."""
    monkeypatch.setenv("IMGREC_CACHE", str(tmp_path / "imgrec-cache"))


@pytest.fixture(scope="module")
def synth(tiny_shapes) -> Path:
    return tiny_shapes


@pytest.fixture(scope="module")
def pretrain_run(synth, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("probe-pretrain") / "run"
    return pretrain(
        data=str(synth), model="resnet10t", method="simclr", out=str(out), epochs=1, batch_size=8, workers=0, device="cpu",
        precision="fp32", tensorboard=False, proj_hidden_dim=64, proj_dim=32, warmup_epochs=0, data_config={"img_size": 32},
        console=quiet(),
    )  # fmt: skip


@pytest.fixture(scope="module")
def train_run(synth, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("probe-train") / "run"
    assert train_cli(synth, out) == 0
    return out


# --- kNN --------------------------------------------------------------------------------------

BANK = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0], [3.0, 4.0]])  # the last: norm 5, cosine as (0.6, 0.8)
BANK_LABELS = torch.tensor([0, 0, 1, 2, 1])
QUERIES = torch.tensor([[2.0, 0.0], [0.0, -1.0]])


def test_knn_scores_by_hand():
    e = math.exp
    scores = knn_scores(BANK, BANK_LABELS, QUERIES, 3, k=3, temperature=0.5)
    assert scores.shape == (2, 3)
    # Query 0 = (1, 0): cosines 1, 0.8, 0, -1, 0.6; the 3 nearest are bank 0 (class 0), 1 (class 0), 4 (class 1).
    # Query 1 = (0, -1): cosines 0, -0.6, -1, 0, -0.8; the 3 nearest are bank 0 (0), 3 (class 2), 1 (-0.6, class 0).
    expected = torch.tensor([[e(1 / 0.5) + e(0.8 / 0.5), e(0.6 / 0.5), 0.0], [e(0.0) + e(-0.6 / 0.5), 0.0, e(0.0)]])
    torch.testing.assert_close(scores, expected)
    # k = 1: only the nearest votes.
    torch.testing.assert_close(knn_scores(BANK, BANK_LABELS, QUERIES[:1], 3, k=1, temperature=0.5), torch.tensor([[e(2.0), 0.0, 0.0]]))


def test_knn_k_larger_than_the_bank_is_clamped():
    e = math.exp
    scores = knn_scores(BANK, BANK_LABELS, QUERIES, 4, k=50, temperature=0.25)
    everyone = torch.tensor(
        [
            [e(1 / 0.25) + e(0.8 / 0.25), e(0.0) + e(0.6 / 0.25), e(-1 / 0.25), 0.0],
            [e(0.0) + e(-0.6 / 0.25), e(-1 / 0.25) + e(-0.8 / 0.25), e(0.0), 0.0],
        ]
    )
    torch.testing.assert_close(scores, everyone)


def test_knn_chunks_give_the_same_scores():
    gen = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(40, 6, generator=gen), torch.randn(17, 6, generator=gen)
    labels = torch.randint(0, 4, (40,), generator=gen)
    whole = knn_scores(bank, labels, queries, 4, k=7, temperature=0.1)
    assert whole.shape == (17, 4)
    for chunk in (1, 5, 17, 100):
        torch.testing.assert_close(knn_scores(bank, labels, queries, 4, k=7, temperature=0.1, chunk=chunk), whole)
    # Each row's votes are k weights exp(cos / T), each between exp(-1 / T) and exp(1 / T).
    assert ((whole > 0).sum(dim=1) <= 7).all()
    assert (whole.sum(dim=1) <= 7 * math.exp(10) + 1e-3).all() and (whole.sum(dim=1) >= 7 * math.exp(-10)).all()


def test_knn_errors():
    with pytest.raises(ValueError, match="labels"):
        knn_scores(BANK, BANK_LABELS[:3], QUERIES, 3)
    with pytest.raises(ValueError, match="empty"):
        knn_scores(torch.zeros(0, 2), torch.zeros(0, dtype=torch.int64), QUERIES, 3)


# --- linear probe -----------------------------------------------------------------------------


def test_linear_probe_separates_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = 10 * torch.eye(5)[:3]
    labels = torch.arange(3).repeat_interleave(20)
    train = centres[labels] + 0.5 * torch.randn(60, 5, generator=gen)
    query_labels = torch.arange(3).repeat_interleave(10)
    queries = centres[query_labels] + 0.5 * torch.randn(30, 5, generator=gen)
    logits = linear_probe(train, labels, queries, 3, epochs=50, seed=0)
    assert logits.shape == (30, 3)
    assert torch.equal(logits.argmax(dim=1), query_labels)  # 100 %


def test_linear_probe_one_dimensional_rule():
    train = torch.tensor([[-3.0], [-2.0], [-1.0], [1.0], [2.0], [3.0]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    queries = torch.tensor([[-3.0], [-0.5], [0.5], [3.0]])
    logits = linear_probe(train, labels, queries, 2, epochs=300, seed=0)
    assert logits.shape == (4, 2)
    assert logits.argmax(dim=1).tolist() == [0, 0, 1, 1]
    # The classifier is linear: the margin grows with the distance from the boundary at 0.
    margin = (logits[:, 1] - logits[:, 0]).tolist()
    assert margin[0] < margin[1] < 0 < margin[2] < margin[3]
    torch.testing.assert_close(logits[1] + logits[2], logits[0] + logits[3])  # symmetric points, affine map
    assert torch.equal(linear_probe(train, labels, queries, 2, epochs=300, seed=0), logits)
    assert not torch.equal(linear_probe(train, labels, queries, 2, epochs=300, seed=1), logits)
    with pytest.raises(ValueError, match="labels"):
        linear_probe(train, labels[:4], queries, 2)


def separable_toy(seed: int, spread: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Four Gaussian clusters in 4-d (50 points each) centred ``spread`` apart on the axes."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat_interleave(50)
    return spread * torch.eye(4)[labels] + torch.randn(200, 4, generator=gen), labels


def test_probe_lr_choice_takes_the_rate_that_trains_the_probe():
    # One full-batch step: at 1e-3 the update is smaller than the initial weights' noise, so the
    # probe is near chance; larger rates learn the clusters. The held-out scores must say so.
    features, labels = separable_toy(0)
    lr, scores = choose_probe_lr(features, labels, 4, epochs=1, batch_size=1000)
    assert list(scores) == list(PROBE_LRS)
    assert scores[1e-3] < 50 < 90 < scores[3e-2] and lr == 3e-2 == max(scores, key=scores.get)
    full = {rate: (linear_probe(features, labels, features, 4, epochs=1, batch_size=1000, lr=rate).argmax(1) == labels).double().mean() for rate in PROBE_LRS}
    assert full[1e-3] < 0.5 < 0.9 < full[3e-2]  # the held-out ranking is the real one


def test_probe_lr_choice_keeps_the_lowest_of_equals_and_needs_a_holdout():
    features, labels = separable_toy(0, spread=20.0)  # every rate reaches 100 %
    lr, scores = choose_probe_lr(features, labels, 4, epochs=20)
    assert set(scores.values()) == {100.0} and lr == PROBE_LRS[0]
    # Four items a class: too few to hold any out; the first rate, no scores. Five: scored.
    four, five = (torch.cat([torch.arange(50 * c, 50 * c + n) for c in range(4)]) for n in (4, 5))
    assert choose_probe_lr(features[four], labels[four], 4, lrs=(0.5, 0.1)) == (0.5, {})
    assert choose_probe_lr(features[five], labels[five], 4, lrs=(0.5, 0.1))[1].keys() == {0.5, 0.1}
    with pytest.raises(ValueError, match="learning rate"):
        choose_probe_lr(features, labels, 4, lrs=())


# --- probe(): features, cache, result ---------------------------------------------------------


def test_probe_random_backbone_and_its_cache(synth, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    result = probe("random:resnet10t", synth, method="knn", cache=cache, **SMALL)
    assert result["method"] == "knn" and result["architecture"] == "resnet10t" and result["backbone"] == "random:resnet10t"
    assert 0 <= result["top1"] <= result["top5"] <= 100
    assert result["top5"] == 100.0  # 3 classes
    assert result["train_images"] == N_TRAIN and result["val_images"] == N_VAL
    assert result["feature_dim"] == 512
    assert [row["class"] for row in result["per_class"]] == CLASSES
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and files[0].startswith("train-") and files[1].startswith("val-")

    # The cached features are what the probe scored: the kNN on them gives its top-1.
    train = safetensors.torch.load_file(str(cache / files[0]))
    val = safetensors.torch.load_file(str(cache / files[1]))
    assert train["features"].shape == (N_TRAIN, 512) and val["features"].shape == (N_VAL, 512)
    assert train["labels"].tolist() == [0] * 8 + [1] * 8 + [2] * 8
    scores = knn_scores(train["features"], train["labels"], val["features"], 3)
    assert classification_metrics(scores, val["labels"], CLASSES)["top1"] == result["top1"]

    # A second probe reads the cache: no network runs.
    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted again despite the cache")

    with monkeypatch.context() as patch:
        patch.setattr(probe_module, "collect_logits", no_extraction)
        again = probe("random:resnet10t", synth, method="knn", cache=cache, **SMALL)
        assert again["top1"] == result["top1"] and again["top5"] == result["top5"]
        linear = probe("random:resnet10t", synth, method="linear", epochs=20, cache=cache, **SMALL)
        assert 0 <= linear["top1"] <= 100 and linear["feature_dim"] == 512
        with pytest.raises(AssertionError, match="extracted again"):
            probe("random:resnet10t", synth, method="knn", cache=cache, seed=1, **SMALL)
    # Another seed is another network: new cache files.
    probe("random:resnet10t", synth, method="knn", cache=cache, seed=1, **SMALL)
    assert len(list(cache.iterdir())) == 4


def test_random_backbone_is_seeded(synth):
    a, b, c = (load_backbone("random:resnet10t", seed=s) for s in (0, 0, 1))
    assert a.digest == b.digest != c.digest
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    first = probe("random:resnet10t", synth, cache=False, **SMALL)
    second = probe("random:resnet10t", synth, cache=False, **SMALL)
    assert first["top1"] == second["top1"] and first["per_class"] == second["per_class"]


def test_cached_features_equal_fresh_ones(synth, tmp_path):
    backbone = load_backbone("random:resnet10t", seed=0)
    config = resolve_data_config(backbone.model, img_size=32)
    dataset = load_splits(synth).val
    options = {"workers": 0, "precision": "fp32", "device": "cpu"}
    fresh, fresh_labels = extract_features(backbone, dataset, config, split="val", cache=None, **options)
    extract_features(backbone, dataset, config, split="val", cache=tmp_path, **options)
    cached, cached_labels = extract_features(backbone, dataset, config, split="val", cache=tmp_path, **options)
    assert torch.equal(cached, fresh) and torch.equal(cached_labels, fresh_labels)
    assert fresh.dtype == torch.float32 and fresh.shape == (N_VAL, 512)


def test_feature_cache_distinguishes_precision(synth, tmp_path):
    backbone = load_backbone("random:resnet10t", seed=0)
    config = resolve_data_config(backbone.model, img_size=32)
    dataset = load_splits(synth).val
    fp32, _ = extract_features(backbone, dataset, config, split="val", workers=0, device="cpu", precision="fp32", cache=None)
    bf16, _ = extract_features(backbone, dataset, config, split="val", workers=0, device="cpu", precision="bf16", cache=tmp_path)
    assert not torch.equal(bf16, fp32)  # the two precisions give different features
    again, _ = extract_features(backbone, dataset, config, split="val", workers=0, device="cpu", precision="fp32", cache=tmp_path)
    assert torch.equal(again, fp32)


def test_probe_default_cache_is_under_imgrec_cache(synth, tmp_path):
    result = probe("random:resnet10t", synth, **SMALL)
    files = sorted(p.name for p in (tmp_path / "imgrec-cache" / "features").iterdir())
    assert len(files) == 2 and files[0].startswith("train-") and files[1].startswith("val-")
    assert result["val_images"] == N_VAL


# --- probing run directories and weights files ------------------------------------------------


def test_probe_a_pretrain_run(synth, pretrain_run, tmp_path):
    info = json.loads((pretrain_run / "backbone.json").read_text(encoding="utf-8"))
    backbone = load_backbone(pretrain_run)
    assert backbone.architecture == "resnet10t" and backbone.source == str(pretrain_run / "backbone.safetensors")
    assert backbone.card.data_config.img_size == 32 and backbone.card.data_config.crop_pct == info["crop_pct"]
    weights = safetensors.torch.load_file(str(pretrain_run / "backbone.safetensors"))
    state = backbone.model.state_dict()
    assert set(state) == set(weights) and all(torch.equal(state[k], weights[k]) for k in weights)
    result = probe(pretrain_run, synth, cache=tmp_path / "cache", workers=0, precision="fp32")
    assert result["architecture"] == "resnet10t" and result["feature_dim"] == 512
    assert result["train_images"] == N_TRAIN and result["val_images"] == N_VAL
    assert 0 <= result["top1"] <= 100


def test_probe_a_train_run(synth, train_run, tmp_path):
    backbone = load_backbone(train_run)
    assert backbone.architecture == "resnet10t" and backbone.source == str(train_run / "model.safetensors")
    weights = safetensors.torch.load_file(str(train_run / "model.safetensors"))
    state = backbone.model.state_dict()
    assert set(weights) - set(state) == {"fc.weight", "fc.bias"}  # the classifier is dropped
    assert all(torch.equal(state[k], weights[k]) for k in state)
    result = probe(train_run, synth, method="linear", epochs=10, cache=tmp_path / "cache", workers=0, precision="fp32")
    assert result["feature_dim"] == 512 and result["val_images"] == N_VAL and 0 <= result["top1"] <= 100


def test_probe_a_bare_weights_file_needs_model(synth, pretrain_run, tmp_path, capsys):
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes((pretrain_run / "backbone.safetensors").read_bytes())
    common = ["--data", str(synth), "--img-size", "32", "--workers", "0", "--precision", "fp32", "--cache-dir", str(tmp_path / "cache")]
    assert main(["probe", str(weights), *common]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "--model" in err
    out_json = tmp_path / "bare.json"
    assert main(["probe", str(weights), "--model", "resnet10t", "--json", str(out_json), *common]) == 0
    result = json.loads(out_json.read_text(encoding="utf-8"))
    assert result["backbone"] == str(weights) and result["architecture"] == "resnet10t" and result["feature_dim"] == 512
    # Same bytes as the run's file: the same digest.
    assert load_backbone(weights, model="resnet10t").digest == load_backbone(pretrain_run).digest


def test_cli_probe_linear_writes_json(synth, tmp_path):
    out_json, cache = tmp_path / "probe.json", tmp_path / "cache"
    args = ["probe", "random:resnet10t", "--data", str(synth), "--method", "linear", "--epochs", "20", "--img-size", "32", "--workers", "0", "--cache-dir", str(cache)]
    assert main([*args, "--json", str(out_json)]) == 0
    result = json.loads(out_json.read_text(encoding="utf-8"))
    assert result["method"] == "linear"
    for key in ("top1", "top5"):
        assert isinstance(result[key], (int, float)) and 0 <= result[key] <= 100
    assert result["train_images"] == N_TRAIN and result["val_images"] == N_VAL
    assert len(list(cache.iterdir())) == 2
    # The rate was chosen on held-out training features and is the one the probe ran with.
    assert set(result["lr_scores"]) == {f"{rate:g}" for rate in PROBE_LRS}
    assert result["lr_scores"][f"{result['lr']:g}"] == max(result["lr_scores"].values())
    assert main([*args, "--lr", str(result["lr"]), "--json", str(tmp_path / "fixed.json")]) == 0
    fixed = json.loads((tmp_path / "fixed.json").read_text(encoding="utf-8"))
    assert fixed["top1"] == result["top1"] and fixed["lr"] == result["lr"] and "lr_scores" not in fixed
    with pytest.raises(SystemExit):
        main(["probe", "random:resnet10t", "--data", str(synth), "--method", "svm"])


# --- fine-tuning from a pretraining run -------------------------------------------------------


@pytest.mark.parametrize("target", ["run", "file"])
def test_finetune_from_pretrain_run_loads_its_backbone(synth, pretrain_run, tmp_path, target):
    source = pretrain_run if target == "run" else pretrain_run / "backbone.safetensors"
    out = tmp_path / "finetune"
    assert train_cli(synth, out, "--pretrained", str(source), "--freeze-backbone") == 0
    backbone_keys_equal(out / "model.safetensors", pretrain_run / "backbone.safetensors")
    info = json.loads((out / "model.json").read_text(encoding="utf-8"))
    assert info["architecture"] == "resnet10t" and info["classes"] == CLASSES
    config = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert config["pretrained"] == str(source) and config["freeze_backbone"] is True


def test_finetune_with_layer_decay(synth, pretrain_run, tmp_path):
    out = tmp_path / "ld"
    assert train_cli(synth, out, "--pretrained", str(pretrain_run), "--layer-decay", "0.7") == 0
    config = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert config["layer_decay"] == 0.7
    groups = load_checkpoint(out / "last.pt")["optimizer"]["param_groups"]
    scales = sorted({g["lr_scale"] for g in groups})
    assert scales == pytest.approx([0.7**k for k in range(5, -1, -1)])
    for g in groups:
        assert g["initial_lr"] == pytest.approx(config["lr"] * g["lr_scale"])
    # Not frozen: the backbone moved away from the pretrained weights.
    model = safetensors.torch.load_file(str(out / "model.safetensors"))
    backbone = safetensors.torch.load_file(str(pretrain_run / "backbone.safetensors"))
    assert any(not torch.equal(model[k], v) for k, v in backbone.items() if v.is_floating_point())


def test_train_fraction(synth, tmp_path, capsys):
    dataset = ImageFolderDataset(synth / "train")
    take_fraction(dataset, 0.5, seed=0)
    assert len(dataset) == 12
    assert [dataset.targets.count(c) for c in range(3)] == [4, 4, 4]
    again = ImageFolderDataset(synth / "train")
    take_fraction(again, 0.5, seed=0)
    assert again.samples == dataset.samples
    third = ImageFolderDataset(synth / "train")
    take_fraction(third, 0.3, seed=0)
    assert [third.targets.count(c) for c in range(3)] == [2, 2, 2]  # round(0.3 * 8) = 2

    out = tmp_path / "half"
    capsys.readouterr()
    assert train_cli(synth, out, "--train-fraction", "0.5") == 0
    assert "on 12 images (3 classes)" in capsys.readouterr().out
    assert yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))["train_fraction"] == 0.5
    assert train_cli(synth, tmp_path / "zero", "--train-fraction", "0") == 2
    assert "--train-fraction: must be in (0, 1], got 0.0" in capsys.readouterr().err
    assert train_cli(synth, tmp_path / "bad-ld", "--layer-decay", "1.5") == 2
    assert "--layer-decay: must be in (0, 1], got 1.5" in capsys.readouterr().err


# --- what a run directory carries into fine-tuning; bad files in a probe ---------------------------


def test_finetune_takes_the_pretrain_runs_preprocessing(synth, pretrain_run, tmp_path):
    # No --img-size here: the backbone was pretrained at 32 px and backbone.json says so.
    out = tmp_path / "ft"
    rc = main(["train", "--data", str(synth), "--model", "resnet10t", "--out", str(out), "--epochs", "1", "--batch-size", "8",
               "--workers", "0", "--no-tensorboard", "--pretrained", str(pretrain_run)])  # fmt: skip
    assert rc == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["data_config"]["img_size"] == 32
    assert json.loads((out / "model.json").read_text())["img_size"] == 32


def test_finetune_refuses_another_architecture(synth, pretrain_run, tmp_path, capsys):
    rc = train_cli(synth, tmp_path / "ft", "--model", "resnet18", "--pretrained", str(pretrain_run))
    assert rc == 2
    assert "resnet10t" in capsys.readouterr().err


def test_probe_lists_unreadable_images(synth, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth, data)
    bad = data / "val" / "circle" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = probe("random:resnet10t", data, data_config={"img_size": 32, "max_bad_fraction": 0.2}, workers=0, cache=False)
    assert [row["path"] for row in result["skipped"]] == [str(bad)]
    assert result["val_images"] == N_VAL
