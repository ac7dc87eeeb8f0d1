"""The console script as a user runs it: synth, verify, inspect, models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from imgrec.data.verify import verify_folder

IMGREC = shutil.which("imgrec") or str(Path(sys.executable).with_name("imgrec"))


def imgrec(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([IMGREC, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_synth_verify_inspect_end_to_end(tmp_path: Path) -> None:
    data = tmp_path / "data"
    made = imgrec("synth", str(data), "--classes", "10", "--train-per-class", "4", "--val-per-class", "2", "--seed", "3")
    assert made.returncode == 0, made.stderr
    assert len(list((data / "train").glob("*/*.jpg"))) == 40
    assert len(list((data / "val").glob("*/*.jpg"))) == 20

    checked = imgrec("verify", str(data), "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    report = json.loads(checked.stdout)
    assert report["files"] == 60 and report["bad"] == 0 and report["bad_files"] == []
    assert report["per_format"] == {"JPEG": 60}
    assert len(report["per_class"]) == 20  # train/<shape> and val/<shape>
    assert all(v == {"files": 4, "bad": 0} for k, v in report["per_class"].items() if k.startswith("train/"))

    human = imgrec("verify", str(data))
    assert human.returncode == 0 and "60 files checked, 0 bad" in human.stdout

    grid = tmp_path / "grid.png"
    shown = imgrec("inspect", str(data), "--img-size", "64", "--samples", "9", "--out", str(grid))
    assert shown.returncode == 0, shown.stderr
    for step in ("load_rgb", "random_resized_crop", "horizontal_flip", "resize_shorter_side", "center_crop", "batch_normalize"):
        assert step in shown.stdout
    assert "tensor uint8 (3, 64, 64)" in shown.stdout
    assert "RandomResizedCropDecode" in shown.stdout and "CenterCropDecode" in shown.stdout  # the default, fast pipelines
    with Image.open(grid) as image:  # 3x3 tiles of 64 px plus padding and captions
        assert image.format == "PNG" and image.width == 3 * 68 and image.height == 3 * (64 + 14 + 4)


def test_verify_reports_exactly_the_bad_files(odd_folder) -> None:
    root, good, bad = odd_folder
    result = imgrec("verify", str(root), "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert {f["path"] for f in report["bad_files"]} == bad
    assert report["files"] == len(good) + len(bad) + 7  # plus the plain class files
    reasons = {Path(f["path"]).name: f["reason"] for f in report["bad_files"]}
    assert "empty" in reasons["empty.jpg"]
    assert "too many pixels" in reasons["bomb.png"] and "3,600,000,000" in reasons["bomb.png"]
    assert "not an image" in reasons["text.jpg"]
    assert [m["path"] for m in report["misnamed"]] == [str(root / "train" / "odd" / "png_named.JPEG")]

    human = imgrec("verify", str(root))
    assert human.returncode == 1
    assert f"{len(bad)} bad file(s)" in human.stdout and "bomb.png" in human.stdout


def test_verify_api_matches_cli_and_checks_good_files(odd_folder) -> None:
    root, good, bad = odd_folder
    report = verify_folder(root, workers=2)
    assert {f.path for f in report.bad} == bad
    assert good <= {f.path for f in report.good}
    modes = {Path(f.path).name: f.mode for f in report.good}
    assert modes["cmyk.jpg"] == "CMYK" and modes["grey16.png"] == "I;16"
    sizes = {Path(f.path).name: (f.width, f.height) for f in report.good}
    assert sizes["rotated.jpg"] == (30, 40)  # EXIF orientation 6 applied
    assert sizes["wide.jpg"] == (2000, 20) and sizes["one_pixel.png"] == (1, 1)


def test_verify_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    result = imgrec("verify", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert "nope" in result.stderr and "is not a folder" in result.stderr


def test_inspect_with_model_config_and_bad_root(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert imgrec("synth", str(data), "--classes", "3", "--train-per-class", "2", "--val-per-class", "1").returncode == 0
    shown = imgrec("inspect", str(data), "--model", "resnet18", "--samples", "0")
    assert shown.returncode == 0, shown.stderr
    assert "crop_pct 0.95" in shown.stdout and "bicubic" in shown.stdout  # from timm's resnet18 config
    assert "tensor uint8 (3, 224, 224)" in shown.stdout

    missing = imgrec("inspect", str(tmp_path / "missing"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    beyond = imgrec("inspect", str(data), "--index", "999", "--samples", "0")
    assert beyond.returncode == 2 and "--index 999 is out of range" in beyond.stderr and "Traceback" not in beyond.stderr


def test_models_lists_architectures_with_params() -> None:
    result = imgrec("models", "resnet18")
    assert result.returncode == 0
    row = next(line for line in result.stdout.splitlines() if " resnet18 " in line)
    assert "11.69" in row
    assert imgrec("models", "no_such_model_xyz").returncode == 1


@pytest.mark.parametrize("args", [["--help"], ["synth", "--help"], ["verify", "--help"]])
def test_help_works(args: list[str]) -> None:
    assert imgrec(*args).returncode == 0


def subcommand(name: str):
    """The argparse parser of ``imgrec NAME``."""
    import argparse

    from imgrec.cli import build_parser

    commands = next(action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction))
    return commands.choices[name]


def options(parser) -> dict[str, object]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


@pytest.mark.parametrize("command, classes", [("train", ("TrainConfig", "DataConfig")), ("pretrain", ("PretrainConfig", "DataConfig"))])
def test_every_config_field_is_a_flag_of_its_command(command: str, classes: tuple[str, ...]) -> None:
    import dataclasses

    import imgrec.config as config

    flags = options(subcommand(command))
    for name in classes:
        for f in dataclasses.fields(getattr(config, name)):
            flag = "--" + f.name.replace("_", "-")
            assert (flag in flags) == f.metadata.get("flag", True), f"{command} {flag}"
            if flag in flags:
                assert flags[flag].default is None, f"{flag} must default to None, so that the YAML or the dataclass default applies"
                assert flags[flag].help, f"{flag} has no help"


def test_choice_lists_come_from_the_registries() -> None:
    from imgrec.config import LOADERS, PRECISIONS
    from imgrec.engine.tasks import METHODS
    from imgrec.inference.backends import BACKENDS

    assert list(options(subcommand("pretrain"))["--method"].choices) == list(METHODS)
    for command in ("predict", "serve"):
        assert list(options(subcommand(command))["--backend"].choices) == ["auto", *BACKENDS]
    assert list(options(subcommand("train"))["--precision"].choices) == list(PRECISIONS)
    assert list(options(subcommand("evaluate"))["--loader"].choices) == list(LOADERS)
    assert "--channels-last" in options(subcommand("train")) and "--no-channels-last" in options(subcommand("train"))
    assert options(subcommand("train"))["--scale"].nargs == 2 and options(subcommand("probe"))["--mean"].nargs == 3


def test_serve_flags_build_its_config(monkeypatch, tmp_path: Path) -> None:
    import imgrec.serve
    from imgrec.cli import main

    seen = {}
    monkeypatch.setattr(imgrec.serve, "serve", lambda run, **kwargs: seen.update(kwargs, run=run))
    assert main(["serve", str(tmp_path / "my-run"), "--max-batch", "4", "--max-body-mb", "2", "--max-wait-ms", "1.5"]) == 0
    config = seen["config"]
    assert (config.name, config.max_batch, config.max_body_bytes, config.max_wait_ms) == ("my-run", 4, 2 << 20, 1.5)
    assert config.max_queue == 256 and seen["backend"] == "auto"  # defaults where no flag was given
