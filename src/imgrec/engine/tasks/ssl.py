"""The interface every self-supervised method implements, and the pieces they share."""

from __future__ import annotations

import copy
import inspect
import math
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import nn

from imgrec.config import DataConfig
from imgrec.data.views import ViewSpec


class SSLMethod(nn.Module):
    """A backbone plus a method's heads and loss.

    ``forward(images, num_views)`` takes the normalised views of B images as one batch
    [V * B, 3, H, W], view-major (``images.chunk(V)[v]`` is view v of every image), and returns
    the loss. One batch means one backbone call for all views (batch-norm statistics over all). ``after_step(progress)`` runs after each
    optimizer step with the run's progress in [0, 1] (a momentum teacher moves there).
    ``backbone`` is a timm model without classifier (``num_classes=0``): its pooled features are
    what ``RUN/backbone.safetensors`` holds and what the probes and fine-tuning use.

    Class attributes give the paper's recipe, which ``PretrainConfig`` fields left at ``None``
    take: ``optimizer``, ``base_lr`` (per 256 images), ``weight_decay``, head sizes, ``views``.
    A new run records the method's options among them (``paper_options``) in its config.
    """

    name: ClassVar[str]
    optimizer: ClassVar[str] = "lars"
    base_lr: ClassVar[float]
    weight_decay: ClassVar[float]
    proj_hidden_dim: ClassVar[int]
    proj_dim: ClassVar[int]
    views: ClassVar[tuple[ViewSpec, ...]]
    crop_scale: ClassVar[tuple[float, float]] = (0.08, 1.0)  # the views' crop area range in the paper
    local_crops: ClassVar[int] = 0  # multi-crop methods: small views besides the global ones
    needs_teacher: ClassVar[bool] = False  # built with a frozen ``teacher`` and its width (``--teacher``: distillation)
    # The defaults that runs from before ``paper_options`` were recorded ran with, where they have changed since.
    unrecorded_defaults: ClassVar[dict[str, object]] = {}

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = pooled_width(backbone)

    @classmethod
    def build(cls, backbone: nn.Module, **options: object) -> SSLMethod:
        """The method around ``backbone`` with the options its constructor takes (``None``: the paper's)."""
        accepted = inspect.signature(cls.__init__).parameters
        given = {k: v for k, v in options.items() if v is not None}
        foreign = sorted(k for k in given if k not in accepted)
        if foreign:
            raise ValueError(f"{', '.join(foreign)} do(es) not apply to {cls.name}: leave it unset")
        return cls(backbone, **given)

    @classmethod
    def paper_options(cls) -> dict[str, object]:
        """The paper's value of each option the method takes that a class attribute of the same name
        holds (head sizes, temperature, teacher momentum...), and its number of local views if it
        has any: what ``None`` in a ``PretrainConfig`` stands for, to be recorded in a run's config
        so that a resumed run keeps it even where a later version changes the default."""
        accepted = inspect.signature(cls.__init__).parameters
        options = {k: getattr(cls, k) for k in accepted if k not in ("self", "backbone") and isinstance(getattr(cls, k, None), (int, float, str))}
        if cls.local_crops:
            options["local_crops"] = cls.local_crops
        return options

    @classmethod
    def view_specs(cls, data: DataConfig, local_crops: int | None = None) -> tuple[ViewSpec, ...]:
        """The views of each image: the paper's, each cropping ``data.scale`` (the recipe's choice)."""
        return cls.views

    def forward(self, images: torch.Tensor, num_views: int = 2) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, progress: float) -> None:
        """Called after every optimizer step; ``progress`` = steps done / total steps."""

    def backbone_state(self) -> dict[str, torch.Tensor]:
        return self.backbone.state_dict()


class MomentumTeacherMethod(SSLMethod):
    """An online branch (backbone, projector, predictor) that predicts, for each of two views, a
    momentum teacher's projection of the other view; the teacher (backbone + projector) follows
    the online weights by an EMA whose rate rises from ``teacher_momentum`` to 1 along a cosine.
    BYOL and MoCo v3 differ only in their heads and in ``pair_loss(predictions, targets)``; DINO
    keeps the teacher (of its backbone and head: ``teacher_of``) and has a forward of its own.

    Subclasses build ``projector`` and ``predictor``, then call ``init_teacher``.
    """

    title: ClassVar[str]  # the method's name in messages
    teacher_momentum: ClassVar[float]
    teacher_of: ClassVar[tuple[str, ...]] = ("backbone", "projector")  # the online modules the teacher copies, as teacher_<name>

    def init_teacher(self, teacher_momentum: float | None) -> None:
        for name in self.teacher_of:
            setattr(self, f"teacher_{name}", frozen_copy(getattr(self, name)))
        self.base_momentum = teacher_momentum if teacher_momentum is not None else type(self).teacher_momentum

    def pair_loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, num_views: int = 2) -> torch.Tensor:
        if num_views != 2:
            raise ValueError(f"{self.title} takes 2 views per image, got {num_views}")
        p1, p2 = self.predictor(self.projector(self.backbone(images))).float().chunk(2)
        with torch.no_grad():
            t1, t2 = self.teacher_projector(self.teacher_backbone(images)).float().chunk(2)
        return self.pair_loss(p1, t2) + self.pair_loss(p2, t1)  # both ways, summed as in both papers

    def after_step(self, progress: float) -> None:
        # A function of the step alone, so a resumed run moves its teacher exactly as before.
        momentum = cosine_momentum(self.base_momentum, progress)
        for name in self.teacher_of:
            ema_update(getattr(self, f"teacher_{name}"), getattr(self, name), momentum)


def pooled_width(model: nn.Module) -> int:
    """The width of a timm model's pooled output without classifier: its head's hidden size where it
    has one (MobileNetV3, GhostNet: a layer after the pooling), else its feature count."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def mlp(in_dim: int, hidden_dim: int, out_dim: int, *, layers: int = 2, last_norm: bool = False) -> nn.Sequential:
    """Linear-BN-ReLU blocks then a Linear: the projection and prediction heads of SimCLR and BYOL.

    ``last_norm`` adds a BatchNorm without affine parameters after the last layer (SimCLR's
    ImageNet projector has one).
    """
    blocks: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        blocks += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        dim = hidden_dim
    blocks.append(nn.Linear(dim, out_dim, bias=not last_norm))
    if last_norm:
        blocks.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*blocks)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that no optimizer sees: a momentum teacher's starting point."""
    teacher = copy.deepcopy(module)
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student, parameters and float buffers."""
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)  # BN running statistics and counters follow the student


def cosine_momentum(base: float, progress: float) -> float:
    """BYOL's teacher schedule: ``base`` at the start, rising to 1 along a cosine."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(max(progress, 0.0), 1.0)) + 1.0) / 2.0


def gather_across_ranks(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' ``tensor`` concatenated along dim 0 (gradients flow back to each rank's part),
    and this rank's index; the tensor itself and 0 outside distributed training."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor)), dist.get_rank()


__all__ = ["MomentumTeacherMethod", "SSLMethod", "cosine_momentum", "ema_update", "frozen_copy", "gather_across_ranks", "mlp", "pooled_width"]
