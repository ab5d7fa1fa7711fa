"""`bench compare`: evaluated runs side by side by class group, and which run wins each group.

The group mIoUs (bench.definitions.GROUP_DEFINITION) are computed here for `bench study`
too: from each evaluation's confusion matrix with ess.metrics.per_class_iou, against the
class frequencies and LVIS groups of the training build.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from bench.definitions import GROUP_DEFINITION, TOP
from bench.report import files_section, fmt, markdown_table, save_table, write_summary
from bench.tables import (GROUP_COLUMNS, ROW_COLUMNS, evaluation_rows, read_class_stats, read_eval, run_labels,
                          training_data)
from segkit.io import InputError

GROUP_NAMES = {"miou": "all classes", "miou_top50": f"the {TOP} most frequent classes", "miou_tail": "the tail",
               "miou_lvis_f": "LVIS frequent", "miou_lvis_c": "LVIS common", "miou_lvis_r": "LVIS rare",
               "miou_stuff": "stuff", "pixel_acc": "pixel accuracy"}


def winners(table: pd.DataFrame) -> pd.DataFrame:
    """Per group column: the best run, its value, the runner-up's, the difference and the ratio."""
    rows = []
    for column in (*GROUP_COLUMNS, "pixel_acc"):
        values = table.set_index("run")[column].astype(float).dropna().sort_values(ascending=False, kind="stable")
        if len(values) < 2:
            rows.append({"group": column, "winner": None, "best": np.nan, "runner_up": np.nan})
            continue
        tie = values.iloc[0] == values.iloc[1]
        rows.append({"group": column, "winner": "tie" if tie else values.index[0], "best": values.iloc[0],
                     "runner_up": values.iloc[1]})
    out = pd.DataFrame(rows)
    out["difference"] = out["best"] - out["runner_up"]
    out["ratio"] = out["best"] / out["runner_up"].where(out["runner_up"] > 0)
    return out


def margin(best: float, runner_up: float, difference: float, ratio: float) -> str:
    """'best vs runner-up (+difference, ratio x)', the ratio left out where there is none."""
    times = f", {ratio:.2f}x" if not math.isnan(ratio) else ""
    return f"{fmt(best)} vs {fmt(runner_up)} (+{fmt(difference, 3)}{times})"


def winner_lines(wins: pd.DataFrame) -> list[str]:
    """Plain sentences: who won overall, by how much, and on which classes."""
    lines = []
    for r in wins.itertuples():
        what = GROUP_NAMES[r.group]
        if not isinstance(r.winner, str):  # None (pandas may hold it as NaN)
            lines.append(f"- {what} ({r.group}): no comparison (fewer than two runs have these classes)")
        elif r.winner == "tie":
            lines.append(f"- {what} ({r.group}): a tie at {fmt(r.best)}")
        else:
            lines.append(f"- {what} ({r.group}): **{r.winner}** {margin(r.best, r.runner_up, r.difference, r.ratio)}")
    return lines


def headline(wins: pd.DataFrame) -> str:
    overall = wins.set_index("group").loc["miou"]
    if not isinstance(overall["winner"], str):
        return "No run wins on mIoU."
    if overall["winner"] == "tie":
        return f"A tie on mIoU ({fmt(overall['best'])})."
    decided = wins[wins["group"].isin(GROUP_COLUMNS) & wins["winner"].map(lambda w: isinstance(w, str) and w != "tie")]
    won = decided[decided["winner"] == overall["winner"]]["group"].map(GROUP_NAMES).tolist()
    lost = decided[decided["winner"] != overall["winner"]]
    lost_text = ("; it loses on " + ", ".join(f"{GROUP_NAMES[g]} (to {w})" for g, w in zip(lost["group"], lost["winner"]))
                 if len(lost) else "")
    mi = margin(overall["best"], overall["runner_up"], overall["difference"], overall["ratio"])
    return f"Winner: **{overall['winner']}**, mIoU {mi}; it wins on {', '.join(won)}{lost_text}."


def run_compare(evals: list[str | Path], out: str | Path, data: str | Path | None = None,
                echo: bool = True) -> dict[str, Path]:
    """Compute the group table of the evaluations, then write compare.csv, winners.csv and summary.md."""
    if len(evals) < 2:
        raise InputError(None, "give at least two --eval directories to compare")
    evs = [read_eval(e) for e in evals]
    if data is None:
        found = {training_data(ev) for ev in evs}
        if len(found) > 1:
            raise InputError(evs[0]["dir"] / "metrics.json", "the runs were trained on different data: pass --data")
        data = found.pop()
    data, out = Path(data), Path(out)
    stats = read_class_stats(data)
    labels = run_labels(evs)
    table, _ = evaluation_rows(dict(zip(labels, evs)), stats, data / "stats.csv")
    wins = winners(table)

    out.mkdir(parents=True, exist_ok=True)
    paths = {"compare.csv": save_table(table, out / "compare.csv"), "winners.csv": save_table(wins, out / "winners.csv")}
    shown = table.set_index("run")[[*GROUP_COLUMNS, "pixel_acc", "classes_present", "iters", "train_seconds"]].T
    shown = shown.rename_axis("metric").reset_index()
    text = "\n".join([
        f"# Comparison of {', '.join(labels)} (classes of `{data}`)",
        "",
        headline(wins),
        "",
        markdown_table(shown),
        "",
        "Best run per group (difference to the runner-up, and their ratio):",
        "",
        *winner_lines(wins),
        "",
        "Groups: " + GROUP_DEFINITION,
        "",
        files_section(out, {"compare.csv": "one row per run: " + ", ".join(ROW_COLUMNS),
                            "winners.csv": "per group: winner, best, runner_up, difference, ratio"}),
    ])
    paths["summary.md"] = write_summary(out, text, echo=echo)
    return paths
