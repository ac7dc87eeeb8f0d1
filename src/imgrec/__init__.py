"""imgrec: ImageNet-style image recognition, from a folder of images to a served classifier.

The public API. Names are imported on first use, so that ``import imgrec`` (and every CLI
command) does not pay for torch and timm until it needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "DataConfig": "imgrec.config",
    "TrainConfig": "imgrec.config",
    "PretrainConfig": "imgrec.config",
    "LoopConfig": "imgrec.config",
    "ServeConfig": "imgrec.config",
    "ModelCard": "imgrec.card",
    "load_config": "imgrec.recipe",
    "resolve_data_config": "imgrec.recipe",
    "train": "imgrec.engine.tasks.classify",
    "pretrain": "imgrec.engine.tasks.pretrain",
    "Trainer": "imgrec.engine.trainer",
    "Task": "imgrec.engine.tasks.base",
    "probe": "imgrec.engine.probe",
    "knn_scores": "imgrec.engine.knn",
    "linear_probe": "imgrec.engine.knn",
    "MultiViewTransform": "imgrec.data.views",
    "method_class": "imgrec.engine.tasks",
    "evaluate": "imgrec.engine.evaluate",
    "classification_metrics": "imgrec.engine.evaluate",
    "calibrate": "imgrec.engine.calibrate",
    "calibration_metrics": "imgrec.calibration",
    "fit_temperature": "imgrec.calibration",
    "load": "imgrec.inference.predict",
    "Classifier": "imgrec.inference.predict",
    "Prediction": "imgrec.inference.predict",
    "export": "imgrec.inference.export",
    "benchmark": "imgrec.inference.benchmark",
    "BadImageError": "imgrec.data.decode",
    "load_rgb": "imgrec.data.decode",
    "DatasetError": "imgrec.data.folder",
    "ImageFolderDataset": "imgrec.data.folder",
    "SkipLog": "imgrec.data.folder",
    "load_splits": "imgrec.data.splits",
    "write_class_index": "imgrec.data.folder",
    "read_labels_file": "imgrec.data.labels",
    "TrainTransform": "imgrec.data.transforms",
    "EvalTransform": "imgrec.data.transforms",
    "BatchNormalize": "imgrec.data.transforms",
    "train_transform": "imgrec.data.transforms",
    "eval_transform": "imgrec.data.transforms",
    "RandomResizedCropDecode": "imgrec.data.decode_crop",
    "CenterCropDecode": "imgrec.data.decode_crop",
    "EncodedImage": "imgrec.data.decode",
    "ShardDataset": "imgrec.data.shards",
    "write_shards": "imgrec.data.shard_writer",
    "prepare_imagenet": "imgrec.data.prepare",
    "create_loader": "imgrec.data.loader",
    "SynthSpec": "imgrec.data.synth",
    "write_synth_dataset": "imgrec.data.synth",
    "verify_folder": "imgrec.data.verify",
    "inspect_pipeline": "imgrec.data.inspect",
    "create_model": "imgrec.models.factory",
    "list_architectures": "imgrec.models.factory",
    "load_model_dir": "imgrec.models.directory",
    "WeightsError": "imgrec.models.factory",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'imgrec' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
