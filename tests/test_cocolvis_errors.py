"""Bad input to `cocolvis build`: one line naming the file and the item, exit 1, no output."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from click.testing import CliRunner

from cocolvis.cli import main


FIXTURES = Path(__file__).parent / "fixtures"
IMAGE = 266409  # a real LVIS v0.5 image, 480x640


@pytest.fixture(scope="module")
def good():
    """A valid (LVIS, COCO-Stuff) pair: one real LVIS image with its instances, and real stuff on it."""
    lvis = json.loads((FIXTURES / "lvis_v0.5_val_100.json").read_text())
    stuff = json.loads((FIXTURES / "cocostuff_stuff_examples.json").read_text())
    image = next(img for img in lvis["images"] if img["id"] == IMAGE)
    lvis = {**lvis, "images": [image], "annotations": [a for a in lvis["annotations"] if a["image_id"] == IMAGE]}
    stuff_img = {**stuff["images"][0], "id": IMAGE}
    stuff_anns = [{**a, "image_id": IMAGE} for a in stuff["annotations"] if a["image_id"] == 934]
    return lvis, {**stuff, "images": [stuff_img], "annotations": stuff_anns}


def run_build(tmp_path: Path, lvis, stuffs, *extra):
    paths = []
    for name, obj in [("lvis.json", lvis)] + [(f"stuff{i}.json", s) for i, s in enumerate(stuffs)]:
        p = tmp_path / name
        p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
        paths.append(p)
    args = ["build", "--lvis", str(paths[0]), "--out", str(tmp_path / "out"), "--workers", "1"]
    for p in paths[1:]:
        args += ["--coco", str(p)]
    return CliRunner().invoke(main, args + list(extra)), paths


def assert_one_line_error(result, path: Path, *words: str, out: Path):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"Error: {path}: "), lines[0]
    for w in words:
        assert w in lines[0], lines[0]
    assert not out.exists()  # nothing written, not even the output directory


def test_the_good_pair_builds(good, tmp_path):
    result, _ = run_build(tmp_path, *good[:1], [good[1]])
    assert result.exit_code == 0, result.output
    assert "1312 classes" in result.output and "1 written" in result.output


def test_missing_file(good, tmp_path):
    lvis, stuff = good
    missing = tmp_path / "nope.json"
    result = CliRunner().invoke(main, ["build", "--lvis", str(missing), "--coco", str(missing),
                                       "--out", str(tmp_path / "out")])
    assert_one_line_error(result, missing, "no such file", out=tmp_path / "out")


def test_directory_instead_of_file(good, tmp_path):
    lvis, stuff = good
    (tmp_path / "stuff0.json").mkdir()
    (tmp_path / "lvis.json").write_text(json.dumps(lvis))
    result = CliRunner().invoke(main, ["build", "--lvis", str(tmp_path / "lvis.json"), "--coco",
                                       str(tmp_path / "stuff0.json"), "--out", str(tmp_path / "out")])
    assert_one_line_error(result, tmp_path / "stuff0.json", "directory", out=tmp_path / "out")


def test_malformed_json(good, tmp_path):
    lvis, stuff = good
    result, paths = run_build(tmp_path, json.dumps(lvis)[:-20], [stuff])
    assert_one_line_error(result, paths[0], "malformed JSON", out=tmp_path / "out")


@pytest.mark.parametrize("which", ["lvis", "coco"])
@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_top_level_key(good, tmp_path, which, key):
    lvis, stuff = copy.deepcopy(good)
    target = lvis if which == "lvis" else stuff
    del target[key]
    result, paths = run_build(tmp_path, lvis, [stuff])
    assert_one_line_error(result, paths[0] if which == "lvis" else paths[1], f"missing `{key}`", out=tmp_path / "out")


@pytest.mark.parametrize("which", ["lvis", "coco"])
def test_annotation_category_not_in_file(good, tmp_path, which):
    lvis, stuff = copy.deepcopy(good)
    ann = (lvis if which == "lvis" else stuff)["annotations"][3]
    ann["category_id"] = 5000
    result, paths = run_build(tmp_path, lvis, [stuff])
    path = paths[0] if which == "lvis" else paths[1]
    assert_one_line_error(result, path, f"annotation {ann['id']}", "category 5000", out=tmp_path / "out")


def test_annotation_of_unknown_image(good, tmp_path):
    lvis, stuff = copy.deepcopy(good)
    lvis["annotations"][0]["image_id"] = 123
    result, paths = run_build(tmp_path, lvis, [stuff])
    assert_one_line_error(result, paths[0], f"annotation {lvis['annotations'][0]['id']}", "image 123",
                          out=tmp_path / "out")


def test_rle_size_not_its_images(good, tmp_path):
    lvis, stuff = copy.deepcopy(good)
    ann = stuff["annotations"][2]
    ann["segmentation"]["size"] = [500, 335]
    result, paths = run_build(tmp_path, lvis, [stuff])
    assert_one_line_error(result, paths[1], f"annotation {ann['id']}", "RLE size 500x335", "480x640",
                          out=tmp_path / "out")


def test_duplicate_image_id_in_a_file(good, tmp_path):
    lvis, stuff = copy.deepcopy(good)
    lvis["images"].append(dict(lvis["images"][0]))
    result, paths = run_build(tmp_path, lvis, [stuff])
    assert_one_line_error(result, paths[0], f"image {IMAGE}", "duplicate image id", out=tmp_path / "out")


def test_duplicate_image_id_across_coco_files(good, tmp_path):
    lvis, stuff = copy.deepcopy(good)
    second = {**stuff, "annotations": []}
    result, paths = run_build(tmp_path, lvis, [stuff, second])
    assert_one_line_error(result, paths[2], f"image {IMAGE}", "duplicate image id", str(paths[1]),
                          out=tmp_path / "out")


def test_odd_polygon_is_an_error(good, tmp_path):
    lvis, stuff = copy.deepcopy(good)
    lvis["annotations"][1]["segmentation"][0].append(3.0)
    result, paths = run_build(tmp_path, lvis, [stuff])
    assert_one_line_error(result, paths[0], f"annotation {lvis['annotations'][1]['id']}", "polygon",
                          out=tmp_path / "out")


def test_sizes_disagree_skips_and_reports_the_image(good, tmp_path):
    """The image is skipped and reported, the rest of the split is complete, the exit is non-zero."""
    lvis, stuff = copy.deepcopy(good)
    other = json.loads((FIXTURES / "lvis_v0.5_val_100.json").read_text())
    extra = next(img for img in other["images"] if img["id"] != IMAGE and (img["height"], img["width"]) == (480, 640))
    lvis["images"].append(extra)
    lvis["annotations"] += [a for a in other["annotations"] if a["image_id"] == extra["id"]]
    stuff["images"].append({"id": extra["id"], "height": 640, "width": 480, "file_name": "x.jpg"})
    result, paths = run_build(tmp_path, lvis, [stuff])
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors[0] == (f"Error: {paths[0]}: image {extra['id']} is 480x640 but 640x480 in {paths[1]}; skipped")
    assert "sizes disagree" in errors[-1]
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["skipped"]["size_mismatch"] == [extra["id"]]
    assert [json.loads(line)["id"] for line in (out / "images.jsonl").read_text().splitlines()] == [IMAGE]
    assert sorted(p.name for p in (out / "masks").iterdir()) == [f"{IMAGE:012d}.png"]


def test_degenerate_polygon_is_skipped_and_counted(good, tmp_path):
    lvis, stuff = copy.deepcopy(good)
    anns = lvis["annotations"]
    anns[0]["segmentation"].append([10.0, 10.0, 20.0, 20.0])  # a two-point part: dropped, the rest painted
    anns[1]["segmentation"] = [[5.0, 5.0, 9.0, 9.0]]  # nothing left: the annotation paints nothing
    result, _ = run_build(tmp_path, lvis, [stuff])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["degenerate_polygons"] == 2
    assert report["annotations_without_polygon"] == [anns[1]["id"]]
    assert "degenerate polygons (under 3 points) skipped: 2" in result.output


def test_lvis_category_ids_must_be_1_to_n(good, tmp_path):
    lvis, stuff = copy.deepcopy(good)
    lvis["categories"] = lvis["categories"][1:]
    lvis["annotations"] = [a for a in lvis["annotations"] if a["category_id"] != 1]
    result, paths = run_build(tmp_path, lvis, [stuff])
    assert_one_line_error(result, paths[0], "1..N", out=tmp_path / "out")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_rle_running_past_the_image_is_refused_before_painting(good, tmp_path, workers):
    lvis, stuff = copy.deepcopy(good)
    ann = lvis["annotations"][-1]
    too_long = mask_utils.encode(np.ones((1000, 1000), np.uint8, order="F"))["counts"].decode()
    ann["segmentation"] = {"size": [480, 640], "counts": too_long}  # runs past the end of the image
    result, paths = run_build(tmp_path, lvis, [stuff], "--workers", workers)
    assert_one_line_error(result, paths[0], f"annotation {ann['id']}: RLE `counts` cover 1000000 pixels, "
                                            "not the image's 307200", out=tmp_path / "out")


def test_non_numeric_polygon_is_named(good, tmp_path):
    lvis, stuff = copy.deepcopy(good)
    stuff["annotations"][0]["segmentation"] = [[1, 2, "x", 4, 5, 6]]
    result, paths = run_build(tmp_path, lvis, [stuff])
    assert_one_line_error(result, paths[1], f"annotation {stuff['annotations'][0]['id']}: "
                                            "polygon coordinates must be numbers", out=tmp_path / "out")
