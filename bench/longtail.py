"""`bench longtail`: how unevenly pixels and images spread over the merged classes.

Reads a build's `stats.csv` and `classes.json` only (no masks), so it runs in seconds
on the full COCO+LVIS train split.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bench.report import (files_section, markdown_table, new_figure, plain_log_ticks, plural,
                          save_figure, save_table, write_summary)
from bench.definitions import GROUP_COLORS, GROUPS, SOURCES
from bench.tables import frequency_order, read_class_stats
from segkit.io import InputError


def ranked_classes(df: pd.DataFrame) -> pd.DataFrame:
    """The long-tail table: classes most frequent (by images) first, with rank and ratios."""
    ranked = frequency_order(df, "images")
    total_pixels = int(df["pixels"].sum())
    out = ranked[["name", "source", "group", "images", "pixels"]].copy()
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    out["pixel_ratio"] = out["pixels"] / total_pixels if total_pixels else 0.0
    return out.rename_axis("id").reset_index()[["rank", "id", "name", "source", "group", "images", "pixels", "pixel_ratio"]]


def group_counts(df: pd.DataFrame) -> pd.DataFrame:
    """How many merged classes fall in each frequency group and source, with totals."""
    table = pd.crosstab(df["group"], df["source"]).reindex(index=list(GROUPS), columns=SOURCES, fill_value=0)
    table["total"] = table.sum(axis=1)
    table.loc["total"] = table.sum(axis=0)
    table.index.name = "group"
    table.columns.name = None
    return table.reset_index()


def overlap_images(df: pd.DataFrame, stats_path: Path) -> pd.DataFrame:
    """For every class that is both a COCO stuff class and an LVIS class: where its pixels came from.

    `images` counts the images where the class is in the final mask, `lvis_images` and
    `coco_images` those where each source contributed pixels to it, so by inclusion-exclusion
    both = lvis_images + coco_images - images.
    """
    both = df[df["source"] == "both"]
    rows = []
    for cid, r in both.iterrows():
        shared = int(r["lvis_images"] + r["coco_images"] - r["images"])
        stuff_only, lvis_only = int(r["coco_images"]) - shared, int(r["lvis_images"]) - shared
        if min(shared, stuff_only, lvis_only) < 0:
            raise InputError(stats_path, f"class {cid} ({r['name']}): lvis_images={r['lvis_images']} and "
                             f"coco_images={r['coco_images']} are inconsistent with images={r['images']}")
        rows.append({"id": int(cid), "name": r["name"], "images": int(r["images"]), "stuff_only": stuff_only,
                     "lvis_only": lvis_only, "both": shared, "coco_pixels": int(r["coco_pixels"]),
                     "lvis_pixels": int(r["lvis_pixels"])})
    columns = ["id", "name", "images", "stuff_only", "lvis_only", "both", "coco_pixels", "lvis_pixels"]
    return pd.DataFrame(rows, columns=columns)


def plot_longtail(ranked: pd.DataFrame, title: str):
    fig = new_figure(11, 4.5)
    ax = fig.add_subplot()
    shown = ranked[ranked["images"] > 0]
    x = shown["rank"].to_numpy()
    colors = shown["group"].map(GROUP_COLORS).to_numpy()
    ax.bar(x, shown["images"].to_numpy(), width=1.0, color=colors, linewidth=0)
    ax.set_yscale("log")
    plain_log_ticks(ax.yaxis)
    ax.set_ylim(bottom=0.5)  # classes in a single image still show as a bar
    ax.set_xlim(0.5, max(len(ranked), 1) + 0.5)
    ax.set_xlabel("class rank (most images first)")
    ax.set_ylabel("images containing the class")
    ax.set_title(title)
    from matplotlib.patches import Patch

    counts = ranked["group"].value_counts()
    handles = [Patch(color=GROUP_COLORS[g], label=f"{GROUPS[g]}: {plural(int(counts.get(g, 0)), 'class')}")
               for g in GROUPS]
    ax.legend(handles=handles, loc="upper right", fontsize=9)
    return fig


def plot_wordcloud(ranked: pd.DataFrame, stats_path: Path, width: int = 1600, height: int = 800):
    """Class names sized by their share of labelled pixels; the font ships with matplotlib."""
    from matplotlib import font_manager
    from wordcloud import WordCloud

    weights = {r.name: float(r.pixel_ratio) for r in ranked.itertuples() if r.pixels > 0}
    if not weights:
        raise InputError(stats_path, "no class has any pixels: nothing to draw")
    cloud = WordCloud(font_path=font_manager.findfont("DejaVu Sans"), width=width, height=height,
                      background_color="white", max_words=len(weights), random_state=0, relative_scaling=0.5,
                      min_font_size=4, collocations=False).generate_from_frequencies(weights)
    fig = new_figure(width / 100, height / 100)
    ax = fig.add_subplot()
    ax.imshow(cloud.to_array(), interpolation="bilinear")
    ax.set_axis_off()
    return fig


def plot_overlaps(overlaps: pd.DataFrame):
    fig = new_figure(8, 0.45 * max(len(overlaps), 1) + 1.5)
    ax = fig.add_subplot()
    y = np.arange(len(overlaps))
    left = np.zeros(len(overlaps))
    for col, color, label in [("stuff_only", "#7f7f7f", "stuff only"), ("both", "#9467bd", "both"),
                              ("lvis_only", "#1f77b4", "LVIS only")]:
        values = overlaps[col].to_numpy(dtype=float)
        ax.barh(y, values, left=left, color=color, label=label)
        left += values
    ax.set_yticks(y, overlaps["name"].tolist())
    ax.invert_yaxis()
    ax.set_xlabel("images")
    ax.set_title("Classes that are both COCO stuff and LVIS: where their pixels came from")
    ax.legend(loc="lower right", fontsize=9)
    return fig


def longtail_summary(data: Path, out: Path, df: pd.DataFrame, ranked: pd.DataFrame, groups: pd.DataFrame,
                     overlaps: pd.DataFrame) -> str:
    present = ranked[ranked["images"] > 0]
    top, bottom = present.head(1), present.tail(1)
    head_share = ranked["pixels"].head(max(len(ranked) // 10, 1)).sum() / max(ranked["pixels"].sum(), 1)
    lines = [
        f"# Long tail of `{data}`",
        "",
        f"{plural(len(df), 'class')}; {len(present):,} appear in at least one image, {len(df) - len(present):,} in none "
        f"(left off the log-scale plot).",
    ]
    if len(present):
        lines.append(
            f"Most frequent: {top['name'].iloc[0]} ({plural(int(top['images'].iloc[0]), 'image')}); least frequent "
            f"present: {bottom['name'].iloc[0]} ({plural(int(bottom['images'].iloc[0]), 'image')}); ratio "
            f"{int(top['images'].iloc[0]) / int(bottom['images'].iloc[0]):,.0f}:1.")
    lines += [
        f"The 10% most frequent classes (by images) hold {head_share:.1%} of the labelled pixels.",
        "",
        "## Classes per LVIS frequency group and source",
        "",
        "Group r/c/f is LVIS's own (by LVIS train images); stuff-only classes have none.",
        "",
        markdown_table(groups),
        "",
        "## Classes that are both stuff and thing: images by pixel source",
        "",
        "stuff_only + both = coco_images, lvis_only + both = lvis_images, all three = images (from stats.csv).",
        "",
        markdown_table(overlaps[["id", "name", "images", "stuff_only", "lvis_only", "both"]]) if len(overlaps)
        else "No class is both a COCO stuff class and an LVIS class in this build.",
        "",
        files_section(out, {
            "longtail.csv": "one row per class, most images first: rank, id, name, source, group, images, pixels, "
                            "pixel_ratio (share of all labelled pixels)",
            "longtail.png": "images per class by rank, log y axis, bars coloured by LVIS frequency group",
            "wordcloud.png": "class names sized by pixel ratio",
            "groups.csv": "the frequency group x source table above",
            "overlaps.csv": "the stuff/thing overlap table above, with pixel counts per source",
            "overlaps.png": "the same as stacked bars",
        }),
    ]
    return "\n".join(lines)


def run_longtail(data: str | Path, out: str | Path, echo: bool = True) -> dict[str, Path]:
    """Write the long-tail tables, figures and summary of one build into `out`."""
    data, out = Path(data), Path(out)
    df = read_class_stats(data)
    stats_path = data / "stats.csv"
    ranked = ranked_classes(df)
    groups = group_counts(df)
    overlaps = overlap_images(df, stats_path)

    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "longtail.csv": save_table(ranked, out / "longtail.csv"),
        "groups.csv": save_table(groups, out / "groups.csv"),
        "overlaps.csv": save_table(overlaps, out / "overlaps.csv"),
    }
    paths["longtail.png"] = save_figure(plot_longtail(ranked, f"Images per class, {data.name} ({len(df)} classes)"),
                                        out / "longtail.png")
    paths["wordcloud.png"] = save_figure(plot_wordcloud(ranked, stats_path), out / "wordcloud.png", dpi=100)
    paths["overlaps.png"] = save_figure(plot_overlaps(overlaps), out / "overlaps.png")

    text = longtail_summary(data, out, df, ranked, groups, overlaps)
    paths["summary.md"] = write_summary(out, text, echo=echo)
    return paths
