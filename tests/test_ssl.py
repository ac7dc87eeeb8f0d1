"""Self-supervised pretraining: SimCLR and BYOL losses, LARS, layer decay, views, and ``imgrec pretrain`` end to end.

Every network is timm's ``resnet10t`` at 32 px; the data is a 3-class synthetic set of 24 train
and 12 val images. Torch runs on one thread: on a shared 2-core machine the second thread only
waits at barriers (one thread made these runs about 20x faster there).
"""

from __future__ import annotations

import functools
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import yaml
from rich.console import Console

import imgrec.engine.tasks.pretrain as pretrain_module
from imagefiles import photo
from imgrec.cli import main
from imgrec.config import DataConfig
from imgrec.data.decode import BadImageError
from imgrec.data.folder import class_balanced_subset
from imgrec.data.views import MultiViewTransform, blur_kernel, view_augment
from imgrec.engine.checkpoint import load_checkpoint
from imgrec.engine.optim import LARS, create_optimizer, param_groups
from imgrec.engine.tasks import METHODS, method_class
from imgrec.engine.tasks.byol import BYOL, BYOL_VIEWS, regression_loss
from imgrec.engine.tasks.moco import MoCoV3, info_nce
from imgrec.engine.tasks.pretrain import pretrain
from imgrec.engine.tasks.simclr import SimCLR, nt_xent
from imgrec.engine.tasks.ssl import cosine_momentum
from imgrec.recipe import RULES
from runs import quiet, read_metrics

N_TRAIN, N_VAL = 24, 12
METHOD_NAMES = ["simclr", "byol", "moco"]
# Small heads, 32 px views, fp32 on the CPU, no loader processes: the fixed recipe of every Python-API run here.
API_COMMON = {
    "model": "resnet10t", "epochs": 2, "batch_size": 8, "workers": 0, "device": "cpu", "precision": "fp32",
    "tensorboard": False, "proj_hidden_dim": 64, "proj_dim": 32, "warmup_epochs": 1, "data_config": {"img_size": 32},
}  # fmt: skip


def cli_pretrain(data: Path, out: Path, method: str, *extra: str) -> int:
    return main(
        [
            "pretrain", "--data", str(data), "--model", "resnet10t", "--method", method, "--out", str(out), "--epochs", "2",
            "--batch-size", "8", "--img-size", "32", "--workers", "0", "--proj-hidden-dim", "64", "--warmup-epochs", "1",
            "--no-tensorboard", *extra,
        ]
    )  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def synth(tiny_shapes) -> Path:
    return tiny_shapes


@pytest.fixture(scope="module")
def cli_runs(synth, tmp_path_factory) -> dict[str, tuple[int, Path]]:
    """(return code, run directory) of a 2-epoch ``imgrec pretrain`` of each method on the labelled root."""
    base = tmp_path_factory.mktemp("ssl-runs")
    return {m: (cli_pretrain(synth, base / m, m), base / m) for m in METHOD_NAMES}


def two_view_batch(seed: int = 0, images: int = 8, size: int = 32) -> torch.Tensor:
    """[2B, 3, size, size] view-major: B base images, each with two different noise "augmentations"."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(images, 3, size, size, generator=gen)
    view1 = base + 0.1 * torch.randn(base.shape, generator=gen)
    view2 = base + 0.1 * torch.randn(base.shape, generator=gen)
    return torch.cat([view1, view2])


# --- the methods ------------------------------------------------------------------------------


def test_method_registry():
    assert set(METHODS) == {"simclr", "byol", "moco", "dino", "distill"}
    assert method_class("simclr") is SimCLR and method_class("byol") is BYOL and method_class("moco") is MoCoV3
    with pytest.raises(ValueError, match="simclr"):
        method_class("nonsense")


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_loss_is_finite_and_falls_with_training(name):
    torch.manual_seed(0)
    cls = method_class(name)
    method = cls.build(timm.create_model("resnet10t", num_classes=0), proj_hidden_dim=64, proj_dim=32)
    assert method.feature_dim == 512
    images = two_view_batch()
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    method.train()
    with torch.no_grad():
        start = method(images, 2).item()
    total = 10
    losses = []
    for step in range(total):
        loss = method(images, 2)
        assert loss.ndim == 0
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_step((step + 1) / total)
        losses.append(loss.item())
    with torch.no_grad():
        end = method(images, 2).item()
    assert math.isfinite(start) and all(math.isfinite(v) for v in losses) and math.isfinite(end)
    if name == "byol":
        assert 0 <= start <= 4 and 0 <= end <= 4  # 2 - 2 cos lies in [0, 4]
    else:
        assert start > 0
    assert end < 0.9 * start, (start, losses, end)
    with pytest.raises(ValueError, match="2 views"):
        method(images, 3)


# --- SimCLR's NT-Xent -------------------------------------------------------------------------


def nt_xent_by_hand(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """The NT-Xent of the SimCLR paper with plain loops: embedding k's positive is its other view."""
    b = z1.shape[0]
    z = [[float(v) for v in row] for row in torch.cat([z1, z2])]
    z = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in z]

    def sim(i: int, j: int) -> float:
        return sum(a * c for a, c in zip(z[i], z[j]))

    total = 0.0
    for i in range(2 * b):
        positive = i + b if i < b else i - b
        denominator = sum(math.exp(sim(i, j) / temperature) for j in range(2 * b) if j != i)
        total += -math.log(math.exp(sim(i, positive) / temperature) / denominator)
    return total / (2 * b)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_matches_the_formula(temperature):
    gen = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen) * 5  # scale must not matter
    got = nt_xent(z1, z2, temperature)
    assert got.ndim == 0
    assert got.item() == pytest.approx(nt_xent_by_hand(z1, z2, temperature), rel=1e-5)


def test_nt_xent_of_identical_orthogonal_pairs():
    z = torch.eye(4)[:3]  # three orthogonal unit rows; both views identical
    temperature = 0.5
    # Each embedding: positive similarity 1, four negatives of similarity 0.
    expected = -math.log(math.exp(1 / temperature) / (math.exp(1 / temperature) + 4))
    assert nt_xent(z, z.clone(), temperature).item() == pytest.approx(expected, rel=1e-6)
    gen = torch.Generator().manual_seed(0)
    random_pairs = [nt_xent(torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen), temperature).item() for _ in range(5)]
    assert all(loss > expected for loss in random_pairs)


def test_nt_xent_gradient_flows():
    gen = torch.Generator().manual_seed(1)
    z1 = torch.randn(4, 8, generator=gen, requires_grad=True)
    z2 = torch.randn(4, 8, generator=gen, requires_grad=True)
    nt_xent(z1, z2, 0.2).backward()
    for z in (z1, z2):
        assert z.grad is not None
        assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


# --- BYOL -------------------------------------------------------------------------------------


def test_regression_loss_hand_values():
    assert regression_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])).item() == pytest.approx(2.0)
    assert regression_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[-3.0, 0.0]])).item() == pytest.approx(4.0)
    p = torch.tensor([[0.3, -1.2, 2.0]])
    assert regression_loss(p, p.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert regression_loss(p, 7 * p).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    # The batch mean: rows at 0, 90 and 45 degrees -> (0 + 2 + (2 - sqrt 2)) / 3.
    pred = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    target = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert regression_loss(pred, target).item() == pytest.approx((0 + 2 + (2 - math.sqrt(2))) / 3, rel=1e-6)


def test_cosine_momentum():
    assert cosine_momentum(0.996, 0.0) == pytest.approx(0.996)
    assert cosine_momentum(0.996, 0.5) == pytest.approx(0.998)
    assert cosine_momentum(0.996, 1.0) == pytest.approx(1.0)
    assert cosine_momentum(0.996, 2.0) == pytest.approx(1.0)  # clamped
    assert cosine_momentum(0.99, 0.25) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)


def byol() -> BYOL:
    torch.manual_seed(0)
    return BYOL.build(timm.create_model("resnet10t", num_classes=0), proj_hidden_dim=64, proj_dim=32)


def test_byol_teacher_moves_by_ema_after_a_step():
    method = byol()
    assert method.base_momentum == 0.996
    online = {**{f"b.{k}": v for k, v in method.backbone.named_parameters()}, **{f"p.{k}": v for k, v in method.projector.named_parameters()}}
    teacher = {
        **{f"b.{k}": v for k, v in method.teacher_backbone.named_parameters()},
        **{f"p.{k}": v for k, v in method.teacher_projector.named_parameters()},
    }
    assert online.keys() == teacher.keys()
    for key in online:  # the teacher starts as a copy of the online network
        assert torch.equal(online[key], teacher[key])
    old_teacher = {k: v.detach().clone() for k, v in teacher.items()}

    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    method.train()
    loss = method(two_view_batch(), 2)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    moved = [k for k in online if not torch.equal(online[k], old_teacher[k])]
    assert len(moved) > len(online) // 2  # the step changed the online weights
    method.after_step(0.0)
    m = cosine_momentum(0.996, 0.0)
    for key in online:
        expected = m * old_teacher[key] + (1 - m) * online[key].detach()
        torch.testing.assert_close(teacher[key], expected, rtol=1e-5, atol=1e-7)
    for key in moved[:5]:
        assert not torch.equal(teacher[key], old_teacher[key])
    # BN running statistics follow the online network.
    for t, s in zip(method.teacher_backbone.buffers(), method.backbone.buffers()):
        assert torch.equal(t, s)

    # At the end of the run the momentum is 1: the teacher stays where it is.
    before = {k: v.clone() for k, v in teacher.items()}
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    method.after_step(1.0)
    for key in teacher:
        torch.testing.assert_close(teacher[key], before[key], rtol=0, atol=1e-6)


def test_byol_teacher_is_not_optimised():
    method = byol()
    teacher_params = list(method.teacher_backbone.parameters()) + list(method.teacher_projector.parameters())
    assert teacher_params and all(not p.requires_grad for p in teacher_params)
    optimizer = create_optimizer(method, "lars", 0.1)
    assert isinstance(optimizer, LARS)
    optimised = [p for group in optimizer.param_groups for p in group["params"]]
    teacher_ids = {id(p) for p in teacher_params}
    assert not any(id(p) in teacher_ids for p in optimised)
    trainable = [p for module in (method.backbone, method.projector, method.predictor) for p in module.parameters()]
    assert sorted(map(id, optimised)) == sorted(map(id, trainable))  # each online parameter exactly once
    # After a step and the loss' backward, no teacher parameter has a gradient.
    method(two_view_batch(), 2).backward()
    assert all(p.grad is None for p in teacher_params)


# --- LARS and layer decay ---------------------------------------------------------------------


class Affine(torch.nn.Module):
    def __init__(self, weight: list[list[float]], bias: list[float]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(weight))
        self.bias = torch.nn.Parameter(torch.tensor(bias))


def test_param_groups_split_decay():
    model = Affine([[1.0, 2.0]], [0.5])
    groups = param_groups(model, 0.1)
    assert [g["decay"] for g in groups] == [True, False]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert groups[0]["params"] == [model.weight] and groups[1]["params"] == [model.bias]
    assert all("lr_scale" not in g for g in groups)


def test_lars_step_matches_the_formula():
    w0 = torch.tensor([[3.0, -4.0], [0.0, 12.0]])  # |w| = 13
    g1 = torch.tensor([[0.5, 1.0], [-2.0, 0.25]])
    g2 = torch.tensor([[-1.0, 0.0], [1.0, 3.0]])
    b0, gb = torch.tensor([1.0, -2.0]), torch.tensor([0.3, -0.7])
    model = Affine(w0.tolist(), b0.tolist())
    lr, wd, mom, trust = 0.5, 0.1, 0.9, 0.02
    optimizer = create_optimizer(model, "lars", lr, wd, mom, lars_trust=trust)
    assert isinstance(optimizer, LARS)
    assert [g["decay"] for g in optimizer.param_groups] == [True, False]

    def scaled(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        update = g + wd * w
        return update * (trust * w.norm() / update.norm())

    model.weight.grad, model.bias.grad = g1.clone(), gb.clone()
    optimizer.step()
    buf = scaled(w0, g1)  # first step: the buffer is the scaled update
    w1 = w0 - lr * buf
    torch.testing.assert_close(model.weight.detach(), w1)
    torch.testing.assert_close(model.bias.detach(), b0 - lr * gb)  # no decay, no trust ratio
    # Second step: momentum buffer = mom * buf + new scaled update.
    model.weight.grad, model.bias.grad = g2.clone(), gb.clone()
    optimizer.step()
    buf = mom * buf + scaled(w1, g2)
    torch.testing.assert_close(model.weight.detach(), w1 - lr * buf)
    torch.testing.assert_close(model.bias.detach(), b0 - lr * gb - lr * (mom * gb + gb))


def test_lars_zero_weight_takes_the_plain_step():
    model = Affine([[0.0, 0.0]], [0.0])
    optimizer = create_optimizer(model, "lars", 0.1, 0.5, 0.9, lars_trust=1e-3)
    model.weight.grad = torch.tensor([[2.0, -1.0]])
    optimizer.step()
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[-0.2, 0.1]]))  # |w| = 0: ratio 1
    assert model.bias.detach().tolist() == [0.0]  # no gradient: untouched


def test_layer_decay_groups_on_resnet10t():
    model = timm.create_model("resnet10t", num_classes=3)
    groups = param_groups(model, 0.05, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(names)  # every parameter exactly once
    scale_of = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert all("lr_scale" in g and "decay" in g for g in groups)
    assert scale_of["fc.weight"] == scale_of["fc.bias"] == 1.0
    smallest = min(scale_of.values())
    assert scale_of["conv1.0.weight"] == scale_of["bn1.weight"] == smallest
    # stem, layer1..layer4, head: six depths, scales 0.5 ** (5 - depth).
    assert sorted(set(scale_of.values())) == [0.5**k for k in range(5, -1, -1)]
    for stage in range(1, 5):
        assert scale_of[f"layer{stage}.0.conv1.weight"] == 0.5 ** (5 - stage)
    for g in groups:
        assert g["weight_decay"] == (0.05 if g["decay"] else 0.0)
    optimizer = create_optimizer(model, "adamw", 1e-3, layer_decay=0.5)
    assert len(optimizer.param_groups) == len(groups)
    for g in optimizer.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
    with pytest.raises(ValueError, match="group_matcher"):
        param_groups(torch.nn.Linear(2, 2), 0.05, layer_decay=0.5)


# --- class-balanced subsets -------------------------------------------------------------------


def test_class_balanced_subset():
    counts = {0: 10, 1: 5, 2: 1, 3: 3}
    targets = [label for label, n in counts.items() for _ in range(n)]
    targets = [targets[(7 * i) % len(targets)] for i in range(len(targets))]  # interleaved (19 is prime)
    assert sorted(targets) == sorted(label for label, n in counts.items() for _ in range(n))
    keep = class_balanced_subset(targets, 0.5, seed=0)
    assert keep == sorted(set(keep))
    kept_per_class = {c: sum(targets[i] == c for i in keep) for c in counts}
    # max(1, round(0.5 n)): 10 -> 5, 5 -> 2 (round half to even), 1 -> 1, 3 -> 2
    assert kept_per_class == {0: 5, 1: 2, 2: 1, 3: 2}
    assert class_balanced_subset(targets, 0.5, seed=0) == keep
    assert any(class_balanced_subset(targets, 0.5, seed=s) != keep for s in range(1, 6))
    assert class_balanced_subset(targets, 1.0, seed=3) == list(range(len(targets)))
    assert {targets[i] for i in class_balanced_subset(targets, 0.01, seed=0)} == set(counts)  # at least one each
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            class_balanced_subset(targets, bad, seed=0)


# --- views ------------------------------------------------------------------------------------


VIEW_CONFIG = DataConfig(img_size=32, crop_pct=1.0, scale=(0.2, 1.0))


def test_multi_view_transform(tmp_path):
    jpeg, png, bad = tmp_path / "a.jpg", tmp_path / "b.png", tmp_path / "bad.jpg"
    photo(60, 48, 0).save(jpeg, "JPEG", quality=95)
    photo(50, 40, 1).save(png, "PNG")
    bad.write_bytes(b"not an image at all" * 10)
    torch.manual_seed(0)
    for loader in ("fast", "standard"):
        transform = MultiViewTransform(VIEW_CONFIG, list(SimCLR.views), loader=loader)
        for path in (jpeg, png):
            views = transform(str(path))
            assert views.dtype == torch.uint8
            assert views.shape == (2, 3, 32, 32)
            assert not torch.equal(views[0], views[1])
        with pytest.raises(BadImageError):
            transform(str(bad))
    assert MultiViewTransform(VIEW_CONFIG, list(BYOL_VIEWS))(str(jpeg)).shape == (2, 3, 32, 32)
    assert MultiViewTransform(VIEW_CONFIG, [SimCLR.views[0]] * 3)(str(jpeg)).shape == (3, 3, 32, 32)
    with pytest.raises(ValueError):
        MultiViewTransform(VIEW_CONFIG, [])


def test_blur_kernel_and_view_recipes():
    assert blur_kernel(224) == 23
    assert blur_kernel(16) == 3 and blur_kernel(64) == 7
    for size in range(16, 257):
        k = blur_kernel(size)
        assert k % 2 == 1 and k >= 3 and abs(k - size * 0.1) <= 1.5
    # BYOL's asymmetric views: blur always on the first, solarisation only on the second.
    first, second = (repr(view_augment(spec, 32)) for spec in BYOL_VIEWS)
    assert "Solarize" not in first and "Solarize" in second
    assert BYOL_VIEWS[0].blur_p == 1.0 and BYOL_VIEWS[1].blur_p == 0.1


# --- imgrec pretrain end to end ---------------------------------------------------------------


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_cli_pretrain_writes_a_loadable_backbone(cli_runs, method):
    rc, run = cli_runs[method]
    assert rc == 0
    tensors = safetensors.torch.load_file(str(run / "backbone.safetensors"))
    backbone = timm.create_model("resnet10t", num_classes=0)
    assert set(tensors) == set(backbone.state_dict())  # the backbone alone: no projector, predictor or teacher
    backbone.load_state_dict(tensors, strict=True)
    fresh = timm.create_model("resnet10t", num_classes=0).state_dict()
    assert any(not torch.equal(tensors[k], fresh[k]) for k in tensors if tensors[k].is_floating_point())

    info = json.loads((run / "backbone.json").read_text(encoding="utf-8"))
    assert info["architecture"] == "resnet10t"
    assert info["method"] == method
    assert info["img_size"] == 32
    assert info["epoch"] == 2 and info["epochs"] == 2
    assert info["feature_dim"] == 512

    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        assert {"loss", "lr", "knn_top1", "knn_top5"} <= set(row)
        assert math.isfinite(row["loss"]) and row["loss"] > 0
        assert 0 <= row["knn_top1"] <= row["knn_top5"] <= 100
        assert row["knn_top1"] * N_VAL / 100 == pytest.approx(round(row["knn_top1"] * N_VAL / 100))  # a count of 12 images
    assert rows[1]["lr"] == 0.0  # the cosine ends at min_lr 0
    assert info["loss"] == rows[1]["loss"] and info["knn_top1"] == rows[1]["knn_top1"]

    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    assert config["method"] == method and config["model"] == "resnet10t" and config["epochs"] == 2
    assert config["proj_hidden_dim"] == 64 and config["data_config"]["img_size"] == 32
    # A global batch of 8: the recipe takes AdamW at its self-supervised rate, not the paper's LARS (kept from batch 1,024).
    assert config["opt"] == "adamw" and config["weight_decay"] == RULES["pretrain_adamw"]["weight_decay"]
    assert config["lr"] == pytest.approx(RULES["pretrain_adamw"]["base_lr"] * 8 / 256)
    checkpoint = load_checkpoint(run / "last.pt")
    assert checkpoint["epoch"] == 2
    if method == "byol":
        assert any(k.startswith("teacher_backbone.") for k in checkpoint["model"])


def test_pretrain_on_a_flat_folder_without_labels(synth, tmp_path):
    flat = tmp_path / "pile"
    for i, image in enumerate(sorted((synth / "train").rglob("*.jpg"))[:12]):
        folder = flat / f"part{i % 2}" / ("deep" if i % 3 else "")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, folder / f"img{i}.jpg")
    run = tmp_path / "run"
    assert cli_pretrain(flat, run, "simclr") == 0
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        assert "knn_top1" not in row and "knn_top5" not in row
        assert math.isfinite(row["loss"])
    info = json.loads((run / "backbone.json").read_text(encoding="utf-8"))
    assert info["epoch"] == 2 and "knn_top1" not in info
    tensors = safetensors.torch.load_file(str(run / "backbone.safetensors"))
    timm.create_model("resnet10t", num_classes=0).load_state_dict(tensors, strict=True)


def test_pretrain_on_a_root_with_train_but_no_val(synth, tmp_path):
    root = tmp_path / "train-only"
    shutil.copytree(synth / "train", root / "train")
    run = tmp_path / "run"
    assert cli_pretrain(root, run, "simclr") == 0
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all("knn_top1" not in row and math.isfinite(row["loss"]) for row in rows)


@pytest.mark.parametrize("method", [*METHOD_NAMES, "dino", "dino-ema-koleo", "distill"])
def test_resume_after_a_crash_is_bitwise_exact(synth, tmp_path, monkeypatch, method, teacher_run):
    options = dict(API_COMMON)
    if method == "dino-ema-koleo":  # the paper's running centre (the default is Sinkhorn-Knopp), and the KoLeo term
        method, options = "dino", options | {"centering": "ema", "koleo_weight": 0.1}
    if method == "dino":
        options["local_crops"] = 2  # views of 32 px: globals and locals alike
    if method == "distill":  # no heads of its own to size: a projection to the teacher's width
        options = {k: v for k, v in options.items() if k not in ("proj_hidden_dim", "proj_dim")} | {"teacher": str(teacher_run)}
    straight = pretrain(data=str(synth), method=method, out=str(tmp_path / "x"), console=quiet(), **options)

    original = pretrain_module.PretrainTask.save
    calls = []

    def crash_on_second(self, row):
        calls.append(row["epoch"])
        if len(calls) == 2:
            raise RuntimeError("simulated crash after epoch 2 was logged")
        return original(self, row)

    crashed = tmp_path / "y"
    with monkeypatch.context() as patch:
        patch.setattr(pretrain_module.PretrainTask, "save", crash_on_second)
        with pytest.raises(RuntimeError, match="simulated crash"):
            pretrain(data=str(synth), method=method, out=str(crashed), console=quiet(), **options)
    assert calls == [1, 2]
    assert load_checkpoint(crashed / "last.pt")["epoch"] == 1
    assert json.loads((crashed / "backbone.json").read_text())["epoch"] == 1
    assert len(read_metrics(crashed)) == 2  # epoch 2 was logged before the crash

    assert main(["pretrain", "--resume", str(crashed)]) == 0

    timing = {"seconds", "images_per_s"}
    rows_x = [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(straight)]
    rows_y = [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(crashed)]
    assert [r["epoch"] for r in rows_y] == [1, 2]
    assert rows_x == rows_y  # losses, lr and kNN accuracy identical
    a = safetensors.torch.load_file(str(straight / "backbone.safetensors"))
    b = safetensors.torch.load_file(str(crashed / "backbone.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    state_x, state_y = load_checkpoint(straight / "last.pt"), load_checkpoint(crashed / "last.pt")
    assert state_y["epoch"] == 2
    assert state_x["model"].keys() == state_y["model"].keys()
    for key in state_x["model"]:  # projector, predictor, the teachers of BYOL, MoCo v3 and DINO, DINO's centre and progress
        assert torch.equal(state_x["model"][key], state_y["model"][key]), key
    if method == "distill":  # the frozen teacher is read from its source again, not kept in checkpoints
        assert not any(k.startswith("teacher.") for k in state_x["model"])


def test_a_resumed_run_keeps_the_options_it_started_with_when_the_defaults_change(synth, tmp_path, monkeypatch):
    options = {k: v for k, v in API_COMMON.items() if k != "proj_dim"}
    out = pretrain(data=str(synth), method="simclr", out=str(tmp_path / "run"), console=quiet(), **options | {"epochs": 1})
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert (recorded["temperature"], recorded["proj_dim"], recorded["proj_hidden_dim"]) == (0.1, 128, 64)  # the paper's, the paper's, the user's

    built = []
    original = SimCLR.__init__

    @functools.wraps(original)  # the same signature: build() reads the options it takes there
    def spy(self, backbone, **kwargs):
        original(self, backbone, **kwargs)
        built.append((self.temperature, self.projector[-1].num_features))

    monkeypatch.setattr(SimCLR, "__init__", spy)
    monkeypatch.setattr(SimCLR, "temperature", 0.5)  # a later version's defaults
    monkeypatch.setattr(SimCLR, "proj_dim", 64)
    pretrain(resume=out, epochs=2, console=quiet())
    assert built == [(0.1, 128)]
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2]
    fresh = pretrain(data=str(synth), method="simclr", out=str(tmp_path / "fresh"), console=quiet(), **options | {"epochs": 1})
    assert built[-1] == (0.5, 64) and yaml.safe_load((fresh / "config.yaml").read_text())["temperature"] == 0.5


def test_pretrain_errors(synth, cli_runs, tmp_path, capsys):
    try:
        rc = cli_pretrain(synth, tmp_path / "nonsense", "nonsense")
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2
    assert "nonsense" in capsys.readouterr().err
    assert not (tmp_path / "nonsense" / "metrics.jsonl").exists()

    _, existing = cli_runs["simclr"]
    before = (existing / "metrics.jsonl").read_bytes()
    assert cli_pretrain(synth, existing, "simclr") == 2
    err = capsys.readouterr().err
    assert "error:" in err and "--resume" in err
    assert (existing / "metrics.jsonl").read_bytes() == before

    with pytest.raises(ValueError, match="resume"):
        pretrain(data=str(synth), method="simclr", out=str(existing), console=quiet(), **API_COMMON)
    assert main(["pretrain", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r"), "--workers", "0", "--no-tensorboard"]) == 2


@pytest.mark.parametrize("temperature", [0.2, 1.0])
def test_info_nce_matches_the_formula(temperature):
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    qn, kn = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    expected = 0.0
    for i in range(4):
        logits = [float(qn[i] @ kn[j]) / temperature for j in range(4)]
        expected += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
    expected = expected / 4 * 2 * temperature  # MoCo v3 scales by 2T
    assert info_nce(q, k, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_moco_keys_carry_no_gradient_and_teacher_follows():
    torch.manual_seed(0)
    method = MoCoV3.build(timm.create_model("resnet10t", num_classes=0), proj_hidden_dim=32, proj_dim=16, temperature=0.2)
    teacher = [p.detach().clone() for p in method.teacher_projector.parameters()]
    method(torch.randn(8, 3, 32, 32)).backward()
    assert all(p.grad is None for p in method.teacher_backbone.parameters())
    assert method.projector[0].weight.grad is not None and method.predictor[0].weight.grad is not None
    with torch.no_grad():
        for p in method.projector.parameters():
            p.add_(1.0)
    method.after_step(0.0)  # momentum 0.99 at the start
    for old, new, online in zip(teacher, method.teacher_projector.parameters(), method.projector.parameters()):
        assert torch.allclose(new, 0.99 * old + 0.01 * online, atol=1e-6)


def test_options_that_do_not_apply_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        BYOL.build(timm.create_model("resnet10t", num_classes=0), temperature=0.5)
    with pytest.raises(ValueError, match="teacher_momentum"):
        SimCLR.build(timm.create_model("resnet10t", num_classes=0), teacher_momentum=0.9)


def test_adjust_view_scales_jitter_and_drops_blur():
    from imgrec.data.views import ViewSpec, adjust_view

    spec = ViewSpec(jitter=(0.4, 0.4, 0.2, 0.3), blur_p=0.5, solarize_p=0.2)
    stronger = adjust_view(spec, jitter_strength=2.0, blur=False)
    assert stronger.jitter == pytest.approx((0.8, 0.8, 0.4, 0.5))  # hue capped at 0.5
    assert stronger.blur_p == 0.0 and stronger.solarize_p == 0.2
    assert adjust_view(spec) == spec


@pytest.mark.parametrize(
    "field, value",
    [("temperature", 0.0), ("knn_k", 0), ("knn_every", -1), ("teacher_momentum", 1.5), ("lars_trust", -1.0), ("jitter_strength", 0.0)],
)
def test_pretrain_config_rejects_bad_values(field, value):
    from imgrec.config import PretrainConfig

    with pytest.raises(ValueError, match=field):
        PretrainConfig(data="x", **{field: value})


def test_pretrain_config_refuses_supervised_augmentation():
    from imgrec.config import PretrainConfig

    with pytest.raises(ValueError, match="auto_augment"):
        PretrainConfig(data="x", data_config={"auto_augment": "trivial"})


def test_pretrain_falls_back_when_val_is_not_labelled(synth, tmp_path):
    # train/<class>/ next to a flat val/ of images (ImageNet's raw val layout): pretrain on train/, no monitor.
    root = tmp_path / "raw"
    shutil.copytree(synth / "train", root / "train")
    (root / "val").mkdir()
    for i, image in enumerate(sorted((synth / "val").rglob("*.jpg"))):
        shutil.copy(image, root / "val" / f"{i}.jpg")
    console = Console(file=io.StringIO())
    run = pretrain(data=str(root), method="simclr", out=str(tmp_path / "run"), console=console, **{**API_COMMON, "epochs": 1})
    assert all("knn_top1" not in row for row in read_metrics(run))
    assert "no kNN monitor" in console.file.getvalue()


def test_pretrain_without_monitor_when_knn_every_is_zero(synth, tmp_path):
    run = pretrain(data=str(synth), method="simclr", out=str(tmp_path / "run"), knn_every=0, console=quiet(), **{**API_COMMON, "epochs": 1})
    assert [sorted(row) for row in read_metrics(run)] == [["epoch", "images_per_s", "loss", "lr", "seconds"]]


def test_pretraining_data_keeps_shard_urls_intact(monkeypatch, tmp_path):
    import imgrec.engine.tasks.pretrain as pretrain_module
    from imgrec.config import PretrainConfig
    from imgrec.data.folder import SkipLog

    seen = []
    monkeypatch.setattr(pretrain_module, "ShardDataset", lambda source, **kw: seen.append(source) or "shards")
    url = "https://host.example/in1k/train-{000000..000009}.tar"
    train, bank, queries, classes, note = pretrain_module.pretraining_data(PretrainConfig(data=url), SkipLog(tmp_path / "skip.jsonl"))
    assert seen == [url] and train == "shards" and bank is None and "no kNN monitor" in note


def test_monitor_bank_never_exceeds_its_size(synth, tmp_path):
    from imgrec.config import PretrainConfig
    from imgrec.data.folder import SkipLog
    from imgrec.engine.tasks.pretrain import pretraining_data

    # 3 classes but room for 2: class balance (one per class at least) gives way to the cap.
    train, bank, queries, classes, _ = pretraining_data(PretrainConfig(data=str(synth), knn_bank_size=2), SkipLog(tmp_path / "s.jsonl"))
    assert len(bank) == 2 and len(train) == N_TRAIN and len(queries) == N_VAL
    assert {path for path, _ in bank.samples} <= {path for path, _ in train.samples}


def test_backbone_file_named_directly_brings_its_info(cli_runs):
    from imgrec.models.factory import resolve_weights

    _, run = cli_runs["simclr"]
    weights, card = resolve_weights(run / "backbone.safetensors")
    assert weights == run / "backbone.safetensors" and card.architecture == "resnet10t" and card.img_size == 32
