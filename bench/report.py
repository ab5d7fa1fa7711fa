"""Write what every bench command produces: CSV tables, PNG figures and `summary.md`.

All files are written atomically, so an interrupted command never leaves a
truncated CSV or PNG under its final name. Figures are plain
`matplotlib.figure.Figure` objects (no pyplot state), so nothing needs a display.
"""
from __future__ import annotations

import math
import numbers
from pathlib import Path

import click
import pandas as pd
from matplotlib.figure import Figure

from segkit.io import atomic_path, write_text

SUMMARY = "summary.md"


def new_figure(width: float, height: float, **kwargs) -> Figure:
    """A figure detached from pyplot: safe on a machine with no screen, freed when dropped."""
    return Figure(figsize=(width, height), layout="constrained", **kwargs)


def plain_log_ticks(axis) -> None:
    """Label a log axis 1, 10, 100 rather than 10^0, 10^1, 10^2."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def save_table(df: pd.DataFrame, path: str | Path, index: bool = False) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".csv") as tmp:
        df.to_csv(tmp, index=index, lineterminator="\n")
    return path


def write_summary(out: str | Path, text: str, echo: bool = True, name: str = SUMMARY) -> Path:
    """Write `OUT/summary.md` (or OUT/name) and print it: every command ends with this."""
    path = Path(out) / name
    write_text(path, text.rstrip() + "\n")
    if echo:
        click.echo(text.rstrip())
    return path


def fmt(value, digits: int = 4) -> str:
    """A number as it reads best in a markdown table: ints plain, floats to `digits` significant digits."""
    if value is None or (isinstance(value, numbers.Real) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    return f"{float(value):.{digits}g}"


# Columns that hold identifiers or positions: no thousands separators.
PLAIN = {"id", "n", "C", "cluster", "position", "rank"}


def markdown_table(df: pd.DataFrame, digits: int = 4) -> str:
    """A DataFrame as a GitHub markdown table (no extra dependency)."""
    header = [str(c) for c in df.columns]
    plain = [h in PLAIN for h in header]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for row in df.itertuples(index=False):
        cells = [v if isinstance(v, str) else str(int(v)) if p and isinstance(v, numbers.Integral) else fmt(v, digits)
                 for v, p in zip(row, plain)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plural(count: int, noun: str) -> str:
    """'1 class', '2 classes', '1,284 images'."""
    suffix = "es" if noun.endswith(("s", "x", "ch", "sh")) else "s"
    return f"{count:,} {noun}{'' if count == 1 else suffix}"


def files_section(out: str | Path, files: dict[str, str]) -> str:
    """The 'Files' list of a summary: name -> what it holds, paths given relative to OUT."""
    lines = [f"## Files (in `{out}`)", ""]
    lines += [f"- `{name}`: {what}" for name, what in files.items()]
    return "\n".join(lines)
