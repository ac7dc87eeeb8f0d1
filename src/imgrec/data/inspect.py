"""Walk one sample through the data pipeline, step by step, and draw a grid of augmented samples.

The debugging aid fastai users know as ``summary()``: when accuracy is odd, look first at what
the model is actually fed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from imgrec.config import DataConfig
from imgrec.data.decode import load_rgb
from imgrec.data.folder import ImageFolderDataset
from imgrec.data.splits import split_dirs
from imgrec.data.transforms import (
    BatchNormalize,
    EvalTransform,
    StepwiseTransform,
    TrainTransform,
    eval_transform,
    train_transform,
)


@dataclass
class PipelineStep:
    pipeline: str  # "train" or "eval"
    step: str
    output: str


@dataclass
class InspectReport:
    path: str
    label: str
    steps: list[PipelineStep]
    grid: Path | None


def describe(value: Any) -> str:
    if isinstance(value, Image.Image):
        return f"PIL {value.mode} {value.width}x{value.height}"
    if isinstance(value, torch.Tensor):
        text = f"tensor {str(value.dtype).removeprefix('torch.')} {tuple(value.shape)}"
        if value.is_floating_point():
            text += f" mean {value.mean().item():+.3f} std {value.std().item():.3f}"
        else:
            text += f" range [{int(value.min())}, {int(value.max())}]"
        return text
    return type(value).__name__


def walk(transform: StepwiseTransform, image: Image.Image, pipeline: str) -> tuple[list[PipelineStep], Any]:
    steps = []
    for name, step in transform.steps:
        image = step(image)
        steps.append(PipelineStep(pipeline, name, describe(image)))
    return steps, image


def dataset_for_inspection(root: str | os.PathLike) -> ImageFolderDataset:
    """The train split of a train/val root, or the folder itself if it is a plain ImageFolder."""
    root = Path(root)
    folder = split_dirs(root)[0] if (root / "train").is_dir() else root
    return ImageFolderDataset(folder)


def inspect_pipeline(
    root: str | os.PathLike,
    config: DataConfig,
    *,
    index: int = 0,
    samples: int = 16,
    out: str | os.PathLike | None = None,
    seed: int = 0,
) -> InspectReport:
    """Show sample ``index`` after each train and eval step; write ``samples`` augmented images to ``out``."""
    dataset = dataset_for_inspection(root)
    if not 0 <= index < len(dataset):
        raise ValueError(f"--index {index} is out of range: {dataset.root} holds {len(dataset)} images")
    torch.manual_seed(seed)
    path, label = dataset.samples[index]
    image = load_rgb(path, config.max_pixels)
    steps = [PipelineStep("decode", "load_rgb", describe(image))]
    train_steps, train_tensor = walk(TrainTransform.from_config(config), image, "train")
    batch = BatchNormalize.from_config(config, train=True)(train_tensor.unsqueeze(0))
    eval_steps, eval_tensor = walk(EvalTransform.from_config(config), image, "eval")
    steps += train_steps + [PipelineStep("train", "batch_normalize (on device)", describe(batch))]
    steps += eval_steps + [PipelineStep("eval", "batch_normalize (on device)", describe(BatchNormalize.from_config(config)(eval_tensor.unsqueeze(0))))]
    # The default (fast) pipelines decode and crop in one step, from the file itself.
    for pipeline, transform in (("train (fast)", train_transform(config)), ("eval (fast)", eval_transform(config))):
        steps.append(PipelineStep(pipeline, f"decode, crop, resize: {transform!r}", describe(transform(path, config.max_pixels))))

    grid = None
    if out is not None and samples > 0:
        dataset.transform = train_transform(config)
        picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:samples].tolist()
        tiles = [(dataset[i][0], dataset.classes[dataset.samples[i][1]]) for i in picks]
        grid = Path(out)
        grid.parent.mkdir(parents=True, exist_ok=True)
        draw_grid(tiles).save(grid)
    return InspectReport(path=path, label=dataset.classes[label], steps=steps, grid=grid)


def draw_grid(tiles: list[tuple[torch.Tensor, str]], caption_height: int = 14) -> Image.Image:
    """uint8 CHW tensors with their class names under them, in a near-square grid."""
    columns = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    height, width = tiles[0][0].shape[1:]
    cell_w, cell_h = width + 4, height + caption_height + 4
    canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (tensor, caption) in enumerate(tiles):
        x, y = (k % columns) * cell_w + 2, (k // columns) * cell_h + 2
        canvas.paste(Image.fromarray(tensor.permute(1, 2, 0).numpy()), (x, y))
        draw.text((x, y + height + 1), caption, fill=(0, 0, 0))
    return canvas
