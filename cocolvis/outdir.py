"""The build's claim on --out: the shared output-directory rules (`segkit.outdir`) plus what a build adds.

A build holds the lock on `--out/.lock` for as long as it writes; a second writer is refused.
A directory holds a build when its journal or its dataset.json says so (its format is
`cocolvis-build`); a non-empty directory that holds no build is always refused, `--overwrite`
or not, and nothing in it is touched. A build of other inputs or options (another fingerprint)
is refused unless `overwrite` says to replace it, and then only the files a build writes are
removed (masks/ keeps any file not named like a mask). When a build fails, what it wrote is
removed (and the directory, if it made it); an interrupted build (Ctrl-C, SIGTERM, SIGHUP)
keeps its masks so a re-run resumes.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterator

from cocolvis.dataset import FORMAT, OUTPUT_FILES
from cocolvis.journal import JOURNAL, journal_fingerprint
from segkit.io import InputError, read_json, remove_stale_temporaries
from segkit.outdir import claim_output, contents

COMMAND = "cocolvis build"
BUILD_FILES = (*OUTPUT_FILES, JOURNAL, "masks")
_MASK = re.compile(r"\.?\d{12}\.png(\.\d+\.png)?")
"""A mask, or the temporary of one (`cocolvis.dataset.write_png`)."""


def _held_fingerprint(out: Path) -> str | None:
    """The fingerprint of the build `out` holds: its journal's, else its dataset.json's; None if none."""
    found = journal_fingerprint(out / JOURNAL)
    if found is None and (out / "dataset.json").is_file():
        with contextlib.suppress(InputError):
            meta = read_json(out / "dataset.json")
            if isinstance(meta, dict) and meta.get("format") == FORMAT:
                found = meta.get("fingerprint")
    return found


def holds_build(out: Path) -> bool:
    return _held_fingerprint(out) is not None


def _remove_build(out: Path) -> None:
    """Remove every file a build writes (nothing else in the directory)."""
    for name in BUILD_FILES:
        path = out / name
        if name == "masks" and path.is_dir() and not path.is_symlink():
            for mask in path.iterdir():
                if _MASK.fullmatch(mask.name) and not mask.is_dir():
                    mask.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                path.rmdir()  # kept if it holds anything else
        elif not path.is_dir() or path.is_symlink():
            path.unlink(missing_ok=True)
    remove_stale_temporaries(out)


@contextlib.contextmanager
def claim(out: Path, fingerprint: str, overwrite: bool = False) -> Iterator[bool]:
    """Hold `out` for one build; yields whether it starts fresh (nothing of an earlier run kept)."""
    with claim_output(out, COMMAND, lambda name: name in BUILD_FILES, recognise=holds_build, mark=False,
                      keep=lambda e: isinstance(e, KeyboardInterrupt)) as held:
        try:
            if not held.fresh and not overwrite and _held_fingerprint(out) != fingerprint:
                raise InputError(out, "holds a build of other input files, classes or --order; "
                                      "pass --overwrite to replace it")
            if not held.fresh and overwrite:
                _remove_build(out)
                held.before = contents(out)  # what is left is not the build's: never removed
            fresh = held.fresh or overwrite
            if (out / "masks").is_dir():
                for stale in (out / "masks").glob(".*.png"):  # mask temporaries of a killed run
                    stale.unlink(missing_ok=True)
        except OSError as e:
            raise InputError(out, f"cannot write: {e.strerror or e}") from None
        yield fresh
