"""What each `ess` command writes into its --out, and its claim on that directory (`segkit.outdir`).

    ess train    RUN: config.yaml, classes.json, log.csv, val.csv, tb/, last.pt, best.pt
    ess eval     EVAL (default RUN/eval): metrics.json, per_class.csv, confusion.npz, predictions/
    ess predict  DIR: <stem>.png and <stem>_overlay.png of each IMAGE

A command writes only into a directory that is missing, empty, or marked as its own output
(DIR/.segkit.json); a run or an evaluation written before the marker existed is recognised by
its files (config.yaml, classes.json and last.pt; a metrics.json of `ess eval`). It never
writes inside the builds it reads. Under torchrun the claim is rank 0's, the process that writes.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from ess import distributed
from ess.config import TrainConfig
from segkit.io import InputError, read_json
from segkit.outdir import claim_output

RUN_FILES = ("config.yaml", "classes.json", "log.csv", "val.csv", "tb", "last.pt", "best.pt")
EVAL_FILES = ("metrics.json", "per_class.csv", "confusion.npz", "predictions")


@contextlib.contextmanager
def _on_main(out: Path, command: str, owns: Callable[[str], bool], **rules) -> Iterator[None]:
    """claim_output on the process that writes (rank 0 under torchrun); the other ranks wait for its outcome,
    so none of them starts (or writes predictions) when the claim is refused."""
    with contextlib.ExitStack() as stack:
        refused = None
        if distributed.is_main():
            try:
                stack.enter_context(claim_output(out, command, owns, **rules))
            except InputError as e:
                refused = e
        failed = distributed.all_reduce_sum(torch.tensor([float(refused is not None)]))  # as is in one process
        if refused is not None:
            raise refused
        if failed.item():
            raise InputError(out, "refused by rank 0 (see its message)")
        yield


def _is_run(path: Path) -> bool:
    return all((path / name).is_file() for name in ("config.yaml", "classes.json", "last.pt"))


def claim_run(out: Path, train: TrainConfig) -> contextlib.AbstractContextManager[None]:
    """RUN for `ess train`: a failure keeps what was written once a checkpoint exists (--resume continues it)."""
    return _on_main(out, "ess train", RUN_FILES.__contains__, inputs=(train.data, train.val_data),
                    keep=lambda e: (out / "last.pt").exists(), recognise=_is_run)


def _is_eval(path: Path) -> bool:
    try:
        metrics = read_json(path / "metrics.json")
    except InputError:
        return False
    return isinstance(metrics, dict) and {"miou", "head", "run"} <= set(metrics)


def claim_eval(out: Path, data: Path) -> contextlib.AbstractContextManager[None]:
    """EVAL for `ess eval` of the build `data`."""
    return _on_main(out, "ess eval", EVAL_FILES.__contains__, inputs=(data,), recognise=_is_eval)


def prediction_names(image: Path) -> tuple[str, str]:
    """The label map's and the overlay's file names of one input image."""
    return f"{image.stem}.png", f"{image.stem}_overlay.png"


def claim_predictions(out: Path, images: Iterable[Path]) -> contextlib.AbstractContextManager[None]:
    """DIR for `ess predict`; refused where an output would replace one of the input images."""
    images = list(images)
    names = {name for image in images for name in prediction_names(image)}
    inputs = {os.path.realpath(image) for image in images}
    clash = next((name for name in sorted(names) if os.path.realpath(out / name) in inputs), None)
    if clash is not None:
        raise InputError(out / clash, "is an input image: its prediction would replace it; choose another --out")
    return _on_main(out, "ess predict", names.__contains__)
