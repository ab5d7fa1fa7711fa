"""Devices and their precision, for `ess` and `bench` alike: the one place a device name becomes a
torch.device (`pick_device`) and a CUDA device is named (`cuda_ordinal`, `describe_cuda`), `--amp`
becomes an autocast context and a loss scaler (`precision`), and the code that must compute in float32
under autocast says so (`full_precision`, `float32_forward`, `float32_backward`)."""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Callable, Iterator

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


def cuda_ordinal(device: torch.device) -> int:
    """The ordinal of a CUDA device: its index, or the current device's for a bare `cuda`."""
    return device.index if device.index is not None else torch.cuda.current_device()


def describe_cuda(ordinal: int) -> str:
    """`cuda:N (<card>, compute capability X.Y)`, or just `cuda:N` where torch cannot say."""
    try:
        major, minor = torch.cuda.get_device_capability(ordinal)
        return f"cuda:{ordinal} ({torch.cuda.get_device_name(ordinal)}, compute capability {major}.{minor})"
    except (RuntimeError, AssertionError, ValueError):
        return f"cuda:{ordinal}"


# ----------------------------------------------------------------------------------------------------------
# Mixed precision: what --amp means on a device, and the parts that always compute in float32

# The autocast dtype of each device type that DEVICE_PATTERN allows: float16 on CUDA (tensor cores, and the
# scaler covers its narrow range); bfloat16 on the CPU, the half-precision type CPUs accelerate (AVX512-BF16,
# AMX), with float32's exponent range, so no scaler.
AUTOCAST_DTYPES = {"cuda": torch.float16, "cpu": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """Mixed precision on one device type: the autocast dtype (None: float32 throughout) and whether the
    loss is scaled, which float16 needs (its range loses small gradients) and bfloat16 does not (float32's range)."""

    device_type: str
    dtype: torch.dtype | None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    @property
    def scaled(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self) -> torch.autocast:
        """The context the network's forward pass runs in (a no-op context in float32)."""
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """The loss scaler of a training loop: active with float16 only; a disabled one passes everything through."""
        return torch.amp.GradScaler(self.device_type, enabled=self.scaled)

    def describe(self) -> str:
        if not self.enabled:
            return "float32"
        name = str(self.dtype).removeprefix("torch.")
        return f"{name} autocast" + (" with gradient scaling" if self.scaled else "")


def precision(device: torch.device | str, amp: bool | None) -> Precision:
    """What `--amp` means on `device`: None (the default) is on for CUDA and off for the CPU; on is
    float16 autocast with gradient scaling on CUDA, bfloat16 autocast without a scaler on the CPU."""
    device_type = torch.device(device).type
    if device_type not in AUTOCAST_DTYPES:
        raise InputError(None, f"--amp: no mixed precision for device type {device_type!r}")
    on = device_type == "cuda" if amp is None else amp
    return Precision(device_type, AUTOCAST_DTYPES[device_type] if on else None)


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Autocast off on every device type, for code that decides by distances (nearest classes, margins,
    close pairs): inside, every op computes in its tensors' own dtype, float32 here. Also a decorator."""
    with contextlib.ExitStack() as stack:
        for device_type in AUTOCAST_DTYPES:
            stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def float32_forward(forward: Callable) -> Callable:
    """`torch.amp.custom_fwd(cast_inputs=torch.float32)` for every device type of AUTOCAST_DTYPES: under
    autocast, the custom autograd Function's forward gets its floating-point inputs in float32 (float64
    stays) and runs with autocast off; outside autocast it runs as it is. Pair with `float32_backward`."""
    for device_type in AUTOCAST_DTYPES:
        forward = torch.amp.custom_fwd(forward, device_type=device_type, cast_inputs=torch.float32)
    return forward


def float32_backward(backward: Callable) -> Callable:
    """`torch.amp.custom_bwd` for every device type of AUTOCAST_DTYPES: the backward of a `float32_forward`
    runs with autocast off too, even when .backward() is called inside an autocast region."""
    for device_type in AUTOCAST_DTYPES:
        backward = torch.amp.custom_bwd(backward, device_type=device_type)
    return backward
