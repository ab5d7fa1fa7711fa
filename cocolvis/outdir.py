"""One writer per build directory: a lock, a check of what the directory already holds, and
no half-written directory left behind by a failed build.

A build takes an exclusive `fcntl` lock on `--out/.lock` (holding its pid) for as long
as it writes; a second build into the same directory is refused. A directory that
holds a build of other inputs or options (another fingerprint) is refused unless
`overwrite` says to replace it; a non-empty directory that holds no build is always
refused. When a build fails in a directory it found empty or made, everything it wrote
is removed; an interrupted build (Ctrl-C) keeps its masks so a re-run resumes.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from pathlib import Path
from typing import Iterator

from cocolvis.dataset import FORMAT, OUTPUT_FILES
from segkit.io import InputError, read_json, remove_stale_temporaries
from cocolvis.journal import JOURNAL, journal_fingerprint

LOCK = ".lock"
BUILD_FILES = (*OUTPUT_FILES, JOURNAL, "masks")


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


def _make(out: Path) -> bool:
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


def _lock(out: Path) -> int:
    """An fd holding the exclusive lock on out/.lock, with our pid written in it."""
    path = out / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise InputError(out, f"cannot write: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise InputError(out, f"another build is writing into this directory (pid {holder or '?'}); "
                                      "wait for it to finish or choose another --out") from None
            raise InputError(out, f"cannot lock: {e.strerror or e}") from None
        try:  # the holder may have removed the file between our open and our lock: lock the new one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _unlock(out: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(out / LOCK)
    os.close(fd)


def _held_fingerprint(out: Path) -> str | None:
    """The fingerprint of the build `out` holds: its journal's, else its dataset.json's."""
    found = journal_fingerprint(out / JOURNAL)
    if found is None and (out / "dataset.json").is_file():
        with contextlib.suppress(InputError):
            meta = read_json(out / "dataset.json")
            if isinstance(meta, dict) and meta.get("format") == FORMAT:
                found = meta.get("fingerprint")
    return found


def _remove_build(out: Path) -> None:
    """Remove every file a build writes (nothing else in the directory)."""
    for name in BUILD_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    remove_stale_temporaries(out)


def _contents(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()} - {LOCK}


@contextlib.contextmanager
def claim(out: Path, fingerprint: str, overwrite: bool = False) -> Iterator[bool]:
    """Hold `out` for one build; yields whether it starts fresh (nothing of an earlier run kept).

    On an exception other than KeyboardInterrupt in a fresh directory, everything the
    build wrote is removed (and the directory too, if this made it).
    """
    created = _make(out)
    try:
        fd = _lock(out)
    except InputError:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    failed = False
    try:
        try:
            held = _contents(out)
            if held and not held & set(BUILD_FILES):
                raise InputError(out, "is not empty and holds no `cocolvis build` output; choose a new or empty "
                                      "directory")
            if held and not overwrite and _held_fingerprint(out) != fingerprint:
                raise InputError(out, "holds a build of other input files, classes or --order; "
                                      "pass --overwrite to replace it")
            if held and overwrite:
                _remove_build(out)
            fresh = not held or overwrite
            remove_stale_temporaries(out)
            if (out / "masks").is_dir():
                for stale in (out / "masks").glob(".*.png"):  # mask temporaries of a killed run
                    stale.unlink(missing_ok=True)
        except OSError as e:
            raise InputError(out, f"cannot write: {e.strerror or e}") from None
        try:
            yield fresh
        except KeyboardInterrupt:
            raise
        except BaseException:
            failed = fresh
            raise
    finally:
        if failed:
            with contextlib.suppress(OSError):
                _remove_build(out)
        _unlock(out, fd)
        if failed and created:
            with contextlib.suppress(OSError):
                out.rmdir()
