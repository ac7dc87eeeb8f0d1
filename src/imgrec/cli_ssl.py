"""``imgrec pretrain`` and ``imgrec probe``: self-supervised pretraining and the frozen-feature probes.

Thin layers over ``imgrec.engine.pretrain.pretrain`` and ``imgrec.engine.probe.probe``.
"""

from __future__ import annotations

import argparse

from imgrec.cli import LOOP_FAULT_FIELDS

PRETRAIN_FIELDS = (
    "data", "val_data", "model", "out", "method", "epochs", "batch_size", "accum_steps", "opt", "lr", "base_lr", "weight_decay",
    "momentum", "warmup_epochs", "min_lr", "temperature", "jitter_strength", "blur", "lars_trust", "proj_hidden_dim", "proj_dim", "teacher_momentum", "knn_k",
    "knn_temperature", "knn_every", "knn_bank_size", "precision", "channels_last", "compile", "device", "seed", "workers",
    "steps_per_epoch", "tensorboard", "loader", *LOOP_FAULT_FIELDS,
)  # fmt: skip


def add_pretrain_parser(commands: argparse._SubParsersAction) -> None:
    from imgrec.cli import add_loop_flags
    from imgrec.ssl import METHODS

    p = commands.add_parser("pretrain", help="self-supervised pretraining of a backbone on images without labels; writes RUN/backbone.safetensors")
    add_loop_flags(p, "PretrainConfig")
    p.add_argument("--method", choices=list(METHODS), help="simclr (contrastive, default), moco (MoCo v3: contrastive, momentum teacher) or byol (momentum teacher, no negatives)")
    p.add_argument("--opt", choices=["lars", "adamw", "sgd"], help="default: the method's (LARS)")
    p.add_argument("--temperature", type=float, help="contrastive softmax temperature (SimCLR 0.1, MoCo v3 1.0)")
    p.add_argument("--jitter-strength", type=float, help="scale the method's colour jitter (default 1)")
    p.add_argument("--blur", action=argparse.BooleanOptionalAction, default=None, help="the method's Gaussian blur in the views (default on; off suits images of ~32 px)")
    p.add_argument("--lars-trust", type=float, help="LARS trust coefficient (default 1e-3, the papers' at batch 4096; small batches want ~0.02)")
    p.add_argument("--proj-hidden-dim", type=int, help="hidden width of the projector/predictor (SimCLR 2048, BYOL 4096)")
    p.add_argument("--proj-dim", type=int, help="output size of the projector (SimCLR 128, BYOL 256)")
    p.add_argument("--teacher-momentum", type=float, help="MoCo v3, BYOL: the teacher's EMA rate at the start, rising to 1 (0.99, 0.996)")
    p.add_argument("--knn-k", type=int, help="neighbours of the kNN monitor (default 20)")
    p.add_argument("--knn-temperature", type=float, help="vote weight exp(cosine / T) of the kNN monitor (default 0.07)")
    p.add_argument("--knn-every", type=int, help="run the kNN monitor every N epochs (0 = never; default 1)")
    p.add_argument("--knn-bank-size", type=int, help="labelled train images in the monitor's bank, class-balanced (default 20000)")
    p.set_defaults(handler=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    from imgrec.cli import run_loop
    from imgrec.config import PretrainConfig
    from imgrec.engine.pretrain import pretrain

    return run_loop(pretrain, args, PretrainConfig, PRETRAIN_FIELDS)


def add_probe_parser(commands: argparse._SubParsersAction) -> None:
    from imgrec.cli import add_preprocessing_flags

    p = commands.add_parser("probe", help="kNN or linear-probe accuracy of a frozen backbone's features (features cached on disk)")
    p.add_argument("backbone", metavar="RUN_OR_WEIGHTS", help="a pretrain or train run directory, a weights file (with --model), or random:ARCH")
    p.add_argument("--data", required=True, help="dataset root holding train/ (the probe learns there) and val/ (scored there)")
    p.add_argument("--method", choices=["knn", "linear"], default="knn", help="weighted kNN (default) or a linear softmax classifier")
    p.add_argument("--model", help="architecture of a bare weights file")
    p.add_argument("--k", type=int, default=20, help="kNN: neighbours")
    p.add_argument("--temperature", type=float, default=0.07, help="kNN: vote weight exp(cosine / T)")
    p.add_argument("--epochs", type=int, default=100, help="linear: passes over the cached features")
    p.add_argument("--lr", type=float, default=1e-3, help="linear: AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="linear: AdamW weight decay")
    p.add_argument("--json", dest="json_path", metavar="FILE", help="also write the result as JSON (keys top1, top5, ...)")
    p.add_argument("--cache-dir", help="feature cache folder (default $IMGREC_CACHE/features or ~/.cache/imgrec/features)")
    p.add_argument("--no-cache", action="store_true", help="extract features afresh and keep none")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--loader", choices=["fast", "standard"], default="fast")
    p.add_argument("--seed", type=int, default=0, help="random:ARCH's initialisation and the linear probe's batches")
    add_preprocessing_flags(p)
    p.set_defaults(handler=run_probe)


def run_probe(args: argparse.Namespace) -> int:
    from imgrec.cli import console
    from imgrec.config import PREPROCESSING
    from imgrec.engine.probe import probe
    from imgrec.utils import write_json

    cache = False if args.no_cache else (args.cache_dir or True)
    result = probe(
        args.backbone, args.data, method=args.method, model=args.model, k=args.k, temperature=args.temperature, epochs=args.epochs,
        lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size, workers=args.workers, device=args.device,
        precision=args.precision, loader=args.loader, seed=args.seed, cache=cache, console=console,
        data_config={n: getattr(args, n) for n in (*PREPROCESSING, "max_pixels") if getattr(args, n) is not None},
    )  # fmt: skip
    console.print(
        f"{result['method']} probe of {result['backbone']} ({result['architecture']}, {result['feature_dim']}-d): "
        f"top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}% on {result['val_images']} val images "
        f"({result['train_images']} train images; classifier {result['classifier_seconds']:.1f} s)",
        highlight=False,
    )
    if args.json_path:
        write_json(args.json_path, result)
    return 0


__all__ = ["add_pretrain_parser", "add_probe_parser"]
