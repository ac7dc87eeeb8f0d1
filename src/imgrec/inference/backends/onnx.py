"""``onnx``: onnxruntime on the CPU, running RUN/model.onnx (fp32, opset 18, dynamic batch axis).

The file is written by torch.onnx's dynamo exporter with the model card in its metadata
(``imgrec``), so that a server needs nothing else.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from imgrec.card import ModelCard
from imgrec.inference.backends.base import Backend, Forward, metadata

ONNX_OPSET = 18  # onnxruntime 1.16+ runs every op of it; newer opsets gain nothing for CNNs
METADATA_KEY = "imgrec"


def onnx_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def write_onnx(model: torch.nn.Module, example: torch.Tensor, info: dict[str, Any], path: Path) -> None:
    """``model`` as ONNX at ``path``, batch axis dynamic, ``info`` in its metadata."""
    import onnx

    batch = torch.export.Dim("batch", min=1, max=4096)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # the exporter narrates each pass
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=ONNX_OPSET, input_names=["input"], output_names=["logits"],
            dynamic_shapes=({0: batch},), verbose=False,
        )  # fmt: skip
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(info)
    onnx.save(proto, str(path))


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The model card stored in an ONNX file written by imgrec."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if METADATA_KEY not in props:
        raise ValueError(f"{path} has no imgrec metadata: export it with `imgrec export`")
    return json.loads(props[METADATA_KEY])


class Onnx(Backend):
    name = "onnx"
    file = "model.onnx"
    devices = ("cpu",)

    def load(self, model: torch.nn.Module | None, device: torch.device, *, precision: str = "auto", path: str | os.PathLike | None = None,
             threads: int | None = None) -> Forward:  # fmt: skip
        self.check_device(device)
        session = onnx_session(self.require_file(path), threads)
        return lambda x: torch.from_numpy(session.run(None, {"input": x.float().cpu().contiguous().numpy()})[0])

    def export(self, model: torch.nn.Module, example: torch.Tensor, card: ModelCard, path: Path, *, calibration: torch.Tensor | None = None,
               fp32: Path | None = None) -> None:  # fmt: skip
        write_onnx(model, example, metadata(card), path)


__all__ = ["METADATA_KEY", "ONNX_OPSET", "Onnx", "onnx_session", "read_onnx_metadata", "write_onnx"]
