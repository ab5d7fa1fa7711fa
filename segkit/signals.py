"""Stopping on signals: SIGTERM and SIGHUP end a command as Ctrl-C does, and workers die with their parent.

Batch schedulers (SLURM, Kubernetes) stop a job with SIGTERM, a closed terminal sends SIGHUP.
Inside `stop_on_signals()` (every command runs in it, see `segkit.errors.CommandGroup`) both
raise `Interrupted`, a KeyboardInterrupt, so every clean-up written for Ctrl-C runs for them
too; the command exits with 128 + the signal number (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP).
Inside `deferred()` the signals are only recorded, for a loop to stop at a point of its
choosing (training stops at an iteration's end); a second signal raises at once.

Worker processes call `ignore_stop_signals()`: Ctrl-C and a hang-up reach a terminal's whole
process group, and the parent decides when to stop. They keep SIGTERM's default, since their
pools (multiprocessing, concurrent.futures, torch's DataLoader) end a stuck worker with it; a
SIGTERM sent to the whole group (as SLURM sends it) ends them at once while their parent stops
as it does on its own SIGTERM. Pool workers also call `die_with_parent()`, so none outlives a
parent that was killed outright (SIGKILL, the out-of-memory killer) and keeps its pipes open:
on Linux through prctl(PR_SET_PDEATHSIG), elsewhere through a thread that watches the parent's pid.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
REASONS = {signal.SIGINT: "Interrupted", signal.SIGTERM: "Terminated (SIGTERM)", signal.SIGHUP: "Hung up (SIGHUP)"}
PR_SET_PDEATHSIG = 1


class Interrupted(KeyboardInterrupt):
    """A stop requested by a signal; `detail` (optional) is the command's one line about what it kept."""

    def __init__(self, signum: int = signal.SIGINT, detail: str = ""):
        super().__init__(detail)
        self.signum, self.detail = signum, detail


def exit_status(e: KeyboardInterrupt) -> int:
    """128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""
    return 128 + int(getattr(e, "signum", signal.SIGINT))


def reason(e: KeyboardInterrupt) -> str:
    """'Interrupted', 'Terminated (SIGTERM)' or 'Hung up (SIGHUP)'."""
    return REASONS.get(getattr(e, "signum", signal.SIGINT), "Interrupted")


def message(e: KeyboardInterrupt) -> str:
    """The one line a command prints when it stops on a signal."""
    detail = getattr(e, "detail", "")
    return f"{reason(e)}: {detail}" if detail else f"{reason(e)}."


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _handlers(handler) -> Iterator[None]:
    """`handler` for the stop signals for the length of the block (the main thread alone can set them)."""
    if not _in_main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _raise(signum: int, frame) -> None:
    raise Interrupted(signum)


def stop_on_signals() -> contextlib.AbstractContextManager:
    """SIGTERM and SIGHUP (and Ctrl-C) raise `Interrupted` in the main thread for the length of the block."""
    return _handlers(_raise)


class Deferred:
    """Stop signals recorded, not raised, between `install()` and `restore()` (or inside `deferred()`):
    `signum` is the first one, None before any."""

    def __init__(self):
        self.signum: int | None = None
        self._immediate = False
        self._previous: dict = {}

    def install(self) -> Deferred:
        if _in_main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self._immediate or self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum

    def interrupted(self) -> Interrupted:
        """The exception that ends the command (raise it once the loop has stopped cleanly)."""
        return Interrupted(self.signum if self.signum is not None else signal.SIGINT)

    @contextlib.contextmanager
    def immediate(self) -> Iterator[None]:
        """Within the block a stop signal raises at once, and one already recorded raises on entry."""
        if self.signum is not None:
            raise self.interrupted()
        self._immediate = True
        try:
            yield
        finally:
            self._immediate = False


@contextlib.contextmanager
def deferred() -> Iterator[Deferred]:
    """Record the first stop signal in the yielded `Deferred` instead of raising it; a second raises."""
    state = Deferred().install()
    try:
        yield state
    finally:
        state.restore()


def ignore_stop_signals(*_: object) -> None:
    """For a worker process: Ctrl-C and SIGHUP are its parent's to act on; SIGTERM ends it (any arguments are
    ignored: it serves as a DataLoader's `worker_init_fn` too)."""
    for s in (signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def die_with_parent(parent: int) -> None:
    """Make this (forked) process end when its parent `parent` ends, however the parent ends."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent:  # the parent died before the request was made
                    os._exit(1)
                return
    threading.Thread(target=_watch, args=(parent,), daemon=True, name="watch-parent").start()


def worker_setup(parent: int) -> None:
    """A pool worker's initializer: `ignore_stop_signals` and `die_with_parent`."""
    ignore_stop_signals()
    die_with_parent(parent)
