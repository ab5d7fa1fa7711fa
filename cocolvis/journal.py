"""The resume journal of a build: which masks are finished, with their class counts.

`.journal.jsonl` in the build directory: a header line {"fingerprint": ...}, then one
`MaskResult` a line, written as each mask is renamed into place. A re-run with the same
fingerprint keeps the masks the journal lists (and that exist) and paints the rest; a
line cut short by an interruption ends the journal there.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from cocolvis.dataset import FORMAT_VERSION
from cocolvis.paint import MaskResult

JOURNAL = ".journal.jsonl"


def fingerprint(input_paths: Iterable[Path], digests: Iterable[str], classes: list, order: str) -> str:
    """What the masks depend on: the input files (path and content digest), the classes and the order."""
    ident = [[os.path.abspath(p), d] for p, d in zip(input_paths, digests)]
    blob = json.dumps({"files": ident, "classes": classes, "order": order, "version": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def journal_fingerprint(path: Path) -> str | None:
    """The fingerprint in a journal's header; None if there is no readable one."""
    try:
        with open(path, encoding="utf-8") as f:
            header = json.loads(f.readline())
    except (OSError, ValueError):
        return None
    value = header.get("fingerprint") if isinstance(header, dict) else None
    return value if isinstance(value, str) else None


def read_journal(path: Path, fingerprint: str) -> dict[int, MaskResult]:
    """Finished masks of an earlier run with the same fingerprint; anything else is ignored."""
    if journal_fingerprint(path) != fingerprint:
        return {}
    done = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        f.readline()
        for line in f:
            try:
                r = json.loads(line)
                result = MaskResult(r["image_id"], r["classes"], r["lvis_pixels"], r["coco_pixels"])
            except (ValueError, KeyError, TypeError):
                break  # a line cut short by an interruption: its mask is painted again
            if not _well_formed(result):
                break
            done[result.image_id] = result
    return done


def _well_formed(r: MaskResult) -> bool:
    lists = (r.classes, r.lvis_pixels, r.coco_pixels)
    return type(r.image_id) is int and all(type(v) is list and len(v) == len(r.classes) for v in lists) \
        and all(type(x) is int and x >= 0 for v in lists for x in v)


class Journal:
    """The journal being written: the header and the kept results, then one line per new mask."""

    def __init__(self, path: Path, fingerprint: str, kept: Iterable[MaskResult]):
        self.file = open(path, "w", encoding="utf-8")
        lines = [json.dumps({"fingerprint": fingerprint})] + [json.dumps(r._asdict()) for r in kept]
        self.file.write("\n".join(lines) + "\n")
        self.file.flush()

    def add(self, result: MaskResult) -> None:
        self.file.write(json.dumps(result._asdict()) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
