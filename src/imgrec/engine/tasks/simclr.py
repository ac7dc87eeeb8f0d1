"""SimCLR (Chen et al., 2020): two views, a projection MLP, and the NT-Xent contrastive loss.

Each image's other view is its positive; every other view in the global batch (all ranks, when
distributed) is a negative. Recipe of the paper's ImageNet runs: strong colour jitter
(strength 1: 0.8, 0.8, 0.8, 0.2 with p = 0.8), greyscale 0.2, Gaussian blur half the time;
LARS at 0.3 x batch / 256 with weight decay 1e-6; a 2-layer projector to 128 dimensions with
batch norm; temperature 0.1 (the paper's best at large batches; small batches like 0.2-0.5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imgrec.data.views import ViewSpec
from imgrec.engine.tasks.ssl import SSLMethod, gather_across_ranks, mlp

SIMCLR_VIEW = ViewSpec(jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, greyscale_p=0.2, blur_p=0.5)


class SimCLR(SSLMethod):
    name = "simclr"
    optimizer = "lars"
    base_lr = 0.3
    weight_decay = 1e-6
    proj_hidden_dim = 2048
    proj_dim = 128
    temperature = 0.1
    views = (SIMCLR_VIEW, SIMCLR_VIEW)

    def __init__(self, backbone: nn.Module, *, proj_hidden_dim: int | None = None, proj_dim: int | None = None, temperature: float | None = None):
        super().__init__(backbone)
        self.projector = mlp(self.feature_dim, proj_hidden_dim or self.proj_hidden_dim, proj_dim or self.proj_dim, last_norm=True)
        self.temperature = temperature if temperature is not None else type(self).temperature

    def forward(self, images: torch.Tensor, num_views: int = 2) -> torch.Tensor:
        if num_views != 2:
            raise ValueError(f"SimCLR takes 2 views per image, got {num_views}")
        z = self.projector(self.backbone(images)).float()
        z1, z2 = z.chunk(2)
        return nt_xent(z1, z2, self.temperature)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """The normalised-temperature cross-entropy of SimCLR for pairs (z1[i], z2[i]).

    Each of the 2B local embeddings is classified among all 2N embeddings of the global batch
    (N = B x world size; itself excluded): its pair is the right answer. Mean over the 2B.
    Computed in float32 even under autocast: logits of 1/temperature scale need the precision.
    """
    with torch.autocast(z1.device.type, enabled=False):
        return _nt_xent(z1.float(), z2.float(), temperature)


def _nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    g1, rank = gather_across_ranks(z1)
    g2, _ = gather_across_ranks(z2)
    local, keys = torch.cat([z1, z2]), torch.cat([g1, g2])
    b, n = z1.shape[0], g1.shape[0]
    logits = local @ keys.T / temperature
    index = torch.arange(b, device=z1.device) + rank * b
    self_index = torch.cat([index, index + n])
    positive = torch.cat([index + n, index])
    rows = torch.arange(2 * b, device=z1.device)
    logits = logits.index_put((rows, self_index), torch.tensor(float("-inf"), device=z1.device))
    return F.cross_entropy(logits, positive)


__all__ = ["SimCLR", "nt_xent"]
