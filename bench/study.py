"""`bench study`: the softmax and ESS heads and the ablations of ESS, trained and evaluated alike.

Every variant (ess.variants.VARIANTS) is one run directory OUT/runs/<variant>,
trained with `ess.train.train` from the same resolved configuration (data, iterations,
seed, schedule), changed only in the variant's model options, and evaluated on the
validation build with `ess.evaluate.evaluate_run` at its last checkpoint. Then, from the
files alone:

    OUT/study.csv           one row per variant (STUDY_COLUMNS; groups: bench.definitions.GROUP_DEFINITION)
    OUT/topn_miou.csv/.png  mIoU over the n most frequent classes, one curve per variant
    OUT/learning_curve.csv/.png   validation mIoU against iteration (each RUN/val.csv)
    OUT/study.md            the table beside the paper's figures, and each claim reproduced or not

A study that stops (Ctrl-C, a crash, a lost machine) continues with `--resume`:
evaluated variants are kept as they are, a partly trained one continues from its
RUN/last.pt (written every `ckpt_every` iterations), exactly as `ess train --resume`.
"""
from __future__ import annotations

import math
from pathlib import Path

import click
import pandas as pd

from bench.definitions import GROUP_DEFINITION
from bench.report import files_section, fmt, markdown_table, new_figure, save_figure, save_table, write_summary
from bench.tables import ROW_COLUMNS, evaluation_rows, read_class_stats, read_csv_log, read_eval
from bench.topn import plot_topn, topn_table
from ess import config as cfg
from ess.variants import VARIANTS
from ess.variants import parse as parse_variants
from segkit.io import InputError

STUDY_COLUMNS = ("variant", *ROW_COLUMNS[1:])
CHECKPOINT = "last"  # every variant is evaluated after the same number of iterations

# The published results on COCO+LVIS (mIoU, %), for direction only: this study runs far smaller.
PAPER = {
    "softmax": "about 1/3 of ESS",
    "ess": "about 3x softmax; above every ablation",
    "ess-random": "0.5",
    "ess-no-norm": "4.15",
    "ess-no-reg": "3.9",
}


# --- configuration ------------------------------------------------------------------------------------------

def variant_configs(data: Path, val_data: Path, variants: list[str], iters: int | None = None,
                    preset: str | None = "study", config_file: Path | None = None) -> dict:
    """variant -> its resolved ess.config.Config: the shared configuration plus the variant's model options."""
    base = cfg.resolve(preset, config_file, {"data": str(data), "val_data": str(val_data), "iters": iters})
    configs = {}
    for name in variants:
        config = base.updated(VARIANTS[name].options, f"variant {name}")
        cfg.check_for_training(config, f"variant {name}")
        configs[name] = config
    return configs


def check_same_config(config, run: Path) -> None:
    """A resumed variant must continue with the configuration it started with."""
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

def run_variant(name: str, config, run: Path, progress: bool = True) -> None:
    """Train (or continue training) one variant and evaluate its last checkpoint, skipping what is done."""
    from ess.evaluate import evaluate_run
    from ess.train import train

    if (run / "eval" / "metrics.json").exists():  # written last, once training had finished
        return
    train(config, run, resume=(run / "last.pt").exists(), progress=progress)
    evaluate_run(run, config.train.val_data, checkpoint=CHECKPOINT, device=config.train.device, progress=progress)


def run_variants(configs: dict, out: Path, resume: bool = False, progress: bool = True, echo: bool = True) -> None:
    """Every variant into OUT/runs/<variant>, one after another."""
    runs = out / "runs"
    if not resume:
        started = [runs / name for name in configs if (runs / name).exists()]
        if started:
            raise InputError(started[0], "already holds a run of a study: pass --resume to continue it, "
                                         "or choose another --out")
    for i, (name, config) in enumerate(configs.items(), 1):
        run = runs / name
        if resume and (run / "config.yaml").exists():
            check_same_config(config, run)
        if echo:
            state = "evaluated, kept" if (run / "eval" / "metrics.json").exists() else (
                "continuing" if (run / "last.pt").exists() else "training")
            click.echo(f"[{i}/{len(configs)}] {name}: {state} ({config.train.iters} iterations) -> {run}")
        run_variant(name, config, run, progress=progress)


# --- tables ----------------------------------------------------------------------------------------------------

def study_tables(out: Path, data: Path, stats: pd.DataFrame, variants: list[str]) -> dict[str, pd.DataFrame]:
    """study, topn and learning-curve tables of the evaluated variants in OUT/runs (`stats`: the data's class stats)."""
    runs = {name: out / "runs" / name for name in variants}
    evals = {name: read_eval(run / "eval") for name, run in runs.items()}
    rows, ious = evaluation_rows(evals, stats, Path(data) / "stats.csv")
    curves = [read_csv_log(run / "val.csv").assign(variant=name) for name, run in runs.items()
              if (run / "val.csv").exists()]
    curve = (pd.concat(curves, ignore_index=True) if curves
             else pd.DataFrame(columns=["iteration", "miou", "pixel_acc", "variant"]))
    return {"study": rows.rename(columns={"run": "variant"}),
            "topn": topn_table(stats, "pixels", ious),
            "learning_curve": curve[["variant", "iteration", "miou", "pixel_acc"]]}


def claims(study: pd.DataFrame) -> list[dict]:
    """The paper's directions, each checked on the study's table: claim, paper, verdict, numbers."""
    table = study.set_index("variant")

    def value(variant: str, column: str) -> float:
        return float(table.at[variant, column]) if variant in table.index else float("nan")

    checks = [
        ("`ess` mIoU >= `softmax` mIoU", "ESS about 3x the softmax mIoU", "ess", "softmax", "miou", 1.0, ">="),
        ("`ess` tail mIoU >= 1.5x `softmax` tail mIoU", "ESS's gain is in the rare classes", "ess", "softmax",
         "miou_tail", 1.5, ">="),
        ("`ess` mIoU >= 3x `ess-random`", "random negatives: 0.5 mIoU", "ess", "ess-random", "miou", 3.0, ">="),
        ("`ess` mIoU > `ess-no-norm`", "no normalisation: 4.15 mIoU", "ess", "ess-no-norm", "miou", 1.0, ">"),
        ("`ess` mIoU > `ess-no-reg`", "no regulariser: 3.9 mIoU", "ess", "ess-no-reg", "miou", 1.0, ">"),
    ]
    results = []
    for claim, paper, a, b, column, factor, op in checks:
        x, y = value(a, column), value(b, column)
        if math.isnan(x) or math.isnan(y):
            verdict, numbers = "not measured", f"needs variants {a} and {b} with present classes"
        elif x == 0 and y == 0:  # 0 >= 1.5 x 0 holds, but says nothing
            verdict, numbers = "not measurable", f"{a} and {b} are both 0"
        else:
            ok = x >= factor * y if op == ">=" else x > factor * y
            verdict = "reproduced" if ok else "not reproduced"
            ratio = f", ratio {x / y:.2f}" if y > 0 else ""
            numbers = f"{a} {fmt(x)} vs {b} {fmt(y)}{ratio}"
        results.append({"claim": claim, "paper": paper, "verdict": verdict, "numbers": numbers})
    return results


# --- figures and summary -------------------------------------------------------------------------------------

def plot_learning_curves(curve: pd.DataFrame):
    fig = new_figure(8, 4.5)
    ax = fig.add_subplot()
    for name, rows in curve.groupby("variant", sort=False):
        ax.plot(rows["iteration"], rows["miou"], marker="o", markersize=3, linewidth=1.6, label=name)
    ax.set_xlabel("training iteration")
    ax.set_ylabel("validation mIoU")
    ax.set_ylim(bottom=0)
    ax.set_title("Learning curves: validation mIoU during training")
    ax.grid(True, alpha=0.3)
    if len(curve):
        ax.legend(fontsize=8)
    return fig


def study_summary(out: Path, data: Path, val_data: Path, tables: dict, config) -> str:
    study = tables["study"]
    shown = study.assign(paper=[PAPER.get(v, "") for v in study["variant"]])
    train = config.train
    lines = [
        f"# Study: softmax, ESS and its ablations on `{data}`",
        "",
        f"Every variant: the same data, {train.iters} iterations, batch {train.batch}, crop {train.crop}, "
        f"seed {train.seed}, LR {train.lr} (poly), encoder {config.model.encoder}; evaluated at its last "
        f"checkpoint on `{val_data}`. Variants differ only in their model options.",
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
        *[f"- {c['claim']} (paper: {c['paper']}): **{c['verdict']}** — {c['numbers']}" for c in claims(study)],
        "",
        files_section(out, {
            "study.csv": "one row per variant: " + ", ".join(STUDY_COLUMNS),
            "topn_miou.csv": "per n: the n-th most frequent training class, and per variant its IoU and mIoU@n",
            "topn_miou.png": "mIoU over the n most frequent classes against n, one curve per variant",
            "learning_curve.csv": "variant, iteration, validation miou and pixel_acc (each RUN/val.csv)",
            "learning_curve.png": "validation mIoU against iteration, one curve per variant",
            "runs/<variant>": "each variant's `ess train` run, with its evaluation in eval/",
        }),
    ]
    return "\n".join(lines)


def report_study(out: Path, data: Path, val_data: Path, variants: list[str], stats: pd.DataFrame, config,
                 echo: bool = True) -> dict:
    """Compute the tables from OUT/runs, then draw, then write the summary."""
    tables = study_tables(out, data, stats, variants)
    paths = {"study.csv": save_table(tables["study"], out / "study.csv"),
             "topn_miou.csv": save_table(tables["topn"], out / "topn_miou.csv"),
             "learning_curve.csv": save_table(tables["learning_curve"], out / "learning_curve.csv")}
    title = f"Top-n mIoU, {len(tables['topn'])} classes ordered by {Path(data).name} pixels"
    paths["topn_miou.png"] = save_figure(plot_topn(tables["topn"], variants, "pixels", title), out / "topn_miou.png")
    paths["learning_curve.png"] = save_figure(plot_learning_curves(tables["learning_curve"]),
                                              out / "learning_curve.png")
    text = study_summary(out, data, val_data, tables, config)
    paths["study.md"] = write_summary(out, text, echo=echo, name="study.md")
    return paths


def run_study(data: str | Path, val_data: str | Path, out: str | Path, variants: str | list[str] | None = None,
              iters: int | None = None, preset: str | None = "study", config_file: str | Path | None = None,
              resume: bool = False, progress: bool = True, echo: bool = True) -> dict[str, Path]:
    """`bench study`: train and evaluate every variant into OUT/runs, then write the study's files into OUT."""
    data, val_data, out = Path(data).resolve(), Path(val_data).resolve(), Path(out)
    names = variants if isinstance(variants, list) else parse_variants(variants, "study", "--variants")
    configs = variant_configs(data, val_data, names, iters, preset, config_file)
    stats = read_class_stats(data)  # a bad stats.csv stops the study before any training
    out.mkdir(parents=True, exist_ok=True)
    run_variants(configs, out, resume=resume, progress=progress, echo=echo)
    return report_study(out, data, val_data, names, stats, next(iter(configs.values())), echo=echo)
