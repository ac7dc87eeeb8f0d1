"""DINO (Caron et al., 2021): self-distillation without labels, for ResNets and ViTs.

A student (backbone + head) is trained to give, for every view of an image, the same
distribution over ``proj_dim`` prototypes as a momentum teacher gives for the image's global
views. Multi-crop: two global views at the input size and ``local_crops`` small views (96/224 of
the side) of small parts of the image; the teacher sees only the global views, the student all,
and every (teacher global view, other student view) pair is a term of the loss. Collapse is
avoided by the teacher's centring (its outputs less a running mean of them, momentum 0.9, in the
paper; Sinkhorn-Knopp here by default, below) and sharpening (temperature 0.04 rising to 0.07
over the first 30% of the run, against the student's 0.1). The teacher follows the student by
an EMA whose rate rises from 0.996 to 1 along a cosine. Head: a 3-layer MLP (2048 wide, GELU)
to a 256-d bottleneck, L2-normalised, then a weight-normalised linear layer (its weights' norm
fixed at 1) to the prototypes.
Two changes from DINOv2 (Oquab et al., 2023). By default the teacher's targets come from
Sinkhorn-Knopp (3 iterations: every prototype gets an equal share of the batch) rather than the
running centre (``centering="ema"``, the paper's): on small real sets it measured +0.9 linear
and +0.4 kNN points on fashion-mnist, -0.4 and +7.1 linear (+2.9 and +6.3 kNN) on photographs
at two seeds (BENCHMARKS.md). An option, ``koleo_weight``, adds the KoLeo term, which spreads
the backbone's features of each global view over the batch (minus the mean log distance of each
L2-normalised feature to its nearest neighbour); with it at 0.1 the photographs' linear probe
fell 3.8 points, so it is off.
Views of the paper: blur always on the first global view, rarely on the second (which is
solarised a fifth of the time), half the time on the locals; globals crop 40-100% of the image,
locals 5-40%.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from imgrec.config import DataConfig, PretrainConfig
from imgrec.data.views import ViewSpec
from imgrec.distributed import all_reduce, world_size
from imgrec.engine.tasks.ssl import MomentumTeacherMethod

JITTER = (0.4, 0.4, 0.2, 0.1)
LOCAL_SIZE = 96 / 224  # the local views' side, as a fraction of the global one


class DINOHead(nn.Module):
    """MLP (Linear-GELU x2, Linear to ``bottleneck``), L2 normalisation, and a linear layer onto
    ``out_dim`` prototypes whose weight rows are normalised to unit length (DINO's weight norm with
    its gain frozen at 1): the logits are cosines between the embedding and each prototype."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        embedding = F.normalize(self.mlp(features), dim=-1)
        return F.linear(embedding, F.normalize(self.prototypes, dim=-1))


def teacher_temperature(progress: float, start: float, end: float, warmup: float) -> float:
    """The teacher's temperature: ``start`` rising linearly to ``end`` over the first ``warmup`` of the run."""
    if warmup <= 0 or progress >= warmup:
        return end
    return start + (end - start) * max(progress, 0.0) / warmup


CENTERINGS = PretrainConfig.CENTERINGS


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Targets [N, K] from scores [N, K] (logits over temperature) by Sinkhorn-Knopp: exp(scores)
    scaled alternately so that every one of the K prototypes holds 1/K of the batch and every row
    1/N, ``iterations`` times; returned with rows summing to 1. Under DDP the batch is every rank's."""
    with torch.autocast(scores.device.type, enabled=False):
        scores = scores.float()
        top = all_reduce(scores.max().clone(), "max")  # one shift for all ranks: exp stays finite
        q = torch.exp(scores - top).t()  # [K, N]
        prototypes, rows = q.shape[0], q.shape[1] * world_size()
        q /= all_reduce(q.sum())
        for _ in range(iterations):
            q /= all_reduce(q.sum(dim=1, keepdim=True))
            q /= prototypes
            q /= q.sum(dim=0, keepdim=True)
            q /= rows
        return (q * rows).t()


def dino_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    global_views: int = 2,
    centering: str = "ema",
) -> torch.Tensor:
    """DINO's cross-entropy, in float32 even under autocast.

    ``student``: logits [V * B, K] of all V views, view-major, the ``global_views`` first;
    ``teacher``: logits [global_views * B, K] of the global views. The teacher's targets are
    softmax((teacher - center) / teacher_temp) (``centering="ema"``), or Sinkhorn-Knopp of
    teacher / teacher_temp over all global views (``"sinkhorn"``, ``center`` unused); the
    student's predictions log_softmax(student / student_temp); the loss is the mean over every
    pair (teacher view i, student view j != i) of the batch-mean of -sum(target * log prediction).
    """
    with torch.autocast(student.device.type, enabled=False):
        views = student.shape[0] // (teacher.shape[0] // global_views)
        log_p = F.log_softmax(student.float() / student_temp, dim=-1).chunk(views)
        if centering == "sinkhorn":
            targets = sinkhorn_knopp(teacher.detach().float() / teacher_temp).chunk(global_views)
        else:
            targets = F.softmax((teacher.detach().float() - center) / teacher_temp, dim=-1).chunk(global_views)
        terms = [(-t * log_p[j]).sum(dim=-1).mean() for i, t in enumerate(targets) for j in range(views) if j != i]
        return torch.stack(terms).mean()


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo (DINOv2): -mean over the rows of log(distance to the nearest other row), the rows
    [B, D] L2-normalised first; in float32. Low when the batch's features spread out."""
    with torch.autocast(features.device.type, enabled=False):
        x = F.normalize(features.float(), dim=-1)
        distances = torch.cdist(x, x)
        distances = distances + torch.eye(x.shape[0], device=x.device, dtype=x.dtype) * 4.0  # never the row itself (unit vectors are at most 2 apart)
        return -torch.log(distances.min(dim=1).values + eps).mean()


class DINO(MomentumTeacherMethod):
    name = "dino"
    title = "DINO"
    teacher_of = ("backbone", "head")
    # The paper's ViT recipe (AdamW, 5e-4 per 256, decay 0.04); its ResNet-50 run used LARS at 0.3 with 1e-6.
    optimizer = "lars"
    base_lr = 0.3
    weight_decay = 1e-6
    proj_hidden_dim = 2048
    proj_dim = 65536  # prototypes
    bottleneck = 256
    teacher_momentum = 0.996
    local_crops = 6
    crop_scale = (0.4, 1.0)  # the global views'
    local_scale = (0.05, 0.4)
    student_temp = 0.1
    teacher_temp = (0.04, 0.07, 0.3)  # start, end, fraction of the run to rise over
    center_momentum = 0.9
    centering = "sinkhorn"  # DINOv2's; "ema": the paper's running centre
    unrecorded_defaults = {"centering": "ema"}  # the default before Sinkhorn-Knopp became it
    koleo_weight = 0.0
    views = (
        ViewSpec(jitter=JITTER, jitter_p=0.8, greyscale_p=0.2, blur_p=1.0),
        ViewSpec(jitter=JITTER, jitter_p=0.8, greyscale_p=0.2, blur_p=0.1, solarize_p=0.2),
    ) + (ViewSpec(jitter=JITTER, jitter_p=0.8, greyscale_p=0.2, blur_p=0.5, size=LOCAL_SIZE, scale=local_scale),) * local_crops

    progress: torch.Tensor
    center: torch.Tensor

    def __init__(
        self,
        backbone: nn.Module,
        *,
        proj_hidden_dim: int | None = None,
        proj_dim: int | None = None,
        temperature: float | None = None,
        teacher_momentum: float | None = None,
        centering: str | None = None,
        koleo_weight: float | None = None,
    ):
        super().__init__(backbone)
        self.centering = centering or type(self).centering
        if self.centering not in CENTERINGS:
            raise ValueError(f"DINO's centring is one of {', '.join(CENTERINGS)}, not {self.centering!r}")
        self.koleo_weight = type(self).koleo_weight if koleo_weight is None else koleo_weight
        out = proj_dim or self.proj_dim
        self.head = DINOHead(self.feature_dim, out, proj_hidden_dim or self.proj_hidden_dim, min(self.bottleneck, out))
        self.init_teacher(teacher_momentum)
        start, end, self.temp_warmup = type(self).teacher_temp
        self.temp_start, self.temp_end = (temperature, temperature) if temperature is not None else (start, end)
        # Buffers, so that a checkpoint holds them and a resumed run goes on exactly.
        self.register_buffer("center", torch.zeros(1, out))
        self.register_buffer("progress", torch.zeros((), dtype=torch.float64))
        # The teacher outputs of the step under way (summed over its micro-batches), for the centre.
        self.pending: torch.Tensor | None = None
        self.pending_rows = 0

    @classmethod
    def view_specs(cls, data: DataConfig, local_crops: int | None = None) -> tuple[ViewSpec, ...]:
        """The two global views (cropping ``data.scale``) and ``local_crops`` local views cropping
        from the paper's 5% (or the global views' smallest area, if smaller) up to that smallest area."""
        local_crops = cls.local_crops if local_crops is None else local_crops
        smallest = float(data.scale[0])
        local = replace(cls.views[2], scale=(min(cls.local_scale[0], smallest), smallest))
        return cls.views[:2] + (local,) * local_crops

    def forward(self, images: torch.Tensor | list[torch.Tensor], num_views: int = 2) -> torch.Tensor:
        """The loss of ``num_views`` views of B images, view-major, the 2 global ones first: one
        tensor when all views share a size, else one tensor per size (globals, then locals)."""
        crops = list(images) if isinstance(images, (list, tuple)) else [images]
        rows = sum(c.shape[0] for c in crops)
        if num_views < 2 or rows % num_views:
            raise ValueError(f"DINO takes 2 global views and any local ones per image: {rows} views do not split into {num_views} per image")
        globals_ = crops[0][: 2 * (rows // num_views)]  # the first two views of every image
        features = [self.backbone(c) for c in crops]  # one backbone call per view size
        student = torch.cat([self.head(f) for f in features])
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(globals_)).float()
        temp = teacher_temperature(float(self.progress), self.temp_start, self.temp_end, self.temp_warmup)
        loss = dino_loss(student, teacher, self.center, self.student_temp, temp, centering=self.centering)
        if self.koleo_weight:  # over each global view's features, averaged over the two
            spread = [koleo_loss(f) for f in features[0][: globals_.shape[0]].chunk(2)]
            loss = loss + self.koleo_weight * torch.stack(spread).mean()
        if self.training and self.centering == "ema":  # the centre moves once the step is taken (``after_step``), by all its images
            total = teacher.detach().sum(dim=0, keepdim=True)
            self.pending = total if self.pending is None else self.pending + total
            self.pending_rows += teacher.shape[0]
        return loss

    @torch.no_grad()
    def update_center(self) -> None:
        """center = m * center + (1 - m) * the mean teacher output over the step's global batch
        (every micro-batch, every rank); a step whose outputs are not finite leaves it as it was."""
        if self.pending is None:
            return
        total, count = self.pending, torch.tensor(float(self.pending_rows), device=self.pending.device)
        self.pending, self.pending_rows = None, 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
            dist.all_reduce(count)
        if torch.isfinite(total).all():
            self.center.mul_(self.center_momentum).add_(total / count, alpha=1 - self.center_momentum)

    def after_step(self, progress: float) -> None:
        self.update_center()
        self.progress.fill_(progress)
        super().after_step(progress)  # the teacher's EMA


__all__ = ["CENTERINGS", "DINO", "DINOHead", "dino_loss", "koleo_loss", "sinkhorn_knopp", "teacher_temperature"]
