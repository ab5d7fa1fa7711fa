"""The one-screen summary of a build: classes, images written and skipped, class frequencies."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cocolvis.dataset import SKIP_REASONS, BuiltDataset, read_stats
from segkit.io import read_json
from cocolvis.vocab import describe


def _table(title: str, rows, stats: dict, sources: list, total_pixels: int) -> list[str]:
    lines = [title, f"  {'id':>5}  {'name':<28} {'source':<6} {'images':>7} {'pixels':>12} {'share':>7}"]
    for r in rows:
        pixels = int(stats["pixels"][r])
        share = pixels / total_pixels if total_pixels else 0.0
        lines.append(f"  {stats['id'][r]:>5}  {str(stats['name'][r])[:28]:<28} {sources[r]:<6} "
                     f"{stats['images'][r]:>7} {pixels:>12} {share:>7.2%}")
    return lines


def summary_text(out: str | Path, top: int = 10) -> str:
    """Class count, images written and skipped, and the `top` most and least frequent classes.

    Frequency is the number of images a class appears in (ties: by pixels); the least
    frequent are taken among the classes that appear at all.
    """
    ds = BuiltDataset(out)
    report = read_json(ds.root / "report.json")
    stats = read_stats(ds.root / "stats.csv")
    sources = [c.get("source", "?") for c in ds.classes]
    total = int(stats["pixels"].sum())
    labeled = sum(r["height"] * r["width"] for r in ds.images)
    present = np.flatnonzero(stats["images"] > 0)
    present = present[np.lexsort((-stats["pixels"][present], -stats["images"][present]))]  # most frequent first

    lines = [f"{ds.root}: {describe(ds.classes)}",
             f"images: {report['images_written']} written ({report.get('images_resumed', 0)} already done), "
             f"{report['images_skipped']} skipped"]
    for reason, n in report.get("skipped_by_reason", {}).items():
        if n:
            lines.append(f"  skipped, {SKIP_REASONS.get(reason, reason)}: {n}")
    if report.get("degenerate_polygons"):
        lines.append(f"  degenerate polygons (under 3 points) skipped: {report['degenerate_polygons']}")
    if labeled:
        lines.append(f"pixels: {total / labeled:.1%} labeled ({stats['lvis_pixels'].sum() / labeled:.1%} by LVIS, "
                     f"{stats['coco_pixels'].sum() / labeled:.1%} by COCO-Stuff)")
    lines.append(f"classes present: {len(present)} of {ds.num_classes}")
    if len(present) and top:
        n = min(top, len(present))
        lines += [""] + _table(f"{n} most frequent classes", present[:n], stats, sources, total)
        lines += [""] + _table(f"{n} least frequent classes (of those present)", present[::-1][:n], stats, sources,
                               total)
    return "\n".join(lines)
