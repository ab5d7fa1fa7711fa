"""`bench topn-miou`: mIoU over the n most frequent classes, for every n from 1 to C.

A head that only learns the frequent classes has a curve that starts high and sinks as
rare classes join the mean; the curve shows where along the tail each head gives way.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bench.definitions import TOPN_DEFINITION
from bench.tables import frequency_order, read_class_stats, read_eval, run_labels, training_data
from bench.report import (files_section, fmt, markdown_table, new_figure, plain_log_ticks, save_figure, save_table,
                          write_summary)
from segkit.io import InputError
from ess.metrics import per_class_iou


def topn_miou(iou: np.ndarray, order: np.ndarray) -> np.ndarray:
    """mIoU over the first n classes of `order` (0-based indices), for n = 1..C, skipping NaN IoUs."""
    ranked = iou[order]
    present = ~np.isnan(ranked)
    total = np.cumsum(np.where(present, ranked, 0.0))
    count = np.cumsum(present)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def topn_table(stats: pd.DataFrame, by: str, ious: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per n: the n-th most frequent class, and per label its IoU and the mIoU over the top n."""
    ordered = frequency_order(stats, by)
    order = ordered.index.to_numpy() - 1
    table = pd.DataFrame({"n": np.arange(1, len(stats) + 1), "id": ordered.index.to_numpy(),
                          "name": ordered["name"].to_numpy(), f"train_{by}": ordered[by].to_numpy()})
    for label, iou in ious.items():
        table[f"iou_{label}"] = iou[order]
        table[f"miou_{label}"] = topn_miou(iou, order)
    return table


def plot_topn(table: pd.DataFrame, labels: list[str], by: str, title: str):
    """The curves miou_<label> of a top-n table against n (log x axis), one per label."""
    num_classes = len(table)
    fig = new_figure(8, 4.5)
    ax = fig.add_subplot()
    for label in labels:
        ax.plot(table["n"], table[f"miou_{label}"], label=label, linewidth=1.8)
    ax.set_xscale("log")
    plain_log_ticks(ax.xaxis)
    ax.set_xlim(1, max(num_classes, 2))
    ax.set_ylim(bottom=0)
    ax.set_xlabel(f"n (the n most frequent classes by training {by})")
    ax.set_ylabel("mIoU over the top n classes")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


def milestones(num_classes: int) -> list[int]:
    ns = [n for n in (1, 10, 20, 50, 100, 200, 500, 1000) if n < num_classes]
    return ns + [num_classes]


def topn_summary(data: Path, out: Path, by: str, table: pd.DataFrame, labels: list[str], evs: list[dict],
                 ious: list[np.ndarray]) -> str:
    num_classes = len(table)
    ns = milestones(num_classes)
    rows = table.set_index("n").loc[ns, [f"miou_{label}" for label in labels]].reset_index()
    rows.columns = ["n"] + [f"mIoU@n {label}" for label in labels]
    checks = []
    for label, ev, iou in zip(labels, evs, ious):
        recorded = ev["metrics"].get("miou")
        checks.append(f"- {label} (`{ev['dir']}`): mIoU@C = {fmt(table[f'miou_{label}'].iloc[-1])}, metrics.json miou = "
                      f"{fmt(recorded)}; {int((~np.isnan(iou)).sum())} of {num_classes} classes present")
    return "\n".join([
        f"# Top-n mIoU, classes ordered by training {by} of `{data}`",
        "",
        "Definition: " + TOPN_DEFINITION,
        "",
        markdown_table(rows),
        "",
        *checks,
        "",
        files_section(out, {
            "topn_miou.csv": f"one row per n: n, the n-th class (id, name, train_{by}), and per run its IoU "
                             "(iou_<run>) and the mIoU over the top n (miou_<run>)",
            "topn_miou.png": "mIoU over the top n classes against n (log x axis), one curve per run",
        }),
    ])


def run_topn(evals: list[str | Path], out: str | Path, data: str | Path | None = None, by: str = "pixels",
             echo: bool = True) -> dict[str, Path]:
    """Write the top-n mIoU table, plot and summary of one or more evaluations into `out`."""
    if by not in ("pixels", "images"):
        raise ValueError(f"by must be 'pixels' or 'images', got {by!r}")
    if not evals:
        raise InputError(None, "give at least one --eval directory")
    evs = [read_eval(e) for e in evals]
    if data is None:
        found = {training_data(ev) for ev in evs}
        if len(found) > 1:
            raise InputError(evs[0]["dir"] / "metrics.json",
                             f"the runs were trained on different data ({', '.join(map(str, sorted(found)))}): pass --data")
        data = found.pop()
    data, out = Path(data), Path(out)
    stats = read_class_stats(data)
    num_classes = len(stats)
    for ev in evs:
        if ev["confusion"].shape[0] != num_classes:
            raise InputError(ev["dir"] / "confusion.npz", f"{ev['confusion'].shape[0]} classes, but {data / 'stats.csv'} "
                             f"has {num_classes}")
    labels = run_labels(evs)
    ious = [per_class_iou(ev["confusion"]) for ev in evs]
    table = topn_table(stats, by, dict(zip(labels, ious)))

    out.mkdir(parents=True, exist_ok=True)
    paths = {"topn_miou.csv": save_table(table, out / "topn_miou.csv")}

    title = f"Top-n mIoU, {num_classes} classes ordered by {data.name} {by}"
    paths["topn_miou.png"] = save_figure(plot_topn(table, labels, by, title), out / "topn_miou.png")

    text = topn_summary(data, out, by, table, labels, evs, ious)
    paths["summary.md"] = write_summary(out, text, echo=echo)
    return paths
