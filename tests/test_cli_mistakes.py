"""A user's mistakes on the command line end in one clear line, never a traceback.

Each row is a mistake a person makes (a number out of range, a missing folder or file, a typo in
a name, a YAML file that is not YAML) run through ``imgrec.cli.main`` as the ``imgrec`` command
runs it. The command must stop with exit status 2 before doing any work, and its last line on
stderr must be the error, naming the argument or value and saying what is wanted. An exception
escaping ``main`` is what would reach the user as a traceback: the test fails on it.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch

from imgrec.cli import main

MISTAKES = [
    # (argv, words the error line holds)
    ("serve {run} --port 99999", ["--port", "[0, 65535]", "99999"]),
    ("serve {run} --port -1", ["--port", "[0, 65535]"]),
    ("serve {run} --max-batch 0", ["--max-batch", "at least 1"]),
    ("serve {run} --max-body-mb 0", ["--max-body-mb", "at least 0.01"]),
    ("serve {run} --max-body-mb 1e-9", ["--max-body-mb", "at least 0.01"]),
    ("serve {run} --max-wait-ms -5", ["--max-wait-ms", "at least 0"]),
    ("serve {tmp}/missing", ["missing is not a model directory", "--out folder of `imgrec train`"]),
    ("serve {tmp}/a {tmp}/b --name x", ["--name names the one model served", "NAME=RUN"]),
    ("serve {tmp}/a/r {tmp}/b/r", ["two models named 'r'", "NAME=RUN"]),
    ("serve {tmp}/missing --ssl-keyfile {tmp}/k.pem", ["--ssl-keyfile and --ssl-certfile go together"]),
    ("serve {tmp}/missing --api-key short", ["too easy to guess", "at least 16"]),
    ("train --data {data} --epochs 0 --out {tmp}/r", ["--epochs", "at least 1", "got 0"]),
    ("train --data {data} --epochs ten --out {tmp}/r", ["--epochs", "invalid int value: 'ten'"]),
    ("train --data {data} --batch-size 0 --out {tmp}/r", ["--batch-size", "at least 1"]),
    ("train --data {data} --lr -1 --out {tmp}/r", ["--lr", "must be above 0", "-1"]),
    ("train --data {data} --lr 0 --out {tmp}/r", ["--lr", "must be above 0", "got 0"]),
    ("train --data {data} --lr fast --out {tmp}/r", ["lr must be a number or 'auto'", "'fast'"]),
    ("train --data {data} --img-size 0 --out {tmp}/r", ["--img-size", "[1, 8192]"]),
    ("train --data {data} --img-size 100000 --out {tmp}/r", ["--img-size", "[1, 8192]", "100000"]),
    ("train --data {data} --workers -2 --out {tmp}/r", ["--workers", "at least 0"]),
    ("train --data {data} --val-split 1.5 --out {tmp}/r", ["--val-split", "[0, 1)", "1.5"]),
    ("train --data {data} --label-smoothing 2 --out {tmp}/r", ["--label-smoothing", "[0, 1)"]),
    ("train --data {data} --hflip 3 --out {tmp}/r", ["--hflip", "[0, 1]", "3.0"]),
    ("train --data {data} --scale 0.9 0.1 --out {tmp}/r", ["scale", "MIN must not exceed MAX", "0.9 0.1"]),
    ("train --data {data} --train-fraction 0 --out {tmp}/r", ["--train-fraction", "(0, 1]"]),
    ("train --data {data} --seed 1e30 --out {tmp}/r", ["--seed", "invalid int value"]),
    ("train --data {data} --rotation 400 --out {tmp}/r", ["--rotation", "[0, 360]", "400"]),
    ("train --data {data} --momentum 1.5 --out {tmp}/r", ["--momentum", "[0, 1]", "1.5"]),
    ("train --data {data} --kd-weight 1.5 --teacher {run} --out {tmp}/r", ["--kd-weight", "[0, 1]", "1.5"]),
    ("train --data {data} --kd-temperature 0 --teacher {run} --out {tmp}/r", ["--kd-temperature", "above 0"]),
    ("train --data {data} --unlabelled {tmp} --out {tmp}/r", ["--unlabelled", "--teacher RUN"]),
    ("train --data {data} --kd-weight 0.7 --out {tmp}/r", ["--kd-weight 0.7", "--teacher RUN"]),
    ("train --data {data} --teacher {tmp}/noteacher --out {tmp}/r", ["--teacher", "noteacher does not exist"]),
    ("train --data {tmp}/nothere --out {tmp}/r", ["nothere does not exist", "train/<class>"]),
    ("train --data {data} --model nosuchnet --out {tmp}/r", ["unknown model 'nosuchnet'", "imgrec models"]),
    ("train --data {data} --config {tmp}/nofile.yaml --out {tmp}/r", ["--config", "nofile.yaml", "no such file"]),
    ("train --data {data} --config {tmp}/broken.yaml --out {tmp}/r", ["broken.yaml is not valid YAML at line 2, column 3", "expected ',' or ']'"]),
    ("train --data {data} --config {tmp}/unknown.yaml --out {tmp}/r", ["unknown key(s)", "epoch", "epochs"]),
    ("train --data {data} --config {tmp} --out {tmp}/r", ["--config", "no such file"]),
    ("train --data {data} --config {tmp}/badscale.yaml --out {tmp}/r", ["hflip must be in [0, 1]", "got 2"]),
    ("train --data {data} --config {tmp}/wordscale.yaml --out {tmp}/r", ["scale must be a number", "'big'"]),
    ("train --data {data} --pretrained {tmp}/nope.safetensors --out {tmp}/r", ["nope.safetensors does not exist", "imgrec weights list"]),
    ("train --resume {tmp}/nowhere", ["no checkpoint at", "nowhere"]),
    ("pretrain --data {data} --teacher-momentum 2 --out {tmp}/p", ["--teacher-momentum", "[0, 1]"]),
    ("pretrain --data {data} --local-crops -1 --out {tmp}/p", ["--local-crops", "at least 0"]),
    ("pretrain --data {data} --method nosuch --out {tmp}/p", ["--method", "invalid choice: 'nosuch'"]),
    ("predict {run} {data} --topk 0", ["--topk", "at least 1"]),
    ("predict {tmp}/norun {data}", ["norun is not a model directory"]),
    ("evaluate {run} --data {data} --batch-size 0", ["--batch-size", "at least 1"]),
    ("evaluate {tmp}/norun --data {data}", ["norun is not a model directory"]),
    ("probe random:nosuchnet --data {data}", ["unknown model 'nosuchnet'"]),
    ("export {run} --calibration -1", ["--calibration", "at least 1"]),
    ("export {run} --format tflite", ["--format", "invalid choice: 'tflite'"]),
    ("benchmark {run} --seconds 0", ["--seconds", "above 0"]),
    ("probe {run} --data {data} --k 0", ["--k", "at least 1"]),
    ("verify {tmp}/nothere", ["nothere is not a folder"]),
    ("synth {tmp}/s --classes 0", ["classes must be between 2 and"]),
    ("shards {data} {tmp}/sh --quality 101", ["--quality", "[1, 100]"]),
    ("demo --epochs 0", ["--epochs", "at least 1"]),
]


@pytest.fixture(scope="module")
def places(tiny_shapes, tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("mistakes")
    (tmp / "broken.yaml").write_text("epochs: [10\nlr: 1e-3\n")
    (tmp / "unknown.yaml").write_text("epoch: 10\n")
    (tmp / "badscale.yaml").write_text("data_config:\n  hflip: '2'\n")  # a string YAML gives: converted, then bounds-checked
    (tmp / "wordscale.yaml").write_text("data_config:\n  scale: [big, 1.0]\n")
    return {"data": str(tiny_shapes), "tmp": str(tmp), "run": str(tmp / "run")}


@pytest.mark.parametrize("argv, words", MISTAKES, ids=[f"{i:02d}-{argv.split()[0]}" for i, (argv, _) in enumerate(MISTAKES)])
def test_a_mistake_ends_in_one_line_naming_it(argv: str, words: list[str], places: dict[str, str]) -> None:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv.format(**places).split())
        except SystemExit as exc:  # argparse's errors
            code = exc.code
    lines = err.getvalue().strip().splitlines()
    assert code == 2, (argv, code, err.getvalue(), out.getvalue())
    assert lines, f"{argv}: nothing on stderr"
    last = lines[-1]
    assert "error:" in last and "Traceback" not in err.getvalue(), err.getvalue()
    for word in words:
        assert word in last, f"{argv}: {word!r} not in {last!r}"
    assert not Path(places["tmp"], "r", "last.pt").exists() and not Path(places["tmp"], "p", "last.pt").exists()


def test_bounds_of_every_config_field_hold_in_python_too() -> None:
    """The bounds the flags check are the configs' own: ``TrainConfig(...)`` refuses the same value."""
    from imgrec.config import DataConfig, PretrainConfig, ServeConfig, TrainConfig, out_of_bounds

    with pytest.raises(ValueError, match=r"hflip must be in \[0, 1\], got 3"):
        DataConfig(hflip=3)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\), got 1"):
        TrainConfig(label_smoothing=1)
    with pytest.raises(ValueError, match=r"teacher_momentum must be in \[0, 1\], got 1.5"):
        PretrainConfig(teacher_momentum=1.5)
    with pytest.raises(ValueError, match="max_batch must be at least 1, got 0"):
        ServeConfig(max_batch=0)
    with pytest.raises(ValueError, match=r"scale must be in \(0, 1\], got 1.5"):
        DataConfig(scale=(0.5, 1.5))
    assert TrainConfig(lr="auto").lr == "auto" and TrainConfig(weight_decay=0.0).weight_decay == 0.0
    assert out_of_bounds(0, "[0, 1)") is None and out_of_bounds(1, "[0, 1)") == "must be in [0, 1), got 1"
    assert out_of_bounds(1e-9, "(0, inf)") is None and out_of_bounds(0, "(0, inf)") == "must be above 0, got 0"
    assert out_of_bounds(65535, "[0, 65535]") is None and out_of_bounds(65536, "[0, 65535]") is not None


def test_settings_of_earlier_runs_still_load() -> None:
    """Bounds refuse only what cannot run: a negative seed, EMA decay 0 (off), a full turn of
    rotation and momentum 0 (plain SGD) were accepted before bounds existed and resume still."""
    from imgrec.config import DataConfig, TrainConfig
    from imgrec.engine.optim import create_optimizer

    config = TrainConfig(seed=-7, ema_decay=0.0, momentum=0.0, opt="sgd", data_config={"rotation": 360, "scale": ["0.2", 1]})
    assert (config.seed, config.ema_decay, config.data_config) == (-7, 0.0, {"rotation": 360, "scale": [0.2, 1.0]})
    assert DataConfig(**config.data_config).scale == (0.2, 1.0)
    optimizer = create_optimizer(torch.nn.Linear(2, 2), "sgd", lr=0.1, momentum=0.0)
    assert optimizer.param_groups[0]["momentum"] == 0.0 and optimizer.param_groups[0]["nesterov"] is False


def test_a_config_can_come_through_a_pipe(tiny_shapes, tmp_path) -> None:
    """``--config /dev/stdin`` or ``<(...)``: a pipe is read like a file, not refused as missing."""
    import os

    from imgrec.config import TrainConfig
    from imgrec.recipe import load_config

    read, write = os.pipe()
    os.write(write, b"epochs: 3\nlr: 1e-3\n")
    os.close(write)
    try:
        config = load_config(TrainConfig, yaml_path=f"/dev/fd/{read}", flags={"data": str(tiny_shapes)})
    finally:
        os.close(read)
    assert (config.epochs, config.lr) == (3, 0.001)
