"""Optimisers with the usual ImageNet conventions, and the per-step cosine schedule with warmup.

Weight decay applies to weights only: biases and normalisation parameters (every tensor of one
dimension) are excluded, as in timm and torchvision's references. The learning rate scales
linearly with the images per optimizer step (Goyal et al., 2017): ``lr = base_lr * batch / 256``.
LARS (You et al., 2017) is the optimiser of SimCLR and BYOL at large batches; layer-wise rate
decay (BEiT's, for fine-tuning) lowers the rate of each block below the head by a factor.
"""

from __future__ import annotations

import math

import torch

BASE_LR = {"adamw": 1e-3, "sgd": 0.1, "lars": 0.3}  # per 256 images
WEIGHT_DECAY = {"adamw": 0.05, "sgd": 1e-4, "lars": 1e-6}


def scaled_lr(opt: str, global_batch: int, base_lr: float | None = None) -> float:
    """The learning rate for ``global_batch`` images per step: ``base_lr * global_batch / 256``."""
    return (BASE_LR[opt] if base_lr is None else base_lr) * global_batch / 256


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """The trainable parameters in groups: with weight decay (weights) and without (biases, norms,
    and what the model's ``no_weight_decay()`` names, as timm does).

    Each group's ``decay`` key says which. With ``layer_decay`` the groups are also split by
    depth (timm's ``group_matcher`` of the model: stem, each stage's blocks, head) and each
    holds ``lr_scale = layer_decay ** (layers below the head)``.
    """
    depth, top = _layer_depths(model) if layer_decay is not None else ({}, 0)
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()  # a ViT's position embedding, class token
    groups: dict[tuple[bool, int], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim <= 1 or name.endswith(".bias") or name in skip)
        layer = depth.get(name, top)
        group = groups.setdefault((decay, layer), {"params": [], "weight_decay": weight_decay if decay else 0.0, "decay": decay})
        if layer_decay is not None:
            group["lr_scale"] = layer_decay ** (top - layer)
        group["params"].append(param)
    return [groups[key] for key in sorted(groups, key=lambda k: (not k[0], k[1]))]


def _layer_depths(model: torch.nn.Module) -> tuple[dict[str, int], int]:
    """Parameter name -> depth (0 = stem) from timm's group matcher, and the head's depth."""
    from timm.models import group_parameters

    if not hasattr(model, "group_matcher"):
        raise ValueError(f"{type(model).__name__} does not say how its layers are grouped (no group_matcher): --layer-decay needs a timm model that does")
    depth = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    return depth, max(depth.values(), default=0)


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step per tensor is scaled to ``trust * |w| / |g + wd w|``.

    Groups with ``decay=False`` (biases, norms) take a plain momentum step without weight decay
    or scaling, as in SimCLR and BYOL.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, trust: float = 1e-3):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "trust": trust, "decay": True})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if group["decay"]:
                    update = update.add(param, alpha=group["weight_decay"])
                    weight_norm, update_norm = torch.linalg.vector_norm(param), torch.linalg.vector_norm(update)
                    ratio = torch.where((weight_norm > 0) & (update_norm > 0), group["trust"] * weight_norm / update_norm, 1.0)
                    update = update.mul(ratio)
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = update.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                param.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def create_optimizer(
    model: torch.nn.Module,
    opt: str,
    lr: float,
    weight_decay: float | None = None,
    momentum: float = 0.9,
    layer_decay: float | None = None,
    lars_trust: float = 1e-3,
) -> torch.optim.Optimizer:
    """AdamW, SGD with Nesterov momentum, or LARS, over ``param_groups(model)``.

    A group's learning rate is ``lr`` times its ``lr_scale`` (layer decay), so that the
    schedule, which multiplies each group's starting rate, keeps the ratios.
    """
    if opt not in BASE_LR:
        raise ValueError(f"unknown optimizer {opt!r}: use {', '.join(BASE_LR)}")
    weight_decay = WEIGHT_DECAY[opt] if weight_decay is None else weight_decay
    groups = param_groups(model, weight_decay, layer_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters: nothing to optimise (is everything frozen?)")
    for group in groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    if opt == "lars":
        return LARS(groups, lr=lr, momentum=momentum, trust=lars_trust)
    make = {
        "adamw": lambda **kw: torch.optim.AdamW(groups, lr=lr, **kw),
        "sgd": lambda **kw: torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0, **kw),
    }[opt]
    try:  # one fused kernel for all parameters (CPU and CUDA): fewer passes over memory than foreach
        return make(fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without fused kernels
        return make()


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from ~0 over ``warmup_steps``, then cosine decay to ``min_lr``, stepped per optimizer step."""
    peak = max(group["lr"] for group in optimizer.param_groups)
    floor = min(min_lr / peak, 1.0) if peak > 0 else 0.0
    warmup_steps = min(warmup_steps, total_steps - 1) if total_steps > 1 else 0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def apply_schedule(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set every group's rate from ``scheduler``'s position: after a resume, the schedule of this
    run (its epochs may have been raised) applies from the first resumed step."""
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def peak_lr(optimizer: torch.optim.Optimizer) -> float:
    """The largest group rate (with layer decay the head's; the other groups are scaled down)."""
    return max(group["lr"] for group in optimizer.param_groups)


__all__ = ["BASE_LR", "LARS", "WEIGHT_DECAY", "apply_schedule", "cosine_schedule", "create_optimizer", "param_groups", "peak_lr", "scaled_lr"]
