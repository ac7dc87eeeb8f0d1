"""``openvino`` and ``openvino-int8``: Intel's OpenVINO runtime on the CPU, from an OpenVINO IR.

``openvino`` runs RUN/model.openvino.xml (+ .bin): the network converted from PyTorch by
``openvino.convert_model`` with a dynamic batch axis, weights kept in fp32 and run at f32 (the
CPU plugin would otherwise pick bf16 where the CPU has it, and drift from the eager model).

``openvino-int8`` runs RUN/model.int8.openvino.xml: NNCF's post-training quantisation, accuracy
controlled. NNCF quantises the fp32 IR on the calibration images, then measures the quantised
model's top-1 agreement with the fp32 network on the same images; while it loses more than
``MAX_DROP`` of it (0.5%), the layers that cost the most are put back to floating point one by one (an
ignored scope found by measurement; a model whose plain int8 loses no more than that is kept as it
is, without the ranking's cost). Which layers stayed in floating point is recorded in the
file's metadata beside the card. The card travels inside the IR (runtime info ``imgrec``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgrec.card import ModelCard
from imgrec.inference.backends.base import Backend, Forward, metadata

METADATA_KEY = "imgrec"
MAX_DROP = 0.005  # the quantised model may lose at most this fraction of top-1 agreement with the fp32 one (on the
# calibration images: half the 99% bar predict and serve hold a backend to on other images, as a margin)
MAX_REVERTED = 20  # layers NNCF may put back to floating point before it stops
RANKING_IMAGES = 96  # images NNCF ranks the layers on (each layer's ranking runs the network over them)
QUANTIZATION = "int8, NNCF post-training, accuracy-controlled"


def openvino() -> Any:
    try:
        import openvino as ov
    except ImportError:
        raise ValueError("the openvino backends need OpenVINO and NNCF: pip install 'imgrec[openvino]'") from None
    return ov


def convert(model: torch.nn.Module, example: torch.Tensor) -> Any:
    """``model`` as an OpenVINO model taking any batch of ``example``'s image size."""
    ov = openvino()
    # The tracer records autograd ops: not in inference mode, nor on an inference tensor (a clone made outside is a normal one).
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        example = example.clone()
        converted = ov.convert_model(model.float().eval(), example_input=example, input=[(-1, *example.shape[1:])])
    converted.inputs[0].get_tensor().set_names({"input"})
    converted.outputs[0].get_tensor().set_names({"logits"})
    return converted


def save(converted: Any, info: dict[str, Any], path: Path) -> None:
    """Write the IR (``path`` and the .bin beside it) into a temporary folder beside it, then move
    each file over its name, the weights first: a crash mid-write leaves the files there were."""
    converted.set_rt_info(json.dumps(info), [METADATA_KEY])
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.tmp-") as folder:
        staged = Path(folder) / path.name
        openvino().save_model(converted, str(staged), compress_to_fp16=False)
        for suffix in (".bin", ".xml"):
            os.replace(staged.with_suffix(suffix), path.with_suffix(suffix))


def read_openvino_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The model card stored in an OpenVINO IR written by imgrec."""
    model = openvino().Core().read_model(str(path))
    if not model.has_rt_info([METADATA_KEY]):
        raise ValueError(f"{path} has no imgrec metadata: export it with `imgrec export --format openvino`")
    return json.loads(model.get_rt_info([METADATA_KEY]).astype(str))


def compile_ir(model: Any, threads: int | None = None) -> Any:
    """The compiled model on the CPU, at f32 where it is not quantised: ``model`` an IR's path
    or an OpenVINO model in memory."""
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return openvino().Core().compile_model(str(model) if isinstance(model, (str, os.PathLike)) else model, "CPU", config)


class OpenVino(Backend):
    name = "openvino"
    file = "model.openvino.xml"
    devices = ("cpu",)

    def load(self, model: torch.nn.Module | None, device: torch.device, *, precision: str = "auto", path: str | os.PathLike | None = None,
             threads: int | None = None) -> Forward:  # fmt: skip
        self.check_device(device)
        path = self.require_file(path, beside=(".bin",), made_by="`imgrec export --format openvino` or `imgrec benchmark`")
        try:
            compiled = compile_ir(path, threads)
        except RuntimeError as exc:  # a damaged or foreign IR: OpenVINO's message, as a user's error
            raise ValueError(f"{path} does not load in OpenVINO: {str(exc).strip().splitlines()[-1][:300]}") from None
        local = threading.local()  # an inference request is not to be shared between threads: one per thread, reused

        def forward(x: torch.Tensor) -> torch.Tensor:
            if not hasattr(local, "held"):  # the request with its compiled model: however they are freed, the model outlives the request
                local.held = (compiled, compiled.create_infer_request())
            return torch.from_numpy(np.array(local.held[1].infer([x.float().cpu().contiguous().numpy()])[0]))

        return forward

    def export(self, model: torch.nn.Module, example: torch.Tensor, card: ModelCard, path: Path, *, calibration: torch.Tensor | None = None,
               fp32: Path | None = None) -> None:  # fmt: skip
        save(convert(model, example), metadata(card), path)


class OpenVinoInt8(OpenVino):
    name = "openvino-int8"
    file = "model.int8.openvino.xml"
    calibrates = True

    def export(self, model: torch.nn.Module, example: torch.Tensor, card: ModelCard, path: Path, *, calibration: torch.Tensor | None = None,
               fp32: Path | None = None) -> None:  # fmt: skip
        if calibration is None:
            raise ValueError("int8 quantisation needs calibration images")
        quantized, kept = quantize_int8(convert(model, example), model, calibration)
        save(quantized, metadata(card, quantization=QUANTIZATION, float_layers=kept), path)


def nncf_module() -> Any:
    try:
        import nncf
    except ImportError:
        raise ValueError("openvino-int8 quantises with NNCF: pip install 'imgrec[openvino]' (or pip install nncf)") from None
    return nncf


def quantize_int8(converted: Any, model: torch.nn.Module, calibration: torch.Tensor) -> tuple[Any, list[str]]:
    """(the int8 model, the layers kept in floating point): NNCF's quantisation of ``converted``,
    judged by top-1 agreement with ``model`` (eager fp32) on ``calibration``. The plain
    quantisation is kept where it loses at most ``MAX_DROP`` of the agreement of the fp32 IR (the
    common case: one pass of statistics); else NNCF's accuracy control ranks the layers on up to
    ``RANKING_IMAGES`` of the images and reverts the costliest, at most ``MAX_REVERTED``."""
    nncf = nncf_module()

    nncf.set_log_level(logging.ERROR)
    with torch.inference_mode():
        reference = torch.cat([model(batch) for batch in calibration.split(32)]).argmax(1).numpy()
    images = calibration.numpy()
    singles = nncf.Dataset([images[i : i + 1] for i in range(len(images))])  # statistics image by image
    batches = [(images[i : i + 32], reference[i : i + 32]) for i in range(0, len(images), 32)]

    def agreement(compiled: Any, items: Any) -> float:
        pairs = [(int((np.asarray(compiled(x)[0]).argmax(1) == y).sum()), len(y)) for x, y in items]
        return sum(same for same, _ in pairs) / max(1, sum(count for _, count in pairs))

    def measured(candidate: Any) -> float:
        return agreement(compile_ir(candidate), batches)

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # NNCF's own progress bars
        plain = nncf.quantize(converted, singles, subset_size=len(images))
        if measured(converted) - measured(plain) <= MAX_DROP:
            return plain, []
        quantized = nncf.quantize_with_accuracy_control(
            converted, singles, nncf.Dataset(batches, lambda item: item[0]), agreement, max_drop=MAX_DROP, drop_type=nncf.DropType.ABSOLUTE,
            subset_size=len(images),
            advanced_accuracy_restorer_parameters=nncf.AdvancedAccuracyRestorerParameters(
                max_num_iterations=MAX_REVERTED, ranking_subset_size=min(len(batches), max(1, RANKING_IMAGES // 32))  # counted in batches of 32
            ),
        )  # fmt: skip
    return quantized, float_layers(converted, quantized)


def float_layers(converted: Any, quantized: Any) -> list[str]:
    """The convolutions and matrix products of ``converted`` that NNCF left in floating point in
    ``quantized``: those whose weights are not int8 constants (or fake-quantised) there."""
    weighted = {"Convolution", "GroupConvolution", "MatMul"}
    names = {op.get_friendly_name() for op in converted.get_ops() if op.get_type_name() in weighted}
    quantised = {op.get_friendly_name() for op in quantized.get_ops() if op.get_type_name() in weighted and int8_weights(op.input_value(1).get_node())}
    return sorted(names - quantised)


def int8_weights(node: Any, depth: int = 3) -> bool:
    """Whether ``node`` (a layer's weights input) is, or is made within ``depth`` steps from, an int8
    constant or a FakeQuantize (NNCF's int8 weights: Constant(i8) -> Convert -> Multiply)."""
    if node.get_type_name() == "FakeQuantize" or (node.get_type_name() == "Constant" and node.get_output_element_type(0).get_type_name() in ("i8", "u8")):
        return True
    return depth > 0 and any(int8_weights(value.get_node(), depth - 1) for value in node.input_values())


__all__ = ["MAX_DROP", "OpenVino", "OpenVinoInt8", "QUANTIZATION", "read_openvino_metadata"]
