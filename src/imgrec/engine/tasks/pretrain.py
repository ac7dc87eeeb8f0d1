"""Self-supervised pretraining: ``pretrain(config)`` from unlabelled images to ``RUN/backbone.safetensors``.

The trainer's loop (``imgrec.engine.trainer``) with a method (``imgrec.engine.tasks.METHODS``) in
place of the classifier: each batch holds several augmented views of every image, the method
turns them into a loss, and after each optimizer step it may move a momentum teacher. Every
epoch ends with the online kNN monitor (when the data has a labelled val split), a line in
metrics.jsonl, the backbone's weights and card, and the trainer's checkpoint, so ``--resume``
continues exactly where the run stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from imgrec import distributed
from imgrec.card import BACKBONE_CARD, BACKBONE_WEIGHTS, ModelCard
from imgrec.config import PretrainConfig
from imgrec.data.folder import DatasetError, SkipLog, iter_image_files, take_fraction
from imgrec.data.labels import LabelledFiles
from imgrec.data.loader import create_loader
from imgrec.data.shards import ShardDataset, is_shard_source
from imgrec.data.splits import SHARD_SHUFFLE_BUFFER, load_splits
from imgrec.data.stats import dataset_stats
from imgrec.data.transforms import BatchNormalize, eval_transform
from imgrec.data.views import MultiViewTransform, adjust_view
from imgrec.engine.checkpoint import snapshot
from imgrec.engine.evaluate import classification_metrics, collect_logits
from imgrec.engine.knn import knn_scores
from imgrec.engine.optim import BASE_LR, WEIGHT_DECAY
from imgrec.engine.progress import print_recipe
from imgrec.engine.tasks import method_class
from imgrec.engine.tasks.base import Forward, OptimizerSettings, RunContext, Task
from imgrec.engine.trainer import run_task
from imgrec.hardware import DTYPES, autocast
from imgrec.models.directory import save_model_dir
from imgrec.models.factory import create_model, locate_weights
from imgrec.recipe import resolve_data_config, resolve_recipe


def pretrain(config: PretrainConfig | None = None, *, resume: str | os.PathLike | None = None, console: Console | None = None, **overrides: Any) -> Path:
    """Pretrain a backbone without labels; returns the run directory holding ``backbone.safetensors``.

    ``pretrain(data="DATA", model="resnet18", method="simclr", out="runs/ssl", epochs=100)``;
    ``pretrain(resume="runs/ssl")`` continues a run from its ``last.pt``.
    """
    return run_task(PretrainTask, config, resume=resume, console=console, overrides=overrides)


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


class PretrainTask(Task):
    """A backbone pretrained without labels by one of ``METHODS``; its weights saved every epoch."""

    config_class = PretrainConfig
    no_data = "no images to pretrain on: pass --data DIR, a folder of images (labels, if any, are ignored)"

    @classmethod
    def check(cls, config: PretrainConfig) -> None:
        method = method_class(config.method)  # an unknown method is refused before anything is written
        if method.needs_teacher and not config.teacher:
            raise ValueError(f"--method {config.method} learns from a teacher: pass --teacher NAME_OR_RUN (a timm tag such as resnet50.a1_in1k, hf-hub:ORG/REPO, or a run directory)")
        if config.teacher and not method.needs_teacher:
            raise ValueError(f"--teacher applies to --method distill, not {config.method}")
        for name in ("local_crops", "centering", "koleo_weight"):  # DINO's own settings
            if getattr(config, name) is not None and config.method != "dino":
                raise ValueError(f"--{name.replace('_', '-')} applies to --method dino, not {config.method}")

    def __init__(self, config: PretrainConfig, run: RunContext):
        if config.teacher and run.checkpoint is None and Path(config.teacher).exists():  # a resume from elsewhere finds it again
            config = dataclasses.replace(config, teacher=str(Path(config.teacher).resolve()))
        self.config, self.run = config, run
        self.train_set, self.bank_set, self.query_set, self.classes, self.monitor_note = pretraining_data(config, run.skip_log)
        # Continued pretraining starts from weights (not read again on resume: the checkpoint has them).
        weights = locate_weights(config.pretrained) if config.pretrained and run.checkpoint is None else None
        card = weights.card_for(config.model) if weights is not None else None
        self.pretrained_source: dict[str, str] = dict(weights.source) if weights is not None else {}
        backbone = create_model(config.model, num_classes=0, pretrained=weights)
        self.method_class = cls = method_class(config.method)
        if run.checkpoint is None:  # a resumed run's config holds every choice already
            stats = dataset_stats(self.train_set, seed=config.seed)
            self.config, choices = resolve_recipe(config, stats, model=backbone, device=run.device, card=card, method=cls)
            print_recipe(run.console, choices)
            config = self.config
        # The method's options left open: a new run records the paper's (config.yaml), so that a resume
        # keeps them; a run from before they were recorded takes the defaults it ran with.
        defaults = cls.paper_options() if run.checkpoint is None else cls.unrecorded_defaults
        config = self.config = dataclasses.replace(config, **{k: v for k, v in defaults.items() if getattr(config, k) is None})
        self.data_config = dc = resolve_data_config(backbone, card=card, **config.data_config)
        options: dict[str, Any] = {}
        self.teacher_source: dict[str, Any] = {}
        if cls.needs_teacher:
            from imgrec.engine.tasks.distill import load_teacher

            teacher, width, self.teacher_source = load_teacher(config.teacher, dc)
            options.update(teacher=teacher, teacher_dim=width)
        self.method = cls.build(
            backbone, proj_hidden_dim=config.proj_hidden_dim, proj_dim=config.proj_dim,
            temperature=config.temperature, teacher_momentum=config.teacher_momentum,
            centering=config.centering, koleo_weight=config.koleo_weight, **options,
        )  # fmt: skip
        specs = cls.view_specs(dc, config.local_crops)
        self.num_views = len(specs)
        views = [adjust_view(spec, jitter_strength=config.jitter_strength, blur=config.blur) for spec in specs]
        self.train_set.transform = MultiViewTransform(dc, views, config.loader)
        self.module = self.method.to(run.device, memory_format=torch.channels_last if run.channels_last else torch.preserve_format)
        self.saved = self.method.backbone
        self.monitor_loaders = None
        if self.bank_set is not None:
            for dataset in (self.bank_set, self.query_set):
                dataset.transform = eval_transform(dc, config.loader)
            self.monitor_loaders = [
                create_loader(d, batch_size=config.batch_size, train=False, num_workers=config.workers, skip_none=True, channels_last=run.channels_last)
                for d in (self.bank_set, self.query_set)
            ]
        self.normalize = BatchNormalize.from_config(dc, channels_last=run.channels_last).to(run.device)

    def optimizer_settings(self) -> OptimizerSettings:
        """The method's paper recipe (LARS and its rate and decay) unless the config says otherwise."""
        config, cls = self.config, self.method_class
        opt = config.opt or cls.optimizer
        paper = opt == cls.optimizer  # the method's own learning rate and decay go with its own optimizer
        base_lr = config.base_lr if config.base_lr is not None else (cls.base_lr if paper else BASE_LR[opt])
        weight_decay = config.weight_decay if config.weight_decay is not None else (cls.weight_decay if paper else WEIGHT_DECAY[opt])
        return OptimizerSettings(opt, base_lr, weight_decay, lars_trust=config.lars_trust)

    def loss(self, batch: tuple[Any, torch.Tensor], forward: Forward) -> tuple[torch.Tensor, int]:
        # uint8 [B, V, 3, H, W], or one such tensor per view size (multi-crop); labels unused
        groups = batch[0] if isinstance(batch[0], (list, tuple)) else [batch[0]]
        inputs = [self.normalize(g.to(self.run.device, non_blocking=True).transpose(0, 1).flatten(0, 1)) for g in groups]  # view-major [V * B, 3, H, W]
        with autocast(self.run.device, self.run.precision):
            return forward(inputs if len(inputs) > 1 else inputs[0], self.num_views), groups[0].shape[0]

    def after_step(self, step: int, total_steps: int) -> None:
        self.method.after_step(step / total_steps)

    def validate(self, epoch: int, stats: dict[str, float]) -> dict[str, Any]:
        """The epoch's loss, and the kNN monitor's accuracy on the epochs it runs."""
        config = self.config
        row = {"loss": stats["loss"], "lr": stats["lr"], "images_per_s": stats["images_per_s"]}
        if self.monitor_loaders and config.knn_every and (epoch % config.knn_every == 0 or epoch == config.epochs):
            row.update(self.knn_monitor())
        return row

    def knn_monitor(self) -> dict[str, float]:
        """kNN top-1/top-5 (k, temperature from the config) of val against the train bank, in percent."""
        device, dtype = self.run.device, DTYPES[self.run.precision]
        bank_loader, query_loader = self.monitor_loaders
        if not hasattr(self.bank_set, "samples") and self.config.knn_bank_size:  # shards: the first images read
            bank_loader = itertools.islice(bank_loader, math.ceil(self.config.knn_bank_size / bank_loader.batch_size))
        backbone, normalize = self.method.backbone, self.normalize
        # Each rank embeds its share of the bank and the queries; every rank then holds them all.
        bank, bank_labels, queries, labels = (
            distributed.gather_rows(t.to(device))
            for t in (*collect_logits(backbone, bank_loader, device=device, normalize=normalize, autocast_dtype=dtype),
                      *collect_logits(backbone, query_loader, device=device, normalize=normalize, autocast_dtype=dtype))
        )  # fmt: skip
        scores = knn_scores(bank.to(device), bank_labels, queries, len(self.classes), k=self.config.knn_k, temperature=self.config.knn_temperature)
        metrics = classification_metrics(scores.cpu(), labels.cpu(), self.classes)
        return {"knn_top1": metrics["top1"], "knn_top5": metrics["top5"]}

    def save(self, row: dict[str, Any]) -> Callable[[], Any] | None:
        """The backbone's weights and card (backbone.safetensors, backbone.json), every epoch."""
        card = ModelCard(
            architecture=self.config.model, data_config=self.data_config, method=self.config.method, epochs=self.config.epochs,
            pretrained=self.config.pretrained, pretrained_source=dict(self.pretrained_source), teacher=dict(self.teacher_source),
            feature_dim=self.method.feature_dim, metrics={"epoch": row["epoch"], **{k: row[k] for k in ("loss", "knn_top1", "knn_top5") if k in row}},
        )  # fmt: skip
        state, out = snapshot(self.method.backbone_state()), self.run.out
        return lambda: save_model_dir(out, state, card, weights_name=BACKBONE_WEIGHTS, card_name=BACKBONE_CARD)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.method.state_dict(), "pretrained_source": self.pretrained_source, "teacher_source": self.teacher_source}

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        self.method.load_state_dict(checkpoint["model"])
        self.pretrained_source = dict(checkpoint.get("pretrained_source") or {})
        from imgrec.engine.tasks.distill import check_same_teacher

        check_same_teacher(self.config.teacher, checkpoint.get("teacher_source"), self.teacher_source)

    def start_line(self, batch: str, lr: float) -> str:
        config, run = self.config, self.run
        monitor = f"kNN monitor on {len(self.query_set)} labelled val images" if self.monitor_loaders else self.monitor_note
        opt = config.opt or self.method_class.optimizer
        return (
            f"pretraining {config.model} with {config.method}{f' from teacher {config.teacher}' if config.teacher else ''} on {len(self.train_set)} images; {monitor}; {run.device.type}, "
            f"{run.precision}, {opt} batch {batch}, peak lr {lr:.3g}, {config.epochs} epochs"
        )

    def epoch_line(self, row: dict[str, Any]) -> str:
        knn = f", kNN top-1 {row['knn_top1']:.2f}%" if "knn_top1" in row else ""
        return (
            f"epoch {row['epoch']}/{self.config.epochs}: loss {row['loss']:.4f}{knn}, lr {row['lr']:.3g}, "
            f"{row['images_per_s']:.0f} img/s, {row['seconds']:.1f} s"
        )

    def end_line(self) -> str:
        return f"backbone weights: {self.run.out / BACKBONE_WEIGHTS}"


__all__ = ["PretrainTask", "monitor_bank", "pretrain", "pretraining_data"]
