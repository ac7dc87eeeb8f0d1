"""Pretrained weights by name through the Hugging Face Hub's cache, never the network: each test
builds a cache in the hub's on-disk layout (models--ORG--NAME/{blobs,snapshots,refs}) holding
weights the test made, and runs offline."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from hubcache import COMMIT, TAG, hub_file, made_weights, safetensors_bytes
from imgrec.card import ModelCard
from imgrec.models.factory import WeightsError, create_model, locate_weights
from imgrec.models.hub import fetch_weights, is_weights_name, list_weights


def test_a_timm_tag_loads_the_cached_bytes_bit_exact(hub, tmp_path):
    tensors = made_weights()
    data = safetensors_bytes(tensors, tmp_path)
    hub_file(hub, f"timm/{TAG}", "model.safetensors", data)
    found = locate_weights(TAG)
    assert found.source["sha256"] == hashlib.sha256(data).hexdigest()
    assert found.source["revision"] == COMMIT and found.source["repo"] == f"timm/{TAG}"
    model = create_model("test_resnet", num_classes=1000, pretrained=TAG)
    for key, value in model.state_dict().items():
        assert torch.equal(value, tensors[key]), key
    # A different class count: the backbone is the file's, the head is new.
    five = create_model("test_resnet", num_classes=5, pretrained=TAG)
    assert five.fc.weight.shape == (5, five.fc.in_features)
    assert all(torch.equal(v, tensors[k]) for k, v in five.state_dict().items() if not k.startswith("fc."))


def test_a_bare_architecture_means_its_default_tag_and_the_pretrained_config_is_the_card(hub, tmp_path):
    hub_file(hub, f"timm/{TAG}", "model.safetensors", safetensors_bytes(made_weights(), tmp_path))
    found = fetch_weights("test_resnet")
    assert found.name == TAG and found.architecture == "test_resnet"
    config = found.card.data_config  # timm's pretrained config of test_resnet.r160_in1k
    assert (config.img_size, config.crop_pct, config.interpolation, config.mean, config.std) == (160, 0.95, "bilinear", (0.5,) * 3, (0.5,) * 3)


def test_a_pytorch_bin_is_found_where_the_cache_holds_no_safetensors(hub, tmp_path):
    tensors = made_weights(seed=5)
    torch.save(tensors, tmp_path / "w.bin")
    hub_file(hub, f"timm/{TAG}", "pytorch_model.bin", (tmp_path / "w.bin").read_bytes())
    model = create_model("test_resnet", num_classes=1000, pretrained=TAG)
    assert all(torch.equal(v, tensors[k]) for k, v in model.state_dict().items())


def test_an_hf_hub_repository_in_timm_layout(hub, tmp_path):
    tensors = made_weights(seed=7)
    config = {"architecture": "test_resnet", "num_classes": 1000, "pretrained_cfg": {"input_size": [3, 96, 96], "crop_pct": 0.9, "interpolation": "bicubic", "mean": [0.4, 0.4, 0.4], "std": [0.2, 0.3, 0.4]}}
    hub_file(hub, "someone/tiny-resnet", "config.json", json.dumps(config).encode())
    hub_file(hub, "someone/tiny-resnet", "model.safetensors", safetensors_bytes(tensors, tmp_path))
    found = locate_weights("hf-hub:someone/tiny-resnet")
    assert found.card.architecture == "test_resnet" and found.card.data_config.img_size == 96 and found.card.data_config.std == (0.2, 0.3, 0.4)
    model = create_model("test_resnet", num_classes=1000, pretrained=found)
    assert all(torch.equal(v, tensors[k]) for k, v in model.state_dict().items())


def test_offline_and_not_cached_names_the_weights_and_the_fetch_command(hub):
    with pytest.raises(WeightsError) as info:
        locate_weights("resnet18.a1_in1k")
    message = str(info.value)
    assert "resnet18.a1_in1k" in message and "imgrec weights fetch resnet18.a1_in1k" in message and "offline" in message


def test_names_that_are_neither_files_nor_weights_are_refused(hub, tmp_path):
    assert not is_weights_name("no_such_net.x")
    with pytest.raises(WeightsError, match="does not exist"):
        locate_weights("no_such_net.x")
    with pytest.raises(WeightsError, match="does not exist"):
        locate_weights(tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match="no pretrained weights called"):
        fetch_weights("resnet18.no_such_tag")
    # A local file wins over a name it happens to share.
    local = tmp_path / TAG
    save_file(made_weights(seed=9), str(local))
    assert not is_weights_name(local)
    assert locate_weights(local).path == local


def test_list_marks_the_cached_tags(hub, tmp_path):
    hub_file(hub, f"timm/{TAG}", "model.safetensors", safetensors_bytes(made_weights(), tmp_path))
    tags = {t.name: t for t in list_weights("test_resnet*")}
    assert tags[TAG].cached and tags[TAG].repo == f"timm/{TAG}"
    assert not {t.name: t for t in list_weights("resnet18.*")}["resnet18.a1_in1k"].cached


def imgrec(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgrec", *args], capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_training_from_a_named_weight_uses_its_preprocessing_and_records_its_source(hub, tiny_shapes, tmp_path):
    data = safetensors_bytes(made_weights(), tmp_path)
    hub_file(hub, f"timm/{TAG}", "model.safetensors", data)
    out = tmp_path / "run"
    done = imgrec("train", "--data", str(tiny_shapes), "--model", "test_resnet", "--pretrained", TAG, "--epochs", "1", "--out", str(out), "--batch-size", "8")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    card = ModelCard.read(out)
    assert card.pretrained == TAG
    assert card.pretrained_source["sha256"] == hashlib.sha256(data).hexdigest() and card.pretrained_source["revision"] == COMMIT
    config = card.data_config
    assert (config.img_size, config.crop_pct, config.interpolation, config.mean) == (160, 0.95, "bilinear", (0.5,) * 3)


def test_the_cli_fetches_lists_and_explains_a_missing_weight(hub, tmp_path, tiny_shapes):
    hub_file(hub, f"timm/{TAG}", "model.safetensors", safetensors_bytes(made_weights(), tmp_path))
    listed = imgrec("weights", "list", "test_resnet", "--cached")
    assert listed.returncode == 0 and TAG in listed.stdout and "test_vit" not in listed.stdout
    fetched = imgrec("weights", "fetch", TAG)
    assert fetched.returncode == 0 and COMMIT[:12] in fetched.stdout
    missing = imgrec("train", "--data", str(tiny_shapes), "--model", "resnet18", "--pretrained", "resnet18.a1_in1k", "--out", str(tmp_path / "r"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "imgrec weights fetch resnet18.a1_in1k" in missing.stderr
    wrong = imgrec("train", "--data", str(tiny_shapes), "--model", "resnet18", "--pretrained", TAG, "--out", str(tmp_path / "w"))
    assert wrong.returncode == 2 and "pass --model test_resnet" in wrong.stderr and "Traceback" not in wrong.stderr


def test_pretraining_continues_from_named_weights(hub, tiny_shapes, tmp_path):
    from rich.console import Console

    from imgrec.engine.tasks.pretrain import PretrainTask
    from imgrec.engine.trainer import Trainer, start_or_resume

    tensors = made_weights(seed=11)
    data = safetensors_bytes(tensors, tmp_path)
    hub_file(hub, f"timm/{TAG}", "model.safetensors", data)
    out = tmp_path / "pre"
    overrides = dict(data=str(tiny_shapes), model="test_resnet", pretrained=TAG, method="simclr", epochs=1, batch_size=8, out=str(out), data_config={"img_size": 32})
    config, _ = start_or_resume(PretrainTask, None, None, overrides)
    trainer = Trainer(PretrainTask, config, Console(quiet=True))
    backbone = trainer.task.method.backbone.state_dict()
    assert all(torch.equal(v, tensors[k]) for k, v in backbone.items())  # the named weights, head dropped
    assert not any(k.startswith("fc.") for k in backbone)
    trainer.fit()
    card = json.loads((out / "backbone.json").read_text())
    assert card["pretrained"] == TAG and card["pretrained_source"]["sha256"] == hashlib.sha256(data).hexdigest()
