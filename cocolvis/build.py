"""Build one split of the merged dataset from an LVIS file and COCO-Stuff stuff files.

The steps, each in its own module:
  1. `cocolvis.inputs` reads every input file and checks every value (nothing written);
  2. `cocolvis.plan` decides which images are written and which are skipped, and why;
  3. `cocolvis.outdir` claims --out for this build alone;
  4. `cocolvis.pool` hands a few images at a time to workers (`cocolvis.paint`), while
     `cocolvis.journal` records each finished mask so an interrupted build resumes;
  5. `cocolvis.dataset` writes the summary files, images.jsonl last.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from tqdm import tqdm

from cocolvis.dataset import mask_name, write_build
from cocolvis.inputs import Inputs, read_inputs
from segkit.io import InputError
from cocolvis.journal import JOURNAL, Journal, fingerprint, read_journal
from cocolvis.outdir import claim
from cocolvis.paint import ORDERS
from cocolvis.plan import Plan, mask_tasks, plan_build, report
from cocolvis.pool import default_workers, run_tasks, worker_pool
from segkit.outdir import check_out_path


def build_split(coco, lvis, out, images_root=None, workers: int | None = None, order: str = "area",
                limit: int | None = None, progress: bool = True, overwrite: bool = False) -> dict:
    """Build one split into `out`; returns a summary (counts, skipped images by reason, timing).

    Images whose LVIS and COCO-Stuff sizes disagree are skipped and listed under
    `size_mismatch_messages`; every other kind of bad input raises InputError before
    anything is written. A re-run into the same `out` repaints only missing masks; an
    `out` holding a build of other inputs or options is refused unless `overwrite`.
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
    check_out_path(out)
    with worker_pool(workers) as pool:
        inputs = read_inputs(coco, lvis, say=tqdm.write if progress else lambda line: None)
        plan = plan_build(inputs, limit)
        key = fingerprint([inputs.lvis_path, *inputs.coco_paths], inputs.digests, inputs.classes, order)
        with claim(out, key, overwrite):
            try:
                results, resumed = _write_masks(inputs, plan, out, order, key, pool, workers, progress)
                rep = report(inputs, plan, resumed)
                write_build(out, inputs.classes, plan.records, [results[rec["id"]] for rec in plan.records], rep,
                            _meta(inputs, plan, order, limit, images_root, key))
            except OSError as e:  # a full disk, a file system gone read-only...
                raise InputError(e.filename or out, f"cannot write: {e.strerror or e}") from None
    return {
        "out": str(out),
        "classes": len(inputs.classes),
        "images_written": len(plan.records),
        "images_painted": len(plan.records) - resumed,
        "images_resumed": resumed,
        "images_skipped": rep["images_skipped"],
        "skipped_by_reason": rep["skipped_by_reason"],
        "size_mismatch_messages": plan.size_mismatches,
        "degenerate_polygons": rep["degenerate_polygons"],
        "workers": workers,
        "seconds": time.perf_counter() - start,
    }


def _write_masks(inputs: Inputs, plan: Plan, out: Path, order: str, key: str, pool, workers: int, progress: bool):
    """Paint every planned mask not already finished by an earlier run; returns (results by id, resumed)."""
    masks_dir = out / "masks"
    masks_dir.mkdir(exist_ok=True)
    done = read_journal(out / JOURNAL, key)
    existing = set(os.listdir(masks_dir)) if done else set()
    results = {i: r for i, r in done.items() if mask_name(i) in existing}
    pending = [rec for rec in plan.records if rec["id"] not in results]
    resumed = len(plan.records) - len(pending)
    with Journal(out / JOURNAL, key, results.values()) as journal, \
            tqdm(total=len(plan.records), initial=resumed, unit="img", desc=f"masks {out.name}",
                 disable=not progress, dynamic_ncols=True) as bar:
        for r in run_tasks(mask_tasks(inputs, pending, masks_dir, order), pool, workers):
            results[r.image_id] = r
            journal.add(r)
            bar.update()
    return results, resumed


def _meta(inputs: Inputs, plan: Plan, order: str, limit, images_root, key: str) -> dict:
    """dataset.json's fields (the format and version are added by the writer)."""
    meta = {
        "fingerprint": key,
        "inputs": {"lvis": str(inputs.lvis_path), "coco": [str(p) for p in inputs.coco_paths]},
        "options": {"order": order, "limit": limit},
        "counts": {"classes": len(inputs.classes), "lvis_images": len(inputs.lvis_images),
                   "images_written": len(plan.records),
                   "images_skipped": sum(len(v) for v in plan.skipped.values())},
    }
    if images_root is not None:
        meta["images_root"] = os.path.abspath(images_root)
    return meta
