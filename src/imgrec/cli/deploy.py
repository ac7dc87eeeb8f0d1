"""``imgrec predict``, ``export``, ``benchmark`` and ``serve``: a model directory put to use.
Thin layers over ``imgrec.inference`` and ``imgrec.serve``; the backends' names come from their
registry (``imgrec.inference.backends``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from imgrec.cli.common import add_config_flags, add_tta_flag, bounded, console
from imgrec.cli.evaluation import add_inference_flags
from imgrec.config import ServeConfig
from imgrec.inference.backends import BACKENDS


def add_parsers(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("predict", help="top-k classes of images, folders or globs")
    p.add_argument("run", help="model directory (the --out of imgrec train)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--topk", type=bounded(int, "[1, inf)"), default=5)
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--submission", metavar="CSV", help="also write one row per image, its file (relative to the folder given) and top class: a submission file")
    p.add_argument("--submission-header", default="filename,label", metavar="COLUMNS", help="the submission's header line, e.g. id,label (default filename,label)")
    p.add_argument("--explain", metavar="DIR", help="also write a Grad-CAM heatmap over each image, for its top class, to DIR/<name>.png")
    add_inference_flags(p, batch_size=32)
    add_backend_flag(p)
    p.set_defaults(handler=run_predict)

    p = commands.add_parser("explain", help="Grad-CAM heatmaps: where in each image the evidence for its top class (or --class) lies")
    p.add_argument("run", help="model directory (the --out of imgrec train)")
    p.add_argument("paths", nargs="+", metavar="IMAGE", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--class", dest="class_name", metavar="NAME", help="explain this class in every image (default: each image's top class)")
    p.add_argument("--out", metavar="DIR", help="where the heatmaps go, one <name>.png each (default RUN/explain)")
    p.add_argument("--batch-size", type=bounded(int, "[1, inf)"), default=16)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(handler=run_explain)

    p = commands.add_parser("index", help="store the features of every image under a folder, for imgrec search and serve --index")
    p.add_argument("run", help="model directory (the --out of imgrec train)")
    p.add_argument("--data", required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", metavar="DIR", help="where the index goes (default RUN/index)")
    p.add_argument("--batch-size", type=bounded(int, "[1, inf)"), default=64)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(handler=run_index)

    p = commands.add_parser("search", help="the indexed images most like each image given (cosine similarity of the model's features)")
    p.add_argument("run", help="model directory (the --out of imgrec train)")
    p.add_argument("paths", nargs="+", metavar="IMAGE", help="query images")
    p.add_argument("--index", metavar="DIR", help="the index of imgrec index (default RUN/index)")
    p.add_argument("--k", type=bounded(int, "[1, inf)"), default=10, help="neighbours per image (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(handler=run_search)
    add_export_parser(commands)
    add_benchmark_parser(commands)
    add_serve_parser(commands)


def add_backend_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend", choices=["auto", *BACKENDS], default="auto",
        help="what runs the network; auto: the fastest that `imgrec benchmark RUN` recorded with >= 99%% agreement, else PyTorch at --precision",
    )  # fmt: skip
    add_tta_flag(p)


def add_export_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("export", help="export a model directory to ONNX, OpenVINO or TorchScript, checked against the eager model on real images")
    p.add_argument("run", metavar="RUN", help="a model directory (imgrec train --out)")
    p.add_argument("--format", choices=["onnx", "openvino", "torchscript"], default="onnx", help="onnx (default), openvino (an IR: .xml and .bin) or torchscript")
    p.add_argument("--int8", action="store_true", help="post-training int8 quantisation, calibrated on --calibration images: onnxruntime's for onnx, NNCF's accuracy-controlled one for openvino")
    p.add_argument("--out", help="output file (default: RUN/model.onnx, model.int8.onnx, model.openvino.xml, model.int8.openvino.xml or model.torchscript.pt)")
    p.add_argument("--images", help="folder of images for the parity check and calibration (default: the run's val split)")
    p.add_argument("--max-images", type=bounded(int, "[1, inf)"), default=256, help="images the parity check runs on (default 256)")
    p.add_argument("--calibration", type=bounded(int, "[1, inf)"), default=300, help="--int8: calibration images (default 300)")
    p.add_argument("--tolerance", type=bounded(float, "[0, inf)"), help="largest |logit difference| allowed (default 1e-3; int8: not checked)")
    p.add_argument("--min-agreement", type=bounded(float, "[0, 100]"), help="lowest top-1 agreement in percent (default 100; int8: 97)")
    p.add_argument("--json", metavar="FILE", help="also write the check's figures as JSON")
    p.set_defaults(handler=run_export)


def add_benchmark_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("benchmark", help="latency (batch 1) and throughput of each inference backend, with top-1 agreement")
    p.add_argument("run", metavar="RUN", help="a model directory (imgrec train --out)")
    p.add_argument("--backends", help=f"comma-separated, from {', '.join(BACKENDS)} (default: every one that runs on the CPU)")
    p.add_argument("--batch", type=bounded(int, "[1, inf)"), default=32, help="batch of the throughput figure (default 32)")
    p.add_argument("--iterations", type=bounded(int, "[1, inf)"), default=50, help="batch-1 calls for the latency percentiles (default 50)")
    p.add_argument("--seconds", type=bounded(float, "(0, inf)"), default=10.0, help="seconds of batches for each throughput figure (default 10)")
    p.add_argument("--images", help="folder of images for the agreement check and int8 calibration (default: the run's val split)")
    p.add_argument("--threads", type=bounded(int, "[1, inf)"), help="torch, onnxruntime and OpenVINO threads (default: all cores)")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    p.set_defaults(handler=run_benchmark)


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("serve", help="serve model directories over HTTP (and gRPC): Open Inference Protocol v2, POST /predict, a page at /, /metrics")
    p.add_argument("runs", nargs="+", metavar="RUN", help="model directories (imgrec train --out), each served under its folder's name or as NAME=RUN; the first is /predict's and the page's")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=bounded(int, "[0, 65535]"), default=8000)
    p.add_argument("--grpc-port", type=bounded(int, "[0, 65535]"), default=None, help="also serve the Open Inference Protocol v2 over gRPC on this port (tritonclient.grpc works with it), e.g. 8001")
    p.add_argument("--device", default="auto")
    add_backend_flag(p)
    add_config_flags(p, ServeConfig)
    p.add_argument("--max-body-mb", type=bounded(float, "[0.01, inf)"), default=None, help=f"largest request body in MiB (default {ServeConfig.max_body_bytes >> 20})")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--index", metavar="DIR", help="an index of imgrec index: POST /search answers with the most similar images")
    p.add_argument("--api-key", action="append", metavar="KEY", help="require Authorization: Bearer KEY on every route but the page and health checks (repeat for several keys; or --api-key-file, or $IMGREC_API_KEYS, comma-separated)")
    p.add_argument("--api-key-file", metavar="FILE", help="the accepted keys, one a line (# comments); keeps them out of the process list")
    p.add_argument("--ssl-keyfile", metavar="PEM", help="HTTPS: the private key (with --ssl-certfile)")
    p.add_argument("--ssl-certfile", metavar="PEM", help="HTTPS: the certificate chain")
    p.set_defaults(handler=run_serve)


def run_predict(args: argparse.Namespace) -> int:
    from imgrec.inference.predict import load

    classifier = load(args.run, device=args.device, precision=args.precision, backend=args.backend, tta=args.tta)
    print(f"backend: {classifier.backend} ({classifier.backend_reason})", file=sys.stderr)
    # The bar goes to stderr: stdout carries the table, JSON or CSV, often into a file.
    predictions = classifier.predict(args.paths, topk=args.topk, batch_size=args.batch_size, console=Console(stderr=True))
    if args.format == "json":
        print(json.dumps([p.to_dict() for p in predictions], indent=2))
    elif args.format == "csv":
        print_csv(predictions)
    else:
        print_table(predictions, args.topk)
    if args.submission:
        write_submission(predictions, args.paths, args.submission, args.submission_header)
        print(f"submission: {args.submission} ({sum(p.error is None for p in predictions)} rows)", file=sys.stderr)
    if args.explain:
        from imgrec.inference.explain import explain_files

        shown = [p for p in predictions if p.error is None]
        explained = explain_files(classifier, [p.source for p in shown], args.explain, [p.label for p in shown], batch_size=args.batch_size)  # each for the class the table shows
        print(f"heatmaps: {args.explain} ({sum('heatmap' in row for row in explained)} images)", file=sys.stderr)
    failed = sum(p.error is not None for p in predictions)
    if failed:
        print(f"{failed} of {len(predictions)} input(s) could not be predicted", file=sys.stderr)
    return 0 if failed < len(predictions) else 1


def run_index(args: argparse.Namespace) -> int:
    from imgrec.inference.search import build_index

    info = build_index(args.run, args.data, args.out, device=args.device, batch_size=args.batch_size, console=Console(stderr=True))
    for skipped in info["skipped"]:
        print(f"skipped {skipped['path']}: {skipped['reason']}", file=sys.stderr)
    console.print(f"indexed {info['count']} images of {args.data} ({info['dim']}-d features of {info['architecture']}) in {info['index']}", highlight=False)
    return 0


def run_search(args: argparse.Namespace) -> int:
    from imgrec.inference.search import search

    results = search(args.run, args.paths, index=args.index, k=args.k, device=args.device)
    if args.json:
        print(json.dumps(results, indent=2))
    for result in [] if args.json else results:
        if "error" in result:
            print(f"{result['query']}: {result['error']}", file=sys.stderr)
            continue
        console.print(f"{result['query']}:", highlight=False)
        for rank, hit in enumerate(result["neighbours"], start=1):
            console.print(f"  {rank:>3}  {hit['similarity']:.4f}  {hit['path']}", highlight=False)
    return 0 if any("error" not in r for r in results) else 1


def run_explain(args: argparse.Namespace) -> int:
    from imgrec.inference.explain import explain_files
    from imgrec.inference.predict import Prediction, expand_inputs, load

    classifier = load(args.run, device=args.device, precision="fp32", backend=None)
    paths, rows = [], []
    for source, item in expand_inputs(args.paths):
        if isinstance(item, Prediction):  # a folder without images, a pattern without matches
            rows.append({"source": source, "error": item.error})
        else:
            paths.append(source)
    out = args.out or str(Path(args.run) / "explain")
    rows += explain_files(classifier, paths, out, args.class_name, batch_size=args.batch_size)
    for row in rows:
        if "error" in row:
            print(f"{row['source']}: {row['error']}", file=sys.stderr)
        else:
            console.print(f"{row['source']}: {row['class']} {row['prob']:.1%} -> {row['heatmap']}", highlight=False)
    explained = sum("heatmap" in row for row in rows)
    if not explained:
        print("no image could be explained", file=sys.stderr)
    return 0 if explained else 1


def print_csv(predictions: list) -> None:
    import csv

    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["source", "rank", "class", "prob", "error"])
    for p in predictions:
        if p.error is not None:
            writer.writerow([p.source, "", "", "", p.error])
        for rank, (label, prob) in enumerate(zip(p.labels, p.probs), start=1):
            writer.writerow([p.source, rank, label, f"{prob:.6f}", ""])


def write_submission(predictions: list, paths: list[str], out: str, header: str) -> None:
    """``header`` then ``file,top class`` per predicted image; a file is named relative to the
    folder it was found in when one folder was given (as a competition's sample file lists them)."""
    import csv

    columns = [c.strip() for c in header.split(",")]
    if len(columns) != 2 or not all(columns):
        raise ValueError(f"--submission-header must name two columns, e.g. id,label; got {header!r}")
    folder = Path(paths[0]) if len(paths) == 1 and Path(paths[0]).is_dir() else None
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        for p in predictions:
            if p.error is None:
                source = Path(p.source)
                name = source.relative_to(folder).as_posix() if folder is not None and source.is_relative_to(folder) else p.source
                writer.writerow([name, p.labels[0]])


def print_table(predictions: list, topk: int) -> None:
    table = Table()
    table.add_column("image", overflow="fold")
    table.add_column("class")
    table.add_column("prob", justify="right")
    table.add_column(f"top-{topk}", overflow="fold")
    for p in predictions:
        if p.error is not None:
            table.add_row(p.source, "[red]error[/red]", "", p.error)
        else:
            shown = [f"{c} ({n})" for c, n in zip(p.labels, p.names)] if p.names else p.labels
            others = ", ".join(f"{c} {q:.2f}" for c, q in zip(shown[1:], p.probs[1:]))
            table.add_row(p.source, shown[0], f"{p.prob:.3f}", others)
    console.print(table)


def run_export(args: argparse.Namespace) -> int:
    from imgrec.inference.export import export

    report = export(
        args.run, args.format, out=args.out, int8=args.int8, images=args.images, max_images=args.max_images,
        calibration_images=args.calibration, tolerance=args.tolerance, min_agreement=args.min_agreement, console=console,
    )  # fmt: skip
    kind = f"{report.format}{' int8' if report.int8 else ''}"
    console.print(
        f"exported {kind}: {report.path} (+ {report.path.name}.json{', ' + report.path.with_suffix('.bin').name + ': the weights, keep it beside the .xml' if report.path.suffix == '.xml' else ''}); against the eager model on {report.images} images: "
        f"max |logit difference| {report.max_abs_diff:.3g}, top-1 agreement {report.top1_agreement:.2f}%",
        highlight=False,
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=2)
    return 0


def run_benchmark(args: argparse.Namespace) -> int:
    from imgrec.inference.benchmark import benchmark, best_backend

    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip()) if args.backends else None
    results = benchmark(
        args.run, backends=backends, batch=args.batch, iterations=args.iterations, seconds=args.seconds, images=args.images, threads=args.threads,
        console=console,
    )
    table = Table(title=f"{args.run}: batch 1 latency, batch {args.batch} throughput")
    for column in ("backend", "p50 ms", "p99 ms", "img/s", "vs eager", "top-1 agreement", "note"):
        table.add_column(column, justify="left" if column in ("backend", "note") else "right")
    for r in results:
        figures = [f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}", f"{r.images_per_s:.1f}", f"{r.speedup:.2f}x", f"{r.top1_agreement:.2f}%"] if r.images_per_s else ["-"] * 5
        table.add_row(r.backend, *figures, r.note)
    console.print(table)
    best = best_backend(results)
    console.print(f"best with >= 99% agreement: {best.backend}, {best.images_per_s:.1f} img/s ({best.speedup:.2f}x eager fp32)", highlight=False)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([r.__dict__ for r in results], f, indent=2)
    return 0


def api_keys(args: argparse.Namespace) -> list[str]:
    """The keys of --api-key, --api-key-file and $IMGREC_API_KEYS, together; an unreadable file is an error naming it."""
    import os

    keys = list(args.api_key or [])
    if args.api_key_file:
        try:
            lines = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ValueError(f"--api-key-file {args.api_key_file}: {exc.strerror or exc}") from None
        keys += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not keys:
            raise ValueError(f"--api-key-file {args.api_key_file} holds no key: one key a line")
    keys += [key.strip() for key in os.environ.get("IMGREC_API_KEYS", "").split(",") if key.strip()]
    short = [key for key in keys if len(key) < 16]
    if short:
        raise ValueError(f"an API key of {len(short[0])} characters is too easy to guess: use at least 16 (python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return keys


def run_serve(args: argparse.Namespace) -> int:
    from imgrec.serve import serve
    from imgrec.serve.app import model_names

    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        raise ValueError("--ssl-keyfile and --ssl-certfile go together: HTTPS needs the key and its certificate")
    for flag, path in (("--ssl-keyfile", args.ssl_keyfile), ("--ssl-certfile", args.ssl_certfile)):
        if path and not Path(path).is_file():
            raise ValueError(f"{flag} {path}: no such file")
    values = {name: value for name, value in vars(args).items() if name in ServeConfig.__dataclass_fields__ and value is not None}
    if args.name and len(args.runs) > 1:
        raise ValueError("--name names the one model served; with several, name each as NAME=RUN")
    values["name"] = args.name or next(iter(model_names(args.runs)))
    if args.max_body_mb is not None:
        values["max_body_bytes"] = int(args.max_body_mb * 2**20)
    serve(args.runs, host=args.host, port=args.port, device=args.device, backend=args.backend, config=ServeConfig(**values), access_log=args.access_log, tta=args.tta,
          index=args.index, api_keys=api_keys(args), ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile, grpc_port=args.grpc_port)  # fmt: skip
    return 0


__all__ = ["add_parsers"]
