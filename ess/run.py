"""Load a trained run directory: its config, classes and model weights.

A run directory holds config.yaml, classes.json, log.csv, last.pt and, with
validation, val.csv and best.pt (plus eval/ once evaluated).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from segkit.io import InputError, read_json
from ess import config as cfg
from ess.checkpoint import check_head, load_model
from ess.model import Segmenter


@dataclass
class Run:
    dir: Path
    config: cfg.Config
    classes: list[dict]
    model: Segmenter
    checkpoint: Path
    iteration: int


def checkpoint_path(run_dir: Path, checkpoint: str = "best") -> Path:
    """best.pt, falling back to last.pt when the run never validated; or last.pt; or an explicit file."""
    if checkpoint == "best":
        best = run_dir / "best.pt"
        return best if best.exists() else run_dir / "last.pt"
    if checkpoint == "last":
        return run_dir / "last.pt"
    return Path(checkpoint)


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str | torch.device = "cpu") -> Run:
    """The run's model in eval mode with its weights, its resolved config and its classes."""
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise InputError(run_dir, "not a run directory")
    config = cfg.load(run_dir / "config.yaml")
    classes = read_json(run_dir / "classes.json")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, dict) and "name" in c for c in classes):
        raise InputError(run_dir / "classes.json", "expected a non-empty list of classes with names")
    path = checkpoint_path(run_dir, checkpoint)
    model, state = load_model(path, map_location=torch.device(device))
    check_head(state, config.model.head, path)
    if model.args.num_classes != len(classes):
        raise InputError(path, f"a model of {model.args.num_classes} classes, but {run_dir / 'classes.json'} "
                               f"lists {len(classes)}")
    return Run(dir=run_dir, config=config, classes=classes, model=model, checkpoint=path,
               iteration=int(state["iteration"]))
