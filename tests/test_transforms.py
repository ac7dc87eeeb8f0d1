import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from imgrec.config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataConfig,
    load_yaml,
    save_yaml,
)
from imgrec.data.transforms import BatchNormalize, EvalTransform, TrainTransform
from imgrec.recipe import resolve_data_config


def _image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


def test_train_transform_shape_dtype():
    torch.manual_seed(0)
    out = TrainTransform(img_size=64)(_image(200, 120))
    assert out.dtype == torch.uint8
    assert tuple(out.shape) == (3, 64, 64)


@pytest.mark.parametrize("aa", ["trivial", "rand-m9-n2"])
def test_train_transform_auto_augment_rotation(aa):
    torch.manual_seed(0)
    t = TrainTransform(img_size=64, auto_augment=aa, rotation=15)
    names = [n for n, _ in t.steps]
    assert "auto_augment" in names and "rotation" in names
    for seed in range(4):
        out = t(_image(200, 120, seed))
        assert out.dtype == torch.uint8
        assert tuple(out.shape) == (3, 64, 64)


def test_train_transform_unknown_auto_augment():
    with pytest.raises(ValueError, match="auto_augment"):
        TrainTransform(img_size=64, auto_augment="autoaug-foo")


def test_eval_transform_matches_functional():
    t = EvalTransform(img_size=224, crop_pct=0.875)
    assert t.resize_size == 256
    img = _image(512, 384, seed=3)
    out = t(img)
    ref = F.resize(img, 256, interpolation=InterpolationMode.BICUBIC, antialias=True)
    ref = F.center_crop(ref, 224)
    ref = F.pil_to_tensor(ref)
    assert out.dtype == torch.uint8
    assert tuple(out.shape) == (3, 224, 224)
    assert torch.equal(out, ref)


def test_eval_transform_resize_size_floor():
    assert EvalTransform(img_size=224, crop_pct=0.95).resize_size == math.floor(224 / 0.95)
    assert EvalTransform(img_size=64, crop_pct=1.0).resize_size == 64


@pytest.fixture(scope="module")
def resnet18():
    return timm.create_model("resnet18", pretrained=False)


def test_resolve_data_config_resnet18(resnet18):
    cfg = resolve_data_config(resnet18)
    assert cfg.img_size == 224
    assert cfg.crop_pct == pytest.approx(0.95)
    assert cfg.interpolation == "bicubic"
    assert cfg.mean == pytest.approx(IMAGENET_MEAN)
    assert cfg.std == pytest.approx(IMAGENET_STD)


def test_resolve_data_config_overrides_skip_none(resnet18):
    cfg = resolve_data_config(resnet18, img_size=128, crop_pct=None)
    assert cfg.img_size == 128
    assert cfg.crop_pct == pytest.approx(0.95)
    # training recipe fields come from base, preprocessing from the model
    base = DataConfig(hflip=0.0, auto_augment="trivial", crop_pct=0.5)
    cfg = resolve_data_config(resnet18, base=base, interpolation=None)
    assert cfg.hflip == 0.0 and cfg.auto_augment == "trivial"
    assert cfg.crop_pct == pytest.approx(0.95)
    # no model: base plus overrides
    cfg = resolve_data_config(None, img_size=96, mean=None)
    assert cfg.img_size == 96 and cfg.mean == IMAGENET_MEAN


def test_resolve_data_config_other_model():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    cfg = resolve_data_config(vit)
    assert cfg.img_size == 224
    assert cfg.crop_pct == pytest.approx(0.9)
    assert cfg.mean == pytest.approx((0.5, 0.5, 0.5))
    assert cfg.std == pytest.approx((0.5, 0.5, 0.5))


MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=g)


def test_batch_normalize_values():
    x = _batch()
    out = BatchNormalize(MEAN, STD)(x)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    ref = (x.double() / 255 - mean.double()) / std.double()
    assert out.dtype == torch.float32
    assert out.shape == x.shape
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_batch_normalize_channels_last():
    x = _batch()
    out = BatchNormalize(MEAN, STD, channels_last=True)(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert not out.is_contiguous()  # genuinely NHWC strides for C=3
    assert torch.allclose(out, BatchNormalize(MEAN, STD)(x), atol=0)


def test_batch_normalize_rejects_float():
    with pytest.raises(TypeError, match="uint8"):
        BatchNormalize(MEAN, STD)(_batch().float())


def test_batch_normalize_random_erasing():
    x = _batch()
    plain = BatchNormalize(MEAN, STD)(x)
    torch.manual_seed(0)
    erase = BatchNormalize(MEAN, STD, random_erasing=1.0)
    erase.train()
    out = erase(x)
    assert out.shape == plain.shape
    assert out.dtype == torch.float32
    assert (out != plain).any()
    # from_config honours train flag
    cfg = DataConfig(random_erasing=0.5)
    assert BatchNormalize.from_config(cfg, train=True).erase is not None
    assert BatchNormalize.from_config(cfg, train=False).erase is None


@pytest.mark.parametrize("kwargs", [{"crop_pct": 0}, {"crop_pct": 1.5}, {"interpolation": "foo"}, {"img_size": 0}])
def test_data_config_validation(kwargs):
    with pytest.raises(ValueError):
        DataConfig(**kwargs)


def test_yaml_round_trip(tmp_path):
    cfg = DataConfig(img_size=96, crop_pct=0.9, scale=(0.5, 1.0), auto_augment="rand-m9-n2", rotation=10.0)
    path = tmp_path / "data.yaml"
    save_yaml(cfg, path)
    assert load_yaml(DataConfig, path) == cfg
    path.write_text("img_size: 64\nnope: 1\n")
    with pytest.raises(ValueError, match="nope"):
        load_yaml(DataConfig, path)
