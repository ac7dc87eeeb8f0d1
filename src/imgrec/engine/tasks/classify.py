"""Supervised classification: ``train(config)`` from a folder of images to a model directory.

The task reads DATA/train and DATA/val (folders or shards), builds the timm model (from local
pretrained weights if asked, frozen up to its head if asked), trains it with cross-entropy
(label smoothing, mixup/cutmix, an EMA of the weights), validates every epoch, and saves the
model directory (``model.safetensors`` + ``model.json``, its card) whenever val top-1 improves,
from the model or its EMA, whichever is better. The loop is the trainer's (``imgrec.engine.trainer``).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console

from imgrec import distributed
from imgrec.calibration import checked_temperature
from imgrec.card import MODEL_WEIGHTS, ModelCard
from imgrec.config import TrainConfig
from imgrec.data.cache import BatchedRandomResizedCrop, CachedEvalLoader, CachedTrainLoader, ImageCache, cache_plan, cache_side
from imgrec.data.folder import read_class_names, take_fraction, write_class_index
from imgrec.data.loader import create_loader
from imgrec.data.sampler import class_balanced_weights
from imgrec.data.splits import SPLIT_FILE, load_splits
from imgrec.data.stats import dataset_stats
from imgrec.data.transforms import BatchNormalize, eval_transform, train_transform
from imgrec.engine.checkpoint import snapshot
from imgrec.engine.evaluate import classification_metrics, collect_logits
from imgrec.engine.lr_find import RangeTest
from imgrec.engine.progress import print_recipe
from imgrec.engine.tasks import variant_class
from imgrec.engine.tasks.base import Forward, OptimizerSettings, RunContext, Task
from imgrec.engine.trainer import Trainer, run_task, start_or_resume
from imgrec.hardware import DTYPES, autocast
from imgrec.models.custom import check_logits, is_custom_spec, register_instance
from imgrec.models.directory import save_model_dir
from imgrec.models.factory import Weights, create_model, locate_weights
from imgrec.recipe import resolve_data_config, resolve_recipe


def train(config: TrainConfig | None = None, *, resume: str | os.PathLike | None = None, console: Console | None = None, **overrides: Any):
    """Train a classifier; returns the run directory (``config.out``).

    ``train(data="DATA", model="resnet18", out="runs/r18", epochs=10)`` or ``train(TrainConfig(...))``;
    ``train(resume="runs/r18")`` continues a run from its ``last.pt``.
    """
    if isinstance(overrides.get("model"), torch.nn.Module):  # any nn.Module: trained as given, recorded by its spec
        overrides["model"], overrides["model_args"] = register_instance(overrides["model"], overrides.get("model_args"))
    elif config is not None and isinstance(config.model, torch.nn.Module):
        spec, args = register_instance(config.model, config.model_args)
        config = dataclasses.replace(config, model=spec, model_args=args)
    return run_task(ClassifyTask, config, resume=resume, console=console, overrides=overrides)


def lr_find(config: TrainConfig | None = None, *, console: Console | None = None, **overrides: Any) -> RangeTest:
    """The learning-rate range test of a classifier's run (``imgrec lr-find``): the curve and the
    suggestion, written to OUT/lr_find.png and lr_find.json; no training."""
    console = console or Console(soft_wrap=True)
    config, _ = start_or_resume(ClassifyTask, config, None, {"out": "runs/lr-find", **overrides} if config is None else overrides)  # data given, OUT no run
    trainer = Trainer(ClassifyTask, config, console)
    test = trainer.range_test or trainer.find_lr(trainer.config)
    console.print(f"suggested learning rate {test.suggestion:.3g} (at batch {trainer.config.batch_size}); curve: {trainer.out / 'lr_find.png'}", highlight=False)
    return test


class ClassifyTask(Task):
    """A timm classifier trained with cross-entropy on labelled folders (or shards)."""

    config_class = TrainConfig
    no_data = "no training data: pass --data DATA (data=DATA in Python or YAML), a folder holding train/<class>/ and val/<class>/"
    batches_channels_last = True

    def __new__(cls, config: TrainConfig, run: RunContext):
        """A run with a ``teacher`` is a distillation (``imgrec.engine.tasks.kd``): the same task
        with the teacher's soft targets, for a new run and a resumed one alike."""
        if cls is ClassifyTask and config.teacher:
            return super().__new__(variant_class("distill-classify"))
        return super().__new__(cls)

    @classmethod
    def check(cls, config: TrainConfig) -> None:
        if config.unlabelled and not config.teacher:
            raise ValueError("--unlabelled images are learnt from a teacher's answers: pass --teacher RUN too (a trained classifier of the same classes)")
        if not config.teacher:
            defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
            given = [f"--{name.replace('_', '-')} {getattr(config, name):g}" for name in ("kd_weight", "kd_temperature") if getattr(config, name) != defaults[name]]
            if given:
                raise ValueError(f"{' and '.join(given)} set the distillation term, which needs a teacher: pass --teacher RUN too, or leave them out")
        if config.teacher and cls is ClassifyTask:
            variant_class("distill-classify").check(config)

    def __init__(self, config: TrainConfig, run: RunContext):
        self.config, self.run = config, run
        self.pretrained_source: dict[str, str] = {}  # the starting weights' name, file and SHA-256, for the card
        self.load_data()
        self.model = self.module = self.saved = self.build_model()
        config = self.config  # the recipe's choices filled in
        # Evaluation runs outside DDP: the ranks' shares of val/ may differ by a batch.
        self.eval_forward = torch.compile(self.model) if config.compile else self.model
        self.build_loaders()
        self.ema = None
        if config.ema_decay:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=config.ema_decay, use_warmup=True)
        self.ema_in_checkpoint = self.ema is not None
        self.train_normalize = BatchNormalize.from_config(self.data_config, train=True, channels_last=run.channels_last).to(run.device)
        self.eval_normalize = BatchNormalize.from_config(self.data_config, channels_last=run.channels_last).to(run.device)
        self.mixup = None
        if config.mixup or config.cutmix:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.label_smoothing, num_classes=len(self.classes))
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing, weight=self.class_weights())
        self.best: dict[str, Any] = {"top1": -1.0}
        self.improved = False

    def load_data(self) -> None:
        """The train and val splits, their classes (checked against a resumed run's) and class names."""
        config, run = self.config, self.run
        options = {k: config.data_config[k] for k in ("max_pixels", "max_bad_fraction") if k in config.data_config}
        record = run.out / SPLIT_FILE
        self.splits = load_splits(
            config.data, val_root=config.val_data, seed=config.seed, skip_log=run.skip_log, val_split=config.val_split, split_record=record,
            labels=config.labels, **options,
        )  # fmt: skip
        if self.splits.note:
            run.console.print(self.splits.note, highlight=False)
        if self.splits.record is not None and not record.is_file() and distributed.is_main():
            self.splits.record.write(record)  # resume, evaluate and the report take the same images
        self.class_names = read_class_names(config.data)
        self.classes = self.splits.classes
        if run.checkpoint is not None and run.checkpoint["classes"] != self.classes:
            raise ValueError(
                f"the classes in {config.data} ({len(self.classes)}) differ from those of the run in {run.out} "
                f"({len(run.checkpoint['classes'])}): resume with the dataset the run was started on"
            )
        if self.splits.val is not None:
            self.splits.val.replace_bad = False  # validation counts each readable image once
        if config.train_fraction < 1:
            take_fraction(self.splits.train, config.train_fraction, config.seed)
        self.train_set = self.splits.train
        self.stats = dataset_stats(self.train_set, seed=config.seed)
        if config.balance and not hasattr(self.train_set, "samples"):
            raise ValueError(f"--balance {config.balance} needs the labels ahead (a folder dataset); {config.data} is read as shards")
        run.console.print(balance_line(self.stats, config.balance), highlight=False)
        if config.balance == "sampler":
            self.train_set.sample_weights = class_balanced_weights([label for _, label in self.train_set.samples])
        if distributed.is_main():
            write_class_index(run.out / "classes.json", self.classes)

    def build_model(self) -> torch.nn.Module:
        """The model (from the pretrained weights, unless a checkpoint will give them), the recipe
        (what the user left open, from the data), the data config (flags > the weights' card > the
        data > the architecture's) and transforms, on the device."""
        config, run = self.config, self.run
        # The weights come from the checkpoint on resume: the pretrained file is not needed (nor read) again.
        pretrained = locate_weights(config.pretrained) if config.pretrained and run.checkpoint is None else None
        card = pretrained.card_for(config.model) if pretrained is not None else None
        if pretrained is not None:
            self.pretrained_source = pretrained.source
        model_options = {"drop_path_rate": config.drop_path} if config.drop_path is not None else {}
        custom = is_custom_spec(config.model)
        if custom and (config.freeze_backbone or config.layer_decay or config.drop_path is not None):
            raise ValueError(f"--freeze-backbone, --layer-decay and --drop-path need a timm model; {config.model} is a model of your own")
        model = create_model(config.model, num_classes=len(self.classes), pretrained=pretrained, model_args=config.model_args, **model_options)
        if run.checkpoint is None:  # a resumed run's config holds every choice already
            self.config, choices = resolve_recipe(config, self.stats, model=model, device=run.device, card=card, finetune=finetune_kind(pretrained))
            print_recipe(run.console, choices)
            config = self.config
        check_mixup(config, len(self.train_set))
        self.data_config = resolve_data_config(model, card=card, **config.data_config)
        if custom:
            check_logits(model, len(self.classes), self.data_config.img_size, config.model)
        self.splits.train.transform = train_transform(self.data_config, config.loader)
        if self.splits.val is not None:
            self.splits.val.transform = eval_transform(self.data_config, config.loader)
        if config.freeze_backbone:
            freeze_backbone(model)
        return model.to(run.device, memory_format=torch.channels_last if run.channels_last else torch.preserve_format)

    def build_loaders(self) -> None:
        """The validation loader, and the cache of the training images when they fit (the fast path)."""
        config, run, dc = self.config, self.run, self.data_config
        cached, why = cache_plan(self.stats, dc, run.device, config.cache)
        self.cache = None
        if cached:
            side = cache_side(dc.img_size, self.stats.short_side)
            self.cache = ImageCache(self.splits.train, side=side, interpolation=dc.interpolation, device=run.device, workers=config.workers)
            self.crop = BatchedRandomResizedCrop(dc.img_size, scale=dc.scale, ratio=dc.ratio, hflip=dc.hflip, interpolation=dc.interpolation)
            self.val_loader = None if self.splits.val is None else CachedEvalLoader(self.splits.val, batch_size=config.batch_size, device=run.device, workers=config.workers, channels_last=run.channels_last)
            run.console.print(f"data: {len(self.cache):,} training images decoded once into memory ({why}), augmented in batches on {run.device.type}; no loader processes", highlight=False)
            return
        self.val_loader = None if self.splits.val is None else create_loader(
            self.splits.val, batch_size=config.batch_size, train=False, num_workers=config.workers, skip_none=True, channels_last=run.channels_last
        )
        run.console.print(f"data: read from the files each epoch by loader processes ({why})", highlight=False)

    def make_train_loader(self, config: TrainConfig, device: torch.device, channels_last: bool) -> Any:
        if self.cache is not None:
            return CachedTrainLoader(self.cache, self.crop, batch_size=config.batch_size, seed=config.seed, weights=getattr(self.train_set, "sample_weights", None))
        return super().make_train_loader(config, device, channels_last)

    def optimizer_settings(self) -> OptimizerSettings:
        config = self.config
        return OptimizerSettings(config.opt, config.base_lr, config.weight_decay, layer_decay=config.layer_decay, clip_grad=config.clip_grad)

    def class_weights(self) -> torch.Tensor | None:
        """``--balance loss``: each class weighted by images / (classes x its images) (mean 1 over the images)."""
        if self.config.balance != "loss":
            return None
        counts = torch.bincount(torch.tensor([label for _, label in self.train_set.samples]), minlength=len(self.classes)).double()
        return (counts.sum() / (len(self.classes) * counts.clamp(min=1))).float().to(self.run.device)

    def train_mode(self) -> None:
        self.model.train()
        if self.config.freeze_backbone:
            self.model.eval()  # frozen batch-norm statistics too: a true linear probe
            self.model.get_classifier().train()

    def batch_inputs(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised inputs, targets) of a training batch on the device, mixed where mixup/cutmix is on."""
        device = self.run.device
        inputs, targets = batch
        inputs = self.train_normalize(inputs.to(device, non_blocking=True))
        targets = targets.to(device, non_blocking=True)
        if self.mixup is not None:
            inputs, targets = self.mixup(inputs, targets)
        return inputs, targets

    def supervised_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against the labels (soft ones where mixup/cutmix made them)."""
        return soft_cross_entropy(logits.float(), targets) if self.mixup is not None else self.criterion(logits.float(), targets)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor], forward: Forward) -> tuple[torch.Tensor, int]:
        inputs, targets = self.batch_inputs(batch)
        with autocast(self.run.device, self.run.precision):
            logits = forward(inputs)
        return self.supervised_loss(logits, targets), inputs.shape[0]

    def after_step(self, step: int, total_steps: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=step)

    def val_logits(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, labels) of ``model`` on every val image, gathered from all ranks (each scored its share)."""
        run = self.run
        logits, labels = collect_logits(model, self.val_loader, device=run.device, normalize=self.eval_normalize, autocast_dtype=DTYPES[run.precision])
        return distributed.gather_rows(logits.to(run.device)).cpu(), distributed.gather_rows(labels.to(run.device)).cpu()

    def evaluate(self, model: torch.nn.Module | None = None) -> dict[str, Any]:
        """Loss, top-1 and top-5 of ``model`` (the trained one by default) on every val image, over all ranks."""
        logits, labels = self.val_logits(model if model is not None else self.eval_forward)
        return {**classification_metrics(logits, labels, self.classes), "count": len(labels)}

    def validate(self, epoch: int, stats: dict[str, float]) -> dict[str, Any]:
        """The epoch's row; the model and, with an EMA, its average are scored, and the better one is
        the run's best when it beats every earlier epoch's (``save`` then writes it). Without a
        validation set (``val_split`` 0) every epoch is saved: the model directory holds the last."""
        if self.val_loader is None:
            self.improved, self.best = True, {"top1": None, "top5": None, "epoch": epoch, "weights": "model"}
            return {"train_loss": stats["loss"], "lr": stats["lr"], "images_per_s": round(stats["images_per_s"], 2)}
        metrics = self.evaluate()
        row = {
            "train_loss": stats["loss"], "val_loss": metrics["loss"], "val_top1": metrics["top1"], "val_top5": metrics["top5"],
            "lr": stats["lr"], "images_per_s": round(stats["images_per_s"], 2), "val_images": metrics["count"],
        }  # fmt: skip
        candidates = [("model", metrics["top1"], metrics["top5"])]
        if self.ema is not None:
            ema_metrics = self.evaluate(self.ema.module)
            row["ema_top1"] = ema_metrics["top1"]
            candidates.append(("ema", ema_metrics["top1"], ema_metrics["top5"]))
        source, top1, top5 = max(candidates, key=lambda c: c[1])
        self.improved = self.best["top1"] is None or top1 > self.best["top1"]
        if self.improved:
            self.best = {"top1": top1, "top5": top5, "epoch": epoch, "weights": source}
        return row

    def save(self, row: dict[str, Any]) -> Callable[[], Any] | None:
        """The model directory (model.safetensors, model.json) of an epoch that beat every earlier one."""
        if not self.improved:
            return None
        weights = self.ema.module if self.best["weights"] == "ema" else self.model
        state, card, out = snapshot(weights.state_dict()), self.card(), self.run.out
        return lambda: save_model_dir(out, state, card)

    def card(self) -> ModelCard:
        config, best = self.config, self.best
        names = {c: self.class_names.get(c, c) for c in self.classes} if self.class_names else {}
        return ModelCard(
            architecture=config.model, data_config=self.data_config, classes=list(self.classes), class_names=names,
            metrics={k: best[k] for k in ("top1", "top5", "epoch") if best.get(k) is not None}, weights=best["weights"], pretrained=config.pretrained,
            pretrained_source=dict(self.pretrained_source), model_args=dict(config.model_args or {}),
        )  # fmt: skip

    def finish(self) -> str | None:
        """With ``--calibrate``: the saved weights' temperature, fitted on the val split over all
        ranks, stored in model.json by rank 0 (``imgrec calibrate`` on the run's own held-out images)."""
        if not self.config.calibrate:
            return None
        if self.val_loader is None:
            return "--calibrate: no validation images (--val-split 0), so no temperature was fitted; run `imgrec calibrate RUN --data VAL`"
        from safetensors.torch import load_file

        run = self.run
        distributed.barrier()  # rank 0's model directory is on disk before any rank reads it
        saved = copy.deepcopy(self.saved)
        saved.load_state_dict(load_file(str(run.out / MODEL_WEIGHTS), device=str(run.device)))  # the best epoch's weights, as the model directory holds them
        logits, labels = self.val_logits(saved)
        try:
            temperature, report = checked_temperature(logits, labels)
        except ValueError as exc:
            return f"--calibrate: {exc} in the validation split; the model is left uncalibrated"
        if distributed.is_main():
            card = ModelCard.read(run.out)
            card.temperature, card.calibration = temperature, {"data": "the run's validation split", **report}
            card.write(run.out)
        return (
            f"calibrated on {len(labels)} val images: temperature {temperature:.4g}, ECE {report['ece_before']:.2f}% -> {report['ece_after']:.2f}%, "
            f"NLL {report['nll_before']:.4f} -> {report['nll_after']:.4f}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "best": self.best,
            "classes": self.classes,
            "pretrained_source": self.pretrained_source,  # the weights' name and SHA-256 stay in the card after a resume
        }

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        if self.ema is not None and checkpoint.get("ema") is not None:
            self.ema.module.load_state_dict(checkpoint["ema"])
        self.best = checkpoint["best"]
        self.pretrained_source = dict(checkpoint.get("pretrained_source") or {})

    def start_line(self, batch: str, lr: float) -> str:
        config, run = self.config, self.run
        return (
            f"training {config.model} on {len(self.splits.train)} images ({len(self.classes)} classes), "
            f"{'validating on ' + str(len(self.splits.val)) if self.splits.val is not None else 'no validation'}; {run.device.type}, {run.precision}, "
            f"batch {batch}, peak lr {lr:.3g}, {config.epochs} epochs"
        )

    def epoch_line(self, row: dict[str, Any]) -> str:
        ema = f", EMA top-1 {row['ema_top1']:.2f}%" if "ema_top1" in row else ""
        if "val_loss" not in row:
            return f"epoch {row['epoch']}/{self.config.epochs}: train loss {row['train_loss']:.4f}, {row['images_per_s']:.0f} img/s, {row['seconds']:.1f} s"
        return (
            f"epoch {row['epoch']}/{self.config.epochs}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, "
            f"top-1 {row['val_top1']:.2f}%, top-5 {row['val_top5']:.2f}%{ema}, {row['images_per_s']:.0f} img/s, {row['seconds']:.1f} s"
        )

    def end_line(self) -> str:
        if self.best["top1"] is None:
            return f"no validation set: the model of the last epoch ({self.best.get('epoch')}) is saved; model directory: {self.run.out}"
        return f"best val top-1 {self.best['top1']:.2f}% (epoch {self.best.get('epoch')}); model directory: {self.run.out}"


def balance_line(stats: Any, balance: str | None) -> str:
    """How imbalanced the training classes are, and what the run does about it."""
    if not stats.smallest_class:
        return f"classes: {stats.classes} (their sizes are not known ahead)"
    ratio = stats.largest_class / stats.smallest_class
    line = f"classes: {stats.classes}, {stats.smallest_class:,} to {stats.largest_class:,} training images each ({ratio:.1f}x)"
    if balance == "sampler":
        return line + "; --balance sampler: each class is drawn equally often"
    if balance == "loss":
        return line + "; --balance loss: each class's loss is weighted by its rarity"
    return line + ("; imbalanced: --balance sampler or --balance loss evens it out" if ratio >= 3 else "")


def check_mixup(config: TrainConfig, images: int) -> None:
    if config.mixup or config.cutmix:
        if config.batch_size % 2 or (images < config.batch_size and images % 2):
            raise ValueError(f"mixup/cutmix pair images within a batch: batch_size must be even, got {config.batch_size} ({images} training images)")


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets (mixup/cutmix blends with label smoothing folded in)."""
    return torch.sum(-targets * torch.log_softmax(logits, dim=-1), dim=-1).mean()


def finetune_kind(pretrained: Weights | None) -> str | None:
    """None from scratch; "run" for an imgrec run's weights (they carry its card and no hub source);
    "weights" for weights by name or from a bare file."""
    if pretrained is None:
        return None
    return "run" if pretrained.card is not None and "repo" not in pretrained.source else "weights"


def freeze_backbone(model: torch.nn.Module) -> None:
    """Only the classifier trains (a linear probe): every other parameter stops requiring grad."""
    head = {id(p) for p in model.get_classifier().parameters()}
    if not head:
        raise ValueError(f"{type(model).__name__} has no classifier parameters to train with --freeze-backbone")
    for param in model.parameters():
        param.requires_grad_(id(param) in head)


__all__ = ["ClassifyTask", "freeze_backbone", "soft_cross_entropy", "train"]
