"""Plan a build: which LVIS images are written and which are skipped, and why; the workers' tasks."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from cocolvis.dataset import SKIP_REASONS, image_record
from cocolvis.inputs import Inputs, image_file
from cocolvis.paint import MaskTask


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
        records.append(image_record(img, image_file(img, inputs.lvis_path)))
    return Plan(records, skipped, mismatches)


def mask_tasks(inputs: Inputs, records: Iterable[dict], masks_dir: Path, order: str) -> Iterator[MaskTask]:
    """One task per image, made lazily so only the images in flight are copied to workers."""
    for rec in records:
        image_id = rec["id"]
        coco = inputs.coco_images.get(image_id)
        yield MaskTask(str(masks_dir), image_id, rec["height"], rec["width"],
                       inputs.stuff.by_image.get(image_id, []), inputs.things.by_image.get(image_id, []), order,
                       str(inputs.lvis_path), str(coco[1]) if coco else "")


def report(inputs: Inputs, plan: Plan, resumed: int) -> dict:
    """report.json: what was written, resumed and skipped, and what the inputs held that was dropped."""
    return {
        "images_written": len(plan.records),
        "images_resumed": resumed,
        "images_skipped": sum(len(v) for v in plan.skipped.values()),
        "skipped_by_reason": {k: len(v) for k, v in plan.skipped.items()},
        "skipped": plan.skipped,
        "size_mismatches": plan.size_mismatches,
        "degenerate_polygons": inputs.things.degenerate_polygons + inputs.stuff.degenerate_polygons,
        "annotations_without_polygon": sorted(inputs.things.degenerate_annotations + inputs.stuff.degenerate_annotations,
                                              key=str),
        "coco_annotations_ignored": inputs.stuff.ignored,
        "coco_images_not_in_lvis": len(set(inputs.coco_images) - {img["id"] for img in inputs.lvis_images}),
    }
