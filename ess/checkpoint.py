"""Checkpoints: one dict of tensors and plain data, loadable with `torch.load(weights_only=True)`.

    format, version     identify the file as an ess checkpoint
    iteration           iterations completed
    model, optimizer, scaler   state dicts
    config              the resolved training config
    best_miou           best validation mIoU so far (None before the first validation)
"""
from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from cocolvis.io import InputError, atomic_path

FORMAT = "ess-checkpoint"
VERSION = 1


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write atomically: an interrupted save leaves the previous checkpoint in place."""
    state = {"format": FORMAT, "version": VERSION, **state}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load and check a checkpoint; a missing, truncated or foreign file is one InputError line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such checkpoint")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning would only precede our error
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError,
            AttributeError, TypeError, KeyError, IndexError) as e:
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise InputError(path, f"not a readable checkpoint (truncated or not a torch file): {reason}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(path, "not an ess checkpoint (no 'format': 'ess-checkpoint' entry)")
    if state.get("version") != VERSION:
        raise InputError(path, f"checkpoint version {state.get('version')!r} is not supported (expected {VERSION})")
    missing = [k for k in ("iteration", "model", "config") if k not in state]
    if missing:
        raise InputError(path, f"checkpoint lacks {', '.join(missing)}")
    return state


def load_weights(model: torch.nn.Module, state: dict, path: str | os.PathLike) -> None:
    """Load a checkpoint's model weights, turning a shape or key mismatch into one line."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(" ".join(first[:3]).split())[:300]
        raise InputError(path, f"weights do not fit this model: {detail}") from None
