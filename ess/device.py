"""The one place a device name becomes a torch.device, for `ess` and `bench` alike."""
from __future__ import annotations

import re

import torch

from cocolvis.errors import InputError

DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


def pick_device(name: str = "auto") -> torch.device:
    """`auto` (CUDA when available, else the CPU), `cpu`, `cuda` or `cuda:N`; a device that is not there is an InputError."""
    if not isinstance(name, str) or not re.fullmatch(DEVICE_PATTERN, name):
        raise InputError(None, f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(None, f"--device {name}: no CUDA device available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(None, f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) available")
    return device
