"""``onnx-int8``: onnxruntime on the CPU, running RUN/model.int8.onnx.

Static post-training quantisation with onnxruntime (QDQ, per-channel int8 weights, uint8
activations) of the fp32 ONNX export, calibrated on a few hundred of the run's images.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from imgrec.card import ModelCard
from imgrec.inference.backends.base import metadata
from imgrec.inference.backends.onnx import METADATA_KEY, Onnx, write_onnx

QUANTIZATION = "int8 static QDQ, onnxruntime"


def quantize_int8(fp32: Path, path: Path, calibration: torch.Tensor, info: dict) -> None:
    """Static post-training quantisation of the ONNX file ``fp32`` into ``path``, calibrated on ``calibration``."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration.split(16))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch.numpy()}

    with tempfile.TemporaryDirectory() as tmp:  # the pre-processed copy is a step, not a result
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(path), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )  # fmt: skip
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps({**info, "quantization": QUANTIZATION})
    onnx.save(model, str(path))


class OnnxInt8(Onnx):
    name = "onnx-int8"
    file = "model.int8.onnx"
    calibrates = True

    def export(self, model: torch.nn.Module, example: torch.Tensor, card: ModelCard, path: Path, *, calibration: torch.Tensor | None = None,
               fp32: Path | None = None) -> None:  # fmt: skip
        """Quantise ``fp32`` (an fp32 export already written), or a temporary export of ``model``."""
        if calibration is None:
            raise ValueError("int8 quantisation needs calibration images")
        with tempfile.TemporaryDirectory() as tmp:  # the fp32 model is a step, not a result
            if fp32 is None:
                fp32 = Path(tmp) / "fp32.onnx"
                write_onnx(model, example, metadata(card), fp32)
            quantize_int8(fp32, path, calibration, metadata(card))


__all__ = ["QUANTIZATION", "OnnxInt8", "quantize_int8"]
