"""The deployment commands of ``imgrec``: export (and, later, benchmark and serve). Thin layers
over ``imgrec.export``; no logic lives here."""

from __future__ import annotations

import argparse
import json


def add_export_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("export", help="export a model directory to ONNX or TorchScript, checked against the eager model on real images")
    p.add_argument("run", metavar="RUN", help="a model directory (imgrec train --out)")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("--int8", action="store_true", help="ONNX only: post-training int8 quantisation (onnxruntime), calibrated on --calibration images")
    p.add_argument("--out", help="output file (default: RUN/model.onnx, model.int8.onnx or model.torchscript.pt)")
    p.add_argument("--images", help="folder of images for the parity check and calibration (default: the run's val split)")
    p.add_argument("--max-images", type=int, default=256, help="images the parity check runs on (default 256)")
    p.add_argument("--calibration", type=int, default=300, help="--int8: calibration images (default 300)")
    p.add_argument("--tolerance", type=float, help="largest |logit difference| allowed (default 1e-3; int8: not checked)")
    p.add_argument("--min-agreement", type=float, help="lowest top-1 agreement in percent (default 100; int8: 97)")
    p.add_argument("--json", metavar="FILE", help="also write the check's figures as JSON")
    p.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from imgrec.cli import console
    from imgrec.export import export

    report = export(
        args.run, args.format, out=args.out, int8=args.int8, images=args.images, max_images=args.max_images,
        calibration_images=args.calibration, tolerance=args.tolerance, min_agreement=args.min_agreement,
    )  # fmt: skip
    kind = f"{report.format}{' int8' if report.int8 else ''}"
    console.print(
        f"exported {kind}: {report.path} (+ {report.path.name}.json); against the eager model on {report.images} images: "
        f"max |logit difference| {report.max_abs_diff:.3g}, top-1 agreement {report.top1_agreement:.2f}%",
        highlight=False,
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=2)
    return 0
