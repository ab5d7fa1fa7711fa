"""The one-screen summary of a build: classes, images written and skipped, class frequencies."""
from __future__ import annotations

from pathlib import Path

from cocolvis.dataset import SKIP_REASONS, BuiltDataset
from cocolvis.io import read_json
from cocolvis.vocab import describe


def _table(title: str, rows, total_pixels: int) -> list[str]:
    lines = [title, f"  {'id':>5}  {'name':<28} {'source':<6} {'images':>7} {'pixels':>12} {'share':>7}"]
    for cid, row in rows.iterrows():
        share = row.pixels / total_pixels if total_pixels else 0.0
        lines.append(f"  {cid:>5}  {row['name'][:28]:<28} {row.source:<6} {row.images:>7} {row.pixels:>12} {share:>7.2%}")
    return lines


def summary_text(out: str | Path, top: int = 10) -> str:
    """Class count, images written and skipped, and the `top` most and least frequent classes.

    Frequency is the number of images a class appears in (ties: by pixels); the least
    frequent are taken among the classes that appear at all.
    """
    ds = BuiltDataset(out)
    report = read_json(ds.root / "report.json")
    stats = ds.stats()
    stats["source"] = [c["source"] for c in ds.classes]
    total = int(stats.pixels.sum())
    labeled = sum(r["height"] * r["width"] for r in ds.images)
    present = stats[stats.images > 0].sort_values(["images", "pixels"], ascending=False)

    lines = [f"{ds.root}: {describe(ds.classes)}",
             f"images: {report['images_written']} written ({report.get('images_resumed', 0)} already done), "
             f"{report['images_skipped']} skipped"]
    for reason, n in report.get("skipped_by_reason", {}).items():
        if n:
            lines.append(f"  skipped, {SKIP_REASONS.get(reason, reason)}: {n}")
    if report.get("degenerate_polygons"):
        lines.append(f"  degenerate polygons (under 3 points) skipped: {report['degenerate_polygons']}")
    if labeled:
        lines.append(f"pixels: {total / labeled:.1%} labeled ({stats.lvis_pixels.sum() / labeled:.1%} by LVIS, "
                     f"{stats.coco_pixels.sum() / labeled:.1%} by COCO-Stuff)")
    lines.append(f"classes present: {len(present)} of {ds.num_classes}")
    if len(present):
        lines += [""] + _table(f"{min(top, len(present))} most frequent classes", present.head(top), total)
        lines += [""] + _table(f"{min(top, len(present))} least frequent classes (of those present)",
                               present.tail(top).iloc[::-1], total)
    return "\n".join(lines)
