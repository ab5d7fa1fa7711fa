"""The `bench` command: analysis of a built dataset and of trained runs.

Every command writes CSV tables, PNG figures and `summary.md` into `--out`, and prints
the summary. Heavy imports (torch, the models) happen inside the commands that need them.
Every command claims its `--out` (segkit.outdir): one writer at a time, only a new, empty or
earlier output directory of the same command, never inside --data or --val-data, and on a
failure none of the tables, figures or summaries it wrote left behind.
"""
from __future__ import annotations

from pathlib import Path

import click

from bench.definitions import GROUP_DEFINITION, TOPN_DEFINITION
from ess import variants
from ess.config import ENCODERS, MAX_CROP
from segkit.errors import CommandGroup

_dir = click.Path(exists=True, file_okay=False, path_type=Path)
_out = click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
                    help="Output directory: created if missing; an earlier output of the same command has its files "
                         "of the same names replaced; any other non-empty directory is refused.")
BENCH_SUFFIXES = (".csv", ".png", ".md", ".txt")
"""What the commands write into --out (bench study's runs/ aside: kept, for --resume)."""


class _ClaimsOut(click.Command):
    """A bench command: its --out is claimed (segkit.outdir.claim_output) for as long as it runs."""

    def invoke(self, ctx: click.Context):
        from segkit.outdir import claim_output

        params = ctx.params
        with claim_output(params["out"], f"bench {ctx.info_name}", lambda name: name.endswith(BENCH_SUFFIXES),
                          inputs=(params.get("data"), params.get("val_data")), recognise=_earlier_bench_output):
            return super().invoke(ctx)


def _earlier_bench_output(out: Path) -> bool:
    """A bench output written before output directories were marked: a summary, or a study's shared settings."""
    return (out / "summary.md").is_file() or (out / "study.yaml").is_file()


class _BenchGroup(CommandGroup):
    command_class = _ClaimsOut


@click.group(cls=_BenchGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Analysis of a large-vocabulary segmentation dataset and of the softmax and ESS heads."""


@main.command()
@click.option("--data", required=True, type=_dir,
              help="A `cocolvis build` output directory (reads stats.csv, classes.json).")
@_out
def longtail(data: Path, out: Path):
    """Images per class on a log axis with LVIS frequency groups, a word cloud by pixel ratio,
    classes per frequency group and source, and the stuff/thing overlaps."""
    from bench.longtail import run_longtail

    run_longtail(data, out)


@main.command("topn-miou", help=(
    "mIoU over the n most frequent classes, for every n from 1 to C, one curve per run (log x axis).\n\n"
    "Definition: " + TOPN_DEFINITION))
@click.option("--eval", "evals", required=True, multiple=True, type=_dir,
              help="An `ess eval` output directory (metrics.json, confusion.npz); repeat for several runs.")
@click.option("--data", type=_dir, default=None,
              help="Build whose stats.csv orders the classes; default: the training data of the runs "
                   "(metrics.json `run` -> RUN/config.yaml `data`).")
@click.option("--by", type=click.Choice(["pixels", "images"]), default="pixels", show_default=True,
              help="Order classes by training pixels or by the number of training images containing them.")
@_out
def topn_miou(evals: tuple[Path, ...], data: Path | None, by: str, out: Path):
    from bench.topn import run_topn

    run_topn(list(evals), out, data=data, by=by)


def _class_counts(ctx, param, value):
    if value is None:
        return None
    try:
        counts = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"expected positive class counts, got {value!r}")
    return list(dict.fromkeys(counts))


def _size(ctx, param, value):
    if value is None:
        return None
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected HxW, e.g. 128x128, got {value!r}") from None
    if h < 32 or w < 32 or max(h, w) > MAX_CROP:
        raise click.BadParameter(f"height and width must be 32 to {MAX_CROP}, got {value!r}")
    return h, w


@main.command()
@click.option("--preset", type=click.Choice(["cpu", "paper"]), default="cpu", show_default=True,
              help="cpu: resnet18, 128x128, batch 2, C = 19,150,1284,10000 (a few minutes on 2 cores). "
                   "paper: the published set-up, resnet50, 19 classes at 1024x2048, 150, 1284 and 10000 at 512x512.")
@click.option("--classes", callback=_class_counts, default=None,
              help="Comma-separated class counts C, overriding the preset's, e.g. 19,150,1284,20000.")
@click.option("--size", callback=_size, default=None,
              help="Input size HxW for every class count, overriding the preset's.")
@click.option("--batch", type=click.IntRange(min=2, max=1024), default=None,
              help="Images per batch (preset: 2); at least 2, since the batch norm of DeepLabV3+'s image-pooling "
                   "branch needs two images in training. Inference time is reported per image.")
@click.option("--encoder", type=click.Choice(ENCODERS), default=None,
              help="Encoder, overriding the preset's (resnet18 / resnet50).")
@click.option("--heads", default=",".join(variants.default("timing")), show_default=True,
              help="Variants to time, comma-separated, any of: " + "; ".join(
                  f"{v.name} ({v.label})" for v in variants.VARIANTS.values()) + ".")
@click.option("--repeats", type=click.IntRange(min=1), default=None,
              help="Timed iterations per measurement; the median is reported (preset: cpu 5, paper 10).")
@click.option("--warmup", type=click.IntRange(min=0), default=None,
              help="Untimed iterations before timing (preset: cpu 2, paper 3).")
@click.option("--device", default="auto", show_default=True,
              help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N.")
@click.option("--amp", is_flag=True, help="Mixed precision: float16 autocast and gradient scaling on CUDA, "
                                          "bfloat16 autocast on the CPU [default: float32].")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads torch may use in each measurement [default: torch's own choice].")
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Measure every (C, head, phase) this many times, round after round, and report the median: "
                   "drift of a shared machine then falls on every head alike.")
@_out
def timing(preset, classes, size, batch, encoder, heads, repeats, warmup, device, amp, threads, rounds, out):
    """Inference seconds per image and training seconds per iteration, with peak memory, for each
    class count and head, on synthetic tensors; each measurement runs in a fresh process."""
    from bench.timing import run_timing, timing_plan

    head_list = variants.parse(heads, "timing", "--heads")
    plan = timing_plan(preset, classes=classes, size=size, batch=batch, encoder=encoder, heads=head_list,
                       repeats=repeats, warmup=warmup, device=device, amp=amp, threads=threads, rounds=rounds)
    run_timing(plan, out)


@main.command()
@click.option("--run", "run_dir", required=True, type=_dir, help="An ESS run directory (`ess train` output).")
@click.option("--data", required=True, type=_dir,
              help="A `cocolvis build` output to take the image from (e.g. the val split).")
@click.option("--images-root", type=_dir, default=None,
              help="Directory the image `file` paths are relative to; default: the one recorded by the build.")
@click.option("--image-id", type=int, default=None,
              help="Image to project; default: the image of --data with the most classes.")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="Which checkpoint of the run to load.")
@click.option("--clusters", type=click.IntRange(min=1), default=70, show_default=True,
              help="k-means clusters of the class embeddings (capped at the number of classes).")
@click.option("--dendrogram-classes", type=click.IntRange(min=2), default=100, show_default=True,
              help="The dendrogram shows this many of the most frequent training classes.")
@click.option("--max-points", type=click.IntRange(min=100), default=5000, show_default=True,
              help="Pixels drawn in the 2D projection (a random sample of the labelled pixels).")
@click.option("--device", default="auto", show_default=True,
              help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N.")
@_out
def embeddings(run_dir, data, images_root, image_id, checkpoint, clusters, dendrogram_classes, max_points, device, out):
    """Class-embedding length against frequency, pixel embeddings projected to 2D and to RGB,
    a dendrogram and k-means clusters of the class embeddings of an ESS run."""
    from bench.embeddings import run_embeddings

    run_embeddings(run_dir, data, out, images_root=images_root, image_id=image_id, checkpoint=checkpoint,
                   clusters=clusters, dendrogram_classes=dendrogram_classes, max_points=max_points, device=device)


@main.command(help=(
    "Evaluated runs side by side: mIoU over all classes, the 50 most frequent, the tail, the LVIS frequency "
    "groups and stuff, and which run wins each group, by how much. Writes compare.csv, winners.csv and "
    "summary.md.\n\nGroups: " + GROUP_DEFINITION))
@click.option("--eval", "evals", required=True, multiple=True, type=_dir,
              help="An `ess eval` output directory (metrics.json, confusion.npz); repeat for each run (two or more).")
@click.option("--data", type=_dir, default=None,
              help="Build whose stats.csv and classes.json define the groups; default: the training data of the runs.")
@_out
def compare(evals: tuple[Path, ...], data: Path | None, out: Path):
    from bench.compare import run_compare

    run_compare(list(evals), out, data=data)


@main.command(help=(
    "Train and evaluate the softmax head, ESS and its variants alike at one or several budgets, then tabulate, "
    "draw and check the paper's claims. Every (variant, iterations, seed) cell is a run OUT/runs/iters<N>/seed<S>/"
    "<variant> with the same data, batch and schedule (each budget a full schedule of its own), differing only in "
    "the variant's options, evaluated on --val-data at its last checkpoint (an ESS cell also with the pixel-mean "
    "readout). Writes OUT/budget.csv, budget.png, study.md, and per budget iters<N>/study.csv, study.md, "
    "topn_miou.png, learning_curve.png, from every evaluated cell in OUT.\n\n"
    "Variants: " + "; ".join(f"{v.name} ({', '.join(f'{k}: {x}' for k, x in v.options.items())})"
                             for v in variants.VARIANTS.values())
    + ".\n\nstudy.csv groups: " + GROUP_DEFINITION))
@click.option("--data", required=True, type=_dir, help="Training build (a `cocolvis build` output).")
@click.option("--val-data", required=True, type=_dir,
              help="Validation build: the learning curves during training and the final evaluation.")
@_out
@click.option("--variants", default=None,
              help="Comma-separated variant names, trained in this order [default: " + ",".join(variants.default("study"))
                   + "].")
@click.option("--iters", default=None,
              help="Comma-separated budgets, e.g. 300,1000,3000: each a full schedule of that many iterations "
                   "[default: the preset's].")
@click.option("--seeds", default=None,
              help="Comma-separated seeds of every budget [default: the preset's seed].")
@click.option("--preset", default="study", show_default=True,
              help="Named `ess` configuration that every cell starts from (ess/configs/<preset>.yaml).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="YAML file of `ess train` options applied after the preset, for every cell.")
@click.option("--resume", is_flag=True,
              help="Continue or extend the study in OUT (other budgets or seeds, same settings): evaluated cells are "
                   "kept, a partly trained one continues from its last.pt.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def study(data, val_data, out, variants, iters, seeds, preset, config_file, resume, quiet):
    from bench.study import run_study

    run_study(data, val_data, out, variants=variants, iters=iters, seeds=seeds, preset=preset,
              config_file=config_file, resume=resume, progress=not quiet)


if __name__ == "__main__":
    main()
