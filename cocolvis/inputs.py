"""Read and check a build's input files: one LVIS file and one or more COCO-Stuff files.

Every value a worker will hand to pycocotools is bounded here (see `cocolvis.validate`),
before anything is written; each problem raises an InputError naming the file and the
item. The annotations come out grouped by image and mapped to merged class ids.
"""
from __future__ import annotations

import os
import re
from array import array
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

import numpy as np

from segkit.io import InputError, read_json
from cocolvis.dataset import MAX_IMAGE_ID
from cocolvis.paint import Stuff, Thing
from cocolvis.validate import (POLYGON_TYPES, check_image_size, check_polygons, check_rle_strings, check_uncompressed_counts,
                               is_int)
from cocolvis.vocab import (COCO_ID_LIMIT, check_categories, check_lvis_categories, check_stuff_kind,
                            merge_vocabularies, stuff_table)

NUMBER_TYPES = {int, float}
LVIS_IMAGE_LISTS = ("not_exhaustive_category_ids", "neg_category_ids")
"""Per-image category lists every LVIS image carries (v0.5 and v1); COCO files have none."""


def _compact_polygons(obj: dict) -> dict:
    """json's object hook: an annotation's polygons of plain numbers become arrays of doubles as it is read.

    An LVIS train file holds about 127 million coordinates: as Python floats in lists
    they take 32 bytes each, as `array('d')` 8. pycocotools reads either. A polygon
    holding anything else (a bool, a string, a huge integer) stays a list, for the
    checks to name.
    """
    segm = obj.get("segmentation")
    if type(segm) is list:
        for i, poly in enumerate(segm):
            if type(poly) is list and set(map(type, poly)) <= NUMBER_TYPES:
                try:
                    segm[i] = array("d", poly)
                except OverflowError:
                    pass
    return obj


def read_annotation_file(path: str | Path, digests: dict | None = None) -> dict:
    """Load a COCO-format annotation file and check its top-level structure (`digests`: see `read_json`)."""
    data = read_json(path, digests, object_hook=_compact_polygons)
    if not isinstance(data, dict):
        raise InputError(path, "expected a JSON object with `images`, `annotations` and `categories`")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise InputError(path, f"missing `{key}`")
        if not isinstance(data[key], list):
            raise InputError(path, f"`{key}` must be a list")
    return data


def check_lvis_kind(data: dict, path) -> None:
    """Refuse a file that is not LVIS: LVIS images carry `neg_category_ids` and `not_exhaustive_category_ids`."""
    cats = data["categories"]
    if cats and all(isinstance(c, dict) and is_int(c.get("id")) and 92 <= c["id"] <= 183 for c in cats):
        raise InputError(path, "looks like a COCO-Stuff file (category ids 92-183), not LVIS: give it with --coco")
    for img in data["images"]:
        if not isinstance(img, dict) or not all(key in img for key in LVIS_IMAGE_LISTS):
            image = f"image {img.get('id')!r}" if isinstance(img, dict) else "an image"
            raise InputError(path, f"not an LVIS file: {image} has no `neg_category_ids` and "
                                   f"`not_exhaustive_category_ids` (a COCO file? give it with --coco)")


def image_index(data: dict, path) -> dict[int, dict]:
    """The file's images by id, each with a non-negative integer id and a size within the limits."""
    images = {}
    for i, img in enumerate(data["images"]):
        image_id = img.get("id") if isinstance(img, dict) else None
        if not is_int(image_id) or image_id < 0:
            raise InputError(path, f"images[{i}]: needs a non-negative integer `id`")
        if image_id > MAX_IMAGE_ID:
            raise InputError(path, f"image {image_id}: id above {MAX_IMAGE_ID}: masks are named by 12 digits")
        problem = check_image_size(img.get("height"), img.get("width"))
        if problem:
            raise InputError(path, f"image {image_id}: {problem}")
        if image_id in images:
            raise InputError(path, f"image {image_id}: duplicate image id")
        images[image_id] = img
    return images


@dataclass
class Grouped:
    """A file's annotations grouped by image, plus what was dropped on the way."""

    by_image: dict = field(default_factory=lambda: defaultdict(list))
    degenerate_polygons: int = 0
    degenerate_annotations: list = field(default_factory=list)  # annotations left with no polygon
    ignored: int = 0  # COCO-Stuff annotations of `other` or thing ids

    def add(self, other: Grouped) -> None:
        for image_id, anns in other.by_image.items():
            self.by_image[image_id].extend(anns)
        self.degenerate_polygons += other.degenerate_polygons
        self.degenerate_annotations += other.degenerate_annotations
        self.ignored += other.ignored


class _Checker:
    """Checks one file's annotations; compressed RLE strings are collected and checked at once."""

    def __init__(self, path, images: dict, category_ids: set):
        self.path, self.images, self.category_ids = path, images, category_ids
        self.rle_strings, self.rle_pixels, self.rle_names = [], [], []
        self.polygons, self.polygon_sizes, self.polygon_names = [], [], []
        self.seen_ids = set()

    def fail(self, name: str, problem: str):
        raise InputError(self.path, f"{name}: {problem}")

    def check(self, ann, i: int) -> tuple[str, dict]:
        """The annotation's name and image; the segmentation is checked against the image."""
        if not isinstance(ann, dict):
            self.fail(f"annotations[{i}]", "expected an object")
        if not is_int(ann.get("id")):
            self.fail(f"annotations[{i}]", "needs an integer `id`")
        name = f"annotation {ann['id']}"
        if ann["id"] in self.seen_ids:
            self.fail(name, "duplicate annotation id")
        self.seen_ids.add(ann["id"])
        category = ann.get("category_id")
        if not is_int(category) or category not in self.category_ids:
            self.fail(name, f"category {category!r} is not in the file's categories")
        img = self.images.get(ann.get("image_id")) if is_int(ann.get("image_id")) else None
        if img is None:
            self.fail(name, f"image {ann.get('image_id')!r} is not in the file's images")
        self._check_segmentation(ann.get("segmentation"), img, name)
        return name, img

    def _check_segmentation(self, segm, img: dict, name: str) -> None:
        h, w = img["height"], img["width"]
        if isinstance(segm, list):
            for poly in segm:
                if type(poly) not in POLYGON_TYPES or len(poly) % 2:
                    self.fail(name, "a polygon must be a flat list of x, y pairs")
                self.polygons.append(poly)
                self.polygon_sizes.append((h, w))
                self.polygon_names.append(name)
            return
        if not isinstance(segm, dict):
            self.fail(name, "`segmentation` must be polygons or an RLE")
        size = segm.get("size")
        if "counts" not in segm or not isinstance(size, list) or len(size) != 2 or not all(map(is_int, size)):
            self.fail(name, "an RLE needs `counts` and a `size` of two integers")
        if size != [h, w]:
            self.fail(name, f"RLE size {size[0]}x{size[1]} is not its image's {h}x{w} (image {img['id']})")
        counts = segm["counts"]
        if isinstance(counts, list):
            problem = check_uncompressed_counts(counts, h, w)
            if problem:
                self.fail(name, problem)
        else:
            self.rle_strings.append(counts)
            self.rle_pixels.append(h * w)
            self.rle_names.append(name)

    def finish(self) -> None:
        """Check the collected polygons and compressed RLE strings at once; the first bad one is the error."""
        heights, widths = [s[0] for s in self.polygon_sizes], [s[1] for s in self.polygon_sizes]
        for index, problem in check_polygons(self.polygons, heights, widths)[:1]:
            self.fail(self.polygon_names[index], problem)
        for index, problem in check_rle_strings(self.rle_strings, self.rle_pixels)[:1]:
            self.fail(self.rle_names[index], problem)


def _drop_degenerate(segm, ann_id: int, out: Grouped):
    """The polygons of 3 points or more (RLE unchanged), counting the others; None if none is left."""
    if not isinstance(segm, list):
        return segm
    kept = [poly for poly in segm if len(poly) >= 6]
    out.degenerate_polygons += len(segm) - len(kept)
    if not kept:
        out.degenerate_annotations.append(ann_id)
        return None
    return kept


def group_lvis(data: dict, path, images: dict, category_ids: set) -> Grouped:
    """Check LVIS annotations and group them by image as `Thing`s."""
    out, checker = Grouped(), _Checker(path, images, category_ids)
    for i, ann in enumerate(data["annotations"]):
        name, img = checker.check(ann, i)
        area = ann.get("area")
        if area is not None and (type(area) not in (int, float) or not 0 <= area < float("inf")):
            checker.fail(name, f"`area` must be a non-negative number, got {area!r}")
        segm = _drop_degenerate(ann["segmentation"], ann["id"], out)
        if segm is not None:
            out.by_image[img["id"]].append(Thing(ann["category_id"], segm, None if area is None else float(area),
                                                 ann["id"]))
    checker.finish()
    return out


def group_stuff(data: dict, path, images: dict, category_ids: set, table: np.ndarray) -> Grouped:
    """Check COCO-Stuff annotations and group the stuff ones by image as `Stuff` regions."""
    out, checker = Grouped(), _Checker(path, images, category_ids)
    for i, ann in enumerate(data["annotations"]):
        name, img = checker.check(ann, i)
        cls = int(table[ann["category_id"]]) if ann["category_id"] < COCO_ID_LIMIT else 0
        if cls == 0:
            out.ignored += 1
            continue
        segm = _drop_degenerate(ann["segmentation"], ann["id"], out)
        if segm is not None:
            out.by_image[img["id"]].append(Stuff(cls, segm, ann["id"]))
    checker.finish()
    return out


def image_file(img: dict, path) -> str:
    """The image's path relative to the images root.

    LVIS v1 images have only `coco_url`: its last two parts (`val2017/000000397133.jpg`).
    LVIS v0.5 images also have a 2014-style `file_name`; their `coco_url` wins too, so
    every split points into the COCO 2017 layout that COCO-Stuff uses. With no
    `coco_url`, a `COCO_<split>_<id>.jpg` name goes under `<split>/`, any other name as is.
    """
    url = img.get("coco_url")
    if isinstance(url, str) and url.strip("/").count("/") >= 1:
        rel = "/".join(url.rstrip("/").split("/")[-2:])
    elif isinstance(img.get("file_name"), str):
        name = img["file_name"]
        m = re.fullmatch(r"COCO_([A-Za-z]+\d*)_\d+\.\w+", name)
        rel = f"{m[1]}/{name}" if m else name
    else:
        raise InputError(path, f"image {img['id']}: has neither `coco_url` nor `file_name`")
    if not confined(rel):
        raise InputError(path, f"image {img['id']}: image path {rel!r} leaves the images root")
    return rel


def confined(rel: str) -> bool:
    """Whether a relative image path stays under the images root (no `..`, not absolute, no NUL)."""
    return bool(rel) and not rel.startswith("/") and "\\" not in rel and "\0" not in rel \
        and ".." not in PurePosixPath(rel).parts


@dataclass
class Inputs:
    """Everything a build needs from its input files, checked."""

    lvis_path: Path
    coco_paths: list
    classes: list
    lvis_images: list  # in file order
    things: Grouped
    coco_images: dict  # image id -> (image, path)
    stuff: Grouped
    digests: list  # SHA-256 of the LVIS file, then of each COCO-Stuff file


def _reading(path: Path, say) -> Path:
    try:
        say(f"reading {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
    except OSError:
        pass  # read_json names the problem
    return path


def _check_lvis_image_lists(images: Iterable[dict], path, category_ids: set) -> None:
    for img in images:
        for key in LVIS_IMAGE_LISTS:
            values = img[key]
            if not isinstance(values, list):
                raise InputError(path, f"image {img['id']}: `{key}` must be a list of category ids")
            bad = [c for c in values if not is_int(c) or c not in category_ids]
            if bad:
                raise InputError(path, f"image {img['id']}: `{key}` has {bad[0]!r}, not in the file's categories")


def _stuff_categories(coco_data: list) -> list[dict]:
    """The union of the COCO-Stuff files' categories; a clash of names for one id is an error."""
    seen: dict[int, tuple] = {}
    for p, d in coco_data:
        cats = check_categories(d["categories"], p, "COCO-Stuff")
        check_stuff_kind(cats, p)
        for cat in cats:
            if cat["id"] in seen and seen[cat["id"]][0]["name"] != cat["name"]:
                first, first_path = seen[cat["id"]]
                raise InputError(p, f"category {cat['id']} is {cat['name']!r} here but {first['name']!r} in {first_path}")
            seen.setdefault(cat["id"], (cat, p))
    return [{"id": c["id"], "name": c["name"]} for c, _ in seen.values()]


def read_inputs(coco: Iterable, lvis, say: Callable[[str], None] = lambda line: None) -> Inputs:
    """Read and check an LVIS file and one or more COCO-Stuff files; nothing is written.

    `say` receives a line per file read, for a long read to show it is under way.
    """
    lvis_path, coco_paths = Path(lvis), [Path(p) for p in coco]
    if not coco_paths:
        raise InputError(None, "at least one COCO-Stuff file (--coco) is needed")
    if len(set(map(os.path.abspath, coco_paths))) != len(coco_paths):
        raise InputError(None, "the same COCO-Stuff file is given twice")
    digests: dict = {}
    coco_data = [(p, read_annotation_file(_reading(p, say), digests)) for p in coco_paths]
    if os.path.abspath(lvis_path) in set(map(os.path.abspath, coco_paths)):
        raise InputError(lvis_path, "given both as --lvis and as --coco")
    stuff_list = _stuff_categories(coco_data)
    data = read_annotation_file(_reading(lvis_path, say), digests)
    check_lvis_kind(data, lvis_path)
    lvis_cats = check_lvis_categories(data["categories"], lvis_path)
    classes = merge_vocabularies(lvis_cats, stuff_list)
    table = stuff_table(classes)

    coco_images: dict[int, tuple] = {}
    stuff = Grouped()
    for p, d in coco_data:
        images = image_index(d, p)
        for image_id, img in images.items():
            if image_id in coco_images:
                raise InputError(p, f"image {image_id}: duplicate image id (also in {coco_images[image_id][1]})")
            coco_images[image_id] = (img, p)
        stuff.add(group_stuff(d, p, images, {c["id"] for c in d["categories"]}, table))

    lvis_index = image_index(data, lvis_path)
    lvis_ids = {c["id"] for c in lvis_cats}
    _check_lvis_image_lists(lvis_index.values(), lvis_path, lvis_ids)
    things = group_lvis(data, lvis_path, lvis_index, lvis_ids)
    return Inputs(lvis_path, coco_paths, classes, list(lvis_index.values()), things, coco_images, stuff,
                  [digests[p] for p in [lvis_path, *coco_paths]])
