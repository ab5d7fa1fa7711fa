"""Errors for bad input, and the one place where they become a command's output.

Library code raises `InputError(path, message)` (or another `OneLineError`), a plain
exception. Each command-line entry point is a `CommandGroup`, which prints it, or an
OS error, or a failed allocation, as one `Error: <path>: <message>` line with exit status 1,
and turns Ctrl-C, SIGTERM and SIGHUP (see `segkit.signals`) into one line and exit status
130, 143 and 129, with no traceback.
"""
from __future__ import annotations

import os

import click

from segkit import signals


class OneLineError(Exception):
    """An expected failure, shown as one `Error:` line at the command line (exit status 1)."""


class InputError(OneLineError, ValueError):
    """Bad input, named by the file (or None) it came from: `str(e)` is the one line to show."""

    def __init__(self, path: str | os.PathLike | None, message: str):
        self.path = None if path is None else str(path)
        self.message = f"{path}: {message}" if path is not None else message
        super().__init__(self.message)

    def __reduce__(self):  # so an error raised in a worker process reaches the parent intact
        return type(self), (None, self.message)


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` is a failed allocation: MemoryError, or torch's CPU or CUDA out-of-memory error."""
    text = str(e)
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower()))


class CommandGroup(click.Group):
    """A click group whose commands report a OneLineError, an OS error or a failed allocation as one line,
    and Ctrl-C, SIGTERM and SIGHUP as one line and exit status 128 + the signal's number."""

    def invoke(self, ctx: click.Context):
        try:
            with signals.stop_on_signals():
                return super().invoke(ctx)
        except OneLineError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:  # e.g. an output path under a regular file, on a full disk, or not writable
            where = f"{e.filename}: " if e.filename is not None else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None
        except KeyboardInterrupt as e:
            click.echo(signals.message(e), err=True)
            ctx.exit(signals.exit_status(e))
        except (MemoryError, RuntimeError) as e:
            if not out_of_memory(e):
                raise
            first = " ".join(str(e).split())[:200] or type(e).__name__
            raise click.ClickException(f"out of memory ({first}); use smaller sizes, or a machine with more "
                                       "memory") from None
