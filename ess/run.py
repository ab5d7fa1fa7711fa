"""Load a trained run directory: its config, classes and model weights.

A run directory holds config.yaml, classes.json, log.csv, last.pt and, with
validation, best.pt (plus eval/ once evaluated).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cocolvis.io import InputError, read_json
from ess import config as cfg
from ess.checkpoint import load_checkpoint, load_weights
from ess.model import Segmenter


@dataclass
class Run:
    dir: Path
    config: dict
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
    from ess.train import model_from_config

    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise InputError(run_dir, "not a run directory")
    config = cfg.load(run_dir / "config.yaml")
    classes = read_json(run_dir / "classes.json")
    if not isinstance(classes, list) or not classes:
        raise InputError(run_dir / "classes.json", "expected a non-empty list of classes")
    path = checkpoint_path(run_dir, checkpoint)
    device = torch.device(device)
    state = load_checkpoint(path, map_location=device)
    model = model_from_config({**config, "pretrained": False}, len(classes))  # the checkpoint has the weights
    load_weights(model, state, path)
    model.to(device).eval()
    return Run(dir=run_dir, config=config, classes=classes, model=model, checkpoint=path,
               iteration=int(state["iteration"]))
