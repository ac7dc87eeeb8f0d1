"""``imgrec export RUN``: the model directory as ONNX or TorchScript, checked against the eager model.

The exported model takes what the eager model takes: float32 images [batch, 3, H, W], resized,
cropped and normalised as the model directory says (``imgrec.predict.Classifier`` does it), with
a dynamic batch axis. The model directory's JSON (architecture, classes, class names,
preprocessing) travels with it: inside the file (ONNX metadata ``imgrec``, TorchScript extra
file ``imgrec.json``) and beside it as ``FILE.json``, so a server needs nothing else.

After writing, the export is run on real images (a folder you name, or the run's own val split)
next to the eager model: the largest |logit difference| and the top-1 agreement are printed, and
the export fails past a tolerance. ``int8`` quantises the ONNX model after training with
onnxruntime (static, QDQ, per-channel int8 weights and uint8 activations, calibrated on a few
hundred images) and reports its top-1 agreement with the eager fp32 model.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgrec.checkpoint import load_model_dir
from imgrec.data.decode import BadImageError
from imgrec.data.folder import iter_image_files
from imgrec.predict import Classifier

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 18  # onnxruntime 1.16+ runs every op of it; newer opsets gain nothing for CNNs
METADATA_KEY = "imgrec"


@dataclass
class ExportReport:
    path: Path
    format: str
    images: int  # real images the parity check ran on
    max_abs_diff: float  # largest |logit difference| against the eager fp32 model
    top1_agreement: float  # percent of images with the same top-1 class
    int8: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "path": str(self.path)}


def export(
    run: str | os.PathLike,
    format: str = "onnx",
    *,
    out: str | os.PathLike | None = None,
    int8: bool = False,
    images: str | os.PathLike | None = None,
    max_images: int = 256,
    calibration_images: int = 300,
    tolerance: float | None = None,
    min_agreement: float | None = None,
    seed: int = 0,
) -> ExportReport:
    """Export the model directory ``run``; returns what the parity check measured.

    ``images``: a folder of images for the parity check and int8 calibration (default: the val
    split of the data the run trained on). ``tolerance``: the largest |logit difference| allowed
    (default 1e-3 for fp32 exports; int8 is judged by agreement alone). ``min_agreement``: the
    lowest top-1 agreement in percent (default 100 for fp32, 97 for int8). A failed check raises
    ``ValueError`` naming both figures; the file stays on disk for inspection.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if int8 and format != "onnx":
        raise ValueError("--int8 quantises with onnxruntime: use it with --format onnx")
    run = Path(run)
    model, info = load_model_dir(run)
    classifier = Classifier(model, info, device="cpu", precision="fp32")
    model = model.to(memory_format=torch.contiguous_format).float().eval()
    suffix = {"onnx": ".int8.onnx" if int8 else ".onnx", "torchscript": ".torchscript.pt"}[format]
    path = Path(out) if out is not None else run / f"model{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    files = parity_files(run, images, max_images + (calibration_images if int8 else 0), seed)
    inputs = preprocess(classifier, files)
    checked = inputs[:max_images]
    # Calibrate on other images than those checked, when there are enough.
    calibration = inputs[max_images:] if len(inputs) > max_images else inputs[:calibration_images]
    size = info["img_size"]
    example = torch.zeros(2, 3, size, size)

    if format == "torchscript":
        write_torchscript(model, example, info, path)
        exported = load_torchscript(path)
        run_exported = lambda x: exported(x).detach().numpy()  # noqa: E731
    else:
        with tempfile.TemporaryDirectory() as tmp:  # int8: the fp32 model and its pre-processed copy are steps, not results
            target = path if not int8 else Path(tmp) / "fp32.onnx"
            write_onnx(model, example, info, target)
            if int8:
                quantize_int8(target, path, calibration, info)
        session = onnx_session(path)
        run_exported = lambda x: session.run(None, {"input": x.numpy()})[0]  # noqa: E731

    with torch.inference_mode():
        eager = torch.cat([model(batch) for batch in checked.split(32)]).numpy()
        got = np.concatenate([run_exported(batch) for batch in checked.split(32)])
    report = ExportReport(
        path=path, format=format, images=len(checked), int8=int8,
        max_abs_diff=float(np.abs(got - eager).max()), top1_agreement=top1_agreement(got, eager),
    )  # fmt: skip
    write_sidecar(path, info)
    tolerance = tolerance if tolerance is not None else (None if int8 else 1e-3)
    min_agreement = min_agreement if min_agreement is not None else (97.0 if int8 else 100.0)
    if (tolerance is not None and report.max_abs_diff > tolerance) or report.top1_agreement < min_agreement:
        raise ValueError(
            f"{path} does not match the eager model on {report.images} images: max |logit difference| {report.max_abs_diff:.3g} "
            f"(allowed {tolerance}), top-1 agreement {report.top1_agreement:.2f}% (at least {min_agreement}%). "
            f"The file is kept for inspection."
        )
    return report


def top1_agreement(logits: np.ndarray, reference: np.ndarray) -> float:
    """Percent of rows whose top-1 class is the same in ``logits`` and ``reference``."""
    return 100.0 * float((logits.argmax(1) == reference.argmax(1)).mean())


def parity_files(run: Path, images: str | os.PathLike | None, count: int, seed: int) -> list[Path]:
    """Up to ``count`` image files (a seeded sample) from ``images`` or the run's val split."""
    if images is None:
        config = run / "config.yaml"
        data = None
        if config.is_file():
            import yaml

            data = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("data")
        folder = Path(data, "val") if data else None
        if folder is None or not folder.is_dir():
            raise ValueError(
                f"no images to check the export on: {run} does not name a val folder that exists here; pass --images DIR (any folder of images)"
            )
        images = folder
    files = iter_image_files(images) if Path(images).is_dir() else []
    if not files:
        raise ValueError(f"no images in {images} to check the export on: pass --images DIR, a folder of images")
    if len(files) > count:
        files = sorted(random.Random(seed).sample(files, count))
    return files


def preprocess(classifier: Classifier, files: list[Path]) -> torch.Tensor:
    """The normalised float32 inputs [N, 3, H, W] of the readable ``files`` (contiguous NCHW)."""
    batch = []
    for path in files:
        try:
            batch.append(classifier._prepare(str(path), path))
        except BadImageError:
            continue
    tensors = [t for t in batch if isinstance(t, torch.Tensor)]
    if not tensors:
        raise ValueError(f"none of the {len(files)} images could be read: pass --images DIR with readable images")
    with torch.inference_mode():
        return classifier.normalize(torch.stack(tensors)).float().contiguous()


def write_onnx(model: torch.nn.Module, example: torch.Tensor, info: dict[str, Any], path: Path) -> None:
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


def write_torchscript(model: torch.nn.Module, example: torch.Tensor, info: dict[str, Any], path: Path) -> None:
    with warnings.catch_warnings():  # TorchScript is in maintenance: PyTorch says so at every call
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"imgrec.json": json.dumps(info)})


def load_torchscript(path: str | os.PathLike, extra_files: dict[str, str] | None = None) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), _extra_files=extra_files if extra_files is not None else {}).eval()


def quantize_int8(fp32: Path, path: Path, calibration: torch.Tensor, info: dict[str, Any]) -> None:
    """Static post-training quantisation with onnxruntime, calibrated on ``calibration``."""
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
    entry.key, entry.value = METADATA_KEY, json.dumps({**info, "quantization": "int8 static QDQ, onnxruntime"})
    onnx.save(model, str(path))


def onnx_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def write_sidecar(path: Path, info: dict[str, Any]) -> None:
    from imgrec.utils import write_json

    write_json(path.with_name(path.name + ".json"), info)


def read_export_info(path: str | os.PathLike) -> dict[str, Any]:
    """The model directory's JSON stored in an exported file (ONNX metadata or TorchScript extra file)."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        if METADATA_KEY not in props:
            raise ValueError(f"{path} has no imgrec metadata: export it with `imgrec export`")
        return json.loads(props[METADATA_KEY])
    extra = {"imgrec.json": ""}
    load_torchscript(path, extra)
    return json.loads(extra["imgrec.json"])


__all__ = ["ExportReport", "FORMATS", "export", "load_torchscript", "onnx_session", "read_export_info", "top1_agreement"]
