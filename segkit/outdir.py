"""Output directories: one writer at a time, and never a file the toolkit did not write.

Every command that writes a directory (`cocolvis build` and `synth`, `ess train`, `eval` and
`predict`, every `bench` command) claims its `--out` with `claim_output` first:

  * one writer: an exclusive `fcntl` lock on DIR/.lock, holding the writer's pid and command,
    for as long as the command writes; a second writer is refused while the first holds it
    (the kernel drops the lock when its process ends, however it ends);
  * ownership: DIR must be missing, empty, or hold output of the same command, recognised by
    the marker DIR/.segkit.json (`{"written_by": "ess train"}`) written when a command first
    claims it (a build is recognised by its own files instead, see `cocolvis.outdir`). Any other
    DIR is refused with a line saying what it holds; nothing in it is deleted or overwritten;
  * inputs: DIR may not be, or lie inside, a directory the command reads (a build);
  * no half-written output: when the command fails, the entries it made in DIR (of the names it
    writes, and not there before it started) are removed, and DIR too if the command made it.
    The caller says which failures keep them (an interrupted build or a checkpointed run resumes).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from segkit.errors import InputError
from segkit.io import read_json, remove_stale_temporaries, write_json

LOCK = ".lock"
MARKER = ".segkit.json"


def check_out_path(out: Path) -> None:
    """Refuse an --out that cannot be a directory we may write, before any input is read."""
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a directory")
    parent = out
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise InputError(out, f"cannot be created: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(out, f"cannot be created or written: permission denied on {parent}")


def refuse_inside(out: Path, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an --out that is, or lies inside, one of the directories `inputs` (None entries are skipped)."""
    where = Path(os.path.realpath(out))
    for given in inputs:
        if given is None:
            continue
        source = Path(os.path.realpath(given))
        if where == source or source in where.parents:
            raise InputError(out, f"lies inside the input directory {given}: choose an --out outside it")


def make_dir(out: Path) -> bool:
    """Create `out` (and its parents); True if it did not exist."""
    if out.is_dir():
        return False
    try:
        out.mkdir(parents=True)
    except FileExistsError:
        if not out.is_dir():
            raise InputError(out, "exists and is not a directory") from None
        return False
    except OSError as e:
        raise InputError(out, f"cannot create the directory: {e.strerror or e}") from None
    return True


def _holder(fd: int) -> str:
    """Who holds a lock, from its file: 'another `CMD` (pid N)', or 'another process (pid N)'."""
    pid, _, command = os.read(fd, 256).decode(errors="replace").strip().partition(" ")
    what = f"`{command.strip()}`" if command.strip() else "process"
    return f"another {what} (pid {pid or '?'})"


def lock_dir(out: Path, command: str) -> int:
    """An fd holding the exclusive lock on out/.lock, with our pid and `command` written in it."""
    path = out / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise InputError(out, f"cannot write: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise InputError(out, f"{holder} is writing into this directory; wait for it to finish or "
                                      "choose another --out") from None
            raise InputError(out, f"cannot lock: {e.strerror or e}") from None
        try:  # the holder may have removed the file between our open and our lock: lock the new one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {command}\n".encode())
    return fd


def unlock_dir(out: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(out / LOCK)
    os.close(fd)


def contents(out: Path) -> set[str]:
    """The names in `out`, but for the lock and the marker."""
    return {p.name for p in out.iterdir()} - {LOCK, MARKER}


def written_by(out: Path) -> str | None:
    """The command the marker of `out` names; None without a readable marker."""
    if not (out / MARKER).is_file():
        return None
    with contextlib.suppress(InputError):
        marker = read_json(out / MARKER)
        if isinstance(marker, dict) and isinstance(marker.get("written_by"), str):
            return marker["written_by"]
    return None


def _listing(names: set[str]) -> str:
    shown = sorted(names)[:3]
    return ", ".join(shown) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _check_owner(out: Path, command: str, held: set[str], recognise: Callable[[Path], bool] | None) -> None:
    """Refuse a non-empty `out` that holds no output of `command`."""
    owner = written_by(out)
    if not held or owner == command or (owner is None and recognise is not None and recognise(out)):
        return
    if owner is not None:
        raise InputError(out, f"holds `{owner}` output, not `{command}` output; choose another --out")
    raise InputError(out, f"is not empty and holds no `{command}` output (found {_listing(held)}); nothing in it "
                          "is replaced: choose a new or empty directory")


@dataclass
class Claim:
    """A claimed output directory and what it held when claimed (lock and marker aside)."""

    out: Path
    before: set[str]

    @property
    def fresh(self) -> bool:
        return not self.before


def _remove_written(claim: Claim, owns: Callable[[str], bool]) -> None:
    """Remove what the command made in the directory: new entries of its names, temporaries, the marker."""
    out = claim.out
    for name in contents(out) - claim.before:
        if owns(name):
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    remove_stale_temporaries(out)
    if not contents(out):
        (out / MARKER).unlink(missing_ok=True)


@contextlib.contextmanager
def claim_output(out: str | os.PathLike, command: str, owns: Callable[[str], bool], *,
                 inputs: Iterable[str | os.PathLike | None] = (),
                 keep: Callable[[BaseException], bool] = lambda e: False,
                 recognise: Callable[[Path], bool] | None = None, mark: bool = True) -> Iterator[Claim]:
    """Hold `out` for one run of `command` (the rules in the module docstring); yields the `Claim`.

    `owns(name)`: whether `command` writes entries of that name. `keep(exception)`: whether a failure
    keeps what was written (e.g. an interrupted, resumable build). `recognise(out)`: whether a directory
    without a marker holds output of `command` all the same (e.g. a build, or one written before markers).
    `mark`: write the marker (a build's own files mark it instead).
    """
    out = Path(out)
    check_out_path(out)
    refuse_inside(out, inputs)
    created = make_dir(out)
    try:
        fd = lock_dir(out, command)
    except InputError:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    claim, clean = None, False
    try:
        try:
            held = contents(out)
            _check_owner(out, command, held, recognise)
            if mark and written_by(out) != command:
                write_json(out / MARKER, {"written_by": command})
            remove_stale_temporaries(out)
        except OSError as e:
            raise InputError(out, f"cannot write: {e.strerror or e}") from None
        claim = Claim(out, held)
        yield claim
    except BaseException as e:
        clean = claim is not None and not keep(e)
        raise
    finally:
        with contextlib.suppress(OSError):
            if clean:
                _remove_written(claim, owns)
            elif claim is None and created:  # refused or failed while claiming: only the marker was written
                (out / MARKER).unlink(missing_ok=True)
        unlock_dir(out, fd)
        if created and (clean or claim is None):
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty
