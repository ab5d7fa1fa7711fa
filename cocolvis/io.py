"""File helpers shared by every command: atomic writes and checked JSON reads.

Every output file is written to a temporary name beside its target and renamed, so
an interrupted run never leaves a truncated file under the final name.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from cocolvis.errors import InputError  # noqa: F401  (re-exported: the errors every reader raises)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()
"""The mode a plain open() would give a new file (mkstemp's temporaries are 0600)."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only on success.

    `suffix` keeps the extension a writer may look at (cv2.imwrite picks the codec
    from it); by default it is the target's own.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=suffix if suffix is not None else path.suffix + ".tmp"
    )
    os.close(fd)
    tmp = Path(tmp)
    try:
        os.chmod(tmp, _FILE_MODE)
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[Any]:
    """Open a temporary file for writing; it becomes `path` when the block ends cleanly."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def read_json(path: str | os.PathLike) -> Any:
    """Load a JSON file, turning a missing, unreadable or malformed file into an InputError."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except IsADirectoryError:
        raise InputError(path, "is a directory, expected a JSON file") from None
    except PermissionError:
        raise InputError(path, "permission denied") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(path, f"malformed JSON: {e}") from None
