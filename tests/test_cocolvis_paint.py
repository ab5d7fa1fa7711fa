"""Painting one label map, against a brute-force full-frame painter using pycocotools' COCO API."""
from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from pycocotools.coco import COCO

from cocolvis.paint import Stuff, Thing, paint_label_map, painting_sequence



def square(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def test_area_order_keeps_the_small_object_and_file_order_keeps_the_first():
    big, small = square(0, 0, 40, 40), square(10, 10, 20, 20)
    things = [Thing(7, big, 1600.0, 1), Thing(9, small, 100.0, 2)]
    for seq in (things, things[::-1]):
        label, _, _ = paint_label_map(50, 60, [], seq, "area")
        assert label[15, 15] == 9 and label[30, 30] == 7
    label, _, _ = paint_label_map(50, 60, [], things, "file")
    assert label[15, 15] == 7
    label, _, _ = paint_label_map(50, 60, [], things[::-1], "file")
    assert label[15, 15] == 9


def test_equal_areas_earlier_annotation_wins():
    assert painting_sequence([5.0, 5.0, 9.0], "area") == [2, 1, 0]
    assert painting_sequence([5.0, 5.0, 9.0], "file") == [2, 1, 0]
    assert painting_sequence([1.0, 2.0, 3.0], "area") == [2, 1, 0]
    with pytest.raises(ValueError):
        painting_sequence([1.0], "size")


def test_lvis_over_stuff_and_counts_by_source():
    h, w = 30, 40
    sky = np.zeros((h, w), np.uint8)
    sky[:15] = 1
    ground = 1 - sky
    wall = np.zeros((h, w), np.uint8)
    wall[10:20] = 1  # overlaps both: the first stuff annotation wins
    stuff = [Stuff(1250, mask_utils.encode(np.asfortranarray(sky)), 1),
             Stuff(1260, mask_utils.encode(np.asfortranarray(ground)), 2),
             Stuff(1270, mask_utils.encode(np.asfortranarray(wall)), 4)]
    things = [Thing(5, square(0, 0, 10, 10), None, 3)]  # no area field: computed from the mask
    label, lvis, coco = paint_label_map(h, w, stuff, things, "area")
    assert label.dtype == np.uint16 and label.shape == (h, w)
    assert (label[:10, :10] == 5).all()
    assert lvis[5] == 100 and coco[5] == 0
    assert coco[1250] == 15 * 40 - 100 and coco[1260] == 15 * 40 and coco[1270] == 0
    assert lvis[0] == 0 and label.min() > 0


def test_random_scenes_equal_brute_force_reference():
    rng = np.random.default_rng(3)
    for trial in range(12):
        h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        anns, stuff, things = [], [], []
        for k in range(int(rng.integers(0, 5))):  # stuff: RLE, may overlap
            m = np.zeros((h, w), np.uint8)
            y, x = rng.integers(0, h), rng.integers(0, w)
            m[y:y + int(rng.integers(1, h)), x:x + int(rng.integers(1, w))] = 1
            rle = mask_utils.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode()
            stuff.append(Stuff(1200 + k, rle, k))
            anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": 1200 + k, "segmentation": rle, "stuff": 1})
        for k in range(int(rng.integers(0, 7))):  # LVIS: polygons reaching past the borders, several parts
            polys = []
            for _ in range(int(rng.integers(1, 3))):
                n = int(rng.integers(3, 9))
                cx, cy, r = rng.uniform(-5, w + 5), rng.uniform(-5, h + 5), rng.uniform(2, 30)
                a = np.sort(rng.uniform(0, 2 * np.pi, n))
                polys.append(np.round(np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], 1).ravel(), 2).tolist())
            area = float(rng.choice([100.0, 200.0, rng.uniform(1, 900)]))  # repeated areas test ties
            things.append(Thing(k + 1, polys, area, k))
            anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": k + 1, "segmentation": polys,
                         "area": area, "stuff": 0})
        coco = COCO()
        coco.dataset = {"images": [{"id": 1, "height": h, "width": w}], "annotations": anns,
                        "categories": [{"id": a["category_id"]} for a in anns]}
        coco.createIndex()
        for order in ("area", "file"):
            expected = np.zeros((h, w), np.int64)
            stuff_anns = [a for a in anns if a["stuff"]]
            thing_anns = [a for a in anns if not a["stuff"]]
            for a in stuff_anns:  # first wins
                m = coco.annToMask(a).astype(bool) & (expected == 0)
                expected[m] = a["category_id"]
            ranked = sorted(enumerate(thing_anns), key=lambda t: (t[1]["area"], t[0])) if order == "area" \
                else list(enumerate(thing_anns))
            painted = np.zeros((h, w), bool)
            for _, a in ranked:  # smallest (or first) wins
                m = coco.annToMask(a).astype(bool) & ~painted
                expected[m] = a["category_id"]
                painted |= m
            label, lvis, cpx = paint_label_map(h, w, stuff, things, order)
            np.testing.assert_array_equal(label, expected, err_msg=f"trial {trial} {order}")
            assert lvis[1:].sum() == painted.sum()
            assert cpx.sum() == ((expected > 0) & ~painted).sum()


def _random_polygons(rng, h: int, w: int) -> list:
    """Polygons made to hit the rasterizer's edge cases: coordinates on tenths (rounding ties on the
    1/5-pixel grid), hundredths as LVIS has them, integers, slivers, repeated points, and parts
    reaching past every border."""
    polys = []
    for _ in range(int(rng.integers(1, 3))):
        n = int(rng.integers(3, 13))
        cx, cy = rng.uniform(-10, w + 10), rng.uniform(-10, h + 10)
        rx, ry = rng.uniform(0.3, 40), rng.uniform(0.3, 40) * (0.05 if rng.random() < 0.15 else 1)
        a = np.sort(rng.uniform(0, 2 * np.pi, n))
        xy = np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], 1)
        if rng.random() < 0.1:
            xy[1] = xy[0]
        decimals = int(rng.choice([0, 1, 1, 2]))
        polys.append(np.round(xy, decimals).ravel().tolist())
    return polys


def test_framed_decoding_equals_the_full_frame():
    """Rasterizing polygons in a frame cut past their far corner gives exactly the full-frame pixels."""
    from cocolvis.paint import decode_framed, to_rle

    rng = np.random.default_rng(11)
    smaller = 0
    for trial in range(3000):
        h, w = int(rng.integers(4, 100)), int(rng.integers(4, 100))
        polys = _random_polygons(rng, h, w)
        full = mask_utils.decode(to_rle(polys, h, w))
        d = decode_framed(polys, h, w)
        placed = np.zeros((h, w), np.uint8)
        mh, mw = d.mask.shape
        placed[:mh, :mw] = d.mask
        np.testing.assert_array_equal(placed, full, err_msg=f"trial {trial}: {polys} in {h}x{w}")
        assert d.area == int(full.sum())
        x, y, bw, bh = d.box
        if d.area:
            assert full[y:y + bh, x:x + bw].sum() == d.area and full[y, x:x + bw].any() and full[y:y + bh, x].any()
        smaller += mh * mw < h * w
    assert smaller > 1500  # most polygons really were decoded in a smaller frame


@pytest.mark.parametrize("overlap", [False, True])
def test_stuff_through_one_table_equals_painting_region_by_region(overlap):
    """Disjoint regions take the bit-plane path, overlapping ones the region-by-region one: same pixels."""
    from cocolvis.paint import STUFF_FLAG, paint_stuff

    rng = np.random.default_rng(5)
    h, w = 70, 90
    cells = rng.integers(0, 9, (h, w))  # 9 disjoint regions, one per cell value
    stuff, masks = [], []
    for k in range(9):
        m = (cells == k).astype(np.uint8)
        if overlap and k % 3 == 0:
            m[10:40, 20:60] = 1  # overlaps its neighbours: the first annotation must win
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode()
        stuff.append(Stuff(1210 + 7 * k, rle, k))
        masks.append(m.astype(bool))
    expected = np.zeros((h, w), np.int64)
    for (cls, _, _), m in zip(stuff, masks):
        expected[m & (expected == 0)] = cls | STUFF_FLAG
    np.testing.assert_array_equal(paint_stuff(h, w, stuff), expected)
