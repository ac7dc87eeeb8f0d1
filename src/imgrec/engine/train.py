"""The supervised training loop: ``train(config)`` from a folder of images to a model directory.

Read it top to bottom: ``train`` builds the run (data, model, optimiser, schedule, EMA) once,
then each epoch calls ``train_one_epoch`` and ``validate``, appends a line to metrics.jsonl,
saves the model directory when val top-1 improves and writes ``last.pt`` atomically.

Exact resume (``imgrec.engine.resume``): the data order and each image's augmentation depend
only on (seed, epoch, image), and the checkpoint holds everything else (weights, optimizer,
schedule, EMA, scaler, the step within the epoch, the epoch's sums, every rank's RNG states).
So a run resumed from a checkpoint written at any step, mid-epoch included, continues as if it
had never stopped. Under torchrun each process trains on its share of every epoch in DDP
(``imgrec.engine.distributed``); rank 0 writes the files.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from imgrec.checkpoint import save_model_dir
from imgrec.config import PREPROCESSING, TrainConfig, preprocessing, save_yaml, to_dict
from imgrec.data.folder import class_balanced_subset, load_splits, read_class_names, write_class_index
from imgrec.data.loader import create_loader
from imgrec.data.transforms import BatchNormalize, eval_transform, resolve_data_config, train_transform
from imgrec.engine import distributed
from imgrec.engine.evaluate import classification_metrics, collect_logits
from imgrec.engine.hardware import DTYPES, autocast
from imgrec.engine.loop import (
    CONFIG_NAME,
    begin_epoch,
    launch,
    open_run,
    open_tensorboard,
    ranks_note,
    run_epoch,
    start_or_resume,
    steps_per_epoch,
    write_metrics,
)
from imgrec.engine.optim import cosine_schedule, create_optimizer, scaled_lr
from imgrec.engine.resume import (
    check_free_space,
    end_epoch,
    restore_training_state,
    run_epochs,
    save_run_checkpoint,
)
from imgrec.models.factory import create_model, resolve_weights


def train(config: TrainConfig | None = None, *, resume: str | os.PathLike | None = None, console: Console | None = None, **overrides: Any) -> Path:
    """Train a classifier; returns the run directory (``config.out``).

    ``train(data="DATA", model="resnet18", out="runs/r18", epochs=10)`` or ``train(TrainConfig(...))``;
    ``train(resume="runs/r18")`` continues a run from its ``last.pt``.
    """
    console = console or Console(soft_wrap=True)
    # The weights come from the checkpoint on resume: the pretrained file is not needed (nor read) again.
    config, checkpoint = start_or_resume(
        TrainConfig, config, resume, overrides, fixed={"pretrained": None},
        no_data="no training data: pass --data DATA (data=DATA in Python or YAML), a folder holding train/<class>/ and val/<class>/",
    )  # fmt: skip
    classes = checkpoint["classes"] if checkpoint is not None else None
    return launch(lambda console, device: Run(config, console, device, resume_classes=classes), config.device, console, checkpoint)


class Run:
    """The state of one training run; built once, then ``fit`` loops over the epochs."""

    def __init__(self, config: TrainConfig, console: Console, device: torch.device | None = None, resume_classes: list[str] | None = None):
        channels_last = open_run(self, config, console, device)
        dataset_options = {k: config.data_config[k] for k in ("max_pixels", "max_bad_fraction") if k in config.data_config}
        self.splits = load_splits(config.data, val_root=config.val_data, seed=config.seed, skip_log=self.skip_log, **dataset_options)
        self.class_names = read_class_names(config.data)
        self.classes = self.splits.classes
        if resume_classes is not None and resume_classes != self.classes:
            raise ValueError(
                f"the classes in {config.data} ({len(self.classes)}) differ from those of the run in {self.out} "
                f"({len(resume_classes)}): resume with the dataset the run was started on"
            )
        self.splits.val.replace_bad = False  # validation counts each readable image once
        if config.train_fraction < 1:
            take_fraction(self.splits.train, config.train_fraction, config.seed)
        if distributed.is_main():
            write_class_index(self.out / "classes.json", self.classes)

        model_kwargs = {"drop_path_rate": config.drop_path} if config.drop_path is not None else {}
        weights_info = pretrained_info(config.pretrained, config.model)
        self.model = create_model(config.model, num_classes=len(self.classes), pretrained=config.pretrained, **model_kwargs)
        # Size, crop_pct, interpolation, mean and std: as given, else as the pretrained weights were
        # trained (their backbone.json / model.json), else the architecture's.
        base = {k: weights_info[k] for k in PREPROCESSING if k in weights_info}
        given = {k: v for k, v in config.data_config.items() if v is not None}
        self.data_config = dc = resolve_data_config(self.model, **{**base, **given})
        self.splits.train.transform = train_transform(dc, config.loader)
        self.splits.val.transform = eval_transform(dc, config.loader)
        if config.freeze_backbone:
            freeze_backbone(self.model)
        self.model.to(self.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        self.forward = distributed.wrap(self.model, self.device, sync_bn=config.sync_bn)
        # Evaluation runs outside DDP: the ranks' shares of val/ may differ by a batch.
        self.eval_forward = torch.compile(self.model) if config.compile else self.model
        self.forward = torch.compile(self.forward) if config.compile else self.forward

        if config.mixup or config.cutmix:
            if config.batch_size % 2 or (len(self.splits.train) < config.batch_size and len(self.splits.train) % 2):
                raise ValueError(
                    f"mixup/cutmix pair images within a batch: batch_size must be even, got {config.batch_size} "
                    f"({len(self.splits.train)} training images)"
                )
        self.train_loader = create_loader(
            self.splits.train,
            batch_size=config.batch_size,
            train=True,
            num_workers=config.workers,
            seed=config.seed,
            persistent_workers=False,
            low_priority_workers=self.device.type == "cpu",
            channels_last=channels_last,
        )
        self.val_loader = create_loader(
            self.splits.val, batch_size=config.batch_size, train=False, num_workers=config.workers, skip_none=True, channels_last=channels_last
        )
        self.steps_per_epoch = steps_per_epoch(self.splits.train, self.train_loader, config)

        global_batch = config.batch_size * config.accum_steps * distributed.world_size()
        self.lr = lr = config.lr if config.lr is not None else scaled_lr(config.opt, global_batch, config.base_lr)
        self.optimizer = create_optimizer(self.model, config.opt, lr, config.weight_decay, config.momentum, config.layer_decay)
        total = config.epochs * self.steps_per_epoch
        self.scheduler = cosine_schedule(self.optimizer, total, round(config.warmup_epochs * self.steps_per_epoch), config.min_lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.ema = None
        if config.ema_decay:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=config.ema_decay, use_warmup=True)
        self.train_normalize = BatchNormalize.from_config(dc, train=True, channels_last=channels_last).to(self.device)
        self.eval_normalize = BatchNormalize.from_config(dc, channels_last=channels_last).to(self.device)
        self.mixup = None
        if config.mixup or config.cutmix:
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.label_smoothing, num_classes=len(self.classes)
            )
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        # config.yaml records what the run used, not just what was asked for.
        self.config = dataclasses.replace(
            config,
            data_config=to_dict(self.data_config),
            lr=lr,
            weight_decay=self.optimizer.param_groups[0]["weight_decay"],
            precision=self.precision,
            channels_last=channels_last,
            workers=self.train_loader.num_workers,
        )
        self.best = {"top1": -1.0}
        self.writer = None
        if distributed.is_main():
            check_free_space(self.out, self.model, config.opt, saved=self.model, ema=self.ema is not None)
            self.writer = open_tensorboard(self.out) if config.tensorboard else None
            save_yaml(self.config, self.out / CONFIG_NAME)

    def restore(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        if self.ema is not None and checkpoint.get("ema") is not None:
            self.ema.module.load_state_dict(checkpoint["ema"])
        self.best = checkpoint["best"]
        restore_training_state(self, checkpoint)

    def fit(self) -> Path:
        config = self.config
        self.console.print(
            f"training {config.model} on {len(self.splits.train)} images ({len(self.classes)} classes), "
            f"validating on {len(self.splits.val)}; {self.device.type}, {self.precision}, "
            f"batch {config.batch_size}x{config.accum_steps}{ranks_note()}, peak lr {self.lr:.3g}, {config.epochs} epochs",
            highlight=False,
        )
        run_epochs(self)
        self.console.print(
            f"best val top-1 {self.best['top1']:.2f}% (epoch {self.best.get('epoch')}); model directory: {self.out}", highlight=False
        )
        return self.out

    def train_epochs(self) -> None:
        config = self.config
        while self.epoch < config.epochs:
            epoch = self.epoch + 1
            begin_epoch(self, epoch)
            started = time.perf_counter()
            stats = train_one_epoch(self, epoch)
            metrics = self.validate()
            row = {
                "epoch": epoch,
                "train_loss": stats["loss"],
                "val_loss": metrics["loss"],
                "val_top1": metrics["top1"],
                "val_top5": metrics["top5"],
                "lr": stats["lr"],
                "seconds": round(time.perf_counter() - started, 3),
                "images_per_s": round(stats["images_per_s"], 2),
                "val_images": metrics["count"],
            }
            if self.skipped_steps:
                row["skipped_steps"] = self.skipped_steps
            candidates = [("model", metrics["top1"], metrics["top5"])]
            if self.ema is not None:
                ema_metrics = self.validate(self.ema.module)
                row["ema_top1"] = ema_metrics["top1"]
                candidates.append(("ema", ema_metrics["top1"], ema_metrics["top5"]))
            self.epoch, self.step = epoch, 0
            source, top1, top5 = max(candidates, key=lambda c: c[1])
            improved = top1 > self.best["top1"]
            if improved:
                self.best = {"top1": top1, "top5": top5, "epoch": epoch, "weights": source}
            if distributed.is_main():
                self.log(row)
                if improved:
                    self.save_model_dir()
            end_epoch(self)

    def validate(self, model: torch.nn.Module | None = None) -> dict[str, Any]:
        model = model if model is not None else self.eval_forward
        logits, labels = collect_logits(model, self.val_loader, device=self.device, normalize=self.eval_normalize, autocast_dtype=DTYPES[self.precision])
        logits, labels = distributed.gather_rows(logits.to(self.device)).cpu(), distributed.gather_rows(labels.to(self.device)).cpu()  # each rank scored its share
        return {**classification_metrics(logits, labels, self.classes), "count": len(labels)}

    def log(self, row: dict[str, Any]) -> None:
        write_metrics(self.out, self.writer, row)
        ema = f", EMA top-1 {row['ema_top1']:.2f}%" if "ema_top1" in row else ""
        self.console.print(
            f"epoch {row['epoch']}/{self.config.epochs}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, "
            f"top-1 {row['val_top1']:.2f}%, top-5 {row['val_top5']:.2f}%{ema}, {row['images_per_s']:.0f} img/s, {row['seconds']:.1f} s",
            highlight=False,
        )

    def save_model_dir(self) -> None:
        weights = self.ema.module if self.best["weights"] == "ema" else self.model
        dc = self.data_config
        info = {
            "architecture": self.config.model,
            "num_classes": len(self.classes),
            "classes": self.classes,
            "input_size": [3, dc.img_size, dc.img_size],
            **preprocessing(dc),
            "top1": self.best["top1"],
            "top5": self.best["top5"],
            "epoch": self.best["epoch"],
            "weights": self.best["weights"],
        }
        if self.class_names:
            info["class_names"] = {c: self.class_names.get(c, c) for c in self.classes}
        save_model_dir(self.out, weights.state_dict(), info)

    def save_checkpoint(self) -> None:
        state = {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "best": self.best,
            "classes": self.classes,
        }
        save_run_checkpoint(self, state)


def train_one_epoch(run: Run, epoch: int) -> dict[str, float]:
    """One pass of ``run.steps_per_epoch`` optimizer steps; returns mean loss, last lr and images/s."""
    config, model, device = run.config, run.model, run.device
    model.train()
    if config.freeze_backbone:
        model.eval()  # frozen batch-norm statistics too: a true linear probe
        model.get_classifier().train()

    def batch_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        inputs, targets = batch
        inputs = run.train_normalize(inputs.to(device, non_blocking=True))
        targets = targets.to(device, non_blocking=True)
        if run.mixup is not None:
            inputs, targets = run.mixup(inputs, targets)
        with autocast(device, run.precision):
            logits = run.forward(inputs)
        loss = soft_cross_entropy(logits.float(), targets) if run.mixup is not None else run.criterion(logits.float(), targets)
        return loss, inputs.shape[0]

    after_step = (lambda step: run.ema.update(model, step=step)) if run.ema is not None else None
    return run_epoch(run, epoch, batch_loss, after_step, module=model)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets (mixup/cutmix blends with label smoothing folded in)."""
    return torch.sum(-targets * torch.log_softmax(logits, dim=-1), dim=-1).mean()


def pretrained_info(pretrained: str | None, model: str) -> dict[str, Any]:
    """The JSON info stored with ``--pretrained`` weights (a run directory's), checked against ``--model``."""
    if pretrained is None:
        return {}
    info = resolve_weights(pretrained)[1]
    if info.get("architecture") not in (None, model):
        raise ValueError(f"{pretrained} holds {info['architecture']} weights, not {model}: pass --model {info['architecture']}")
    return info


def take_fraction(dataset: Any, fraction: float, seed: int) -> None:
    """Keep a class-balanced ``fraction`` of a folder dataset's samples, chosen by ``seed`` (in place)."""
    if not hasattr(dataset, "samples"):
        raise ValueError("--train-fraction needs a folder dataset (shards are read as a stream): pass an ImageFolder root")
    keep = class_balanced_subset(dataset.targets, fraction, seed)
    dataset.samples = [dataset.samples[i] for i in keep]


def freeze_backbone(model: torch.nn.Module) -> None:
    """Only the classifier trains (a linear probe): every other parameter stops requiring grad."""
    head = {id(p) for p in model.get_classifier().parameters()}
    if not head:
        raise ValueError(f"{type(model).__name__} has no classifier parameters to train with --freeze-backbone")
    for param in model.parameters():
        param.requires_grad_(id(param) in head)


__all__ = ["Run", "freeze_backbone", "pretrained_info", "soft_cross_entropy", "take_fraction", "train", "train_one_epoch"]
