"""Build one split of the merged dataset from an LVIS file and COCO-Stuff stuff files.

The parent process reads and checks every input before writing anything, then hands
a few images' annotations at a time to a pool of workers (`cocolvis.paint.write_mask`),
forked before the files were read, so peak memory does not grow with the worker count. Each mask is written under a
temporary name and renamed; a journal of finished masks lets an interrupted build
resume where it stopped. The summary files are written last.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import multiprocessing
import multiprocessing.pool
import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from cocolvis.dataset import mask_name
from cocolvis.io import InputError, atomic_open, read_json, write_json, write_text
from cocolvis.paint import ORDERS, MaskResult, MaskTask, write_mask
from cocolvis.vocab import STUFF_IDS, check_categories, check_lvis_categories, merge_vocabularies, stuff_table

JOURNAL = ".journal.jsonl"
"""Finished masks and their class counts, one JSON line each; what a re-run resumes from."""
FORMAT_VERSION = 1
SKIP_REASONS = {
    "not_in_coco_stuff": "image in none of the COCO-Stuff files",
    "size_mismatch": "LVIS and COCO-Stuff sizes disagree",
    "no_annotations": "no LVIS instance and no stuff region",
}


def read_annotation_file(path: str | Path) -> dict:
    """Load a COCO-format annotation file and check its top-level structure."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise InputError(path, "expected a JSON object with `images`, `annotations` and `categories`")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise InputError(path, f"missing `{key}`")
        if not isinstance(data[key], list):
            raise InputError(path, f"`{key}` must be a list")
    return data


def _image_index(data: dict, path) -> dict[int, dict]:
    images = {}
    for i, img in enumerate(data["images"]):
        image_id = img.get("id") if isinstance(img, dict) else None
        if not isinstance(image_id, int) or isinstance(image_id, bool) or image_id < 0:
            raise InputError(path, f"images[{i}]: needs a non-negative integer `id`")
        h, w = img.get("height"), img.get("width")
        if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
            raise InputError(path, f"image {image_id}: needs positive integer `height` and `width`")
        if image_id in images:
            raise InputError(path, f"image {image_id}: duplicate image id")
        images[image_id] = img
    return images


def _annotation_name(ann, i: int) -> str:
    return f"annotation {ann['id']}" if isinstance(ann, dict) and "id" in ann else f"annotations[{i}]"


@dataclass
class Grouped:
    """A file's annotations grouped by image, plus what was dropped on the way."""

    by_image: dict = field(default_factory=lambda: defaultdict(list))
    degenerate_polygons: int = 0
    degenerate_annotations: list = field(default_factory=list)  # annotations left with no polygon
    ignored: int = 0  # COCO-Stuff annotations of `other` or thing ids


def _drop_degenerate(segm, ann: dict, out: Grouped):
    """The polygons of 3 points or more (RLE unchanged), counting the others; None if none is left."""
    if not isinstance(segm, list):
        return segm
    kept = [poly for poly in segm if len(poly) >= 6]
    out.degenerate_polygons += len(segm) - len(kept)
    if not kept:
        out.degenerate_annotations.append(ann.get("id"))
        return None
    return kept


def _group_lvis(data: dict, path, images: dict, category_ids: set) -> Grouped:
    """Check LVIS annotations and group them by image as (class id, segmentation, area, annotation id)."""
    out = Grouped()
    for i, ann in enumerate(data["annotations"]):
        segm, img = _check_annotation(ann, i, path, images, category_ids)
        segm = _drop_degenerate(segm, ann, out)
        if segm is None:
            continue
        area = ann.get("area")
        area = float(area) if isinstance(area, (int, float)) and not isinstance(area, bool) else None
        out.by_image[img["id"]].append((ann["category_id"], segm, area, ann.get("id")))
    return out


def _group_stuff(data: dict, path, images: dict, category_ids: set, table: np.ndarray) -> Grouped:
    """Check COCO-Stuff annotations and group the stuff ones by image as (class id, segmentation, annotation id)."""
    out = Grouped()
    for i, ann in enumerate(data["annotations"]):
        segm, img = _check_annotation(ann, i, path, images, category_ids)
        cls = int(table[ann["category_id"]]) if 0 <= ann["category_id"] < len(table) else 0
        if cls == 0:
            out.ignored += 1
            continue
        segm = _drop_degenerate(segm, ann, out)
        if segm is None:
            continue
        out.by_image[img["id"]].append((cls, segm, ann.get("id")))
    return out


def _check_annotation(ann, i: int, path, images: dict, category_ids: set):
    """The annotation's segmentation and image, or an InputError naming what is wrong."""
    if not isinstance(ann, dict):
        raise InputError(path, f"annotations[{i}]: expected an object")
    if ann.get("category_id") not in category_ids:
        raise InputError(path, f"{_annotation_name(ann, i)}: category {ann.get('category_id')!r} is not in the file's categories")
    img = images.get(ann.get("image_id"))
    if img is None:
        raise InputError(path, f"{_annotation_name(ann, i)}: image {ann.get('image_id')!r} is not in the file's images")
    segm = ann.get("segmentation")
    if isinstance(segm, dict):
        size = segm.get("size")
        if "counts" not in segm or not isinstance(size, list):
            raise InputError(path, f"{_annotation_name(ann, i)}: an RLE needs `counts` and `size`")
        if list(size) != [img["height"], img["width"]]:
            raise InputError(path, f"{_annotation_name(ann, i)}: RLE size {size[0]}x{size[1]} is not its image's "
                                   f"{img['height']}x{img['width']} (image {img['id']})")
    elif isinstance(segm, list):
        for poly in segm:
            if not isinstance(poly, list) or len(poly) % 2:
                raise InputError(path, f"{_annotation_name(ann, i)}: a polygon must be a flat list of x, y pairs")
    else:
        raise InputError(path, f"{_annotation_name(ann, i)}: `segmentation` must be polygons or an RLE")
    return segm, img


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
    parts = PurePosixPath(rel).parts
    if rel.startswith("/") or ".." in parts or "\\" in rel:
        raise InputError(path, f"image {img['id']}: image path {rel!r} leaves the images root")
    return rel


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


def _reading(path: Path, say) -> Path:
    try:
        say(f"reading {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
    except OSError:
        pass  # read_json names the problem
    return path


def read_inputs(coco: Iterable, lvis, say=lambda line: None) -> Inputs:
    """Read and check an LVIS file and one or more COCO-Stuff files; nothing is written.

    `say` receives a line per file read, for a long read to show it is under way.
    """
    lvis_path, coco_paths = Path(lvis), [Path(p) for p in coco]
    if not coco_paths:
        raise InputError(None, "at least one COCO-Stuff file (--coco) is needed")
    if len(set(map(os.path.abspath, coco_paths))) != len(coco_paths):
        raise InputError(None, "the same COCO-Stuff file is given twice")
    coco_data = [(p, read_annotation_file(_reading(p, say))) for p in coco_paths]
    data = read_annotation_file(_reading(lvis_path, say))

    lvis_cats = check_lvis_categories(data["categories"], lvis_path)
    stuff_cats: dict[int, dict] = {}
    for p, d in coco_data:
        for cat in check_categories(d["categories"], p, "COCO-Stuff"):
            seen = stuff_cats.get(cat["id"])
            if seen is not None and seen["name"] != cat["name"]:
                raise InputError(p, f"category {cat['id']} is {cat['name']!r} here but {seen['name']!r} in {seen['_path']}")
            stuff_cats.setdefault(cat["id"], {**cat, "_path": p})
    stuff_list = [{"id": c["id"], "name": c["name"]} for c in stuff_cats.values()]
    if not any(c["id"] in STUFF_IDS for c in stuff_list):
        raise InputError(coco_paths[0], "no COCO-Stuff stuff category (ids 92-182): is this a COCO-Stuff stuff file?")
    classes = merge_vocabularies(lvis_cats, stuff_list)
    table = stuff_table(classes)

    coco_images: dict[int, tuple] = {}
    stuff = Grouped()
    for p, d in coco_data:
        images = _image_index(d, p)
        for image_id, img in images.items():
            if image_id in coco_images:
                raise InputError(p, f"image {image_id}: duplicate image id (also in {coco_images[image_id][1]})")
            coco_images[image_id] = (img, p)
        g = _group_stuff(d, p, images, {c["id"] for c in d["categories"]}, table)
        for image_id, anns in g.by_image.items():
            stuff.by_image[image_id].extend(anns)
        stuff.degenerate_polygons += g.degenerate_polygons
        stuff.degenerate_annotations += g.degenerate_annotations
        stuff.ignored += g.ignored

    lvis_index = _image_index(data, lvis_path)
    lvis_ids = {c["id"] for c in lvis_cats}
    for img in lvis_index.values():
        for key in ("not_exhaustive_category_ids", "neg_category_ids"):
            bad = [c for c in img.get(key, []) if c not in lvis_ids]
            if bad:
                raise InputError(lvis_path, f"image {img['id']}: `{key}` has {bad[0]!r}, not in the file's categories")
    things = _group_lvis(data, lvis_path, lvis_index, lvis_ids)
    return Inputs(lvis_path, coco_paths, classes, list(lvis_index.values()), things, coco_images, stuff)


def image_record(img: dict, path) -> dict:
    """The images.jsonl line of an image (LVIS category ids are merged ids unchanged)."""
    return {
        "id": img["id"],
        "file": image_file(img, path),
        "height": img["height"],
        "width": img["width"],
        "not_exhaustive_category_ids": sorted(img.get("not_exhaustive_category_ids", [])),
        "neg_category_ids": sorted(img.get("neg_category_ids", [])),
    }


@dataclass
class Plan:
    """Which LVIS images a build writes, and which it skips and why."""

    records: list  # images.jsonl lines of the images to write, in LVIS file order
    skipped: dict  # reason -> [image ids]
    size_mismatches: list  # one line per image whose sizes disagree


def plan_build(inputs: Inputs, limit: int | None = None) -> Plan:
    """Decide per image (the first `limit` of the LVIS file): write, or skip with a reason."""
    records, skipped, mismatches = [], {reason: [] for reason in SKIP_REASONS}, []
    for img in inputs.lvis_images[:limit]:
        image_id = img["id"]
        coco = inputs.coco_images.get(image_id)
        if coco is None:
            skipped["not_in_coco_stuff"].append(image_id)
            continue
        cimg, cpath = coco
        if (cimg["height"], cimg["width"]) != (img["height"], img["width"]):
            skipped["size_mismatch"].append(image_id)
            mismatches.append(f"{inputs.lvis_path}: image {image_id} is {img['height']}x{img['width']} "
                              f"but {cimg['height']}x{cimg['width']} in {cpath}; skipped")
            continue
        if not inputs.things.by_image.get(image_id) and not inputs.stuff.by_image.get(image_id):
            skipped["no_annotations"].append(image_id)
            continue
        records.append(image_record(img, inputs.lvis_path))
    return Plan(records, skipped, mismatches)


def mask_tasks(inputs: Inputs, records: Iterable[dict], masks_dir: Path, order: str) -> Iterator[MaskTask]:
    """One task per image, made lazily so only the images in flight are copied to workers."""
    for rec in records:
        image_id = rec["id"]
        coco = inputs.coco_images.get(image_id)
        yield MaskTask(str(masks_dir), image_id, rec["height"], rec["width"],
                       inputs.stuff.by_image.get(image_id, []), inputs.things.by_image.get(image_id, []), order,
                       str(inputs.lvis_path), str(coco[1]) if coco else "")


def default_workers() -> int:
    """All the cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[multiprocessing.pool.Pool | None]:
    """A process pool of `workers` processes, or None for one worker (work stays in this process).

    Made before the annotation files are read: forked workers then share none of the
    parent's copy of a 1 GB annotation file, and each receives one image at a time.
    """
    if workers <= 1:
        yield None
        return
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ctx.Pool(workers) as pool:
        yield pool


CHUNK = 4
"""Images per message to a worker: one at a time, the parent's per-message cost held two
workers to 1.5x the throughput of one; four bring it to 1.9x and still keep a worker's
share of the annotations a few images' worth."""


def run_tasks(tasks: Iterable[MaskTask], pool=None) -> Iterator[MaskResult]:
    """Write every task's mask, in this process or on `pool`; results come in any order."""
    if pool is None:
        yield from map(write_mask, tasks)
    else:
        yield from pool.imap_unordered(write_mask, tasks, chunksize=CHUNK)


def _fingerprint(inputs: Inputs, order: str) -> str:
    """What the masks depend on: the input files (path, size, mtime), the classes and the order."""
    files = [inputs.lvis_path, *inputs.coco_paths]
    ident = [[os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in files]
    blob = json.dumps({"files": ident, "classes": inputs.classes, "order": order, "version": FORMAT_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_journal(path: Path, fingerprint: str) -> dict[int, MaskResult]:
    """Finished masks of an earlier run with the same fingerprint; anything else is ignored."""
    done = {}
    try:
        with open(path, encoding="utf-8") as f:
            header = f.readline()
            try:
                if json.loads(header).get("fingerprint") != fingerprint:
                    return {}
            except (json.JSONDecodeError, AttributeError):
                return {}
            for line in f:
                try:
                    r = json.loads(line)
                    done[r["image_id"]] = MaskResult(r["image_id"], r["classes"], r["lvis_pixels"], r["coco_pixels"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    break  # a line cut short by an interruption: its mask is painted again
    except FileNotFoundError:
        pass
    return done


def _write_stats(path: Path, classes: list, results: Iterable[MaskResult]) -> None:
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
        out.writerow(["id", "name", "pixels", "images", "lvis_pixels", "coco_pixels", "lvis_images", "coco_images"])
        for c in classes:
            i = c["id"]
            out.writerow([i, c["name"], lvis_px[i] + coco_px[i], images[i], lvis_px[i], coco_px[i], lvis_img[i], coco_img[i]])


def write_classes(path: str | Path, classes: list) -> None:
    """classes.json: a JSON list, one class per line, ordered by id."""
    write_text(path, "[\n" + ",\n".join(json.dumps(c) for c in classes) + "\n]\n")


def build_split(coco, lvis, out, images_root=None, workers: int | None = None, order: str = "area",
                limit: int | None = None, progress: bool = True) -> dict:
    """Build one split into `out`; returns a summary (counts, skipped images by reason, timing).

    Images whose LVIS and COCO-Stuff sizes disagree are skipped and listed under
    `size_mismatch_messages`; every other kind of bad input raises InputError before
    anything is written. A re-run into the same `out` repaints only missing masks.
    """
    start = time.perf_counter()
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if limit is not None and limit < 0:
        raise ValueError("limit must be non-negative")
    workers = default_workers() if workers is None else max(1, int(workers))
    if images_root is not None and not Path(images_root).is_dir():
        raise InputError(images_root, "images root is not a directory")
    out = Path(out)
    with worker_pool(workers) as pool:
        inputs = read_inputs(coco, lvis, say=tqdm.write if progress else lambda line: None)
        plan = plan_build(inputs, limit)
        results, resumed = _write_masks(inputs, plan, out, order, pool, progress)
    report = _write_outputs(inputs, plan, out, order, limit, images_root, results, resumed)
    return {
        "out": str(out),
        "classes": len(inputs.classes),
        "images_written": len(plan.records),
        "images_painted": len(plan.records) - resumed,
        "images_resumed": resumed,
        "images_skipped": report["images_skipped"],
        "skipped_by_reason": report["skipped_by_reason"],
        "size_mismatch_messages": plan.size_mismatches,
        "degenerate_polygons": report["degenerate_polygons"],
        "workers": workers,
        "seconds": time.perf_counter() - start,
    }


def _write_masks(inputs: Inputs, plan: Plan, out: Path, order: str, pool, progress: bool):
    """Paint every planned mask not already finished by an earlier run; returns (results by id, resumed)."""
    masks_dir = out / "masks"
    masks_dir.mkdir(parents=True, exist_ok=True)
    for stale in masks_dir.glob(".*.png"):  # temporaries of a killed run
        stale.unlink(missing_ok=True)
    fingerprint = _fingerprint(inputs, order)
    journal_path = out / JOURNAL
    done = read_journal(journal_path, fingerprint)
    results = {i: r for i, r in done.items() if (masks_dir / mask_name(i)).exists()}
    pending = [rec for rec in plan.records if rec["id"] not in results]
    resumed = len(plan.records) - len(pending)
    with open(journal_path, "w", encoding="utf-8") as journal:
        journal.write(json.dumps({"fingerprint": fingerprint}) + "\n")
        for r in results.values():
            journal.write(json.dumps(r._asdict()) + "\n")
        journal.flush()
        with tqdm(total=len(plan.records), initial=resumed, unit="img", desc=f"masks {out.name}",
                  disable=not progress, dynamic_ncols=True) as bar:
            for r in run_tasks(mask_tasks(inputs, pending, masks_dir, order), pool):
                results[r.image_id] = r
                journal.write(json.dumps(r._asdict()) + "\n")
                journal.flush()
                bar.update()
    return results, resumed


def _write_outputs(inputs: Inputs, plan: Plan, out: Path, order: str, limit, images_root, results: dict,
                   resumed: int) -> dict:
    """classes.json, stats.csv, report.json, dataset.json, and last images.jsonl; returns the report."""
    skipped_total = sum(len(v) for v in plan.skipped.values())
    report = {
        "images_written": len(plan.records),
        "images_resumed": resumed,
        "images_skipped": skipped_total,
        "skipped_by_reason": {k: len(v) for k, v in plan.skipped.items()},
        "skipped": plan.skipped,
        "size_mismatches": plan.size_mismatches,
        "degenerate_polygons": inputs.things.degenerate_polygons + inputs.stuff.degenerate_polygons,
        "annotations_without_polygon": sorted(inputs.things.degenerate_annotations + inputs.stuff.degenerate_annotations,
                                              key=str),
        "coco_annotations_ignored": inputs.stuff.ignored,
        "coco_images_not_in_lvis": len(set(inputs.coco_images) - {img["id"] for img in inputs.lvis_images}),
    }
    meta = {
        "format": "cocolvis-build",
        "version": FORMAT_VERSION,
        "inputs": {"lvis": str(inputs.lvis_path), "coco": [str(p) for p in inputs.coco_paths]},
        "options": {"order": order, "limit": limit},
        "counts": {"classes": len(inputs.classes), "lvis_images": len(inputs.lvis_images),
                   "images_written": len(plan.records), "images_skipped": skipped_total},
    }
    if images_root is not None:
        meta["images_root"] = os.path.abspath(images_root)
    write_classes(out / "classes.json", inputs.classes)
    _write_stats(out / "stats.csv", inputs.classes, [results[rec["id"]] for rec in plan.records])
    write_json(out / "report.json", report)
    write_json(out / "dataset.json", meta)
    with atomic_open(out / "images.jsonl", "w", encoding="utf-8") as f:
        for rec in plan.records:
            f.write(json.dumps(rec) + "\n")
    return report
