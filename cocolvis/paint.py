"""Paint one image's label map: COCO-Stuff stuff regions first, LVIS instances over them.

This is the work a build worker does per image, so it is kept small and fast. All
decoding is pycocotools' (the pixels equal lvis-api's `ann_to_mask` and pycocotools'
`annToMask`), and as little of it as possible: an LVIS polygon is rasterized in a frame
cut past its far corner and painted inside its bounding box; disjoint stuff regions
decode as a few bit planes of a region index mapped through one look-up table. Stuff
pixels carry a flag bit while painting, so one `bincount` gives the per-class pixel
counts of both sources.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import pycocotools.mask as mask_utils

from cocolvis.dataset import mask_name, write_png
from segkit.io import InputError

ORDERS = ("area", "file")
STUFF_FLAG = 0x8000
"""Set on stuff-painted pixels of the working map; class ids stay below it."""


class Stuff(NamedTuple):
    """A COCO-Stuff stuff region, its category mapped to the merged class id."""

    class_id: int
    segmentation: list | dict  # polygons or an RLE, checked by cocolvis.validate
    ann_id: int


class Thing(NamedTuple):
    """An LVIS instance (its LVIS category id is its merged class id)."""

    class_id: int
    segmentation: list | dict
    area: float | None  # the file's `area`, which orders the painting; None: the decoded area
    ann_id: int


class MaskTask(NamedTuple):
    """One image's annotations, already mapped to merged class ids; what a worker receives."""

    masks_dir: str
    image_id: int
    height: int
    width: int
    stuff: list  # [Stuff], file order
    things: list  # [Thing], file order
    order: str
    lvis_file: str = ""  # where the annotations come from, to name them in an error
    coco_file: str = ""


class MaskResult(NamedTuple):
    """Which classes a written mask holds, with pixels painted by each source."""

    image_id: int
    classes: list
    lvis_pixels: list
    coco_pixels: list


def to_rle(segm, height: int, width: int) -> dict:
    """An annotation's segmentation as one RLE, the way lvis-api and pycocotools convert it."""
    if isinstance(segm, list):  # polygons: one object may have several parts
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm["counts"], list):  # uncompressed RLE
        return mask_utils.frPyObjects(segm, height, width)
    return segm


def polygon_frame(polygons: list, height: int, width: int) -> tuple[int, int]:
    """(frame height, frame width): the image cut just past the polygons' far corner.

    pycocotools rasterizes the polygons in that frame to exactly the pixels it gives in
    the whole image: the vertices do not move (so no floating-point rounding changes),
    and the frame keeps a margin past the last vertex, so its clipping acts only where
    the image's does. Moving the near side too would change the rasterizer's rounding
    of edges that pass exactly half-way between pixels.
    """
    x = max(max(p[0::2]) for p in polygons)  # a NaN, inf or string raises: the caller names the annotation
    y = max(max(p[1::2]) for p in polygons)
    return min(height, max(0, math.ceil(y) + 2)), min(width, max(0, math.ceil(x) + 2))


class Decoded(NamedTuple):
    """An annotation's mask in a frame at the image's top-left corner, with its pixel box and area."""

    mask: np.ndarray
    box: tuple  # (x, y, w, h)
    area: int


def decode_framed(segm, height: int, width: int) -> Decoded:
    """An annotation's mask, decoded by pycocotools in the smallest frame it can use.

    Polygons are rasterized in a frame cut past their far corner (see `polygon_frame`);
    an RLE covers the image by definition and is decoded whole. The mask placed at the
    image's top-left corner equals the full-frame `annToMask`.
    """
    if isinstance(segm, list):
        h, w = polygon_frame(segm, height, width)
        if h == 0 or w == 0:  # wholly above or left of the image
            return Decoded(np.zeros((0, 0), np.uint8), (0, 0, 0, 0), 0)
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    else:
        rle = to_rle(segm, height, width)
    box = tuple(int(v) for v in mask_utils.toBbox(rle))
    return Decoded(mask_utils.decode(rle), box, int(mask_utils.area(rle)))


def _paint(work: np.ndarray, d: Decoded, value: int) -> None:
    """Set `value` where the decoded mask is on, touching only its bounding box."""
    x, y, w, h = d.box
    if w == 0 or h == 0:
        return
    np.copyto(work[y:y + h, x:x + w], value, where=d.mask[y:y + h, x:x + w].view(bool))


def painting_sequence(areas: list[float], order: str) -> list[int]:
    """Indices of the LVIS instances in painting order; a later-painted instance wins.

    `area`: largest first, so a small object on a large one stays visible (ties: the
    earlier annotation wins). `file`: the first annotation of the file wins.
    """
    n = len(areas)
    if order == "area":
        return sorted(range(n), key=lambda i: (-areas[i], -i))
    if order == "file":
        return list(range(n - 1, -1, -1))
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


def paint_stuff(height: int, width: int, stuff: list) -> np.ndarray:
    """The working map of the stuff regions (flagged class ids), the first annotation winning.

    Disjoint regions, as COCO-Stuff's are, go through one look-up table: region i (from 1)
    sets bit b of a region index wherever the union of the regions with bit b in i is on,
    so K regions cost ceil(log2(K + 1)) full-frame decodes instead of K. Overlapping
    regions are painted one by one, last to first.
    """
    rles = [to_rle(s.segmentation, height, width) for s in stuff]
    if len(rles) < 4 or len(rles) > 255 or \
            int(mask_utils.area(mask_utils.merge(rles))) != sum(int(mask_utils.area(r)) for r in rles):
        work = np.zeros((height, width), np.uint16)
        for s, rle in zip(reversed(stuff), reversed(rles)):
            _paint(work, Decoded(mask_utils.decode(rle), tuple(int(v) for v in mask_utils.toBbox(rle)), 0),
                   s.class_id | STUFF_FLAG)
        return work
    index = None
    for bit in range(len(rles).bit_length()):
        members = [rle for i, rle in enumerate(rles, 1) if i >> bit & 1]
        plane = mask_utils.decode(members[0] if len(members) == 1 else mask_utils.merge(members))
        if index is None:
            index = plane
        else:
            index |= plane << bit
    table = np.zeros(256, np.uint16)
    table[1:len(stuff) + 1] = [s.class_id | STUFF_FLAG for s in stuff]
    # The index is column-major, as pycocotools decodes; cv2.transpose of its transpose is
    # the fast way to a row-major copy.
    return cv2.LUT(cv2.transpose(index.T), table)


def paint_label_map(height: int, width: int, stuff: list, things: list, order: str = "area"):
    """Paint one label map. Returns (uint16 label map, lvis pixel counts, stuff pixel counts).

    `stuff` is [Stuff], the first annotation winning where two overlap; `things` is
    [Thing], always painted over stuff. The counts are arrays indexed by class id.
    """
    work = paint_stuff(height, width, stuff)
    masks = [decode_framed(t.segmentation, height, width) for t in things]
    areas = [float(d.area) if t.area is None else float(t.area) for t, d in zip(things, masks)]
    for i in painting_sequence(areas, order):
        _paint(work, masks[i], things[i].class_id)
    counts = np.bincount(work.ravel(), minlength=2 * STUFF_FLAG)
    np.bitwise_and(work, STUFF_FLAG - 1, out=work)
    return work, counts[:STUFF_FLAG], counts[STUFF_FLAG:2 * STUFF_FLAG]


def _undecodable(task: MaskTask, error: Exception) -> InputError:
    """The error naming the annotation that pycocotools cannot decode (found by decoding each again).

    `cocolvis.validate` checks every segmentation before a task is made; this names what
    it could still miss.
    """
    for file, entries in ((task.coco_file, task.stuff), (task.lvis_file, task.things)):
        for entry in entries:
            try:
                decode_framed(entry.segmentation, task.height, task.width)
            except (ValueError, TypeError, OverflowError) as e:
                return InputError(file, f"annotation {entry.ann_id} (image {task.image_id}): "
                                        f"cannot decode its segmentation: {e}")
    return InputError(task.lvis_file, f"image {task.image_id}: cannot paint its mask: {error}")


def write_mask(task: MaskTask) -> MaskResult:
    """Paint and write one image's mask; the worker function of the build's process pool."""
    try:
        label, lvis, coco = paint_label_map(task.height, task.width, task.stuff, task.things, task.order)
    except (ValueError, TypeError, OverflowError) as e:  # pycocotools' errors, or a bad coordinate
        raise _undecodable(task, e) from None
    write_png(Path(task.masks_dir) / mask_name(task.image_id), label)
    lvis[0] = coco[0] = 0
    classes = np.flatnonzero(lvis + coco)
    return MaskResult(task.image_id, classes.tolist(), lvis[classes].tolist(), coco[classes].tolist())
