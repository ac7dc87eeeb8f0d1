import socket

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from imgrec.models.factory import WeightsError, classifier_keys, create_model, list_architectures, read_state_dict


@pytest.fixture(scope="module")
def sd7():
    torch.manual_seed(123)
    model = timm.create_model("resnet18", pretrained=False, num_classes=7)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def st_file(tmp_path_factory, sd7):
    path = tmp_path_factory.mktemp("w") / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in sd7.items()}, str(path))
    return path


def _assert_all_equal(model, ref, skip=()):
    got = model.state_dict()
    for k, v in ref.items():
        if k in skip:
            continue
        assert torch.equal(got[k], v), k


def test_create_model_head_and_forward():
    model = create_model("resnet18", num_classes=7)
    assert model.fc.out_features == 7
    assert classifier_keys(model) == ["fc.weight", "fc.bias"]
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert tuple(out.shape) == (2, 7)


@pytest.mark.parametrize("name", ["resnet18x", "resnt18", "ResNet18"])
def test_unknown_model_suggests(name):
    with pytest.raises(ValueError) as info:
        create_model(name, num_classes=3)
    msg = str(info.value)
    assert repr(name) in msg and "Close matches" in msg
    suggestions = [s.strip(" .") for s in msg.split("Close matches:")[1].split(",")]
    assert "resnet18" in suggestions
    assert len(suggestions) <= 8


def test_unknown_model_substring_suggests():
    with pytest.raises(ValueError, match="Close matches: .*convit_tiny"):
        create_model("vit_tiny", num_classes=3)


def test_load_safetensors_exact(st_file, sd7):
    model = create_model("resnet18", 7, pretrained=st_file)
    assert set(model.state_dict()) == set(sd7)
    _assert_all_equal(model, sd7)


def test_load_different_num_classes_reinits_head(st_file, sd7):
    model = create_model("resnet18", 3, pretrained=st_file)
    got = model.state_dict()
    _assert_all_equal(model, sd7, skip={"fc.weight", "fc.bias"})
    assert tuple(got["fc.weight"].shape) == (3, 512)
    assert tuple(got["fc.bias"].shape) == (3,)
    assert not torch.equal(got["fc.weight"], sd7["fc.weight"][:3])


@pytest.mark.parametrize("layout", ["state_dict_module", "model"])
def test_load_pth_checkpoint_dicts(tmp_path, sd7, layout):
    if layout == "state_dict_module":
        ckpt = {"state_dict": {"module." + k: v for k, v in sd7.items()}, "epoch": 3}
    else:
        ckpt = {"model": dict(sd7)}
    path = tmp_path / "ckpt.pth"
    torch.save(ckpt, path)
    state = read_state_dict(path)
    assert set(state) == set(sd7)
    model = create_model("resnet18", 7, pretrained=path)
    _assert_all_equal(model, sd7)


def test_load_torchvision_layout(tmp_path):
    torch.manual_seed(7)
    tv = torchvision.models.resnet18(weights=None)
    tv_sd = tv.state_dict()
    path = tmp_path / "tv_resnet18.pth"
    torch.save(tv_sd, path)
    model = create_model("resnet18", 10, pretrained=path)
    got = model.state_dict()
    assert torch.equal(got["conv1.weight"], tv_sd["conv1.weight"])
    for k, v in tv_sd.items():
        if k.startswith("layer4.") or k.startswith("bn1."):
            assert torch.equal(got[k], v), k
    assert tuple(got["fc.weight"].shape) == (10, 512)


def test_wrong_architecture_lists_missing(st_file):
    with pytest.raises(WeightsError) as info:
        create_model("resnet34", 7, pretrained=st_file)
    msg = str(info.value)
    assert "missing from the file" in msg
    assert "layer1.2.conv1.weight" in msg or "layer3.2" in msg or "layer3.3" in msg


def test_unexpected_key_named(tmp_path, sd7):
    sd = {k: v.contiguous() for k, v in sd7.items()}
    sd["extra_head.weight"] = torch.zeros(4, 4)
    path = tmp_path / "extra.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsError, match="extra_head.weight") as info:
        create_model("resnet18", 7, pretrained=path)
    assert "in the file but not in the model" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        create_model("resnet18", 7, pretrained=tmp_path / "nope.safetensors")


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch " + _Evil.target,))


def test_pickled_module_refused(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=7), path)
    with pytest.raises(WeightsError, match="cannot read weights"):
        create_model("resnet18", 7, pretrained=path)
    # an object whose unpickling would run code must never be executed
    marker = tmp_path / "pwned"
    _Evil.target = str(marker)
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil()}, evil)
    with pytest.raises(WeightsError):
        read_state_dict(evil)
    assert not marker.exists()


def test_no_network(monkeypatch, st_file, sd7):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    model = create_model("resnet18", 7, pretrained=st_file)
    _assert_all_equal(model, sd7)


def test_list_architectures():
    infos = {i.name: i.params for i in list_architectures("resnet18")}
    assert "resnet18" in infos
    assert infos["resnet18"] == 11689512
    assert all(name.find("resnet18") >= 0 for name in infos)
    names = [i.name for i in list_architectures("resnet1?", with_params=False)]
    assert "resnet18" in names and "resnet50" not in names


def test_list_architectures_counts_params_only_for_narrow_patterns():
    everything = list_architectures("*")
    assert len(everything) > 100 and all(info.params == -1 for info in everything)
    narrow = list_architectures("resnet18")
    assert {i.name for i in narrow} >= {"resnet18", "resnet18d"} and all(i.params > 0 for i in narrow)
