"""Device, precision and memory-format choices: the fast path where the hardware has it.

bf16 autocast is the default where the hardware computes in bf16 natively: CUDA GPUs that
support it, and CPUs with AVX-512-BF16 or AMX (on other CPUs bf16 is emulated and slower than
fp32). fp16 needs a gradient scaler, which only CUDA gets; channels_last is on by default since
oneDNN (CPU) and cuDNN (GPU) convolutions both prefer it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` is the first CUDA GPU when there is one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} asked for, but PyTorch sees no CUDA GPU here: use --device cpu (or auto)")
    return device


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True for x86 CPUs with AVX-512-BF16 or AMX-BF16 (read from /proc/cpuinfo on Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` becomes bf16 where the hardware has it natively, else fp32; fp16 on CPU is refused."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision not in DTYPES:
        raise ValueError(f"unknown precision {precision!r}: use auto, fp32, bf16 or fp16")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 needs a CUDA GPU (it trains with a gradient scaler there); on CPU use --precision bf16 or fp32")
    return precision


def flush_denormals(device: torch.device) -> None:
    """On CPU, treat denormal floats as zero (process-wide).

    As a network converges, more and more weights, gradients and optimizer moments underflow into
    the denormal range, which x86 CPUs handle in slow microcode: without this the same train step
    got about 20% slower by the end of the demo run. The values lost are below 1e-38.
    """
    if device.type == "cpu":
        torch.set_flush_denormal(True)


def make_deterministic() -> None:
    """PyTorch's deterministic algorithms (an op without one raises), cuDNN without autotuning, and
    cuBLAS in its reproducible workspace mode: the same inputs give the same bits, run after run."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to the precision's dtype on the device; nothing for fp32."""
    dtype = DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


__all__ = ["DTYPES", "autocast", "cpu_has_native_bf16", "flush_denormals", "make_deterministic", "resolve_device", "resolve_precision"]
