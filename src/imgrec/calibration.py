"""How far a classifier's probabilities can be trusted: expected calibration error, NLL, Brier
score, the reliability diagram's bins, and temperature scaling.

A model is calibrated when, of the answers it gives with 80% confidence, 80% are right. Networks
trained with cross-entropy are usually over-confident; dividing the logits by one temperature
``T`` fitted on held-out images (Guo et al., 2017, "On Calibration of Modern Neural Networks")
fixes most of it and never changes the predicted class (the argmax of ``logits / T`` is the
argmax of ``logits`` for any ``T > 0``). ``imgrec calibrate`` stores ``T`` in the model card;
evaluate, predict and serve apply it.

Pure tensor functions (no model, no data): evaluate, calibrate and the tests call them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

ECE_BINS = 15  # equal-width confidence bins, as Guo et al. report ECE
MIN_IMAGES = 50  # fewer held-out images than this fit a temperature to noise
MIN_MISTAKES = 1  # with no wrong answer the NLL is lowest at T -> 0: every answer certain, future mistakes included
# (one is enough: on 181 held-out digit scans with one mistake the fit gave T = 0.48 and the ECE of unseen scans fell from 11.7% to 1.2%)
TEMPERATURE_RANGE = (0.05, 20.0)  # a fitted T outside this means the held-out set is too small or the logits degenerate


def reliability_bins(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """The reliability diagram: ``bins`` equal-width bins of the top-1 confidence over (0, 1],
    bin ``b`` holding confidences in ``(b / bins, (b + 1) / bins]``; for each, its edges, the
    images in it, their mean confidence and their accuracy (both fractions; None when empty)."""
    probs = torch.softmax(logits.double(), dim=1)
    confidence, predicted = probs.max(dim=1)
    correct = predicted.eq(labels).double()
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    rows = []
    for b in range(bins):
        inside = index == b
        n = int(inside.sum())
        rows.append({
            "lower": b / bins, "upper": (b + 1) / bins, "n": n,
            "confidence": float(confidence[inside].mean()) if n else None,
            "accuracy": float(correct[inside].mean()) if n else None,
        })  # fmt: skip
    return rows


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE in percent: the bins' |accuracy - confidence|, weighted by the share of images in each."""
    return _ece(reliability_bins(logits, labels, bins))


def _ece(rows: list[dict[str, Any]]) -> float:
    total = sum(row["n"] for row in rows)
    return 100.0 * sum(row["n"] * abs(row["accuracy"] - row["confidence"]) for row in rows if row["n"]) / total


def brier_score(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The mean over images of sum_c (p_c - [c is the label])^2: 0 is perfect, 2 the worst."""
    probs = torch.softmax(logits.double(), dim=1)
    onehot = F.one_hot(labels, probs.shape[1]).double()
    return float(((probs - onehot) ** 2).sum(dim=1).mean())


def calibration_metrics(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> dict[str, Any]:
    """``ece`` (percent), ``nll`` (mean cross-entropy), ``brier`` and the ``reliability`` bins of
    ``logits`` as they are (divide them by a temperature first to score the calibrated model)."""
    logits, labels = logits.detach().cpu(), labels.detach().to(torch.int64).cpu()
    rows = reliability_bins(logits, labels, bins)
    return {
        "ece": _ece(rows),
        "nll": float(F.cross_entropy(logits.double(), labels)),
        "brier": brier_score(logits, labels),
        "reliability": rows,
    }


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature ``T`` that minimises the NLL of ``logits / T`` on these (held-out) images.

    One parameter, ``log T`` (so ``T`` stays positive), by L-BFGS in float64 from ``T = 1``; the
    result is clamped to ``TEMPERATURE_RANGE`` and is 1.0 where no ``T`` does better than 1.
    """
    logits, labels = logits.detach().double().cpu(), labels.detach().to(torch.int64).cpu()
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"fit_temperature needs logits [N, C] and N labels, N > 0; got {tuple(logits.shape)} and {tuple(labels.shape)}")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    low, high = TEMPERATURE_RANGE
    temperature = min(max(float(log_t.detach().exp()), low), high)
    with torch.no_grad():
        if not float(F.cross_entropy(logits / temperature, labels)) < float(F.cross_entropy(logits, labels)):
            return 1.0
    return temperature


def unfit_reason(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> str | None:
    """Why a temperature fitted on these images should not be used, or None: too few images, no
    mistake (the NLL then keeps falling as T -> 0, making the model certain of everything,
    its future mistakes included), or a fit stuck at the floor of ``TEMPERATURE_RANGE``."""
    mistakes = int((logits.argmax(dim=1) != labels).sum())
    if len(labels) < MIN_IMAGES:
        return f"{len(labels)} labelled images; a temperature fitted on fewer than {MIN_IMAGES} is noise"
    if mistakes < MIN_MISTAKES:
        return (f"the model gets all {len(labels)} of these images right; without a mistake the best temperature "
                "is near 0, which would make it certain of every answer, its future mistakes included")  # fmt: skip
    if temperature <= TEMPERATURE_RANGE[0]:  # the upper edge only makes a model that knows little say so
        return f"the fitted temperature {temperature:g} is at the floor imgrec accepts ({TEMPERATURE_RANGE[0]}): the logits are degenerate"
    return None


def checked_temperature(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict[str, Any]]:
    """The temperature fitted on these held-out images and ``before_and_after`` of it, or a
    ValueError with ``unfit_reason`` where it should not be used (``imgrec calibrate`` and
    ``train --calibrate`` both go through here)."""
    temperature = fit_temperature(logits, labels) if len(labels) >= MIN_IMAGES else 1.0
    reason = unfit_reason(logits, labels, temperature)
    if reason:
        raise ValueError(reason)
    return temperature, before_and_after(logits, labels, temperature)


def before_and_after(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict[str, Any]:
    """What dividing ``logits`` by ``temperature`` does on these images: their number, and ECE
    (percent), NLL and Brier score before and after (what the model card's ``calibration`` holds)."""
    before, after = calibration_metrics(logits, labels), calibration_metrics(logits / temperature, labels)
    return {
        "images": len(labels),
        **{f"{key}_before": before[key] for key in ("ece", "nll", "brier")},
        **{f"{key}_after": after[key] for key in ("ece", "nll", "brier")},
    }


def tempered(logits: torch.Tensor, temperature: float | None) -> torch.Tensor:
    """``logits / temperature`` (``None`` or 1: the logits themselves). The argmax is the same."""
    return logits if temperature in (None, 1.0) else logits / temperature


__all__ = ["ECE_BINS", "MIN_IMAGES", "MIN_MISTAKES", "unfit_reason", "TEMPERATURE_RANGE", "before_and_after", "checked_temperature", "brier_score", "calibration_metrics", "expected_calibration_error", "fit_temperature", "reliability_bins", "tempered"]
