"""The merged class vocabulary of COCO-Stuff's stuff classes and LVIS's thing classes.

The rule, general over LVIS versions:
  * every LVIS category keeps its LVIS id (1..N);
  * a COCO-Stuff stuff category (ids 92-182) whose name equals an LVIS category's name
    merges into that LVIS class (10 of them for LVIS v1, 9 for v0.5);
  * the other stuff categories are appended after N, in COCO id order;
  * COCO-Stuff's `other` (183), its thing ids (1-91) and unlabeled (0) map to 0.
LVIS v1 + COCO-Stuff gives 1203 + 91 - 10 = 1284 classes; LVIS v0.5 gives 1312.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from cocolvis.validate import check_class_name
from segkit.io import InputError, read_json

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_LVIS = DATA_DIR / "lvis_v1_categories.json"
DEFAULT_STUFF = DATA_DIR / "cocostuff_labels.txt"
STUFF_CATEGORIES = DATA_DIR / "cocostuff_stuff_categories.json"

STUFF_IDS = range(92, 183)
"""COCO-Stuff stuff category ids; 183 is `other` (thing pixels) and is not a class."""
COCO_ID_LIMIT = 256
"""Size of the COCO-Stuff id look-up table: every COCO-Stuff id (0..183) fits."""
MAX_CLASSES = 0x7FFF
"""Class ids must fit in 15 bits: the painter flags stuff pixels with the 16th bit."""

LVIS_FIELDS = ("frequency", "synset", "image_count")


def check_categories(categories, path, what: str) -> list[dict]:
    if not isinstance(categories, list):
        raise InputError(path, f"`categories` must be a list of {what} categories")
    seen_ids, seen_names = set(), set()
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or type(cat.get("id")) is not int or not isinstance(cat.get("name"), str):
            raise InputError(path, f"category #{i}: needs an integer `id` and a string `name`")
        problem = check_class_name(cat["name"])
        if problem:
            raise InputError(path, f"category {cat['id']}: {problem}")
        if cat["id"] in seen_ids:
            raise InputError(path, f"category {cat['id']} ({cat['name']!r}): duplicate category id")
        if cat["name"] in seen_names:
            raise InputError(path, f"category {cat['id']} ({cat['name']!r}): duplicate category name")
        seen_ids.add(cat["id"])
        seen_names.add(cat["name"])
    return categories


def categories_of(data, path) -> list[dict]:
    """The categories of an annotation file (a dict with `categories`) or of a bare category list."""
    if isinstance(data, dict):
        if "categories" not in data:
            raise InputError(path, "missing `categories`")
        data = data["categories"]
    return data


def check_lvis_categories(categories, path) -> list[dict]:
    """LVIS categories checked (ids exactly 1..N, so merged ids can keep them), sorted by id."""
    cats = check_categories(categories, path, "LVIS")
    if len(cats) > MAX_CLASSES - len(STUFF_IDS):
        raise InputError(path, f"{len(cats)} LVIS categories: with the {len(STUFF_IDS)} COCO-Stuff stuff classes "
                               f"they would exceed the {MAX_CLASSES} classes a 16-bit label map holds")
    ids = sorted(c["id"] for c in cats)
    if ids != list(range(1, len(ids) + 1)):
        raise InputError(path, "LVIS category ids must be exactly 1..N")
    return sorted(cats, key=lambda c: c["id"])


def read_lvis_categories(path: str | Path = DEFAULT_LVIS) -> list[dict]:
    """LVIS categories from an LVIS annotation file or a JSON list of categories."""
    return check_lvis_categories(categories_of(read_json(path), path), path)


def read_stuff_categories(path: str | Path = DEFAULT_STUFF) -> list[dict]:
    """COCO-Stuff categories from a COCO-Stuff JSON file or the `id: name` label list."""
    path = Path(path)
    if path.suffix == ".txt":
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise InputError(path, "no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(path, f"unreadable: {e}") from None
        cats = []
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            m = re.fullmatch(r"\s*(\d+)\s*:\s*(\S.*?)\s*", line)
            if m is None:
                raise InputError(path, f"line {lineno}: expected `id: name`, got {line!r}")
            cats.append({"id": int(m[1]), "name": m[2]})
    else:
        cats = categories_of(read_json(path), path)
    check_stuff_kind(check_categories(cats, path, "COCO-Stuff"), path)
    return cats


def check_stuff_kind(categories: list, path) -> None:
    """Refuse a file that is not COCO-Stuff: its ids are 0-183 and include stuff ids 92-182."""
    if any(k in c for c in categories for k in LVIS_FIELDS) or any(not 0 <= c["id"] <= 183 for c in categories):
        raise InputError(path, "looks like an LVIS file (category ids past 183 or LVIS fields), not COCO-Stuff: "
                               "give it with --lvis")
    if not any(c["id"] in STUFF_IDS for c in categories):
        raise InputError(path, "no COCO-Stuff stuff category (ids 92-182): is this a COCO-Stuff stuff file?")


def merge_vocabularies(lvis_categories: list[dict], stuff_categories: list[dict]) -> list[dict]:
    """The merged class list, ordered by id (see the module docstring for the rule)."""
    classes = []
    for cat in sorted(lvis_categories, key=lambda c: c["id"]):
        cls = {"id": cat["id"], "name": cat["name"], "lvis_id": cat["id"], "coco_id": None, "source": "lvis"}
        cls.update({k: cat[k] for k in LVIS_FIELDS if k in cat})
        classes.append(cls)
    by_name = {c["name"]: c for c in classes}
    next_id = len(classes) + 1
    for cat in sorted(stuff_categories, key=lambda c: c["id"]):
        if cat["id"] not in STUFF_IDS:
            continue
        cls = by_name.get(cat["name"])
        if cls is not None:
            cls["coco_id"] = cat["id"]
            cls["source"] = "both"
        else:
            classes.append({"id": next_id, "name": cat["name"], "lvis_id": None, "coco_id": cat["id"], "source": "coco"})
            next_id += 1
    if len(classes) > MAX_CLASSES:
        raise ValueError(f"{len(classes)} classes exceed the {MAX_CLASSES} a 16-bit label map with a source flag holds")
    return classes


def stuff_table(classes: list[dict]) -> np.ndarray:
    """Look-up table from COCO-Stuff category id to merged class id (0 for non-stuff ids)."""
    table = np.zeros(COCO_ID_LIMIT, np.uint16)
    for cls in classes:
        if cls["coco_id"] is not None:
            table[cls["coco_id"]] = cls["id"]
    return table


def build_vocabulary(lvis: str | Path | None = None, coco: str | Path | None = None) -> list[dict]:
    """The merged classes of an LVIS file and a COCO-Stuff file (the shipped v1 vocabularies by default)."""
    return merge_vocabularies(read_lvis_categories(lvis or DEFAULT_LVIS), read_stuff_categories(coco or DEFAULT_STUFF))


def describe(classes: list[dict]) -> str:
    """One line: how many classes and where they come from."""
    n = {s: sum(c["source"] == s for c in classes) for s in ("lvis", "both", "coco")}
    return (f"{len(classes)} classes: {n['lvis'] + n['both']} LVIS, {n['both'] + n['coco']} COCO-Stuff stuff, "
            f"{n['both']} merged by name")
