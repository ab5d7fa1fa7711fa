"""`bench study`: the softmax and ESS heads and the variants of ESS, trained and evaluated alike, at several budgets.

A study is a grid of cells (variant, iterations, seed). Every cell is one run directory
OUT/runs/iters<N>/seed<S>/<variant>, trained with `ess.train.train` from the same resolved
configuration (data, batch, crop, schedule), with its own full schedule of N iterations and seed S,
changed only in the variant's options (ess.variants), and evaluated on the validation build with
`ess.evaluate.evaluate_run` at its last checkpoint; an ESS cell is also evaluated with the
pixel-mean readout (ess.readout), whose mIoU is `miou_proto_readout`. Then, from the files alone:

    OUT/iters<N>/study.csv      one row per (variant, seed) at N iterations (STUDY_COLUMNS)
    OUT/iters<N>/study.md       the table beside the paper's figures, and each claim checked per seed
    OUT/iters<N>/topn_miou.csv/.png, learning_curve.csv/.png
    OUT/budget.csv              every cell: group mIoUs and its ratios to softmax at the same budget and seed
    OUT/budget.png              mIoU (overall, top-50, tail) and the ratio to softmax against iterations
    OUT/study.md                the budget table, at which budget each ESS variant reaches softmax, the claims

The report covers every evaluated cell in OUT, so a second seed at the largest budget is a second
`bench study --iters N --seeds 1 --resume` into the same OUT. A study that stops (Ctrl-C, a crash, a
lost machine) continues with `--resume`: evaluated cells are kept as they are, a partly trained one
continues from its RUN/last.pt exactly as `ess train --resume`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import pandas as pd

from bench.definitions import GROUP_DEFINITION
from bench.report import files_section, fmt, markdown_table, new_figure, save_figure, save_table, write_summary
from bench.tables import ROW_COLUMNS, evaluation_rows, read_class_stats, read_csv_log, read_eval
from bench.topn import plot_topn, topn_table
from ess import config as cfg
from ess.config import eval_dir
from ess.variants import VARIANTS
from ess.variants import parse as parse_variants
from segkit.io import InputError, read_json

STUDY_COLUMNS = ("variant", "seed", *ROW_COLUMNS[1:], "miou_proto_readout")
BUDGET_COLUMNS = ("variant", "iters", "seed", "miou", "miou_top50", "miou_tail", "miou_proto_readout", "pixel_acc",
                  "ratio_miou", "ratio_top50", "ratio_tail")
CHECKPOINT = "last"  # every cell is evaluated after its full schedule
CURVE_POINTS = 10  # validations per run at most: val_every grows with the budget (see cell_config)
SHARED = "study.yaml"  # OUT's shared configuration: every cell's, but for iters, seed and val_every
PER_CELL = ("iters", "seed", "val_every")

# The published results on COCO+LVIS (mIoU, %), for direction only: this study runs far smaller.
PAPER = {
    "softmax": "about 1/3 of ESS",
    "ess": "about 3x softmax; above every ablation",
    "ess-random": "0.5",
    "ess-no-norm": "4.15",
    "ess-no-reg": "3.9",
}


@dataclass(frozen=True)
class Cell:
    """One training run of the study: a variant trained for `iters` iterations from `seed`."""
    variant: str
    iters: int
    seed: int

    def run(self, out: Path) -> Path:
        return out / "runs" / f"iters{self.iters}" / f"seed{self.seed}" / self.variant

    @property
    def readouts(self) -> tuple[str, ...]:
        """The evaluations the cell needs: the learned class embeddings, and for ESS the pixel-mean readout."""
        return ("learned", "pixel-mean") if VARIANTS[self.variant].options["head"] == "ess" else ("learned",)


def evaluated(run: Path, cell: Cell) -> bool:
    return all((eval_dir(run, r) / "metrics.json").exists() for r in cell.readouts)


# --- configuration ------------------------------------------------------------------------------------------

def parse_counts(text: str | None, flag: str) -> list[int] | None:
    """Comma-separated positive integers (None: not given), in the order given, without repeats."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(None, f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < (1 if flag == "--iters" else 0):
        raise InputError(None, f"{flag}: expected {'positive' if flag == '--iters' else 'non-negative'} integers, "
                               f"got {text!r}")
    return list(dict.fromkeys(values))


def shared_config(data: Path, val_data: Path, preset: str | None, config_file: Path | None):
    """The configuration every cell starts from (ess.config.resolve of the preset and the YAML file)."""
    return cfg.resolve(preset, config_file, {"data": str(data), "val_data": str(val_data)})


def cell_config(base, cell: Cell):
    """A cell's resolved configuration: the shared one, the variant's options, its budget and seed.

    A cell validates at most CURVE_POINTS times, and never more often than the shared val_every (0: never):
    validation costs the same at every budget, so a fixed interval would weigh on the large ones.
    """
    config = base.updated(VARIANTS[cell.variant].options, f"variant {cell.variant}")
    every = base.train.val_every and max(base.train.val_every, math.ceil(cell.iters / CURVE_POINTS))
    config = config.updated({"iters": cell.iters, "seed": cell.seed, "val_every": every}, "command line")
    cfg.check_for_training(config, f"variant {cell.variant}")
    return config


def shared_settings(base) -> dict:
    return {k: v for k, v in base.to_dict().items() if k not in PER_CELL}


def claim_out(out: Path, base, resume: bool) -> None:
    """Record OUT's shared configuration, or check that a resumed study keeps it."""
    path, wanted = out / SHARED, shared_settings(base)
    if path.exists():
        if not resume:
            raise InputError(out, "already holds a study: pass --resume to continue or extend it, or choose "
                                  "another --out")
        saved = cfg.load(path).to_dict()
        changed = [k for k in wanted if k != "images_root" and saved.get(k) != wanted[k]]
        if changed:
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted[k]!r}" for k in changed[:4])
            raise InputError(path, f"this study was started with other settings ({detail}); resume with the same "
                                   "options, or start the study in another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(base, path)


def check_same_config(config, run: Path) -> None:
    """A resumed cell must continue with the configuration it started with."""
    path = run / "config.yaml"
    saved, wanted = cfg.load(path).to_dict(), config.to_dict()
    if wanted.get("images_root") is None:
        saved.pop("images_root", None)  # training records the root it used
        wanted.pop("images_root", None)
    changed = [k for k in wanted if saved.get(k) != wanted[k]]
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted[k]!r}" for k in changed[:4])
        raise InputError(path, f"this run was started with other settings ({detail}); resume with the same "
                               "options, or start the study in another --out")


# --- training and evaluation ---------------------------------------------------------------------------------

def run_cell(cell: Cell, config, run: Path, progress: bool = True) -> None:
    """Train (or continue training) one cell and evaluate its last checkpoint, skipping what is done."""
    from ess.evaluate import evaluate_run
    from ess.train import train

    if not (run / "eval" / "metrics.json").exists():  # written last, once training had finished
        train(config, run, resume=(run / "last.pt").exists(), progress=progress)
    for readout in cell.readouts:
        if not (eval_dir(run, readout) / "metrics.json").exists():
            evaluate_run(run, config.train.val_data, images_root=config.train.images_root, checkpoint=CHECKPOINT,
                         device=config.train.device, progress=progress, readout=readout)


def run_cells(cells: list[Cell], base, out: Path, progress: bool = True, echo: bool = True) -> None:
    """Every cell into its run directory, smallest budget first."""
    for i, cell in enumerate(cells, 1):
        run, config = cell.run(out), cell_config(base, cell)
        if (run / "config.yaml").exists():
            check_same_config(config, run)
        if echo:
            state = "evaluated, kept" if evaluated(run, cell) else (
                "continuing" if (run / "last.pt").exists() else "training")
            click.echo(f"[{i}/{len(cells)}] {cell.variant}, {cell.iters} iterations, seed {cell.seed}: {state} -> {run}")
        run_cell(cell, config, run, progress=progress)


def found_cells(out: Path) -> list[Cell]:
    """Every evaluated cell under OUT/runs, by budget, seed and registry order of the variants."""
    cells = []
    for run in (out / "runs").glob("iters*/seed*/*"):
        iters, seed, variant = run.parent.parent.name[5:], run.parent.name[4:], run.name
        if iters.isdigit() and seed.isdigit() and variant in VARIANTS:
            cell = Cell(variant, int(iters), int(seed))
            if evaluated(run, cell):
                cells.append(cell)
    order = list(VARIANTS)
    return sorted(cells, key=lambda c: (c.iters, c.seed, order.index(c.variant)))


# --- tables ----------------------------------------------------------------------------------------------------

def cell_rows(out: Path, data: Path, stats: pd.DataFrame, cells: list[Cell]) -> tuple[pd.DataFrame, dict]:
    """One row per cell (STUDY_COLUMNS plus iters), and the learned readout's per-class IoU of each."""
    runs = {cell: cell.run(out) for cell in cells}
    evals = {cell: read_eval(eval_dir(run, "learned")) for cell, run in runs.items()}
    rows, ious = evaluation_rows(evals, stats, Path(data) / "stats.csv")
    proto = [read_json(eval_dir(runs[c], "pixel-mean") / "metrics.json")["miou"] if "pixel-mean" in c.readouts
             else None for c in cells]
    rows = rows.assign(variant=[c.variant for c in cells], seed=[c.seed for c in cells],
                       iters=[c.iters for c in cells], miou_proto_readout=pd.Series(proto, dtype=float))
    return rows, ious


def budget_table(rows: pd.DataFrame) -> pd.DataFrame:
    """BUDGET_COLUMNS: every cell, with its ratios to softmax's cell at the same budget and seed."""
    table = rows.copy()
    softmax = table[table["variant"] == "softmax"].set_index(["iters", "seed"])
    for ratio, column in (("ratio_miou", "miou"), ("ratio_top50", "miou_top50"), ("ratio_tail", "miou_tail")):
        base = [softmax[column].get((i, s), np.nan) for i, s in zip(table["iters"], table["seed"])]
        table[ratio] = table[column] / pd.Series(base, index=table.index).where(lambda v: v > 0)
    return table[list(BUDGET_COLUMNS)]


def learning_curves(out: Path, cells: list[Cell]) -> pd.DataFrame:
    curves = [read_csv_log(cell.run(out) / "val.csv").assign(variant=cell.variant, seed=cell.seed) for cell in cells
              if (cell.run(out) / "val.csv").exists()]
    curve = (pd.concat(curves, ignore_index=True) if curves
             else pd.DataFrame(columns=["iteration", "miou", "pixel_acc", "variant", "seed"]))
    return curve[["variant", "seed", "iteration", "miou", "pixel_acc"]]


def claims(study: pd.DataFrame) -> list[dict]:
    """The paper's directions, each checked on a budget's table, seed by seed: claim, paper, verdict, numbers.

    With several seeds, a claim that holds for some seeds and not for others is "within noise"; seeds that lack
    one of the claim's variants are left out (not measured only when no seed has both).
    """
    checks = [
        ("`ess` mIoU >= `softmax` mIoU", "ESS about 3x the softmax mIoU", "ess", "softmax", "miou", 1.0, ">="),
        ("`ess` tail mIoU >= 1.5x `softmax` tail mIoU", "ESS's gain is in the rare classes", "ess", "softmax",
         "miou_tail", 1.5, ">="),
        ("`ess` mIoU >= 3x `ess-random`", "random negatives: 0.5 mIoU", "ess", "ess-random", "miou", 3.0, ">="),
        ("`ess` mIoU > `ess-no-norm`", "no normalisation: 4.15 mIoU", "ess", "ess-no-norm", "miou", 1.0, ">"),
        ("`ess` mIoU > `ess-no-reg`", "no regulariser: 3.9 mIoU", "ess", "ess-no-reg", "miou", 1.0, ">"),
    ]
    study = study if "seed" in study.columns else study.assign(seed=0)
    results = []
    for claim, paper, a, b, column, factor, op in checks:
        per_seed = {seed: check_claim(rows.set_index("variant"), a, b, column, factor, op)
                    for seed, rows in study.groupby("seed", sort=True)}
        measured = {s: vn for s, vn in per_seed.items() if vn[0] != "not measured"}
        per_seed = measured or per_seed  # a seed that ran only some of the variants does not void the others
        verdicts = {v for v, _ in per_seed.values()}
        verdict = verdicts.pop() if len(verdicts) == 1 else (
            "within noise" if verdicts <= {"reproduced", "not reproduced"} else "not measured")
        numbers = "; ".join(n if len(per_seed) == 1 else f"seed {s}: {n}" for s, (_, n) in per_seed.items())
        results.append({"claim": claim, "paper": paper, "verdict": verdict, "numbers": numbers})
    return results


def check_claim(table: pd.DataFrame, a: str, b: str, column: str, factor: float, op: str) -> tuple[str, str]:
    """(verdict, numbers) of `a`'s `column` against `factor` times `b`'s in one seed's table."""
    x, y = (float(table.at[v, column]) if v in table.index else float("nan") for v in (a, b))
    if math.isnan(x) or math.isnan(y):
        return "not measured", f"needs variants {a} and {b} with present classes"
    if x == 0 and y == 0:  # 0 >= 1.5 x 0 holds, but says nothing
        return "not measurable", f"{a} and {b} are both 0"
    ok = x >= factor * y if op == ">=" else x > factor * y
    ratio = f", ratio {x / y:.2f}" if y > 0 else ""
    return ("reproduced" if ok else "not reproduced"), f"{a} {fmt(x)} vs {b} {fmt(y)}{ratio}"


def catch_up(budget: pd.DataFrame) -> tuple[list[str], str]:
    """Per ESS variant, the smallest budget at which its mean mIoU over seeds reaches softmax's, and a headline."""
    means = budget.groupby(["variant", "iters"], sort=False)[["miou", "ratio_miou"]].agg(["mean", "min", "max"])
    budgets = sorted(budget["iters"].unique())
    lines, best, headline = [], None, []
    for variant in dict.fromkeys(v for v in budget["variant"] if VARIANTS[v].options["head"] == "ess"):
        ratios = {i: means.loc[(variant, i), ("ratio_miou", "mean")] for i in budgets if (variant, i) in means.index}
        ratios = {i: r for i, r in ratios.items() if not math.isnan(r)}
        if not ratios:
            continue
        trend = " -> ".join(f"{r:.2f}x at {i}" for i, r in ratios.items())
        reached = [i for i, r in ratios.items() if r >= 1]
        if reached:
            low = means.loc[(variant, reached[0]), ("ratio_miou", "min")]
            verdict = f"`{variant}` reaches softmax's mIoU at {reached[0]} iterations"
            verdict += " (within noise: a seed is below)" if low < 1 else ""
            lines.append(f"- {verdict} ({trend})")
            headline.append(verdict)
        else:
            lines.append(f"- `{variant}` does not reach softmax's mIoU by {max(ratios)} iterations ({trend})")
        top = max(ratios)
        if best is None or (ratios[top], top) > (best[1], best[2]):
            best = (variant, ratios[top], top)
    if best is None:
        return lines, "No ESS variant was measured against softmax."
    if headline:
        return lines, "Reaching softmax: " + "; ".join(headline) + "."
    return lines, (f"No ESS variant reaches softmax's mIoU by {max(budgets)} iterations; the closest at the largest "
                   f"budget is `{best[0]}` at {best[1]:.2f}x softmax.")


def seed_spread(budget: pd.DataFrame) -> list[str]:
    """At the largest budget, each variant's mIoU over its seeds: values, and the spread relative to their mean."""
    top = budget[budget["iters"] == budget["iters"].max()]
    lines = []
    for variant, rows in top.groupby("variant", sort=False):
        if len(rows) > 1:
            values = rows.sort_values("seed")["miou"]
            spread = (values.max() - values.min()) / values.mean() if values.mean() > 0 else float("nan")
            lines.append(f"- `{variant}`: " + ", ".join(f"seed {s} {fmt(v)}" for s, v in zip(rows["seed"], values))
                         + f" (spread {spread:.0%} of the mean)")
    return lines


# --- figures and summary -------------------------------------------------------------------------------------

def plot_learning_curves(curve: pd.DataFrame):
    fig = new_figure(8, 4.5)
    ax = fig.add_subplot()
    for (name, seed), rows in curve.groupby(["variant", "seed"], sort=False):
        ax.plot(rows["iteration"], rows["miou"], marker="o", markersize=3, linewidth=1.6, color=VARIANTS[name].color,
                linestyle="-" if seed == curve["seed"].min() else "--", label=f"{name}, seed {seed}")
    ax.set_xlabel("training iteration")
    ax.set_ylabel("validation mIoU")
    ax.set_ylim(bottom=0)
    ax.set_title("Learning curves: validation mIoU during training")
    ax.grid(True, alpha=0.3)
    if len(curve):
        ax.legend(fontsize=8)
    return fig


def plot_budget(budget: pd.DataFrame):
    """mIoU (all, top-50, tail) and the ratio to softmax against iterations: a line per variant through its mean
    over seeds, each seed a dot; an ESS variant's pixel-mean readout dashed, with open markers."""
    fig = new_figure(11, 8)
    panels = [("miou", "mIoU (all classes)"), ("miou_top50", "mIoU, 50 most frequent classes"),
              ("miou_tail", "mIoU, the other classes"), ("ratio_miou", "mIoU / softmax's (same budget and seed)")]
    budgets = sorted(budget["iters"].unique())
    for i, (column, title) in enumerate(panels):
        ax = fig.add_subplot(2, 2, i + 1)
        for variant, rows in budget.groupby("variant", sort=False):
            color = VARIANTS[variant].color
            mean = rows.groupby("iters")[column].mean()
            ax.plot(mean.index, mean.values, marker="o", color=color, label=variant)
            ax.scatter(rows["iters"], rows[column], s=10, color=color, alpha=0.5)
            if column == "miou" and rows["miou_proto_readout"].notna().any():
                proto = rows.groupby("iters")["miou_proto_readout"].mean()
                ax.plot(proto.index, proto.values, linestyle="--", marker="o", markerfacecolor="none", color=color,
                        alpha=0.8, label=f"{variant}, pixel-mean readout")  # the open marker shows a lone budget
        if column == "ratio_miou":
            ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("training iterations (each a full schedule)")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    return fig


def budget_report_table(budget: pd.DataFrame) -> pd.DataFrame:
    """One row per (variant, iterations): the means over seeds, and how many seeds."""
    columns = ["miou", "ratio_miou", "miou_top50", "miou_tail", "miou_proto_readout", "pixel_acc"]
    grouped = budget.groupby(["variant", "iters"], sort=False)
    table = grouped[columns].mean().reset_index()
    table.insert(2, "seeds", grouped["seed"].count().to_numpy())
    return table


def budget_summary(out: Path, data: Path, val_data: Path, budget: pd.DataFrame, base) -> str:
    train = base.train
    lines, headline = catch_up(budget)
    largest = budget["iters"].max()
    spread = seed_spread(budget)
    text = [
        f"# Study: softmax, ESS and its variants on `{data}`, at {', '.join(map(str, sorted(budget['iters'].unique())))} "
        "iterations",
        "",
        f"Every cell: the same data, batch {train.batch}, crop {train.crop}, LR {train.lr} (poly), encoder "
        f"{base.model.encoder}; each budget a full schedule of its own; evaluated at its last checkpoint on "
        f"`{val_data}`. Variants differ only in their options (ess.variants). `miou_proto_readout`: the same "
        "network with each class embedding replaced by the mean embedding of its training pixels.",
        "",
        f"**{headline}**",
        "",
        *lines,
        "",
        "Means over seeds (`ratio_miou`: mIoU / softmax's at the same budget and seed, averaged):",
        "",
        markdown_table(budget_report_table(budget)),
        "",
        f"## Seeds at {largest} iterations",
        "",
        *(spread or ["- one seed per variant: no spread measured"]),
        "",
        f"## The paper's claims at {largest} iterations",
        "",
        *claim_lines(budget[budget["iters"] == largest]),
        "",
        files_section(out, {
            "budget.csv": "every cell: " + ", ".join(BUDGET_COLUMNS),
            "budget.png": "mIoU (all, top-50, tail) and the ratio to softmax against iterations",
            "iters<N>/": "each budget's study.csv, study.md, top-n and learning curves",
            "runs/iters<N>/seed<S>/<variant>": "each cell's `ess train` run, evaluated in eval/ (and eval-pixel-mean/)",
        }),
    ]
    return "\n".join(text)


def claim_lines(study: pd.DataFrame) -> list[str]:
    return [f"- {c['claim']} (paper: {c['paper']}): **{c['verdict']}** — {c['numbers']}" for c in claims(study)]


def budget_study_summary(out: Path, data: Path, val_data: Path, iters: int, study: pd.DataFrame, base) -> str:
    shown = study.assign(paper=[PAPER.get(v, "") for v in study["variant"]])
    train = base.train
    return "\n".join([
        f"# Study at {iters} iterations: softmax, ESS and its variants on `{data}`",
        "",
        f"Every variant: the same data, {iters} iterations, batch {train.batch}, crop {train.crop}, LR {train.lr} "
        f"(poly), encoder {base.model.encoder}; evaluated at its last checkpoint on `{val_data}`. Variants differ "
        "only in their options.",
        "",
        GROUP_DEFINITION,
        "",
        "The `paper` column is the published result on COCO+LVIS (mIoU, %) for direction only: this study is a "
        "far smaller budget on other data.",
        "",
        markdown_table(shown),
        "",
        "## The paper's claims on this study",
        "",
        *claim_lines(study),
        "",
        files_section(out, {
            "study.csv": "one row per variant and seed: " + ", ".join(STUDY_COLUMNS),
            "topn_miou.csv": "per n: the n-th most frequent training class, and per run its IoU and mIoU@n",
            "topn_miou.png": "mIoU over the n most frequent classes against n, one curve per run",
            "learning_curve.csv": "variant, seed, iteration, validation miou and pixel_acc (each RUN/val.csv)",
            "learning_curve.png": "validation mIoU against iteration, one curve per run",
        }),
    ])


def report_budget(out: Path, data: Path, val_data: Path, stats: pd.DataFrame, cells: list[Cell], rows: pd.DataFrame,
                  ious: dict, base, iters: int) -> dict:
    """OUT/iters<N>/: the tables, figures and study.md of one budget."""
    where = out / f"iters{iters}"
    mine = [c for c in cells if c.iters == iters]
    study = rows[rows["iters"] == iters][list(STUDY_COLUMNS)].reset_index(drop=True)
    several = len({c.seed for c in mine}) > 1
    labels = {c: c.variant if not several else f"{c.variant}, seed {c.seed}" for c in mine}
    topn = topn_table(stats, "pixels", {labels[c]: ious[c] for c in mine})
    curve = learning_curves(out, mine)
    paths = {"study.csv": save_table(study, where / "study.csv"), "topn_miou.csv": save_table(topn, where / "topn_miou.csv"),
             "learning_curve.csv": save_table(curve, where / "learning_curve.csv")}
    title = f"Top-n mIoU at {iters} iterations, {len(topn)} classes ordered by {Path(data).name} pixels"
    paths["topn_miou.png"] = save_figure(plot_topn(topn, list(labels.values()), "pixels", title), where / "topn_miou.png")
    paths["learning_curve.png"] = save_figure(plot_learning_curves(curve), where / "learning_curve.png")
    paths["study.md"] = write_summary(where, budget_study_summary(where, data, val_data, iters, study, base),
                                      echo=False, name="study.md")
    return {f"iters{iters}/{name}": path for name, path in paths.items()}


def report_study(out: Path, data: Path, val_data: Path, stats: pd.DataFrame, base, echo: bool = True) -> dict:
    """Tables from every evaluated cell in OUT/runs, then figures, then the summaries."""
    cells = found_cells(out)
    rows, ious = cell_rows(out, data, stats, cells)
    paths = {}
    for iters in sorted({c.iters for c in cells}):
        paths.update(report_budget(out, data, val_data, stats, cells, rows, ious, base, iters))
    budget = budget_table(rows)
    paths["budget.csv"] = save_table(budget, out / "budget.csv")
    paths["budget.png"] = save_figure(plot_budget(budget), out / "budget.png")
    paths["study.md"] = write_summary(out, budget_summary(out, data, val_data, budget, base), echo=echo,
                                      name="study.md")
    return paths


def run_study(data: str | Path, val_data: str | Path, out: str | Path, variants: str | list[str] | None = None,
              iters: str | list[int] | None = None, seeds: str | list[int] | None = None,
              preset: str | None = "study", config_file: str | Path | None = None, resume: bool = False,
              progress: bool = True, echo: bool = True) -> dict[str, Path]:
    """`bench study`: train and evaluate every (variant, iterations, seed) cell into OUT/runs, then write the study's
    files into OUT from every evaluated cell there."""
    data, val_data, out = Path(data).resolve(), Path(val_data).resolve(), Path(out)
    names = variants if isinstance(variants, list) else parse_variants(variants, "study", "--variants")
    base = shared_config(data, val_data, preset, config_file)
    budgets = iters if isinstance(iters, list) else parse_counts(iters, "--iters") or [base.train.iters]
    seed_list = seeds if isinstance(seeds, list) else parse_counts(seeds, "--seeds") or [base.train.seed]
    cells = [Cell(v, i, s) for i in sorted(budgets) for s in seed_list for v in names]
    for cell in cells:
        cell_config(base, cell)  # every cell's settings checked before any training
    stats = read_class_stats(data)  # a bad stats.csv stops the study before any training
    claim_out(out, base, resume)
    run_cells(cells, base, out, progress=progress, echo=echo)
    return report_study(out, data, val_data, stats, base, echo=echo)
