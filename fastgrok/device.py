"""The device a command runs on: --device resolved to a torch.device, and the name results record for it."""

from __future__ import annotations

import os
import platform

import torch

from fastgrok.errors import ConfigError


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' (the GPU if torch sees one, else the CPU), cpu, cuda or cuda:K; anything else a ConfigError."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda[:index]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but torch sees no CUDA device here")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {device!r}; use auto, cpu or cuda[:index]")
    return dev


def device_name(device: torch.device) -> str:
    """What a run or a benchmark ran on: the GPU's name, or the CPU's model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:  # Linux: "model name : AMD EPYC" (platform gives only x86_64)
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu: {model}, {os.cpu_count()} cores"
