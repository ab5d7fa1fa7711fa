"""Stopping a training run on a signal (SIGTERM, SIGHUP, Ctrl-C): at an iteration's end, saying what it kept.

While training iterates, a stop signal is only recorded (`segkit.signals.deferred`), so the
weights, optimiser and scaler are never saved half-updated. At the end of the iteration the run
stops, unless its next scheduled checkpoint (every --ckpt-every iterations, and the last one) is
due within GRACE_SECONDS at the pace this session has measured: then it trains on to it, writes
it and stops. A validation due meanwhile is skipped; a signal during a validation, or a second
signal, stops at once. The command prints one line saying where it stopped and the checkpoint
that `--resume` continues from, and exits with 128 + the signal's number (130, 143, 129).
Under torchrun the processes agree on when to stop (one sum over the ranks per iteration).
"""
from __future__ import annotations

import signal
from pathlib import Path

import torch

from ess import distributed
from segkit.signals import Deferred, Interrupted

GRACE_SECONDS = 5.0
"""How far away, in measured training time, a scheduled checkpoint may be for a stopping run to write it."""


class StopPlan:
    """When a training run that received a stop signal stops (see the module docstring): stop signals are
    recorded from its creation until `close()`."""

    def __init__(self, start: int, stop: int, ckpt_every: int, seconds: float):
        self.start, self.stop, self.ckpt_every = start, stop, ckpt_every
        self.start_seconds = seconds
        self.target: int | None = None  # the iteration to stop at, once a stop was requested
        self.pending = Deferred().install()

    @property
    def requested(self) -> bool:
        return self.target is not None

    @property
    def signalled(self) -> bool:
        """Whether a stop signal arrived (on this process), acted on or not."""
        return self.pending.signum is not None

    def close(self) -> None:
        self.pending.restore()

    def immediate(self):
        """A block (a validation) where a stop signal stops at once."""
        return self.pending.immediate()

    def interrupted(self) -> Interrupted:
        return self.pending.interrupted()

    def ends(self, e: BaseException) -> bool:
        """Whether `e` ends the run as a stop: a signal, or an error after one (a DataLoader worker that a
        SIGTERM sent to the whole process group ended)."""
        return isinstance(e, KeyboardInterrupt) or self.pending.signum is not None

    def stopped(self, e: BaseException, done: int, last_saved: int | None, out: Path) -> Interrupted:
        """The exception the run ends with when stopped after iteration `done`: the signal, and one line about
        the checkpoint it keeps."""
        signum = getattr(e, "signum", self.pending.signum or signal.SIGINT)
        if last_saved is None:
            return Interrupted(signum, f"stopped at iteration {done}, before the first checkpoint: nothing kept")
        last = out / "last.pt"
        written = last_saved == done > self.start
        kept = f"the checkpoint due then written to {last}" if written else f"{last} (iteration {last_saved}) kept"
        return Interrupted(signum, f"stopped at iteration {done}, {kept}; continue with --resume")

    def _agree(self, done: int, seconds: float) -> tuple[bool, float]:
        """(whether any process received a signal, seconds per iteration in this session), the same on every rank."""
        pace = (seconds - self.start_seconds) / max(done - self.start, 1)
        flag = float(self.pending.signum is not None)
        if distributed.world_size() == 1:
            return bool(flag), pace
        total = distributed.all_reduce_sum(torch.tensor([flag, pace], dtype=torch.float64))
        return bool(total[0] > 0), float(total[1]) / distributed.world_size()

    def _due(self, done: int, pace: float) -> int:
        """The iteration to stop at: the next checkpoint's if it is due within GRACE_SECONDS, else `done`."""
        if done % self.ckpt_every == 0:
            return done  # its checkpoint is written at this iteration's end
        due = min((done // self.ckpt_every + 1) * self.ckpt_every, self.stop)
        return due if (due - done) * pace <= GRACE_SECONDS else done

    def check(self, done: int, seconds: float) -> bool:
        """At the end of iteration `done` (before its validation and checkpoint): whether to stop after them."""
        if self.target is None and done < self.stop:
            requested, pace = self._agree(done, seconds)
            if requested:
                self.target = self._due(done, pace)
        return self.target is not None and done >= self.target
