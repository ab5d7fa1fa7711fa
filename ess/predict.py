"""Segment arbitrary images with a trained run.

For each IMAGE writes, into DIR, <stem>.png (uint16 class ids 1..C, as in the masks)
and <stem>_overlay.png (the prediction over the image, with a legend of the classes present).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import torch
from tqdm import tqdm

from segkit.io import InputError
from ess.data import to_tensor
from ess.device import precision
from ess.evaluate import write_label_png, write_rgb_png
from ess.run import Run
from ess.visualize import overlay_with_legend


def read_rgb(path: Path):
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise InputError(path, "missing or not an image")
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

    Every image is checked to exist before any output is written; a failure in a fresh
    `out` leaves no directory behind.
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
    fresh = not out.exists()
    names = [c["name"] for c in run.classes]
    written = []
    try:
        for path in tqdm(images, desc="predict", unit="img", disable=not progress, dynamic_ncols=True):
            image = read_rgb(path)
            labels = predict_image(run, image, device)
            write_label_png(out / f"{path.stem}.png", labels)
            write_rgb_png(out / f"{path.stem}_overlay.png", overlay_with_legend(image, labels, names))
            written.append(out / f"{path.stem}.png")
    except BaseException:
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return written
