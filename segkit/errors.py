"""Errors for bad input, and the one place where they become a command's output.

Library code raises `InputError(path, message)` (or another `OneLineError`), a plain
exception. Each command-line entry point is a `CommandGroup`, which prints it, or an
OS error, as one `Error: <path>: <message>` line with exit status 1, and turns Ctrl-C
into exit status 130 with no traceback.
"""
from __future__ import annotations

import os

import click


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


class CommandGroup(click.Group):
    """A click group whose commands report a OneLineError or an OS error as one line, and Ctrl-C as exit 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except OneLineError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:  # e.g. an output path under a regular file, on a full disk, or not writable
            where = f"{e.filename}: " if e.filename is not None else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)
