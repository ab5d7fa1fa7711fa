"""The one place a device name becomes a torch.device, for `ess` and `bench` alike."""
from __future__ import annotations

import re

import torch

from segkit.errors import InputError
from ess.config import DEVICE_PATTERN


def pick_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """`auto` (CUDA when available, else the CPU), `cpu`, `cuda` or `cuda:N`; a device that is not there is an InputError.

    `local_rank` (torchrun's LOCAL_RANK, None without torchrun) gives each process of a node
    its own GPU: `auto` and `cuda` then mean cuda:LOCAL_RANK, and a fixed cuda:N is refused.
    """
    if not isinstance(name, str) or not re.fullmatch(DEVICE_PATTERN, name):
        raise InputError(None, f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    given = name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if local_rank is not None and name.startswith("cuda"):
        if name != "cuda":
            raise InputError(None, f"--device {name}: under torchrun every process takes cuda:LOCAL_RANK; "
                                   "pass --device cuda or auto")
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(None, f"--device {given}: no CUDA device available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(None, f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) available")
    return device
