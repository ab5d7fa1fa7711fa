"""Files for every command: atomic writes and checked JSON reads.

Every output file is written to a temporary name beside its target and renamed, so
an interrupted run never leaves a truncated file under the final name.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

from segkit.errors import InputError  # noqa: F401  (re-exported: the errors every reader raises)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()
"""The mode a plain open() would give a new file (mkstemp's temporaries are 0600)."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only on success.

    The temporary is `.NAME.<8 random characters>SUFFIX` (see `remove_stale_temporaries`);
    `suffix` keeps the extension a writer may look at (cv2.imwrite picks the codec from
    it), by default the target's own plus `.tmp`.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=suffix if suffix is not None else path.suffix + ".tmp"
        )
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, _FILE_MODE)
        yield tmp
        os.replace(tmp, path)
    except (FileExistsError, NotADirectoryError):  # mkdir met a file on the way
        raise InputError(path, "cannot write: a part of the path is a file, not a directory") from None
    except OSError as e:  # an output path in /proc, on a full disk, a directory...
        raise InputError(path, f"cannot write: {e.strerror or e}") from None
    finally:
        if tmp is not None and tmp.exists():
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


def read_json(path: str | os.PathLike, digests: dict | None = None, object_hook=None) -> Any:
    """Load a JSON file, turning a missing, unreadable or malformed file into an InputError.

    The encodings are those JSON has had: UTF-8 with or without a byte-order mark, UTF-16 and
    UTF-32 (either byte order), told apart from the first bytes as `json.loads` does. With
    `digests`, the SHA-256 of the file's bytes is stored in it under `path`; `object_hook` is
    json's (it may make each object smaller as it is read).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
        if digests is not None:
            digests[path] = hashlib.sha256(data).hexdigest()
        encoding = json.detect_encoding(data)
        text = data.decode(encoding)
        del data  # the bytes and their text need not both stay for the parse
        return json.loads(text, object_hook=object_hook)
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except IsADirectoryError:
        raise InputError(path, "is a directory, expected a JSON file") from None
    except PermissionError:
        raise InputError(path, "permission denied") from None
    except UnicodeDecodeError as e:
        raise InputError(path, f"malformed JSON: not {e.encoding.upper()} text ({e.reason} at byte {e.start}); "
                               "JSON files are read as UTF-8, UTF-16 or UTF-32") from None
    except json.JSONDecodeError as e:
        raise InputError(path, f"malformed JSON: {e}") from None
    except RecursionError:
        raise InputError(path, "malformed JSON: nested too deeply") from None
    except OSError as e:
        raise InputError(path, f"unreadable: {e.strerror or e}") from None


_TEMPORARY = re.compile(r"\.(.+)\.[a-z0-9_]{8}(\.\w+)+")
"""The name `atomic_path` gives a temporary (tempfile's random part is 8 of a-z, 0-9, _)."""


def remove_stale_temporaries(directory: str | os.PathLike) -> int:
    """Remove the temporaries `atomic_path` left in `directory` when a run was killed; returns how many.

    Call it only while no other process writes into `directory` (a build holds its lock).
    """
    removed = 0
    for tmp in Path(directory).glob(".*"):
        if _TEMPORARY.fullmatch(tmp.name) and tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed
