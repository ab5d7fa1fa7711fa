"""`ess` command line: train, eval, predict, compare."""
from __future__ import annotations

import json
from pathlib import Path

import click

from segkit.errors import CommandGroup
from segkit.io import InputError, read_json
from ess import config as cfg
from ess.config import READOUTS
from ess.options import click_options

PATH = click.Path(path_type=Path)
EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


@click.group(cls=CommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Train and evaluate softmax and ESS (embedding) segmentation heads on `cocolvis build` output."""


@main.command()
@click.option("--out", type=PATH, required=True, help="Run directory to create (or to continue with --resume).")
@click.option("--config", "config_file", type=PATH, help="YAML file of options; flags override it.")
@click.option("--preset", type=click.Choice(cfg.presets()), help="Named configuration, applied before --config.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt, exactly.")
@click.option("--stop-after", type=click.IntRange(min=1), help="Stop (with a checkpoint) after this iteration; continue later with --resume.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click_options(*cfg.PARTS.values())
def train(out, config_file, preset, resume, stop_after, quiet, **options):
    """Train a softmax or ESS head; writes RUN/config.yaml, log.csv, last.pt (and val.csv, best.pt).

    Under `torchrun --nproc_per_node N -m ess train ...`, N processes share each --batch; rank 0 writes RUN.
    One run at a time writes RUN. Ctrl-C, SIGTERM or SIGHUP stop it at an iteration's end (after the
    next checkpoint when that is due within seconds), with exit status 130, 143 or 129; --resume continues.
    """
    base = None
    if resume:
        saved = out / "config.yaml"
        if not saved.exists():
            raise InputError(saved, "missing: nothing to resume in --out")
        base = cfg.load(saved)
    config = cfg.resolve(preset, config_file, options, base=base)
    from ess.distributed import is_main  # torch: once the options are known to be good
    from ess.train import train as run_training

    summary = run_training(config, out, resume=resume, stop_after=stop_after, progress=not quiet)
    if not is_main():
        return
    best = f", best val mIoU {summary['best_miou']:.4f}" if summary["best_miou"] is not None else ""
    click.echo(f"{out}: {summary['iteration']} iterations in {summary['seconds']:.0f} s{best}")


@main.command(name="eval")
@click.option("--run", "--run-dir", "run_dir", type=EXISTING_DIR, required=True,
              help="Run directory written by `ess train` (under torchrun spell it --run-dir: torchrun takes --run).")
@click.option("--data", type=EXISTING_DIR, required=True, help="Build directory to evaluate on.")
@click.option("--images-root", type=EXISTING_DIR, help="Images root [default: the one in the data's dataset.json].")
@click.option("--out", type=PATH, help="Output directory [default: RUN/eval].")
@click.option("--save-predictions", is_flag=True, help="Also write EVAL/predictions/<id>.png and a colourised preview.")
@click.option("--checkpoint", default="best", show_default=True, help="best, last, or a checkpoint file.")
@click.option("--crop-val", type=click.IntRange(min=1, max=cfg.MAX_CROP),
              help="Evaluate resized centre crops of this size [default: the run's setting, else whole images].")
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu, cuda or cuda:N (under torchrun: cuda means cuda:LOCAL_RANK).")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0, max=cfg.MAX_WORKERS),
              help="DataLoader worker processes.")
@click.option("--readout", type=click.Choice(READOUTS), default="learned", show_default=True,
              help="ESS only: pixel-mean replaces each class embedding by the mean embedding of its pixels in the "
                   "run's training data (how far the class side lags); writes RUN/eval-pixel-mean by default.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def eval_command(run_dir, data, images_root, out, save_predictions, checkpoint, crop_val, device, workers, readout,
                 quiet):
    """Evaluate a run: metrics.json, per_class.csv and confusion.npz (under torchrun, the processes share the images)."""
    from ess.distributed import is_main
    from ess.evaluate import evaluate_run

    metrics = evaluate_run(run_dir, data, images_root, out, save_predictions, checkpoint, crop_val, device,
                           progress=not quiet, workers=workers, readout=readout)
    if not is_main():
        return
    where = out if out is not None else cfg.eval_dir(run_dir, readout)
    click.echo(f"{metrics['head']}: mIoU {_fmt(metrics['miou'])}, pixel acc {_fmt(metrics['pixel_acc'])}, "
               f"{metrics['classes_present']}/{metrics['num_classes']} classes present -> {where}")


@main.command()
@click.option("--run", "run_dir", type=EXISTING_DIR, required=True, help="Run directory written by `ess train`.")
@click.argument("images", nargs=-1, required=True, type=PATH)
@click.option("--out", type=PATH, required=True, help="Directory for <stem>.png and <stem>_overlay.png.")
@click.option("--checkpoint", default="best", show_default=True, help="best, last, or a checkpoint file.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def predict(run_dir, images, out, checkpoint, device, quiet):
    """Segment IMAGE...: uint16 label maps and overlays with a legend."""
    from ess.device import pick_device
    from ess.predict import predict_images
    from ess.run import load_run

    dev = pick_device(device)
    run = load_run(run_dir, checkpoint, dev)
    written = predict_images(run, images, out, dev, progress=not quiet)
    click.echo(f"{len(written)} predictions -> {out}")


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


@main.command()
@click.argument("evals", nargs=-1, required=True, type=PATH)
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON instead of text.")
def compare(evals, as_json):
    """Print the metrics of EVAL directories (or metrics.json files) side by side."""
    columns = []
    for path in evals:
        metrics_path = path / "metrics.json" if path.is_dir() else path
        metrics = read_json(metrics_path)
        if not isinstance(metrics, dict) or "miou" not in metrics:
            raise InputError(metrics_path, "not an `ess eval` metrics.json (no 'miou')")
        columns.append((metrics.get("head", "?"), str(path), metrics))
    names = [h for h, _, _ in columns]
    headers = [h if names.count(h) == 1 else f"{h} ({p})" for h, p, _ in columns]
    rows = ["miou", "pixel_acc", "mean_acc", "fw_iou", "classes_present", "num_classes"]
    if as_json:
        click.echo(json.dumps({h: {r: m.get(r) for r in rows} for h, (_, _, m) in zip(headers, columns)}, indent=1))
        return
    cells = [[r] + [_fmt(m.get(r)) for _, _, m in columns] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(["metric"] + headers, *cells)]
    for line in [["metric"] + headers] + cells:
        click.echo("  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(line, widths))))


if __name__ == "__main__":
    main()
