"""Segment arbitrary images with a trained run.

For each IMAGE writes, into DIR, <stem>.png (uint16 class ids 1..C, as in the masks)
and <stem>_overlay.png (the prediction over the image, with a legend of the classes present).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
from tqdm import tqdm

from segkit.images import read_image
from segkit.io import InputError
from ess.data import to_tensor
from ess.device import precision
from ess.evaluate import write_label_png, write_rgb_png
from ess.memory import check_inference_memory
from ess.outputs import claim_predictions, prediction_names
from ess.run import Run
from ess.visualize import overlay_with_legend


def read_rgb(path: Path, fits: Callable[[int, int], None] | None = None) -> np.ndarray:
    """An image file as RGB uint8, its header's size checked (and by `fits(height, width)`) before decoding."""
    image = read_image(path, cv2.IMREAD_COLOR, "missing or not an image", fits)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@torch.no_grad()
def predict_image(run: Run, image, device: torch.device):
    """(H, W) int64 numpy class ids for one RGB uint8 image."""
    x = to_tensor(image)[None].to(device)
    with precision(device, run.config.train.amp).autocast():
        output = run.model(x)
    return run.model.predict(output)[0].cpu().numpy()


def predict_images(run: Run, images: list[str | Path], out: str | Path, device: torch.device,
                   progress: bool = True) -> list[Path]:
    """Write the label map and the overlay of every image; returns the label map paths.

    Every image is checked to exist before any output is written, and its size before it is decoded;
    a failure leaves none of this call's outputs behind (ess.outputs.claim_predictions).
    """
    images = [Path(p) for p in images]
    stems: dict[str, Path] = {}
    for p in images:
        if p.stem in stems:
            raise InputError(p, f"has the same name as {stems[p.stem]}; outputs are named by file name")
        stems[p.stem] = p
        if not p.is_file():
            raise InputError(p, "no such image file")
    out = Path(out)
    names = [c["name"] for c in run.classes]
    written = []
    with claim_predictions(out, images):
        for path in tqdm(images, desc="predict", unit="img", disable=not progress, dynamic_ncols=True):
            image = read_rgb(path, lambda h, w: check_inference_memory(run.model.args, h, w, device, path))
            labels = predict_image(run, image, device)
            label_name, overlay_name = prediction_names(path)
            write_label_png(out / label_name, labels)
            write_rgb_png(out / overlay_name, overlay_with_legend(image, labels, names))
            written.append(out / label_name)
    return written
