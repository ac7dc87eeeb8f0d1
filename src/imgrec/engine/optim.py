"""Optimisers with the usual ImageNet conventions, and the per-step cosine schedule with warmup.

Weight decay applies to weights only: biases and normalisation parameters (every tensor of one
dimension) are excluded, as in timm and torchvision's references. The learning rate scales
linearly with the images per optimizer step (Goyal et al., 2017): ``lr = base_lr * batch / 256``.
"""

from __future__ import annotations

import math

import torch

BASE_LR = {"adamw": 1e-3, "sgd": 0.1}  # per 256 images
WEIGHT_DECAY = {"adamw": 0.05, "sgd": 1e-4}


def scaled_lr(opt: str, global_batch: int, base_lr: float | None = None) -> float:
    """The learning rate for ``global_batch`` images per step: ``base_lr * global_batch / 256``."""
    return (BASE_LR[opt] if base_lr is None else base_lr) * global_batch / 256


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups of the trainable parameters: with weight decay (weights) and without (biases, norms)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def create_optimizer(model: torch.nn.Module, opt: str, lr: float, weight_decay: float | None = None, momentum: float = 0.9) -> torch.optim.Optimizer:
    """AdamW, or SGD with Nesterov momentum, over ``param_groups(model)``."""
    weight_decay = WEIGHT_DECAY[opt] if weight_decay is None else weight_decay
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters: nothing to optimise (is everything frozen?)")
    if opt not in BASE_LR:
        raise ValueError(f"unknown optimizer {opt!r}: use adamw or sgd")
    make = {
        "adamw": lambda **kw: torch.optim.AdamW(groups, lr=lr, **kw),
        "sgd": lambda **kw: torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True, **kw),
    }[opt]
    try:  # one fused kernel for all parameters (CPU and CUDA): fewer passes over memory than foreach
        return make(fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without fused kernels
        return make()


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from ~0 over ``warmup_steps``, then cosine decay to ``min_lr``, stepped per optimizer step."""
    peak = optimizer.param_groups[0]["lr"]
    floor = min(min_lr / peak, 1.0) if peak > 0 else 0.0
    warmup_steps = min(warmup_steps, total_steps - 1) if total_steps > 1 else 0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


__all__ = ["BASE_LR", "WEIGHT_DECAY", "cosine_schedule", "create_optimizer", "param_groups", "scaled_lr"]
