"""Bounds on every value of an annotation file before pycocotools sees it.

pycocotools trusts its input: a NaN, infinite or huge polygon coordinate, a garbled
compressed RLE string or uncompressed counts that do not add up to the image crash it,
make it loop or allocate without end, or decode silently into a wrong mask. Each check
here returns None for a good value or a short phrase saying what is wrong, for the
caller to name the file and the annotation.

The limits:
  * image sides 1..MAX_SIDE pixels and at most MAX_PIXELS pixels per image (segkit.images'
    limits: a worker holds a few arrays of that size, about 10 bytes a pixel);
  * polygon coordinates finite numbers within POLYGON_MARGIN pixels of the image (real
    annotations reach a pixel or two past the border), at least 3 points, and a
    rasterized outline of at most MAX_OUTLINE pixels (what pycocotools allocates);
  * RLE `size` equal to the image's [height, width]; uncompressed `counts` non-negative
    integers, compressed `counts` in pycocotools' string grammar (below); either kind
    decoding to exactly height x width pixels.

The compressed RLE grammar (pycocotools' `rleToString`): each count is a little-endian
run of 6-bit characters `chr(48 + c)`; bit 0x20 of c says another character follows,
bit 0x10 of the last one is the sign; from the fourth count on, each is stored as its
difference from the count two before it.
"""
from __future__ import annotations

import itertools
import math
import unicodedata
from array import array

import numpy as np

from segkit.images import size_problem

POLYGON_MARGIN = 1000.0
"""How far past the image border (in pixels) a polygon vertex may lie."""
MAX_OUTLINE = 1 << 22
"""Largest sum over a polygon's edges of max(|dx|, |dy|), in pixels."""

NUMBER = (int, float)
POLYGON_TYPES = (list, array)
"""A polygon as read from JSON, or compacted to doubles as it was read (`cocolvis.inputs`)."""
MAX_RLE_CHARS = 6
"""Characters per compressed count: enough for any count of an image within MAX_PIXELS, and few
enough that no shift in pycocotools' decoder overflows."""


def is_int(value) -> bool:
    """An integer from JSON: not a bool, not a float."""
    return type(value) is int


def check_class_name(name: str) -> str | None:
    """A class name: not blank, and no control character or line break (a newline would split a line of
    stats.csv and of every table and figure label made from it)."""
    if not name.strip():
        return "a class name must not be blank"
    bad = next((ch for ch in name if unicodedata.category(ch) in ("Cc", "Zl", "Zp")), None)
    if bad is not None:
        return f"class name {name!r} holds the control character {bad!r}"
    return None


def check_image_size(height, width) -> str | None:
    if not (is_int(height) and is_int(width)):
        return "needs integer `height` and `width`"
    return size_problem(height, width)


def check_polygon(poly, height: int, width: int) -> str | None:
    """One polygon: a flat list of finite x, y numbers near the image, with a bounded outline."""
    if type(poly) not in POLYGON_TYPES or len(poly) % 2:
        return "a polygon must be a flat list of x, y pairs"
    if not set(map(type, poly)) <= {int, float}:
        return "polygon coordinates must be numbers"
    try:
        total = sum(poly)
    except OverflowError:
        total = math.inf
    if not math.isfinite(total):
        return "polygon coordinates must be finite"
    xs, ys = poly[0::2], poly[1::2]
    x0, x1, y0, y1 = min(xs, default=0), max(xs, default=0), min(ys, default=0), max(ys, default=0)
    if x0 < -POLYGON_MARGIN or y0 < -POLYGON_MARGIN or x1 > width + POLYGON_MARGIN or y1 > height + POLYGON_MARGIN:
        return f"polygon coordinates lie more than {POLYGON_MARGIN:g} pixels outside the {height}x{width} image"
    if len(xs) * (max(x1 - x0, y1 - y0) + 1) > MAX_OUTLINE:  # cheap bound first, exact sum only if needed
        p = np.asarray(poly, np.float64).reshape(-1, 2)
        outline = np.abs(p - np.roll(p, 1, axis=0)).max(axis=1).sum()
        if outline > MAX_OUTLINE:
            return f"polygon outline of {outline:.0f} pixels exceeds the limit of {MAX_OUTLINE}"
    return None


def check_polygons(polygons: list, heights: list, widths: list) -> list[tuple[int, str]]:
    """`check_polygon` for many polygons at once: (index, problem) of the bad ones, all in numpy
    but for one pass over the values' types. The polygons must be flat lists of even length."""
    bad, start = [], 0
    while start < len(polygons):  # batches of about a million values keep the copies small
        stop, size = start, 0
        while stop < len(polygons) and size < 1 << 20:
            size += len(polygons[stop])
            stop += 1
        bad += [(start + i, why) for i, why in _check_polygon_batch(polygons[start:stop], heights[start:stop],
                                                                    widths[start:stop])]
        start = stop
    return bad


def _check_polygon_batch(polygons: list, heights: list, widths: list) -> list[tuple[int, str]]:
    lists = [p for p in polygons if type(p) is list]  # arrays of doubles hold only numbers
    try:
        if not set(map(type, itertools.chain.from_iterable(lists))) <= {int, float}:
            raise TypeError
        xy = np.concatenate([np.frombuffer(p, np.float64) if type(p) is array else np.array(p, np.float64)
                             for p in polygons] or [np.zeros(0)]).reshape(-1, 2)
    except (TypeError, OverflowError):  # find the culprit, polygon by polygon
        return [(i, p) for i, p in ((i, check_polygon(poly, h, w))
                                    for i, (poly, h, w) in enumerate(zip(polygons, heights, widths))) if p][:1]
    points = np.fromiter(map(len, polygons), np.int64, len(polygons)) // 2
    starts = np.cumsum(points) - points
    nonempty = points > 0
    starts_ne = starts[nonempty]
    if not np.isfinite(xy).all():
        problem = np.zeros(len(polygons), bool)
        problem[np.flatnonzero(nonempty)] = np.logical_or.reduceat(~np.isfinite(xy).all(axis=1), starts_ne)
        return [(int(np.argmax(problem)), "polygon coordinates must be finite")]
    lo = np.full((len(polygons), 2), 0.0)
    hi = np.full((len(polygons), 2), 0.0)
    lo[nonempty] = np.minimum.reduceat(xy, starts_ne)
    hi[nonempty] = np.maximum.reduceat(xy, starts_ne)
    limit = np.stack([np.asarray(widths, np.float64), np.asarray(heights, np.float64)], 1) + POLYGON_MARGIN
    outside = (lo < -POLYGON_MARGIN).any(axis=1) | (hi > limit).any(axis=1)
    with np.errstate(over="ignore"):  # a huge extent overflows to inf, which the exact check below then refuses
        outline = points * ((hi - lo).max(axis=1) + 1) > MAX_OUTLINE  # the cheap bound; exact below
    found = []
    for i in np.flatnonzero(outside | outline):
        problem = check_polygon(polygons[i], heights[i], widths[i])
        if problem:
            found.append((int(i), problem))
    return found


def check_uncompressed_counts(counts: list, height: int, width: int) -> str | None:
    if not counts or not set(map(type, counts)) <= {int}:
        return "RLE `counts` must be a non-empty list of integers or a string"
    if min(counts) < 0:
        return "RLE `counts` must not be negative"
    if sum(counts) != height * width:
        return f"RLE `counts` cover {sum(counts)} pixels, not the image's {height}x{width}"
    return None


def check_rle_strings(strings: list, pixels: list) -> list[tuple[int, str]]:
    """(index, problem) for each compressed RLE string that is not exactly `pixels[index]` pixels.

    Decodes the counts of all strings at once with numpy (pycocotools' `rleFrString`,
    vectorized), in batches, so a file of a million RLEs is checked in seconds.
    """
    bad, batch, size = [], [], 0
    for i, s in enumerate(strings):
        if type(s) is not str or not s or not s.isascii():
            bad.append((i, "RLE `counts` must be a list of integers or a compressed RLE string"))
            continue
        batch.append(i)
        size += len(s)
        if size > 1 << 22 or i == len(strings) - 1:
            bad += [(batch[j], why) for j, why in _check_batch([strings[j] for j in batch], [pixels[j] for j in batch])]
            batch, size = [], 0
    if batch:
        bad += [(batch[j], why) for j, why in _check_batch([strings[j] for j in batch], [pixels[j] for j in batch])]
    return sorted(bad)


def _segmented_cumsum(x: np.ndarray, reset: np.ndarray) -> np.ndarray:
    """Running sums of x that start again wherever `reset` is true (it must be at 0)."""
    total = np.cumsum(x)
    before = total - x
    return total - before[np.maximum.accumulate(np.where(reset, np.arange(len(x)), 0))]


def _check_batch(strings: list[str], pixels: list[int]) -> list[tuple[int, str]]:
    """_check_rle_strings for ASCII non-empty strings: (position in the batch, problem)."""
    lengths = np.fromiter(map(len, strings), np.int64, len(strings))
    ends = np.cumsum(lengths)
    c = np.frombuffer("".join(strings).encode("ascii"), np.uint8) - np.uint8(48)  # wraps below 48
    bad_char = c > 63
    last = c < 32  # a count's last character
    bad = np.zeros(len(strings), bool)
    if bad_char.any():
        bad[np.searchsorted(ends, np.flatnonzero(bad_char), side="right")] = True
    bad |= ~last[ends - 1]  # cut off inside a count
    stops = np.flatnonzero(last)
    starts = np.concatenate(([0], stops[:-1] + 1))
    nchars = stops - starts + 1
    too_long = np.flatnonzero(nchars > MAX_RLE_CHARS)
    if len(too_long):
        bad[np.searchsorted(ends, stops[too_long], side="right")] = True
    if bad.any():  # decode only the strings that parse
        good = np.flatnonzero(~bad)
        found = [(int(i), "RLE `counts` is not a valid compressed RLE string") for i in np.flatnonzero(bad)]
        if len(good):
            found += [(int(good[j]), why) for j, why in _check_batch([strings[i] for i in good], [pixels[i] for i in good])]
        return found
    digits = c & np.uint8(0x1F)
    x = digits[starts].astype(np.int64)
    for k in range(1, MAX_RLE_CHARS):  # the k-th character of the counts that have one
        longer = np.flatnonzero(nchars > k)
        if not len(longer):
            break
        x[longer] |= digits[starts[longer] + k].astype(np.int64) << (5 * k)
    x -= np.where(c[stops] & 0x10, np.int64(1) << (5 * nchars), 0)  # the sign bit
    per_string = np.diff(np.concatenate(([0], np.searchsorted(stops, ends - 1, side="right"))))
    first_value = np.cumsum(per_string) - per_string
    j = np.arange(len(x)) - np.repeat(first_value, per_string)
    # From the fourth count on, a count is its difference from the count two before: a
    # running sum along each string's even and odd counts, started by its first three.
    counts = np.empty_like(x)
    for parity in (0, 1):
        counts[parity::2] = _segmented_cumsum(x[parity::2], j[parity::2] < 3)
    negative = np.minimum.reduceat(counts, first_value) < 0
    total = np.add.reduceat(counts, first_value)
    found = []
    for i in np.flatnonzero(negative | (total != np.asarray(pixels, np.int64))):
        if negative[i]:
            found.append((int(i), "RLE `counts` decodes to a negative run"))
        else:
            found.append((int(i), f"RLE `counts` cover {int(total[i])} pixels, not the image's {pixels[i]}"))
    return found
