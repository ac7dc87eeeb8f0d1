"""Self-supervised pretraining: ``pretrain(config)`` from unlabelled images to ``RUN/backbone.safetensors``.

The loop of ``imgrec.engine.train`` with a method (``imgrec.ssl``) in place of the classifier:
each batch holds several augmented views of every image, the method turns them into a loss, and
after each optimizer step it may move a momentum teacher. Every epoch ends with the online kNN
monitor (when the data has a labelled val split), a line in metrics.jsonl, the backbone's
weights and an atomic checkpoint, so ``--resume`` continues exactly where the run stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from imgrec.checkpoint import save_model_dir
from imgrec.config import PretrainConfig, preprocessing, save_yaml, to_dict
from imgrec.data.folder import SHARD_SHUFFLE_BUFFER, DatasetError, SkipLog, iter_image_files, load_splits
from imgrec.data.loader import create_loader
from imgrec.data.shards import ShardDataset, is_shard_source
from imgrec.data.transforms import BatchNormalize, eval_transform, resolve_data_config
from imgrec.engine import distributed
from imgrec.engine.evaluate import LabelledFiles, classification_metrics, collect_logits
from imgrec.engine.hardware import DTYPES, autocast
from imgrec.engine.knn import knn_scores
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
from imgrec.engine.optim import BASE_LR, WEIGHT_DECAY, cosine_schedule, create_optimizer, scaled_lr
from imgrec.engine.resume import (
    check_free_space,
    end_epoch,
    restore_training_state,
    run_epochs,
    save_run_checkpoint,
)
from imgrec.engine.train import take_fraction
from imgrec.models.factory import create_model
from imgrec.ssl import method_class
from imgrec.ssl.views import MultiViewTransform, adjust_view

BACKBONE_WEIGHTS = "backbone.safetensors"
BACKBONE_INFO = "backbone.json"


def pretrain(config: PretrainConfig | None = None, *, resume: str | os.PathLike | None = None, console: Console | None = None, **overrides: Any) -> Path:
    """Pretrain a backbone without labels; returns the run directory holding ``backbone.safetensors``.

    ``pretrain(data="DATA", model="resnet18", method="simclr", out="runs/ssl", epochs=100)``;
    ``pretrain(resume="runs/ssl")`` continues a run from its ``last.pt``.
    """
    console = console or Console(soft_wrap=True)
    config, checkpoint = start_or_resume(
        PretrainConfig, config, resume, overrides, no_data="no images to pretrain on: pass --data DIR, a folder of images (labels, if any, are ignored)"
    )
    return launch(lambda console, device: PretrainRun(config, console, device), config.device, console, checkpoint)


def pretraining_data(config: PretrainConfig, skip_log: SkipLog) -> tuple[Any, Any, Any, list[str], str]:
    """(unlabelled train set, labelled bank, labelled queries, classes, note) for ``config.data``.

    A root with train/ and val/ (folders or shards, same classes) pretrains on train/ and, while
    ``knn_every`` is on, monitors the kNN accuracy of val/ against train/. Anything else is
    pretrained on unmonitored, with ``note`` saying why: train/ without a labelled val/ (train/
    alone), a shard source (folder of shards, pattern, URL), or a folder of images at any depth,
    class folders or not. The bank holds at most ``knn_bank_size`` train images (class-balanced
    for folders; the first ones read for shards) and uses the eval transform.
    """
    options = {k: config.data_config[k] for k in ("max_pixels", "max_bad_fraction") if k in config.data_config}
    # ``root`` stays a string: a shard URL's "//" would not survive a Path.
    root, local, note = config.data, Path(config.data), ""
    if config.val_data is not None or (local / "train").is_dir() and (local / "val").is_dir():
        try:
            splits = load_splits(root, val_root=config.val_data, seed=config.seed, skip_log=skip_log, **options)
        except DatasetError as exc:
            if config.val_data is not None:
                raise
            root, note = str(local / "train"), f"no kNN monitor: {exc}"
        else:
            if not config.knn_every:
                return splits.train, None, None, splits.classes, "no kNN monitor (knn_every is 0)"
            splits.val.replace_bad = False  # the monitor counts each readable image once
            return splits.train, monitor_bank(splits.train, config.knn_bank_size, config.seed), splits.val, splits.classes, ""
    elif (local / "train").is_dir():
        root, note = str(local / "train"), f"no kNN monitor: {config.data} has train/ but no labelled val/"
    if is_shard_source(root):
        shard_options = {k: v for k, v in options.items() if k == "max_pixels"}
        train = ShardDataset(root, shuffle=SHARD_SHUFFLE_BUFFER, seed=config.seed, skip_log=skip_log, **shard_options)
        return train, None, None, [], note or "no kNN monitor: shards without a val split"
    if not Path(root).is_dir():
        raise ValueError(f"--data {root} is not a folder: pass a folder of images, or a root holding train/ and val/")
    files = iter_image_files(root)
    if not files:
        raise ValueError(f"no images below {root} (.jpg, .jpeg, .png, .webp, ... at any depth)")
    train = LabelledFiles([(str(f), 0) for f in files], ["unlabelled"], root=root, skip_log=skip_log, replace_bad=True, **options)
    train.seed = config.seed
    return train, None, None, [], note or "no kNN monitor: no labelled val split"


def monitor_bank(train: Any, size: int | None, seed: int) -> Any:
    """The kNN monitor's labelled bank: a copy of the train set, unreadable images left out, cut to
    ``size`` images, class-balanced (a folder; shards are cut as they are read, see ``knn_monitor``)."""
    bank = copy.copy(train)
    bank.replace_bad = False
    if hasattr(bank, "samples") and size and len(bank) > size:
        take_fraction(bank, size / len(bank), seed)
        if len(bank) > size:  # one image per class at least: more classes than the bank holds
            bank.samples = sorted(random.Random(seed).sample(bank.samples, size))
    return bank


class PretrainRun:
    """The state of one pretraining run; built once, then ``fit`` loops over the epochs."""

    def __init__(self, config: PretrainConfig, console: Console, device: torch.device | None = None):
        channels_last = open_run(self, config, console, device)
        memory_format = torch.channels_last if channels_last else torch.preserve_format

        self.train_set, self.bank_set, self.query_set, self.classes, self.monitor_note = pretraining_data(config, self.skip_log)
        backbone = create_model(config.model, num_classes=0)
        self.data_config = dc = resolve_data_config(backbone, **config.data_config)
        cls = method_class(config.method)
        self.method = cls.build(
            backbone, proj_hidden_dim=config.proj_hidden_dim, proj_dim=config.proj_dim,
            temperature=config.temperature, teacher_momentum=config.teacher_momentum,
        )  # fmt: skip
        self.num_views = len(cls.views)
        views = [adjust_view(spec, jitter_strength=config.jitter_strength, blur=config.blur) for spec in cls.views]
        self.train_set.transform = MultiViewTransform(dc, views, config.loader)
        self.method.to(self.device, memory_format=memory_format)
        self.forward = distributed.wrap(self.method, self.device, sync_bn=config.sync_bn)
        self.forward = torch.compile(self.forward) if config.compile else self.forward

        self.train_loader = create_loader(
            self.train_set, batch_size=config.batch_size, train=True, num_workers=config.workers, seed=config.seed,
            persistent_workers=False, low_priority_workers=self.device.type == "cpu",
        )  # fmt: skip
        self.monitor_loaders = None
        if self.bank_set is not None:
            for dataset in (self.bank_set, self.query_set):
                dataset.transform = eval_transform(dc, config.loader)
            self.monitor_loaders = [
                create_loader(d, batch_size=config.batch_size, train=False, num_workers=config.workers, skip_none=True, channels_last=channels_last)
                for d in (self.bank_set, self.query_set)
            ]
        self.steps_per_epoch = steps_per_epoch(self.train_set, self.train_loader, config)

        opt = config.opt or cls.optimizer
        paper = opt == cls.optimizer  # the method's own learning rate and decay go with its own optimizer
        base_lr = config.base_lr if config.base_lr is not None else (cls.base_lr if paper else BASE_LR[opt])
        weight_decay = config.weight_decay if config.weight_decay is not None else (cls.weight_decay if paper else WEIGHT_DECAY[opt])
        global_batch = config.batch_size * config.accum_steps * distributed.world_size()
        self.lr = lr = config.lr if config.lr is not None else scaled_lr(opt, global_batch, base_lr)
        self.optimizer = create_optimizer(self.method, opt, lr, weight_decay, config.momentum, lars_trust=config.lars_trust)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.scheduler = cosine_schedule(self.optimizer, self.total_steps, round(config.warmup_epochs * self.steps_per_epoch), config.min_lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.normalize = BatchNormalize.from_config(dc, channels_last=channels_last).to(self.device)
        self.config = dataclasses.replace(
            config, opt=opt, lr=lr, base_lr=base_lr, weight_decay=weight_decay, data_config=to_dict(dc),
            precision=self.precision, channels_last=channels_last, workers=self.train_loader.num_workers,
        )  # fmt: skip
        self.writer = None
        if distributed.is_main():
            check_free_space(self.out, self.method, opt, saved=self.method.backbone)
            self.writer = open_tensorboard(self.out) if config.tensorboard else None
            save_yaml(self.config, self.out / CONFIG_NAME)

    def restore(self, checkpoint: dict[str, Any]) -> None:
        self.method.load_state_dict(checkpoint["model"])
        restore_training_state(self, checkpoint)

    def fit(self) -> Path:
        config = self.config
        monitor = f"kNN monitor on {len(self.query_set)} labelled val images" if self.monitor_loaders else self.monitor_note
        self.console.print(
            f"pretraining {config.model} with {config.method} on {len(self.train_set)} images; {monitor}; {self.device.type}, "
            f"{self.precision}, {config.opt} batch {config.batch_size}x{config.accum_steps}{ranks_note()}, peak lr {self.lr:.3g}, {config.epochs} epochs",
            highlight=False,
        )
        run_epochs(self)
        self.console.print(f"backbone weights: {self.out / BACKBONE_WEIGHTS}", highlight=False)
        return self.out

    def train_epochs(self) -> None:
        config = self.config
        while self.epoch < config.epochs:
            epoch = self.epoch + 1
            begin_epoch(self, epoch)
            started = time.perf_counter()
            row = {"epoch": epoch, **pretrain_one_epoch(self, epoch)}
            if self.monitor_loaders and config.knn_every and (epoch % config.knn_every == 0 or epoch == config.epochs):
                row.update(self.knn_monitor())
            row["seconds"] = round(time.perf_counter() - started, 3)
            if self.skipped_steps:
                row["skipped_steps"] = self.skipped_steps
            self.epoch, self.step = epoch, 0
            if distributed.is_main():
                self.log(row)
                self.save_backbone(row)
            end_epoch(self)

    def knn_monitor(self) -> dict[str, float]:
        """kNN top-1/top-5 (k, temperature from the config) of val against the train bank, in percent."""
        dtype = DTYPES[self.precision]
        bank_loader, query_loader = self.monitor_loaders
        if not hasattr(self.bank_set, "samples") and self.config.knn_bank_size:  # shards: the first images read
            bank_loader = itertools.islice(bank_loader, math.ceil(self.config.knn_bank_size / bank_loader.batch_size))
        backbone, normalize = self.method.backbone, self.normalize
        # Each rank embeds its share of the bank and the queries; every rank then holds them all.
        bank, bank_labels, queries, labels = (
            distributed.gather_rows(t.to(self.device))
            for t in (*collect_logits(backbone, bank_loader, device=self.device, normalize=normalize, autocast_dtype=dtype),
                      *collect_logits(backbone, query_loader, device=self.device, normalize=normalize, autocast_dtype=dtype))
        )  # fmt: skip
        scores = knn_scores(
            bank.to(self.device), bank_labels, queries, len(self.classes), k=self.config.knn_k, temperature=self.config.knn_temperature
        )  # fmt: skip
        metrics = classification_metrics(scores.cpu(), labels.cpu(), self.classes)
        return {"knn_top1": metrics["top1"], "knn_top5": metrics["top5"]}

    def log(self, row: dict[str, Any]) -> None:
        write_metrics(self.out, self.writer, row)
        knn = f", kNN top-1 {row['knn_top1']:.2f}%" if "knn_top1" in row else ""
        self.console.print(
            f"epoch {row['epoch']}/{self.config.epochs}: loss {row['loss']:.4f}{knn}, lr {row['lr']:.3g}, "
            f"{row['images_per_s']:.0f} img/s, {row['seconds']:.1f} s",
            highlight=False,
        )

    def save_backbone(self, row: dict[str, Any]) -> None:
        info = {
            "architecture": self.config.model,
            "method": self.config.method,
            "epoch": row["epoch"],
            "epochs": self.config.epochs,
            "feature_dim": self.method.feature_dim,
            **preprocessing(self.data_config),
            **{k: row[k] for k in ("loss", "knn_top1", "knn_top5") if k in row},
        }
        save_model_dir(self.out, self.method.backbone_state(), info, weights_name=BACKBONE_WEIGHTS, info_name=BACKBONE_INFO)

    def save_checkpoint(self) -> None:
        save_run_checkpoint(self, {"model": self.method.state_dict()})


def pretrain_one_epoch(run: PretrainRun, epoch: int) -> dict[str, float]:
    """One pass of ``run.steps_per_epoch`` optimizer steps; returns mean loss, last lr and images/s."""
    run.method.train()

    def batch_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        views = batch[0].to(run.device, non_blocking=True)  # uint8 [B, V, 3, H, W]; labels unused
        inputs = run.normalize(views.transpose(0, 1).flatten(0, 1))  # view-major [V * B, 3, H, W]
        with autocast(run.device, run.precision):
            return run.forward(inputs, run.num_views), views.shape[0]

    return run_epoch(run, epoch, batch_loss, lambda step: run.method.after_step(step / run.total_steps), module=run.method)


__all__ = ["BACKBONE_INFO", "BACKBONE_WEIGHTS", "PretrainRun", "pretrain", "pretrain_one_epoch", "pretraining_data"]
