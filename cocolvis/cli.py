"""`cocolvis`: build the 1284-class COCO-Stuff + LVIS semantic segmentation dataset."""
from __future__ import annotations

import re
from pathlib import Path

import click

from segkit import signals
from segkit.errors import CommandGroup
from segkit.io import InputError


@click.group(cls=CommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Merge COCO-Stuff stuff regions and LVIS instances into one dense 16-bit label map per image."""


@main.command()
@click.option("--lvis", type=click.Path(path_type=Path),
              help="LVIS annotation file or JSON category list [default: the shipped LVIS v1 categories].")
@click.option("--coco", type=click.Path(path_type=Path),
              help="COCO-Stuff annotation file or `id: name` label list [default: the shipped COCO-Stuff labels].")
@click.option("--out", type=click.Path(path_type=Path), default=Path("classes.json"),
              show_default=True, help="Where to write the merged class list (JSON).")
def vocab(lvis, coco, out):
    """Write the merged class list (LVIS v1 + COCO-Stuff: 1284 classes).

    LVIS categories keep their ids, a stuff category named like an LVIS one merges into
    it, the other stuff categories are appended in COCO id order.
    """
    from cocolvis.dataset import is_class_list, write_classes
    from cocolvis.vocab import build_vocabulary, describe

    classes = build_vocabulary(lvis, coco)
    if out.is_file() and not is_class_list(out):
        raise InputError(out, "exists and is not a class list written by `cocolvis vocab`; nothing is replaced: "
                              "choose another --out")
    write_classes(out, classes)
    click.echo(f"{out}: {describe(classes)}")


def _size(ctx, param, value: str):
    from segkit.images import size_problem

    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value or "")
    if m is None or min(int(m[1]), int(m[2])) < 8:
        raise click.BadParameter("expected HxW with both at least 8, e.g. 240x320")
    problem = size_problem(int(m[1]), int(m[2]))
    if problem:
        raise click.BadParameter(problem)
    return int(m[1]), int(m[2])


SYNTH_MAX_IMAGES = 100_000
"""Most images of each synthetic split (their ids are drawn from 1..599999)."""


SYNTH_OUTPUT = ("annotations", "images")


def _earlier_synth(out: Path) -> bool:
    """A synthetic dataset written before output directories were marked."""
    return all((out / name).is_dir() for name in SYNTH_OUTPUT)


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write annotations/ and images/ into.")
@click.option("--train", default=200, show_default=True, type=click.IntRange(min=0, max=SYNTH_MAX_IMAGES),
              help="Number of LVIS train images.")
@click.option("--val", default=50, show_default=True, type=click.IntRange(min=0, max=SYNTH_MAX_IMAGES),
              help="Number of LVIS val images (a quarter of them filed under COCO train2017, as in the real set).")
@click.option("--size", default="240x320", show_default=True, callback=_size, help="Image size, HxW.")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed; the output is deterministic for it.")
def synth(out, train, val, size, seed):
    """Write a small synthetic dataset in the real formats.

    COCO-Stuff and LVIS v1 annotation files plus JPEG images, deterministic for a seed.
    """
    from cocolvis.synth import write_synthetic
    from segkit.outdir import claim_output

    with claim_output(out, "cocolvis synth", lambda name: name in SYNTH_OUTPUT, recognise=_earlier_synth):
        info = write_synthetic(out, train=train, val=val, size=size, seed=seed, progress=True)
    click.echo(f"{out}: {train} train and {val} val images of {size[0]}x{size[1]} "
               f"({info['val_from_train2017']} val images under train2017); annotations in {out / 'annotations'}")


@main.command()
@click.option("--coco", "coco", multiple=True, required=True, type=click.Path(path_type=Path),
              help="COCO-Stuff stuff annotation file; repeat for several (LVIS v1 val needs train2017 and val2017).")
@click.option("--lvis", required=True, type=click.Path(path_type=Path),
              help="LVIS annotation file of the split to build.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Output directory; a re-run into it resumes, skipping masks already written.")
@click.option("--images-root", type=click.Path(file_okay=False, path_type=Path),
              help="Directory holding train2017/ and val2017/; recorded in dataset.json for the trainer.")
@click.option("--workers", type=click.IntRange(min=1), help="Worker processes [default: all cores].")
@click.option("--order", type=click.Choice(["area", "file"]), default="area", show_default=True,
              help="LVIS painting order: `area` largest first (small objects stay visible); "
                   "`file` first annotation wins, as the published scripts did.")
@click.option("--limit", type=click.IntRange(min=0), help="Only the first N images of the LVIS file.")
@click.option("--top", default=10, show_default=True, type=click.IntRange(min=0),
              help="Most and least frequent classes to list in the summary.")
@click.option("--overwrite", is_flag=True,
              help="Replace the build --out holds instead of resuming it (needed when it was built from other "
                   "inputs or options).")
def build(coco, lvis, out, images_root, workers, order, limit, top, overwrite):
    """Build one split from an LVIS file and COCO-Stuff files.

    Writes masks/, images.jsonl, classes.json, stats.csv, report.json and dataset.json
    into --out, then prints a summary. One build at a time may write into --out; a
    re-run of the same command resumes; Ctrl-C, SIGTERM and SIGHUP stop it with exit status 130, 143 and 129.
    """
    from cocolvis.build import build_split
    from cocolvis.summary import summary_text

    try:
        result = build_split(coco=list(coco), lvis=lvis, out=out, images_root=images_root, workers=workers,
                             order=order, limit=limit, overwrite=overwrite)
    except KeyboardInterrupt as e:
        click.echo(f"\n{signals.reason(e)}: re-run the same command to resume {out}", err=True)
        raise click.exceptions.Exit(signals.exit_status(e)) from None
    click.echo(summary_text(out, top=top))
    click.echo(f"{result['images_painted']} masks painted in {result['seconds']:.1f} s with {result['workers']} "
               f"worker(s)")
    mismatches = result["size_mismatch_messages"]
    if mismatches:
        for line in mismatches:
            click.echo(f"Error: {line}", err=True)
        raise InputError(out / "report.json", f"{len(mismatches)} image(s) skipped because LVIS and COCO-Stuff "
                                              f"sizes disagree; the rest of the split is complete")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--top", default=10, show_default=True, type=click.IntRange(min=0),
              help="Most and least frequent classes to list.")
def summary(directory, top):
    """Print a built split's summary.

    Class count, images written and skipped, the most and least frequent classes.
    """
    from cocolvis.summary import summary_text

    click.echo(summary_text(directory, top=top))


if __name__ == "__main__":
    main()
