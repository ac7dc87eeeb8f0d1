"""The interface every self-supervised method implements, and the pieces they share."""

from __future__ import annotations

import copy
import inspect
import math
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import nn

from imgrec.ssl.views import ViewSpec


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
    """

    name: ClassVar[str]
    optimizer: ClassVar[str] = "lars"
    base_lr: ClassVar[float]
    weight_decay: ClassVar[float]
    proj_hidden_dim: ClassVar[int]
    proj_dim: ClassVar[int]
    views: ClassVar[tuple[ViewSpec, ...]]

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = int(backbone.num_features)

    @classmethod
    def build(cls, backbone: nn.Module, **options: object) -> SSLMethod:
        """The method around ``backbone`` with the options its constructor takes (``None``: the paper's)."""
        accepted = inspect.signature(cls.__init__).parameters
        given = {k: v for k, v in options.items() if v is not None}
        foreign = sorted(k for k in given if k not in accepted)
        if foreign:
            raise ValueError(f"{', '.join(foreign)} do(es) not apply to {cls.name}: leave it unset")
        return cls(backbone, **given)

    def forward(self, images: torch.Tensor, num_views: int = 2) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, progress: float) -> None:
        """Called after every optimizer step; ``progress`` = steps done / total steps."""

    def backbone_state(self) -> dict[str, torch.Tensor]:
        return self.backbone.state_dict()


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


__all__ = ["SSLMethod", "cosine_momentum", "ema_update", "frozen_copy", "gather_across_ranks", "mlp"]
