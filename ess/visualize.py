"""Fixed colours for class ids, colourised label maps, and overlays with a legend."""
from __future__ import annotations

import functools

import cv2
import numpy as np

MAX_ID = 1 << 16  # label maps are uint16


@functools.lru_cache(maxsize=1)
def _palette() -> np.ndarray:
    """The PASCAL VOC colour map extended to every uint16 id: id bits spread over R, G, B, high bits first."""
    ids = np.arange(MAX_ID, dtype=np.int64)
    rgb = np.zeros((MAX_ID, 3), dtype=np.int64)
    bits = ids.copy()
    for shift in range(7, -1, -1):
        for channel in range(3):
            rgb[:, channel] |= ((bits >> channel) & 1) << shift
        bits >>= 3
    rgb = rgb.astype(np.uint8)
    rgb.setflags(write=False)
    return rgb


def palette(num_ids: int) -> np.ndarray:
    """(num_ids, 3) uint8 RGB colours for ids 0..num_ids-1; id 0 (unlabeled) is black."""
    return _palette()[:num_ids]


def colorize(labels: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 RGB, the same colour for an id in every run and command."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= MAX_ID):
        raise ValueError(f"class ids must lie in 0..{MAX_ID - 1}")
    return _palette()[labels.astype(np.int64)]


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the colourised labels over an RGB image; unlabeled pixels keep the image."""
    color = colorize(labels).astype(np.float32)
    out = image.astype(np.float32)
    labelled = labels > 0
    out[labelled] = (1 - alpha) * out[labelled] + alpha * color[labelled]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def legend(labels: np.ndarray, names: list[str], height: int, width: int = 240, row: int = 18,
           most: int = 40) -> np.ndarray:
    """An RGB panel listing the classes present in `labels`, most pixels first, each with its colour.

    `names[i - 1]` is the name of class id i.
    """
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    order = ids[np.argsort(-counts, kind="stable")]
    shown = order[:most]
    rows = len(shown) + (1 if len(order) > most else 0)
    panel = np.full((max(height, (rows + 1) * row), width, 3), 255, dtype=np.uint8)
    colors = palette(MAX_ID)
    for i, class_id in enumerate(shown):
        y = (i + 1) * row
        cv2.rectangle(panel, (6, y - row + 4), (6 + row - 6, y - 2), tuple(int(v) for v in colors[class_id]), -1)
        cv2.rectangle(panel, (6, y - row + 4), (6 + row - 6, y - 2), (0, 0, 0), 1)
        name = names[class_id - 1] if 0 < class_id <= len(names) else str(class_id)
        cv2.putText(panel, f"{class_id} {name}"[:32], (row + 8, y - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.42,
                    (0, 0, 0), 1, cv2.LINE_AA)
    if len(order) > most:
        cv2.putText(panel, f"... {len(order) - most} more", (row + 8, (len(shown) + 1) * row - 5),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    return panel


def overlay_with_legend(image: np.ndarray, labels: np.ndarray, names: list[str], alpha: float = 0.5) -> np.ndarray:
    """The overlay with the legend panel on its right (the taller of the two sets the height)."""
    blended = overlay(image, labels, alpha)
    panel = legend(labels, names, blended.shape[0])
    if panel.shape[0] > blended.shape[0]:
        pad = np.full((panel.shape[0] - blended.shape[0], blended.shape[1], 3), 255, dtype=np.uint8)
        blended = np.concatenate([blended, pad], axis=0)
    return np.concatenate([blended, panel], axis=1)
