"""Reading image files: the size a file's header claims is checked before anything is decoded.

An image header can claim any size (a 100-byte PNG may claim 50000 x 50000 pixels), and a decoder
allocates what it claims. `read_image` reads the header alone first (Pillow opens files lazily)
and refuses an image beyond MAX_SIDE a side or MAX_PIXELS in all, the limits of a build's images,
or beyond what the caller's `fits` check allows; only then does OpenCV decode it. A format Pillow
cannot identify is left to OpenCV and its own limit (2^30 pixels); either way a file that cannot be
decoded is one InputError.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from segkit.errors import InputError

MAX_SIDE = 16384
"""Largest image height or width."""
MAX_PIXELS = 1 << 26
"""Largest image area (67.1 M pixels, e.g. 8192 x 8192)."""


def size_problem(height: int, width: int) -> str | None:
    """Why an image of this size is refused, or None when it is within the limits."""
    if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE) or height * width > MAX_PIXELS:
        return f"size {height}x{width} is outside the limits (sides 1..{MAX_SIDE}, at most {MAX_PIXELS} pixels)"
    return None


def header_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(height, width) an image file's header claims, read without decoding; None if Pillow cannot identify
    the format. A missing or unreadable file raises OSError; a header beyond Pillow's own limit, InputError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
    except Image.DecompressionBombError:  # Pillow's own limit, 2.7x ours: it does not say the size
        raise InputError(path, f"image header: size is outside the limits (more than {MAX_PIXELS} pixels)") from None
    except (UnidentifiedImageError, SyntaxError, ValueError):
        return None
    return height, width


def read_image(path: str | os.PathLike, flags: int, problem: str,
               fits: Callable[[int, int], None] | None = None) -> np.ndarray:
    """An image file decoded by OpenCV (`flags`, e.g. cv2.IMREAD_COLOR), its header's size checked first.

    `problem` is the message for a missing or undecodable file; `fits(height, width)` may raise to refuse
    a size within the limits (e.g. one that would not fit in memory once processed).
    """
    path = Path(path)
    try:
        size = header_size(path)
        data = np.fromfile(path, np.uint8)
    except OSError:
        raise InputError(path, problem) from None
    if size is not None:
        why = size_problem(*size)
        if why:
            raise InputError(path, f"image header: {why}")
        if fits is not None:
            fits(*size)
    try:
        image = cv2.imdecode(data, flags) if data.size else None
    except cv2.error as e:
        reason = " ".join(str(e).split())[-160:]
        raise InputError(path, f"{problem} (OpenCV: {reason})") from None
    if image is None:
        raise InputError(path, problem)
    if size is None:  # a format only OpenCV reads: the same limits, checked once decoded
        why = size_problem(*image.shape[:2])
        if why:
            raise InputError(path, f"image: {why}")
        if fits is not None:
            fits(*image.shape[:2])
    return image
