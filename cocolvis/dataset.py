"""The `cocolvis build` output format: one directory per split, its writers and its reader.

Files of a build directory:
    classes.json    JSON list of classes ordered by id 1..C, one object a line:
                    {"id", "name", "lvis_id" (or null), "coco_id" (or null),
                     "source": "lvis" | "coco" | "both", and LVIS's "frequency",
                     "synset", "image_count" where the class has them}
    images.jsonl    one JSON object a line per written image, in LVIS file order:
                    {"id", "file" (relative to the images root, never leaving it),
                     "height", "width", "not_exhaustive_category_ids", "neg_category_ids"}
    masks/<12-digit image id>.png
                    single-channel uint16 label map: 0 unlabeled, 1..C class ids
    stats.csv       one row per class, the columns STATS_COLUMNS: id, name, pixels and
                    images (both sources), then lvis_/coco_ pixels and images (the
                    pixels each source painted in the final masks)
    report.json     counts, and the images skipped by reason (SKIP_REASONS), size
                    mismatches, degenerate polygons, annotations left with no polygon
    dataset.json    {"format": "cocolvis-build", "version", "fingerprint", "inputs",
                     "options", "counts", "images_root" (absolute; absent if not given)}
    .journal.jsonl  while building: the resume journal (`cocolvis.journal`)
    .lock           while building: the writer's lock (`cocolvis.outdir`)
Every file is written under a temporary name and renamed; images.jsonl is written last,
so a directory holding it holds a finished build.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np

from cocolvis.validate import check_class_name, check_image_size
from segkit.images import read_image
from segkit.io import InputError, atomic_open, read_json, write_json, write_text

FORMAT = "cocolvis-build"
FORMAT_VERSION = 1
STATS_COLUMNS = ("id", "name", "pixels", "images", "lvis_pixels", "coco_pixels", "lvis_images", "coco_images")
SKIP_REASONS = {
    "not_in_coco_stuff": "image in none of the COCO-Stuff files",
    "size_mismatch": "LVIS and COCO-Stuff sizes disagree",
    "no_annotations": "no LVIS instance and no stuff region",
}
OUTPUT_FILES = ("classes.json", "images.jsonl", "stats.csv", "report.json", "dataset.json")


MAX_IMAGE_ID = 10 ** 12 - 1
"""Largest image id: masks are named by 12 digits, and every id stays far inside int64."""


def mask_name(image_id: int) -> str:
    """The mask file name of an image: its id, 12 digits zero-padded, as COCO names images."""
    return f"{int(image_id):012d}.png"


# ---------------------------------------------------------------------------- writers

def write_png(path: Path, label: np.ndarray) -> None:
    """Write a uint16 label map as PNG under a temporary name, renamed when complete.

    The temporary name is the target's, hidden and tagged with the process id: names
    come from image ids, so no other writer can hold it, and the encoder creates the
    file itself (one file creation per mask, not two as with mkstemp).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.png")
    try:
        if not cv2.imwrite(str(tmp), label):
            raise OSError(f"{path}: could not write the mask")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def image_record(img: dict, file: str) -> dict:
    """The images.jsonl line of an LVIS image (its category ids are merged ids unchanged)."""
    return {
        "id": img["id"],
        "file": file,
        "height": img["height"],
        "width": img["width"],
        "not_exhaustive_category_ids": sorted(img.get("not_exhaustive_category_ids", [])),
        "neg_category_ids": sorted(img.get("neg_category_ids", [])),
    }


def write_classes(path: str | Path, classes: list) -> None:
    """classes.json: a JSON list, one class per line, ordered by id."""
    write_text(path, "[\n" + ",\n".join(json.dumps(c) for c in classes) + "\n]\n")


def write_stats(path: Path, classes: list, results: Iterable) -> None:
    """stats.csv from the masks' per-class pixel counts (`MaskResult`s)."""
    n = len(classes) + 1
    lvis_px, coco_px = np.zeros(n, np.int64), np.zeros(n, np.int64)
    lvis_img, coco_img, images = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    for r in results:
        ids = np.asarray(r.classes, np.int64)
        lp, cp = np.asarray(r.lvis_pixels, np.int64), np.asarray(r.coco_pixels, np.int64)
        lvis_px[ids] += lp
        coco_px[ids] += cp
        lvis_img[ids] += lp > 0
        coco_img[ids] += cp > 0
        images[ids] += 1
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        out = csv.writer(f)
        out.writerow(STATS_COLUMNS)
        for c in classes:
            i = c["id"]
            out.writerow([i, c["name"], lvis_px[i] + coco_px[i], images[i], lvis_px[i], coco_px[i], lvis_img[i],
                          coco_img[i]])


def write_images(path: Path, records: Iterable[dict]) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


def write_build(out: Path, classes: list, records: list, results: Iterable, report: dict, meta: dict) -> None:
    """Every file but the masks, images.jsonl last (its presence marks a finished build)."""
    write_classes(out / "classes.json", classes)
    write_stats(out / "stats.csv", classes, results)
    write_json(out / "report.json", report)
    write_json(out / "dataset.json", {"format": FORMAT, "version": FORMAT_VERSION, **meta})
    write_images(out / "images.jsonl", records)


# ----------------------------------------------------------------------------- reader

def read_label_png(path: str | Path) -> np.ndarray:
    """Read a single-channel uint16 label map; a missing or unreadable file is an InputError."""
    mask = read_image(path, cv2.IMREAD_UNCHANGED, "missing or unreadable mask")
    if mask.ndim != 2 or mask.dtype != np.uint16:
        raise InputError(path, f"expected a single-channel uint16 PNG, got {mask.dtype} of shape {mask.shape}")
    return mask


def _check_classes(classes, path: Path) -> list[dict]:
    if not isinstance(classes, list) or not all(isinstance(c, dict) for c in classes):
        raise InputError(path, "expected a JSON list of class objects")
    for i, c in enumerate(classes, 1):
        if type(c.get("id")) is not int or c["id"] != i:
            raise InputError(path, "class ids must be 1..C in order")
        if not isinstance(c.get("name"), str):
            raise InputError(path, f"class {i}: needs a string `name`")
        problem = check_class_name(c["name"])
        if problem:
            raise InputError(path, f"class {i}: {problem}")
    return classes


def is_class_list(path: Path) -> bool:
    """Whether `path` holds a valid classes.json (a file `cocolvis vocab` may replace)."""
    try:
        _check_classes(read_json(path), path)
    except InputError:
        return False
    return True


def _check_record(rec, path: Path, lineno: int) -> dict:
    """An images.jsonl line: integer id and size, a `file` under the images root."""
    if not isinstance(rec, dict):
        raise InputError(path, f"line {lineno}: expected a JSON object")
    for key in ("id", "height", "width"):
        if type(rec.get(key)) is not int or rec[key] < (0 if key == "id" else 1):
            raise InputError(path, f"line {lineno}: needs a {'non-negative' if key == 'id' else 'positive'} "
                                   f"integer `{key}`")
    if rec["id"] > MAX_IMAGE_ID:
        raise InputError(path, f"line {lineno}: image id {rec['id']} is above {MAX_IMAGE_ID}: masks are named by "
                               "12 digits")
    problem = check_image_size(rec["height"], rec["width"])
    if problem:
        raise InputError(path, f"line {lineno}: {problem}")
    file = rec.get("file")
    if not isinstance(file, str):
        raise InputError(path, f"line {lineno}: needs a string `file`")
    if not file or file.startswith("/") or "\\" in file or "\0" in file or ".." in file.split("/"):
        raise InputError(path, f"line {lineno}: `file` {file!r} leaves the images root")
    return rec


class BuiltDataset:
    """A `cocolvis build` output: classes, image records and masks of one split."""

    def __init__(self, root: str | Path, images_root: str | Path | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(self.root, "not a directory (expected a `cocolvis build` output)")
        classes_path = self.root / "classes.json"
        if not classes_path.exists():
            raise InputError(classes_path, "missing: not a `cocolvis build` output")
        self.classes: list[dict] = _check_classes(read_json(classes_path), classes_path)
        meta_path = self.root / "dataset.json"
        self.meta: dict = read_json(meta_path) if meta_path.exists() else {}
        if not isinstance(self.meta, dict):
            raise InputError(meta_path, "expected a JSON object")
        root_dir = images_root if images_root is not None else self.meta.get("images_root")
        if root_dir is not None and not isinstance(root_dir, (str, os.PathLike)):
            raise InputError(meta_path, "`images_root` must be a path")
        self.images_root = Path(root_dir) if root_dir is not None else None
        self.images = self._read_images(self.root / "images.jsonl")

    @staticmethod
    def _read_images(path: Path) -> list[dict]:
        if not path.exists():
            raise InputError(path, "missing: not a `cocolvis build` output")
        images = []
        try:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except (json.JSONDecodeError, RecursionError) as e:
                        raise InputError(path, f"line {lineno}: malformed JSON: {e}") from None
                    images.append(_check_record(rec, path, lineno))
        except UnicodeDecodeError as e:
            raise InputError(path, f"not UTF-8 text: {e}") from None
        except OSError as e:
            raise InputError(path, f"unreadable: {e.strerror or e}") from None
        return images

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.classes]

    def mask_path(self, image_id: int) -> Path:
        return self.root / "masks" / mask_name(image_id)

    def image_path(self, record: dict) -> Path:
        if self.images_root is None:
            raise InputError(self.root / "dataset.json", "no images root recorded; pass --images-root")
        return self.images_root / record["file"]

    def read_mask(self, image_id: int) -> np.ndarray:
        """The uint16 label map of an image, checked against the class count."""
        path = self.mask_path(image_id)
        mask = read_label_png(path)
        top = int(mask.max())
        if top > self.num_classes:
            raise InputError(path, f"class id {top} exceeds the {self.num_classes} classes of {self.root / 'classes.json'}")
        return mask

    def read_image(self, record: dict) -> np.ndarray:
        """The image as RGB uint8 (H, W, 3)."""
        path = self.image_path(record)
        image = read_image(path, cv2.IMREAD_COLOR, f"image {record['id']} missing or unreadable under the images root")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_stats(path: Path) -> dict[str, np.ndarray]:
    """stats.csv as {column: array} for the columns STATS_COLUMNS, in file order (other columns ignored).

    Ids and counts are int64 (counts non-negative), names str objects. Anything else, a missing,
    unreadable, empty or malformed file, a missing column, a short row, is one InputError naming
    the row or class. The one reader of the file: `cocolvis summary` and the bench analyses use it.
    """
    if not path.exists():
        raise InputError(path, "missing: not a `cocolvis build` output")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, strict=True))
    except UnicodeDecodeError:
        raise InputError(path, "not UTF-8 text") from None
    except csv.Error as e:
        raise InputError(path, f"malformed CSV: {e}") from None
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from None
    if not rows:
        raise InputError(path, "empty: expected a CSV table with a header")
    header = rows[0]
    missing = [c for c in STATS_COLUMNS if c not in header]
    if missing:
        raise InputError(path, f"missing column(s) {', '.join(missing)}")
    short = next((i for i, row in enumerate(rows[1:], 1) if len(row) != len(header)), None)
    if short is not None:
        raise InputError(path, f"row {short}: {len(rows[short])} fields, expected {len(header)}")
    at = {c: header.index(c) for c in STATS_COLUMNS}
    values = {c: [_whole_number(row[at[c]]) for row in rows[1:]] for c in STATS_COLUMNS if c != "name"}
    if None in values["id"]:
        raise InputError(path, f"row {values['id'].index(None) + 1}: class id must be an integer")
    names = [row[at["name"]] for row in rows[1:]]
    columns = {"id": np.array(values["id"], np.int64), "name": np.array(names, dtype=object)}
    for c in STATS_COLUMNS[2:]:
        if None in values[c]:
            raise InputError(path, f"class {columns['id'][values[c].index(None)]}: counts must be non-negative integers")
        if sum(values[c]) >= 2 ** 63:
            raise InputError(path, f"column {c}: the counts add up past the int64 range")
        columns[c] = np.array(values[c], np.int64)
    return columns


def _whole_number(text: str) -> int | None:
    """A non-negative int64 written in ASCII digits, else None."""
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() and int(text) < 2 ** 63 else None
