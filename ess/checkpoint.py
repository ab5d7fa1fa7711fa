"""Checkpoints: one dict of tensors and plain data, loadable with `torch.load(weights_only=True)`.

    format, version     identify the file as an ess checkpoint
    iteration           iterations completed
    model_args          ess.config.ModelArgs as a plain dict: rebuilds the network with ess.model alone
    model, optimizer, scaler   state dicts
    config              the run's resolved flat configuration, training settings included (for the record)
    best_miou           best validation mIoU so far (None before the first validation)
    seconds             training time so far

`load_model` needs nothing but the file: nanoGPT's `model_args` convention.
"""
from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from segkit.io import InputError, atomic_path
from ess.config import ModelArgs
from ess.model import Segmenter

FORMAT = "ess-checkpoint"
VERSION = 2


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write atomically: an interrupted save leaves the previous checkpoint in place."""
    state = {"format": FORMAT, "version": VERSION, **state}
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as e:  # torch's archive writer reports a full disk or a failed write so
            reason = " ".join(str(e).split())[:200]
            raise InputError(path, f"cannot write the checkpoint (is the disk full?): {reason}") from None


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
    missing = [k for k in ("iteration", "model", "model_args", "config") if k not in state]
    if missing:
        raise InputError(path, f"checkpoint lacks {', '.join(missing)}")
    return state


def check_head(state: dict, head: str, path: str | os.PathLike) -> None:
    """Refuse a checkpoint of another head than `head`, the head of the run it is loaded for."""
    saved = state["model_args"].get("head") if isinstance(state.get("model_args"), dict) else None
    if saved != head:
        raise InputError(path, f"holds a checkpoint of the {saved} head, but its run is of the {head} head "
                               f"(config.yaml)")


def load_weights(model: torch.nn.Module, state: dict, path: str | os.PathLike) -> None:
    """Load a checkpoint's model weights, turning another head, a shape or a key mismatch into one line."""
    check_head(state, model.args.head, path)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(" ".join(first[:3]).split())[:300]
        raise InputError(path, f"weights do not fit this model: {detail}") from None


def load_model(path: str | os.PathLike, map_location="cpu") -> tuple[Segmenter, dict]:
    """The network a checkpoint holds, with its weights, in eval mode; and the checkpoint itself."""
    state = load_checkpoint(path, map_location=map_location)
    try:
        args = ModelArgs(**{**state["model_args"], "pretrained": False})  # the checkpoint has the weights
        model = Segmenter.from_args(args)
    except (TypeError, ValueError) as e:
        raise InputError(path, f"model_args do not describe a model of this version: {e}") from None
    load_weights(model, state, path)
    return model.to(map_location).eval(), state
