"""DINO (self-distillation with multi-crop) and feature distillation from a frozen teacher: their
losses against hand computations, the multi-crop views, the teacher's centre and temperature,
the checkpoint without the teacher's weights, ``imgrec pretrain --method dino|distill`` end to
end with bitwise-exact resume, a teacher by name from a hub cache, and the recipe's choices for
short runs on small images."""

from __future__ import annotations

import json
import math

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F

from hubcache import TAG, hub_file, made_weights, safetensors_bytes
from imgrec.cli import main
from imgrec.config import DataConfig, PretrainConfig
from imgrec.data.stats import DataStats
from imgrec.data.views import MultiViewTransform, ViewSpec, view_size
from imgrec.engine.checkpoint import load_checkpoint, save_checkpoint
from imgrec.engine.tasks import METHODS, method_class
from imgrec.engine.tasks.dino import DINO, DINOHead, dino_loss, koleo_loss, sinkhorn_knopp, teacher_temperature
from imgrec.engine.tasks.distill import Distill, Renormalize, distill_loss
from imgrec.engine.tasks.pretrain import pretrain
from imgrec.recipe import RULES, resolve_recipe
from runs import quiet, read_metrics

API_COMMON = {
    "model": "resnet10t", "epochs": 2, "batch_size": 8, "workers": 0, "device": "cpu", "precision": "fp32",
    "tensorboard": False, "warmup_epochs": 1, "data_config": {"img_size": 32},
}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


# --- DINO's loss, by hand -------------------------------------------------------------------------


def softmax(row: list[float]) -> list[float]:
    top = max(row)
    e = [math.exp(v - top) for v in row]
    return [v / sum(e) for v in e]


def sinkhorn_by_hand(scores: list[list[float]], iterations: int = 3) -> list[list[float]]:
    """Sinkhorn-Knopp with loops: exp of the N x K scores, normalised to sum 1, then ``iterations``
    times every column scaled to 1/K and every row to 1/N; the rows returned summing to 1."""
    n, k = len(scores), len(scores[0])
    q = [[math.exp(v) for v in row] for row in scores]
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        columns = [sum(q[i][j] for i in range(n)) for j in range(k)]
        q = [[q[i][j] / columns[j] / k for j in range(k)] for i in range(n)]
        rows = [sum(row) for row in q]
        q = [[v / rows[i] / n for v in q[i]] for i in range(n)]
    return [[v * n for v in row] for row in q]


def dino_loss_by_hand(student, teacher, center, student_temp, teacher_temp, global_views=2, centering="ema") -> float:
    """The paper's pseudo-code with loops: for each teacher global view i and each student view
    j != i, the batch mean of -sum_k target_k log softmax(s / ts)_k; then the mean. The targets:
    softmax((t - c) / tt), or Sinkhorn-Knopp of t / tt over all the global views' rows."""
    b = len(teacher) // global_views
    views = len(student) // b
    balanced = sinkhorn_by_hand([[v / teacher_temp for v in row] for row in teacher]) if centering == "sinkhorn" else None
    total, pairs = 0.0, 0
    for i in range(global_views):
        for j in range(views):
            if i == j:
                continue
            term = 0.0
            for n in range(b):
                t = balanced[i * b + n] if balanced else softmax([(v - c) / teacher_temp for v, c in zip(teacher[i * b + n], center)])
                s = softmax([v / student_temp for v in student[j * b + n]])
                term += -sum(tk * math.log(sk) for tk, sk in zip(t, s))
            total += term / b
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("local_views", [0, 1, 4])
def test_dino_loss_matches_the_hand_computation(local_views):
    gen = torch.Generator().manual_seed(local_views)
    b, k = 3, 5
    student = torch.randn((2 + local_views) * b, k, generator=gen)
    teacher = torch.randn(2 * b, k, generator=gen)
    center = torch.randn(1, k, generator=gen) * 0.3
    got = dino_loss(student, teacher, center, 0.1, 0.04).item()
    want = dino_loss_by_hand(student.tolist(), teacher.tolist(), center[0].tolist(), 0.1, 0.04)
    assert got == pytest.approx(want, rel=1e-5)
    # The teacher's view i is never compared with the student's view i: identical logits there change nothing.
    same = student.clone()
    same[:b] = teacher[:b] * 7
    assert dino_loss(same, teacher, center, 0.1, 0.04).item() == pytest.approx(
        dino_loss_by_hand(same.tolist(), teacher.tolist(), center[0].tolist(), 0.1, 0.04), rel=1e-5
    )


def test_sinkhorn_knopp_matches_the_hand_computation_and_balances_the_prototypes():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 4, generator=gen) * 3
    got = sinkhorn_knopp(scores)
    assert torch.allclose(got, torch.tensor(sinkhorn_by_hand(scores.tolist())), rtol=1e-5, atol=1e-7)
    assert torch.allclose(got.sum(dim=1), torch.ones(6), atol=1e-6)  # each row a distribution
    # More iterations: every prototype ends up with an equal share of the batch (6 rows / 4).
    assert torch.allclose(sinkhorn_knopp(scores, iterations=200).sum(dim=0), torch.full((4,), 1.5), atol=1e-4)
    assert not torch.allclose(F.softmax(scores, dim=-1).sum(dim=0), torch.full((4,), 1.5), atol=0.1)  # the softmax alone does not
    assert torch.isfinite(sinkhorn_knopp(torch.full((3, 5), 400.0))).all()  # large scores do not overflow


@pytest.mark.parametrize("local_views", [0, 2])
def test_dino_loss_with_sinkhorn_centring_matches_the_hand_computation(local_views):
    gen = torch.Generator().manual_seed(10 + local_views)
    b, k = 3, 5
    student = torch.randn((2 + local_views) * b, k, generator=gen)
    teacher = torch.randn(2 * b, k, generator=gen)
    center = torch.randn(1, k, generator=gen)  # not used by Sinkhorn-Knopp
    got = dino_loss(student, teacher, center, 0.1, 0.05, centering="sinkhorn").item()
    assert got == pytest.approx(dino_loss_by_hand(student.tolist(), teacher.tolist(), None, 0.1, 0.05, centering="sinkhorn"), rel=1e-5)
    assert got != pytest.approx(dino_loss(student, teacher, center, 0.1, 0.05).item(), rel=1e-3)


def test_koleo_loss_matches_the_hand_computation():
    # Three 2-d points (normalised first: the scale of a row does not count) at angles 0, 0.3 and 2.
    angles, scales = [0.0, 0.3, 2.0], [1.0, 5.0, 0.5]
    points = torch.tensor([[s * math.cos(a), s * math.sin(a)] for a, s in zip(angles, scales)])
    chord = lambda a, b: 2 * math.sin(abs(a - b) / 2)  # noqa: E731 - distance of two unit vectors
    nearest = [chord(0.0, 0.3), chord(0.3, 0.0), chord(2.0, 0.3)]
    assert koleo_loss(points).item() == pytest.approx(-sum(math.log(d) for d in nearest) / 3, rel=1e-5)
    spread = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert koleo_loss(spread) < koleo_loss(points)  # spreading the rows lowers it


def test_dino_adds_the_koleo_term_of_the_global_views_and_sinkhorn_by_default_leaves_the_centre():
    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", num_classes=0).eval()
    images = torch.randn(4 * 3, 3, 32, 32)  # 3 images, 2 global + 2 local views of one size
    plain = DINO.build(backbone, proj_hidden_dim=16, proj_dim=8).eval()
    spread = DINO.build(backbone, proj_hidden_dim=16, proj_dim=8, koleo_weight=0.5).eval()
    spread.head.load_state_dict(plain.head.state_dict())
    spread.teacher_head.load_state_dict(plain.teacher_head.state_dict())
    with torch.no_grad():
        features = backbone(images[:6])
        want = plain(images, num_views=4) + 0.5 * (koleo_loss(features[:3]) + koleo_loss(features[3:])) / 2
        assert spread(images, num_views=4).item() == pytest.approx(want.item(), rel=1e-5)
    balanced = DINO.build(timm.create_model("test_resnet", num_classes=0), proj_hidden_dim=16, proj_dim=8)
    assert balanced.centering == "sinkhorn"  # the default (DINOv2's)
    balanced(images, num_views=4).backward()
    balanced.after_step(0.5)
    assert torch.equal(balanced.center, torch.zeros(1, 8))  # no running centre under Sinkhorn-Knopp
    with pytest.raises(ValueError, match="ema, sinkhorn"):
        DINO.build(timm.create_model("test_resnet", num_classes=0), centering="median")


def test_dino_loss_gradient_reaches_only_the_student():
    student = torch.randn(8, 6, requires_grad=True)
    teacher = torch.randn(4, 6, requires_grad=True)
    dino_loss(student, teacher, torch.zeros(1, 6), 0.1, 0.04).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None  # the teacher's outputs are targets


def test_teacher_temperature_warms_up_then_holds():
    assert teacher_temperature(0.0, 0.04, 0.07, 0.3) == pytest.approx(0.04)
    assert teacher_temperature(0.15, 0.04, 0.07, 0.3) == pytest.approx(0.055)
    assert teacher_temperature(0.3, 0.04, 0.07, 0.3) == pytest.approx(0.07)
    assert teacher_temperature(0.9, 0.04, 0.07, 0.3) == pytest.approx(0.07)
    assert teacher_temperature(0.1, 0.04, 0.07, 0.0) == pytest.approx(0.07)


def test_dino_head_gives_cosines_to_unit_prototypes():
    torch.manual_seed(0)
    head = DINOHead(16, 10, hidden_dim=32, bottleneck=8)
    with torch.no_grad():
        head.prototypes.mul_(5.0)  # the prototypes' length does not count
        logits = head(torch.randn(4, 16))
    embedding = F.normalize(head.mlp(torch.randn(0, 16)), dim=-1)
    assert embedding.shape == (0, 8)
    assert logits.shape == (4, 10) and logits.abs().max() <= 1.0 + 1e-6


@pytest.mark.parametrize("grouped", [True, False])
def test_dino_forward_gives_the_teacher_the_global_views_only(grouped):
    """Views of two sizes come as two tensors; views of one size (32 px images: the locals are as
    large as the globals) as one, view-major: either way the teacher sees the first 2 views."""
    torch.manual_seed(0)
    method = DINO.build(timm.create_model("resnet10t", num_classes=0), proj_hidden_dim=32, proj_dim=16, teacher_momentum=0.9, centering="ema")
    method.train()
    b = 4
    globals_, locals_ = torch.randn(2 * b, 3, 32, 32), torch.randn(3 * b, 3, 32, 32)
    seen = []
    method.teacher_backbone.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    with torch.no_grad():
        expected_teacher = method.teacher_head(method.teacher_backbone(globals_))
        # One backbone call per tensor (batch-norm statistics over the views it holds).
        groups = [globals_, locals_] if grouped else [torch.cat([globals_, locals_])]
        student = torch.cat([method.head(method.backbone(g)) for g in groups])
    seen.clear()
    loss = method(groups if grouped else groups[0], 5)
    assert len(seen) == 1 and torch.equal(seen[0], globals_)  # the teacher sees the 2 global views, not the locals
    want = dino_loss(student, expected_teacher, torch.zeros(1, 16), method.student_temp, 0.04)
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)
    assert torch.equal(method.center, torch.zeros(1, 16))  # the centre moves when the step is taken...
    method.after_step(0.1)
    # ...to 0.9 * 0 + 0.1 * the batch mean of the teacher's outputs
    assert torch.allclose(method.center, 0.1 * expected_teacher.mean(dim=0, keepdim=True), atol=1e-6)
    method.eval()
    before = method.center.clone()
    method([globals_, locals_], 5)
    method.after_step(0.2)
    assert torch.equal(method.center, before)  # evaluation leaves the centre alone
    with pytest.raises(ValueError, match="do not split"):
        method(torch.cat([globals_, locals_]), 3)


def test_dino_centre_averages_micro_batches_and_ignores_a_non_finite_step():
    method = DINO.build(timm.create_model("test_resnet", num_classes=0), proj_hidden_dim=16, proj_dim=4)
    method.pending, method.pending_rows = torch.full((1, 4), 2.0), 2  # two rows of ones (one micro-batch)...
    method.pending, method.pending_rows = method.pending + torch.full((1, 4), 6.0), 4  # ...and two rows of threes
    method.update_center()
    assert torch.allclose(method.center, torch.full((1, 4), 0.2))  # 0.1 x their mean, 2
    method.pending, method.pending_rows = torch.tensor([[1.0, float("nan"), 0.0, 0.0]]), 1
    method.update_center()
    assert torch.allclose(method.center, torch.full((1, 4), 0.2)) and method.pending is None


def test_dino_teacher_follows_by_ema_and_progress_sets_the_temperature():
    torch.manual_seed(0)
    method = DINO.build(timm.create_model("resnet10t", num_classes=0), proj_hidden_dim=32, proj_dim=16, teacher_momentum=0.5)
    with torch.no_grad():
        for p in method.head.parameters():
            p.add_(1.0)
    teacher_before = [p.clone() for p in method.teacher_head.parameters()]
    method.after_step(0.0)  # progress 0: momentum = base 0.5
    for t0, t, s in zip(teacher_before, method.teacher_head.parameters(), method.head.parameters()):
        assert torch.allclose(t, 0.5 * t0 + 0.5 * s, atol=1e-6)
    assert float(method.progress) == 0.0
    method.after_step(0.6)
    assert float(method.progress) == pytest.approx(0.6)
    assert "progress" in method.state_dict() and "center" in method.state_dict()  # both resume with the run


# --- the multi-crop views ---------------------------------------------------------------------------


def test_multi_crop_views_come_as_one_tensor_per_size(tiny_shapes):
    data = DataConfig(img_size=96, scale=(0.3, 1.0))
    specs = DINO.view_specs(data, local_crops=3)
    assert len(specs) == 5 and specs[0].scale is None and specs[1].scale is None  # the globals crop the data config's range
    assert specs[2].scale == (0.05, 0.3) and all(s == specs[2] for s in specs[2:])  # the locals crop below it
    transform = MultiViewTransform(data, list(specs), "standard")
    image = next(p for p in sorted((tiny_shapes / "train").rglob("*")) if p.is_file())
    globals_, locals_ = transform(str(image))
    assert globals_.shape == (2, 3, 96, 96) and globals_.dtype == torch.uint8
    assert locals_.shape == (3, 3, 40, 40)  # 96 x 96/224 = 41 -> 40, a multiple of 8
    assert view_size(ViewSpec(size=96 / 224), 32) == 32  # never below 32 px...
    assert view_size(ViewSpec(size=96 / 224), 24) == 24  # ...nor above the global views
    single = MultiViewTransform(data, list(DINO.view_specs(data, local_crops=0)), "standard")
    assert single(str(image)).shape == (2, 3, 96, 96)


# --- feature distillation --------------------------------------------------------------------------


def test_distill_loss_matches_the_hand_computation():
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    by_hand = 0.0
    for a, b in zip(s.tolist(), t.tolist()):
        cos = sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
        by_hand += 2 - 2 * cos
    assert distill_loss(s, t).item() == pytest.approx(by_hand / 6, rel=1e-5)
    assert distill_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_renormalize_gives_the_teachers_normalisation():
    a = DataConfig(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    b = DataConfig(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    pixels = torch.rand(2, 3, 4, 4)
    as_a = (pixels - torch.tensor(a.mean).view(1, 3, 1, 1)) / torch.tensor(a.std).view(1, 3, 1, 1)
    as_b = (pixels - torch.tensor(b.mean).view(1, 3, 1, 1)) / torch.tensor(b.std).view(1, 3, 1, 1)
    assert torch.allclose(Renormalize(a, b)(as_a), as_b, atol=1e-5)


def test_distill_projects_widths_keeps_the_teacher_frozen_and_out_of_checkpoints():
    torch.manual_seed(0)
    teacher = timm.create_model("resnet18", num_classes=0)
    method = Distill.build(timm.create_model("resnet10t", num_classes=0), teacher=torch.nn.Sequential(teacher), teacher_dim=512)
    assert isinstance(method.projector, torch.nn.Identity)  # same width: no projection
    narrow = timm.create_model("test_resnet", num_classes=0)
    method = Distill.build(narrow, teacher=torch.nn.Sequential(teacher), teacher_dim=512)
    assert isinstance(method.projector, torch.nn.Linear) and method.projector.weight.shape == (512, narrow.num_features)
    method.train()
    assert not method.teacher.training and method.backbone.training  # the teacher keeps its statistics
    assert not any(p.requires_grad for p in method.teacher.parameters())
    teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    images = torch.randn(4, 3, 32, 32)
    loss = method(images)
    loss.backward()
    assert 0 <= loss.item() <= 4
    assert method.projector.weight.grad is not None and all(p.grad is None for p in method.teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in method.teacher.state_dict().items())  # BN statistics untouched
    state = method.state_dict()
    assert state and not any(k.startswith("teacher.") for k in state)
    fresh = Distill.build(timm.create_model("test_resnet", num_classes=0), teacher=torch.nn.Sequential(teacher), teacher_dim=512)
    fresh.load_state_dict(state)  # the teacher's weights come from its source, the rest from the checkpoint
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())
    # The same through a wrapper (DDP's module., torch.compile's _orig_mod.): keys carry a prefix.
    wrapped = torch.nn.ModuleDict({"module": method}).state_dict()
    assert wrapped and not any(".teacher." in k for k in wrapped)
    torch.nn.ModuleDict({"module": fresh}).load_state_dict(wrapped)


def test_the_projection_fits_the_pooled_width_of_heads_with_a_hidden_layer():
    teacher = timm.create_model("mobilenetv3_small_050", num_classes=0).eval()  # num_features 288, pooled output 1024
    from imgrec.engine.tasks.ssl import pooled_width

    assert pooled_width(teacher) == teacher(torch.randn(1, 3, 32, 32)).shape[1] == 1024
    method = Distill.build(timm.create_model("resnet10t", num_classes=0), teacher=teacher, teacher_dim=pooled_width(teacher))
    assert method.projector.weight.shape == (1024, 512)
    assert method(torch.randn(2, 3, 32, 32)).ndim == 0


# --- end to end -------------------------------------------------------------------------------------


def test_methods_are_registered():
    assert {"dino", "distill"} <= set(METHODS)
    assert method_class("dino") is DINO and method_class("distill") is Distill


def test_cli_dino_pretrains_a_loadable_backbone(tiny_shapes, tmp_path):
    out = tmp_path / "dino"
    code = main(["pretrain", "--data", str(tiny_shapes), "--model", "resnet10t", "--method", "dino", "--out", str(out), "--epochs", "2",
                 "--batch-size", "8", "--img-size", "32", "--workers", "0", "--proj-hidden-dim", "32", "--local-crops", "2", "--no-tensorboard"])  # fmt: skip
    assert code == 0
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) and "knn_top1" in r for r in rows)
    card = json.loads((out / "backbone.json").read_text())
    assert card["method"] == "dino" and card["feature_dim"] == 512
    config = (out / "config.yaml").read_text()
    assert "proj_dim: 4096" in config and "local_crops: 2" in config  # the recipe's prototypes for 24 images
    assert "centering: sinkhorn" in config  # the default, recorded so that a resumed run keeps it
    weights = safetensors.torch.load_file(str(out / "backbone.safetensors"))
    backbone = timm.create_model("resnet10t", num_classes=0)
    backbone.load_state_dict(weights)


def test_a_dino_run_from_before_sinkhorn_resumes_with_the_running_centre(tiny_shapes, tmp_path):
    out = pretrain(data=str(tiny_shapes), method="dino", out=str(tmp_path / "old"), local_crops=2, proj_hidden_dim=32, console=quiet(), **API_COMMON)
    state = load_checkpoint(out / "last.pt")
    assert state["config"]["centering"] == "sinkhorn"
    del state["config"]["centering"]  # what a run started before the option existed holds
    save_checkpoint(out / "last.pt", state)
    pretrain(resume=out, epochs=3, console=quiet())
    assert "centering: ema" in (out / "config.yaml").read_text()
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2, 3]


def test_distill_from_a_named_teacher_in_the_hub_cache(tiny_shapes, hub, tmp_path):
    tensors = made_weights("test_resnet", seed=5)
    hub_file(hub, f"timm/{TAG}", "model.safetensors", safetensors_bytes(tensors, tmp_path))
    out = tmp_path / "run"
    pretrain(data=str(tiny_shapes), method="distill", teacher=TAG, out=str(out), console=quiet(), **{**API_COMMON, "epochs": 1})
    card = json.loads((out / "backbone.json").read_text())
    assert card["teacher"]["name"] == TAG and card["teacher"]["architecture"] == "test_resnet"
    # The teacher in the run is the cached weights, bit for bit.
    from imgrec.engine.tasks.distill import load_teacher

    teacher, width, _ = load_teacher(TAG, DataConfig(img_size=32))
    model = teacher[1]
    assert width == model.num_features
    assert all(torch.equal(v, tensors[k]) for k, v in model.state_dict().items())


def test_distill_refuses_a_changed_teacher_on_resume(tiny_shapes, teacher_run, tmp_path, capsys):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_run, teacher)
    out = tmp_path / "run"
    pretrain(
        data=str(tiny_shapes),
        method="distill",
        teacher=str(teacher),
        out=str(out),
        console=quiet(),
        **{**API_COMMON, "epochs": 2},
    )
    checkpoint = load_checkpoint(out / "last.pt")
    checkpoint["epoch"], checkpoint["step"] = 1, 0
    torch.save(checkpoint, out / "last.pt")
    weights = safetensors.torch.load_file(str(teacher / "model.safetensors"))
    weights["fc.bias"] = weights["fc.bias"] + 1
    safetensors.torch.save_file(weights, str(teacher / "model.safetensors"))
    assert main(["pretrain", "--resume", str(out)]) != 0
    assert "not the one this run started with" in capsys.readouterr().err


def test_teacher_errors_are_plain(tiny_shapes, teacher_run, tmp_path, capsys):
    common = [
        "pretrain",
        "--data",
        str(tiny_shapes),
        "--model",
        "resnet10t",
        "--img-size",
        "32",
        "--epochs",
        "1",
        "--workers",
        "0",
        "--no-tensorboard",
    ]
    assert main([*common, "--method", "distill", "--out", str(tmp_path / "a")]) != 0
    assert "pass --teacher" in capsys.readouterr().err
    assert main([*common, "--method", "simclr", "--teacher", str(teacher_run), "--out", str(tmp_path / "b")]) != 0
    assert "--teacher applies to --method distill" in capsys.readouterr().err
    assert main([*common, "--method", "byol", "--local-crops", "4", "--out", str(tmp_path / "c")]) != 0
    assert "--local-crops applies to --method dino" in capsys.readouterr().err
    assert main([*common, "--method", "simclr", "--centering", "sinkhorn", "--out", str(tmp_path / "c2")]) != 0
    assert "--centering applies to --method dino" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's usage error names the choices
        main([*common, "--method", "dino", "--centering", "median", "--out", str(tmp_path / "c3")])
    assert "invalid choice: 'median' (choose from 'ema', 'sinkhorn')" in capsys.readouterr().err
    bare = tmp_path / "bare.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(1)}, str(bare))
    assert main([*common, "--method", "distill", "--teacher", str(bare), "--out", str(tmp_path / "d")]) != 0
    assert "does not say its architecture" in capsys.readouterr().err


# --- the recipe ---------------------------------------------------------------------------------------


def recipe(config: PretrainConfig, images: int, side: int) -> dict:
    with torch.device("meta"):
        model = timm.create_model("resnet18", num_classes=0)
    stats = DataStats(images, 3, images // 3, images // 3, side, side, 0.0)
    _, choices = resolve_recipe(config, stats, model=model, device=torch.device("cpu"), method=method_class(config.method))
    return {c.name: c.value for c in choices} | {"why": {c.name: c.reason for c in choices}}


def test_recipe_fits_the_teacher_momentum_to_the_runs_steps():
    # 720 images, batch 32: 22 full batches x 20 epochs = 440 steps; the teacher averages over 5% of them.
    got = recipe(PretrainConfig(data="x", method="dino", epochs=20), 720, 64)
    assert got["batch_size"] == 32 and got["opt"] == "adamw"
    assert got["base_lr"] == RULES["pretrain_adamw_lr"]["dino"] != RULES["pretrain_adamw"]["base_lr"]  # DINO's own AdamW rate
    steps = 20 * (720 // 32)
    assert got["teacher_momentum"] == pytest.approx(1 - 1 / (RULES["teacher_horizon"] * steps), abs=1e-4)
    assert f"{steps} steps" in got["why"]["teacher_momentum"]
    long = recipe(PretrainConfig(data="x", method="byol", epochs=300, batch_size=1024), 1_281_167, 400)
    assert "teacher_momentum" not in long  # ImageNet's length: the paper's 0.996 stands
    assert "teacher_momentum" not in recipe(PretrainConfig(data="x", method="simclr", epochs=20), 720, 64)  # no teacher
    assert "teacher_momentum" not in recipe(PretrainConfig(data="x", method="dino", epochs=20, teacher_momentum=0.99), 720, 64)
    capped = recipe(PretrainConfig(data="x", method="moco", epochs=20, steps_per_epoch=5), 720, 64)
    assert "100 steps" in capped["why"]["teacher_momentum"] and capped["teacher_momentum"] == pytest.approx(max(RULES["teacher_momentum_min"], 0.8))
    tiny = recipe(PretrainConfig(data="x", method="byol", epochs=2), 40, 64)
    assert tiny["teacher_momentum"] == RULES["teacher_momentum_min"]  # a handful of steps: never a teacher that copies the student


def test_recipe_crops_small_images_less_and_sizes_dinos_prototypes():
    small = recipe(PretrainConfig(data="x", method="simclr", epochs=20), 720, 28)
    assert small["scale"] == (round((RULES["pretrain_crop_px"] / 28) ** 2, 2), 1.0)  # 16 px of 28: 33% at least
    large = recipe(PretrainConfig(data="x", method="simclr", epochs=20), 720, 256)
    assert large["scale"] == (0.08, 1.0)  # the method's own
    dino = recipe(PretrainConfig(data="x", method="dino", epochs=20), 720, 256)
    assert dino["scale"] == (0.4, 1.0) and dino["proj_dim"] == RULES["dino_prototypes"]
    given = recipe(PretrainConfig(data="x", method="dino", epochs=20, proj_dim=512, data_config={"scale": (0.2, 1.0)}), 720, 28)
    assert "scale" not in given and "proj_dim" not in given


def test_dino_pretrains_a_vit_on_global_and_local_views_of_two_sizes(tiny_shapes, tmp_path):
    """A ViT built for 160 px takes 64 px global and 32 px local views (its position embedding resampled)."""
    out = tmp_path / "vit"
    pretrain(
        data=str(tiny_shapes), method="dino", out=str(out), console=quiet(),
        **{**API_COMMON, "model": "test_vit", "epochs": 1, "data_config": {"img_size": 64}}, proj_hidden_dim=32, local_crops=2,
    )  # fmt: skip
    assert math.isfinite(read_metrics(out)[0]["loss"])
    weights = safetensors.torch.load_file(str(out / "backbone.safetensors"))
    backbone = timm.create_model("test_vit", num_classes=0)
    assert backbone.pos_embed.shape == weights["pos_embed"].shape  # the native grid is kept


def test_recipe_takes_two_local_views_where_they_cannot_be_smaller():
    small = recipe(PretrainConfig(data="x", method="dino", epochs=20, data_config={"img_size": 32}), 3200, 28)  # 32 px inputs: locals of 32 px too
    assert small["local_crops"] == RULES["same_size_local_crops"] and "cost what global ones do" in small["why"]["local_crops"]
    assert "local_crops" not in recipe(PretrainConfig(data="x", method="dino", epochs=20), 960, 150)  # 144 px: 64 px locals
    assert "local_crops" not in recipe(PretrainConfig(data="x", method="dino", epochs=20), 3200, 28)  # pretrained at 64 px: 32 px locals
    assert "local_crops" not in recipe(PretrainConfig(data="x", method="dino", epochs=20, local_crops=6), 3200, 28)
    assert "local_crops" not in recipe(PretrainConfig(data="x", method="byol", epochs=20), 3200, 28)
