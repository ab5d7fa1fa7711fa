"""`cocolvis build` on real annotations, checked pixel for pixel against lvis-api and pycocotools.

The real LVIS v0.5 file and the real COCO-Stuff file share no image, so the tests make
copies in which they do: the stuff of COCO image 934 (480x640) moves onto LVIS image
157390 (480x640, 54 instances), COCO image 13715 (500x335) joins the LVIS file with no
instance (a stuff-only image), and a second COCO-Stuff file lists the other LVIS
images with no stuff, so the build reads two `--coco` files.
"""
from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from lvis import LVIS
from pycocotools.coco import COCO

from cocolvis.build import build_split
from cocolvis.dataset import BuiltDataset, read_label_png, read_stats
from cocolvis.vocab import merge_vocabularies, stuff_table

# pycocotools 2.0.x under numpy 2 warns on every decode; the warning is not ours to fix.

FIXTURES = Path(__file__).parent / "fixtures"
LVIS05 = FIXTURES / "lvis_v0.5_val_100.json"
STUFF = FIXTURES / "cocostuff_stuff_examples.json"
TARGET = 157390  # receives the stuff of COCO image 934
STUFF_ONLY = 13715
NOT_IN_COCO = 999_999_001
EMPTY = 999_999_002  # in both files, annotated in neither


def write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture(scope="session")
def real_inputs(tmp_path_factory):
    """(lvis file, [stuff file with image 934's stuff, stuff file of the other images])."""
    root = tmp_path_factory.mktemp("real")
    lvis = json.loads(LVIS05.read_text())
    stuff = json.loads(STUFF.read_text())
    by_id = {img["id"]: img for img in stuff["images"]}

    stuff_a = copy.deepcopy(stuff)
    for img in stuff_a["images"]:
        if img["id"] == 934:
            img["id"] = TARGET
    for ann in stuff_a["annotations"]:
        if ann["image_id"] == 934:
            ann["image_id"] = TARGET
    lvis["images"].append({"id": STUFF_ONLY, "height": 500, "width": 335, "coco_url": by_id[STUFF_ONLY]["coco_url"],
                           "not_exhaustive_category_ids": [], "neg_category_ids": [3, 1]})
    lvis["images"].append({"id": NOT_IN_COCO, "height": 10, "width": 10, "coco_url": "http://x/val2017/a.jpg",
                           "not_exhaustive_category_ids": [], "neg_category_ids": []})
    lvis["images"].append({"id": EMPTY, "height": 10, "width": 10, "coco_url": "http://x/val2017/b.jpg",
                           "not_exhaustive_category_ids": [], "neg_category_ids": []})
    others = [{"id": img["id"], "height": img["height"], "width": img["width"], "file_name": f"{img['id']:012d}.jpg"}
              for img in lvis["images"] if img["id"] not in (TARGET, STUFF_ONLY, NOT_IN_COCO)]
    stuff_b = {"info": stuff["info"], "licenses": [], "images": others, "annotations": [],
               "categories": stuff["categories"]}
    return (write(root / "lvis.json", lvis),
            [write(root / "stuff_a.json", stuff_a), write(root / "stuff_b.json", stuff_b)])


@pytest.fixture(scope="session")
def reference(real_inputs):
    """lvis-api and pycocotools on the same files, plus the merged stuff look-up table."""
    lvis_path, coco_paths = real_inputs
    lvis = LVIS(str(lvis_path))
    cocos = [COCO(str(p)) for p in coco_paths]
    classes = merge_vocabularies(list(lvis.cats.values()), cocos[0].dataset["categories"])
    return lvis, cocos, stuff_table(classes)


_CACHE: dict = {}


def reference_label(reference, image_id: int, order: str):
    key = (id(reference), image_id, order)
    if key not in _CACHE:
        _CACHE[key] = _reference_label(reference, image_id, order)
    return _CACHE[key]


def _reference_label(reference, image_id: int, order: str):
    """The label map by the reference decoders, one full-frame mask per annotation.

    Stuff: first annotation wins. LVIS over stuff: with `area` the smallest instance covering
    a pixel wins (ties: the earlier one), with `file` the first in the file wins.
    Returns (label, mask of LVIS-painted pixels).
    """
    lvis, cocos, table = reference
    img = lvis.imgs[image_id]
    stuff = np.zeros((img["height"], img["width"]), np.int64)
    for coco in cocos:
        for ann in coco.imgToAnns.get(image_id, []):
            if table[ann["category_id"]]:
                m = coco.annToMask(ann).astype(bool) & (stuff == 0)
                stuff[m] = table[ann["category_id"]]
    anns = list(enumerate(lvis.img_ann_map.get(image_id, [])))
    if order == "area":
        anns.sort(key=lambda t: (t[1]["area"], t[0]))
    things = np.zeros_like(stuff)
    painted = np.zeros(stuff.shape, bool)
    for _, ann in anns:
        m = lvis.ann_to_mask(ann).astype(bool) & ~painted
        things[m] = ann["category_id"]
        painted |= m
    return np.where(painted, things, stuff), painted


def _build(real_inputs, tmp_path_factory, order: str):
    lvis_path, coco_paths = real_inputs
    out = tmp_path_factory.mktemp(f"real-{order}") / "val"
    return order, out, build_split(coco=coco_paths, lvis=lvis_path, out=out, workers=1, order=order, progress=False)


@pytest.fixture(scope="session")
def built_area(real_inputs, tmp_path_factory):
    return _build(real_inputs, tmp_path_factory, "area")


@pytest.fixture(scope="session")
def built_file(real_inputs, tmp_path_factory):
    return _build(real_inputs, tmp_path_factory, "file")


@pytest.fixture(params=["area", "file"])
def built_real(request):
    """(order, output directory, summary) of the real build, in each order."""
    return request.getfixturevalue(f"built_{request.param}")


def test_masks_equal_reference_decoders(built_real, reference):
    order, out, _ = built_real
    ds = BuiltDataset(out)
    assert ds.num_classes == 1312
    for rec in ds.images:
        mask = ds.read_mask(rec["id"])
        expected, _ = reference_label(reference, rec["id"], order)
        assert mask.shape == (rec["height"], rec["width"])
        np.testing.assert_array_equal(mask, expected, err_msg=f"image {rec['id']}, order {order}")


def test_stuff_and_lvis_combine_on_the_shared_image(built_real, reference):
    order, out, _ = built_real
    mask = read_label_png(out / "masks" / f"{TARGET:012d}.png")
    _, painted = reference_label(reference, TARGET, order)
    lvis_ids = set(np.unique(mask[painted]).tolist())
    stuff_ids = set(np.unique(mask[~painted]).tolist()) - {0}
    assert lvis_ids and max(lvis_ids) <= 1230
    assert stuff_ids and min(stuff_ids) > 1230  # grass, trees, ... appended after the LVIS ids
    stuff_only = read_label_png(out / "masks" / f"{STUFF_ONLY:012d}.png")
    assert stuff_only.shape == (500, 335) and stuff_only.min() == 0 and stuff_only.max() > 1230


def test_orders_differ_where_instances_overlap(built_real, reference):
    order, out, _ = built_real
    ds = BuiltDataset(out)
    differ = 0
    for rec in ds.images:
        other, _ = reference_label(reference, rec["id"], "file" if order == "area" else "area")
        differ += int((ds.read_mask(rec["id"]) != other).sum())
    assert differ > 1000


def test_area_order_keeps_small_objects_visible(built_area, reference):
    """Every LVIS instance keeps the pixels no smaller instance covers; first-wins loses some."""
    _, out, _ = built_area
    lvis = reference[0]
    ds = BuiltDataset(out)
    hidden_in_file_order = 0
    for rec in ds.images:
        mask = ds.read_mask(rec["id"])
        file_mask, _ = reference_label(reference, rec["id"], "file")
        anns = sorted(lvis.img_ann_map.get(rec["id"], []), key=lambda a: a["area"])
        covered = np.zeros(mask.shape, bool)  # union of the instances smaller than the current one
        for ann in anns:
            own = lvis.ann_to_mask(ann).astype(bool)
            visible = own & ~covered
            assert (mask[visible] == ann["category_id"]).all()
            hidden_in_file_order += bool(visible.any() and not (file_mask[visible] == ann["category_id"]).any())
            covered |= own
    assert hidden_in_file_order > 0


def test_records_skips_and_report(built_real):
    order, out, summary = built_real
    ds = BuiltDataset(out)
    lvis = json.loads(LVIS05.read_text())
    annotated = {a["image_id"] for a in lvis["annotations"]}
    expected = [img["id"] for img in lvis["images"] if img["id"] in annotated] + [STUFF_ONLY]
    assert [r["id"] for r in ds.images] == expected
    by_id = {r["id"]: r for r in ds.images}
    src = {img["id"]: img for img in lvis["images"]}
    rec = by_id[266409]
    assert rec["file"] == "val2017/000000266409.jpg"  # v0.5: coco_url wins over file_name COCO_val2014_...
    assert rec["neg_category_ids"] == sorted(src[266409]["neg_category_ids"])
    assert by_id[STUFF_ONLY]["neg_category_ids"] == [1, 3]
    assert by_id[STUFF_ONLY]["file"] == "train2017/000000013715.jpg"
    assert sorted(p.name for p in (out / "masks").iterdir()) == sorted(f"{i:012d}.png" for i in expected)

    report = json.loads((out / "report.json").read_text())
    no_ann = sorted(img["id"] for img in lvis["images"] if img["id"] not in annotated) + [EMPTY]
    assert report["skipped"]["not_in_coco_stuff"] == [NOT_IN_COCO]
    assert sorted(report["skipped"]["no_annotations"]) == sorted(no_ann)
    assert report["images_written"] == len(expected) == summary["images_written"]
    assert report["images_skipped"] == 1 + len(no_ann)
    assert report["coco_annotations_ignored"] == 2  # the two `other` regions
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["options"]["order"] == order and len(meta["inputs"]["coco"]) == 2
    assert meta["counts"]["classes"] == 1312


def test_stats_match_masks_and_sources(built_real, reference):
    order, out, _ = built_real
    ds = BuiltDataset(out)
    n = ds.num_classes + 1
    pixels, images = np.zeros(n, np.int64), np.zeros(n, np.int64)
    lvis_px, coco_px = np.zeros(n, np.int64), np.zeros(n, np.int64)
    lvis_img, coco_img = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for rec in ds.images:
        mask = ds.read_mask(rec["id"]).astype(np.int64)
        _, painted = reference_label(reference, rec["id"], order)
        pixels += np.bincount(mask.ravel(), minlength=n)
        images += np.bincount(np.unique(mask), minlength=n)
        lp = np.bincount(mask[painted], minlength=n)
        cp = np.bincount(mask[~painted], minlength=n)
        lvis_px += lp
        coco_px += cp
        lvis_img += lp > 0
        coco_img += cp > 0
    with open(out / "stats.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["id"]) for r in rows] == list(range(1, n))
    assert [r["name"] for r in rows] == ds.class_names
    for col, ref in [("pixels", pixels), ("images", images), ("lvis_pixels", lvis_px), ("coco_pixels", coco_px),
                     ("lvis_images", lvis_img), ("coco_images", coco_img)]:
        assert [int(r[col]) for r in rows] == ref[1:].tolist(), col
    stats = read_stats(out / "stats.csv")
    assert stats["coco_pixels"].sum() > 0 and stats["lvis_pixels"].sum() > 0
    assert stats["id"].tolist() == list(range(1, n)) and stats["name"].tolist() == ds.class_names


def test_lvis_rle_segmentations_equal_lvis_api(tmp_path):
    """LVIS segmentations may be RLE too: compressed and uncompressed decode as lvis-api does."""
    import pycocotools.mask as mask_utils

    lvis = json.loads(LVIS05.read_text())
    image = next(img for img in lvis["images"] if img["id"] == 266409)
    anns = [a for a in lvis["annotations"] if a["image_id"] == 266409][:6]
    h, w = image["height"], image["width"]
    for k, ann in enumerate(anns):
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], h, w))
        if k % 3 == 1:
            ann["segmentation"] = {"size": [h, w], "counts": rle["counts"].decode()}
        elif k % 3 == 2:  # uncompressed: run lengths of the column-major mask
            flat = mask_utils.decode(rle).ravel(order="F")
            edges = np.flatnonzero(np.diff(np.r_[0, flat, 1 - flat[-1]]))
            ann["segmentation"] = {"size": [h, w], "counts": np.diff(np.r_[0, edges]).tolist()}
    lvis_file = write(tmp_path / "lvis.json", {**lvis, "images": [image], "annotations": anns})
    stuff = write(tmp_path / "stuff.json", {"images": [image], "annotations": [],
                                            "categories": json.loads(STUFF.read_text())["categories"]})
    build_split(coco=[stuff], lvis=lvis_file, out=tmp_path / "out", workers=1, progress=False)
    api = LVIS(str(lvis_file))
    expected = np.zeros((h, w), np.int64)
    painted = np.zeros((h, w), bool)
    for ann in sorted(api.img_ann_map[266409], key=lambda a: a["area"]):
        m = api.ann_to_mask(ann).astype(bool) & ~painted
        expected[m] = ann["category_id"]
        painted |= m
    assert painted.sum() > 1000
    np.testing.assert_array_equal(read_label_png(tmp_path / "out" / "masks" / "000000266409.png"), expected)


def test_two_workers_write_identical_output(real_inputs, tmp_path):
    lvis_path, coco_paths = real_inputs
    one = build_split(coco=coco_paths, lvis=lvis_path, out=tmp_path / "one", workers=1, limit=8, progress=False)
    two = build_split(coco=coco_paths, lvis=lvis_path, out=tmp_path / "two", workers=2, limit=8, progress=False)
    assert one["images_written"] == two["images_written"] == 7  # one of the first 8 has no instance
    assert two["workers"] == 2
    for name in ("classes.json", "images.jsonl", "stats.csv", "report.json", "dataset.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    masks = sorted(p.name for p in (tmp_path / "one" / "masks").iterdir())
    assert masks == sorted(p.name for p in (tmp_path / "two" / "masks").iterdir()) and len(masks) == 7
    for name in masks:
        np.testing.assert_array_equal(read_label_png(tmp_path / "one" / "masks" / name),
                                      read_label_png(tmp_path / "two" / "masks" / name))
