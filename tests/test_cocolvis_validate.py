"""The value checks agree with pycocotools on good input and refuse what would hurt it."""
from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_utils

from cocolvis.validate import POLYGON_MARGIN, check_polygon, check_polygons, check_rle_strings


def test_compressed_rle_strings_of_real_masks_pass_and_wrong_sizes_fail():
    rng = np.random.default_rng(0)
    strings, pixels = [], []
    for i in range(200):
        h, w = rng.integers(1, 50, 2)
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        if i % 4 == 0:
            mask[: h // 2] = 1  # long runs: counts of several characters, negative deltas
        strings.append(mask_utils.encode(np.asfortranarray(mask))["counts"].decode())
        pixels.append(int(h * w))
    assert check_rle_strings(strings, pixels) == []
    wrong = check_rle_strings(strings, [p + 1 for p in pixels])
    assert [i for i, _ in wrong] == list(range(200))
    assert all(f"cover {p} pixels, not the image's {p + 1}" in why for (_, why), p in zip(wrong, pixels))


def test_garbled_rle_strings_fail():
    good = mask_utils.encode(np.asfortranarray(np.eye(20, dtype=np.uint8)))["counts"].decode()
    bad = [good[:-1] + "P", good + "\x7f", "", 5, "é", "PPPPPP0" + good, good[:4] + " " + good[4:]]
    found = check_rle_strings([good] + bad, [400] * (len(bad) + 1))
    assert [i for i, _ in found] == list(range(1, len(bad) + 1))


def test_polygons_in_one_batch_equal_one_by_one():
    rng = np.random.default_rng(1)
    polys = [rng.uniform(-5, 70, 2 * rng.integers(3, 12)).tolist() for _ in range(300)]
    polys[17][3] = 60 + POLYGON_MARGIN + 1
    polys[40][0] = -POLYGON_MARGIN - 1
    h, w = [50] * len(polys), [60] * len(polys)
    one_by_one = [(i, p) for i, p in enumerate(map(check_polygon, polys, h, w)) if p]
    assert [i for i, _ in one_by_one] == [17, 40]
    assert check_polygons(polys, h, w) == one_by_one
    polys[5][1] = float("nan")
    assert check_polygons(polys, h, w) == [(5, "polygon coordinates must be finite")]
    polys[5][1] = 10 ** 400
    assert check_polygons(polys, h, w) == [(5, "polygon coordinates must be finite")]
    polys[5][1] = "3"
    assert check_polygons(polys, h, w) == [(5, "polygon coordinates must be numbers")]
