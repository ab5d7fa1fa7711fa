"""Read one `cocolvis build` output directory (one split).

The layout it owns:
    classes.json    list of classes ordered by id (1..C)
    dataset.json    inputs, options, images root, counts
    images.jsonl    one line per written image: id, file, height, width, ...
    masks/<12-digit id>.png   uint16 label map, 0 unlabeled, 1..C class ids
    stats.csv       per-class pixel and image counts
    report.json     what was skipped and why
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from cocolvis.io import InputError, read_json


def mask_name(image_id: int) -> str:
    """The mask file name of an image: its id, 12 digits zero-padded, as COCO names images."""
    return f"{int(image_id):012d}.png"


def read_label_png(path: str | Path) -> np.ndarray:
    """Read a single-channel uint16 label map; a missing or unreadable file is an InputError."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise InputError(path, "missing or unreadable mask")
    if mask.ndim != 2 or mask.dtype != np.uint16:
        raise InputError(path, f"expected a single-channel uint16 PNG, got {mask.dtype} of shape {mask.shape}")
    return mask


class BuiltDataset:
    """A `cocolvis build` output: classes, image records and masks of one split."""

    def __init__(self, root: str | Path, images_root: str | Path | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(self.root, "not a directory (expected a `cocolvis build` output)")
        classes_path = self.root / "classes.json"
        if not classes_path.exists():
            raise InputError(classes_path, "missing: not a `cocolvis build` output")
        self.classes: list[dict] = read_json(classes_path)
        ids = [c.get("id") for c in self.classes]
        if ids != list(range(1, len(ids) + 1)):
            raise InputError(classes_path, "class ids must be 1..C in order")
        meta_path = self.root / "dataset.json"
        self.meta: dict = read_json(meta_path) if meta_path.exists() else {}
        root_dir = images_root if images_root is not None else self.meta.get("images_root")
        self.images_root = Path(root_dir) if root_dir is not None else None
        self.images = self._read_images(self.root / "images.jsonl")

    @staticmethod
    def _read_images(path: Path) -> list[dict]:
        if not path.exists():
            raise InputError(path, "missing: not a `cocolvis build` output")
        images = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    images.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(path, f"line {lineno}: malformed JSON: {e}") from None
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
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise InputError(path, f"image {record['id']} missing or unreadable under the images root")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def stats(self):
        """stats.csv as a pandas DataFrame indexed by class id."""
        import pandas as pd

        path = self.root / "stats.csv"
        if not path.exists():
            raise InputError(path, "missing: not a `cocolvis build` output")
        return pd.read_csv(path).set_index("id")
