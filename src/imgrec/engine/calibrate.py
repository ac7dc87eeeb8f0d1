"""``imgrec calibrate RUN --data VAL``: fit the temperature that makes a model's probabilities
honest on held-out images and store it in the model card (``imgrec.calibration``).

Predict, evaluate and serve read the card and divide the logits by the temperature before the
softmax; the predicted class never changes, only how sure the model says it is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rich.console import Console

from imgrec.calibration import checked_temperature
from imgrec.card import MODEL_CARD, ModelCard
from imgrec.engine.evaluate import model_outputs
from imgrec.utils import write_json


def calibrate(run: str | os.PathLike, data: str | os.PathLike, *, write: bool = True, console: Console | None = None, **options: Any) -> dict[str, Any]:
    """Fit a temperature on the labelled images ``data`` (held out from training: a val folder, a
    dataset root whose ``val/`` or recorded split is used, as ``evaluate`` reads it) and, with
    ``write``, store it in ``run``'s model.json. Any temperature already stored is ignored: the fit
    starts from the raw logits. ``options`` are ``model_outputs``'s (labels, batch_size, workers,
    device, precision, max_bad_fraction, loader, tta: fit with the test-time augmentation the model
    will be used with; the card records it). The cards beside exported files are written again
    with the temperature. Returns the temperature, the images it was
    fitted on, and the ECE (percent), NLL and Brier score before and after.
    """
    out = model_outputs(run, data, console=console, **options)
    try:
        temperature, report = checked_temperature(out.logits, out.labels)
    except ValueError as exc:
        raise ValueError(f"{data}: {exc}. The model is left uncalibrated; calibrate on more held-out images, or harder ones") from None
    result = {"temperature": temperature, "data": str(data), **report}
    result["tta"] = options.get("tta")
    if write:
        card = out.card
        card.temperature = temperature
        card.calibration = {key: value for key, value in result.items() if key != "temperature"}
        card.write(run)
        result["card"] = str(Path(run) / MODEL_CARD)
        result["exports"] = restamp_exports(run, card)
    return result


def restamp_exports(run: str | os.PathLike, card: ModelCard) -> list[str]:
    """The cards beside the files ``imgrec export`` wrote in ``run`` (FILE.json), written again with
    the temperature, for those who serve an exported file without imgrec (the copy inside the
    file keeps the card of its export: export again to renew it); the files they name."""
    stamped = []
    for sidecar in sorted(Path(run).glob("*.json")):
        exported = sidecar.with_name(sidecar.name[: -len(".json")])
        if exported.suffix in (".onnx", ".xml", ".pt") and exported.is_file():
            write_json(sidecar, card.to_dict())
            stamped.append(str(exported))
    return stamped


__all__ = ["calibrate"]
