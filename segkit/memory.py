"""How much memory this process may still allocate, and the one check of an estimate against it.

Sizes a user types or a file claims are bounded before anything of that size is allocated:
the caller estimates the bytes the work needs at least and `check_fits` refuses it, in one
line naming the value and the limit, when the estimate exceeds `available_bytes()`.
"""
from __future__ import annotations

import math
import re
import resource

from segkit.errors import InputError


def _meminfo_available() -> int | None:
    """MemAvailable of /proc/meminfo: what the system can still hand out without swapping."""
    try:
        with open("/proc/meminfo") as f:
            return int(re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024
    except (OSError, AttributeError):
        return None


def _address_space_left() -> int | None:
    """Under an address-space limit (ulimit -v): the limit less the virtual memory already mapped."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status") as f:
            mapped = int(re.search(r"^VmSize:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024
    except (OSError, AttributeError):
        mapped = 0
    return max(soft - mapped, 0)


def _cgroup_left() -> int | None:
    """Under a cgroup v2 memory limit (a container's): the limit less the memory the group uses."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(int(limit) - used, 0)


def available_bytes() -> int:
    """Memory this process can still allocate: the least of MemAvailable, what an address-space limit
    leaves and what a cgroup memory limit leaves; 8 GB where none is known."""
    known = [b for b in (_meminfo_available(), _address_space_left(), _cgroup_left()) if b is not None]
    return min(known) if known else 8 << 30


def gigabytes(n: float) -> str:
    """A byte count for a message: '1.2 GB', 'inf GB' for an overflowed estimate."""
    return f"{n / 1e9:.1f} GB" if math.isfinite(n) else "inf GB"


def check_fits(source: object, what: str, needed: float, available: int | None = None, where: str = "memory",
               detail: str = "") -> None:
    """Refuse work that needs at least `needed` bytes when fewer are available (`available`, default
    `available_bytes()`): one InputError naming `source` (a file, a flag, or None), `what` needs it and
    `detail` (e.g. which values account for most of it)."""
    available = available_bytes() if available is None else available
    if not needed <= available:  # also refuses a NaN or infinite estimate
        raise InputError(source, f"{what} needs at least {gigabytes(needed)} of {where}, more than the "
                                 f"{gigabytes(available)} available" + (f"; {detail}" if detail else ""))
