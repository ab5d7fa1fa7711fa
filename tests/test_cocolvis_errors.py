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


def _rle(lvis, change):
    """The first LVIS annotation turned into a compressed RLE of its image, its string changed."""
    ann = lvis["annotations"][0]
    rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], 480, 640))
    ann["segmentation"] = {"size": [480, 640], "counts": change(rle["counts"].decode())}


HOSTILE = {  # name: (mutation of (lvis, stuff), which file is named, words of the message)
    "nan coordinate": (lambda l, s: l["annotations"][0]["segmentation"][0].__setitem__(0, float("nan")), 0, "finite"),
    "inf coordinate": (lambda l, s: l["annotations"][0]["segmentation"][0].__setitem__(1, float("inf")), 0, "finite"),
    "huge coordinate": (lambda l, s: l["annotations"][0]["segmentation"][0].__setitem__(0, 1e30), 0, "outside"),
    "huge integer": (lambda l, s: l["annotations"][0]["segmentation"][0].__setitem__(0, 10 ** 400), 0, "finite"),
    "bool coordinate": (lambda l, s: l["annotations"][0]["segmentation"][0].__setitem__(0, True), 0, "numbers"),
    "polygon a scalar": (lambda l, s: l["annotations"][0].__setitem__("segmentation", [5]), 0, "flat list"),
    "huge image": (lambda l, s: l["images"][0].update(height=100000, width=100000), 0, "limits"),
    "bool image size": (lambda l, s: l["images"][0].update(height=True), 0, "integer `height`"),
    "float stuff category": (lambda l, s: s["annotations"][0].__setitem__("category_id", 93.0), 1, "category 93.0"),
    "bool category id": (lambda l, s: l["annotations"][0].__setitem__("category_id", True), 0, "category True"),
    "float image id": (lambda l, s: l["annotations"][0].__setitem__("image_id", float(IMAGE)), 0, "not in the file"),
    "neg_category_ids scalar": (lambda l, s: l["images"][0].__setitem__("neg_category_ids", 5), 0, "must be a list"),
    "RLE size of one number": (lambda l, s: s["annotations"][0]["segmentation"].__setitem__("size", [480]), 1,
                               "`size` of two integers"),
    "RLE string truncated": (lambda l, s: _rle(l, lambda c: c[:-1] + "P"), 0, "not a valid compressed RLE"),
    "RLE string garbled": (lambda l, s: _rle(l, lambda c: c[:5] + "~~\x01" + c[5:]), 0, "not a valid compressed RLE"),
    "RLE string cut short": (lambda l, s: _rle(l, lambda c: c[:len(c) // 2]), 0, "pixels, not the image's 307200"),
    "RLE string run too long": (lambda l, s: _rle(l, lambda c: "PPPPPP0" + c), 0, "not a valid compressed RLE"),
    "uncompressed counts short": (lambda l, s: l["annotations"][0].__setitem__(
        "segmentation", {"size": [480, 640], "counts": [100, 200]}), 0, "cover 300 pixels"),
    "uncompressed counts negative": (lambda l, s: l["annotations"][0].__setitem__(
        "segmentation", {"size": [480, 640], "counts": [-5, 307205]}), 0, "negative"),
    "NaN area": (lambda l, s: l["annotations"][0].__setitem__("area", float("nan")), 0, "`area`"),
    "too many classes": (lambda l, s: l.__setitem__("categories", l["categories"] + [
        {"id": i, "name": f"c{i}"} for i in range(len(l["categories"]) + 1, 33000)]), 0, "exceed the 32767 classes"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_values_are_refused_before_pycocotools(good, tmp_path, name):
    lvis, stuff = copy.deepcopy(good)
    mutate, which, words = HOSTILE[name]
    mutate(lvis, stuff)
    result, paths = run_build(tmp_path, lvis, [stuff])
    assert_one_line_error(result, paths[which], words, out=tmp_path / "out")


def test_deeply_nested_json(good, tmp_path):
    result, paths = run_build(tmp_path, "[" * 100000 + "]" * 100000, [good[1]])
    assert_one_line_error(result, paths[0], "nested too deeply", out=tmp_path / "out")


def test_swapped_files_are_refused(good, tmp_path):
    lvis, stuff = good
    result, paths = run_build(tmp_path, stuff, [lvis])
    assert_one_line_error(result, paths[1], "looks like an LVIS file", out=tmp_path / "out")
    lvis_as_both = run_build(tmp_path, lvis, [lvis])[0]
    assert_one_line_error(lvis_as_both, paths[1], "looks like an LVIS file", out=tmp_path / "out")
    coco_instances = {**stuff, "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}]}
    result, paths = run_build(tmp_path, lvis, [coco_instances])
    assert_one_line_error(result, paths[1], "no COCO-Stuff stuff category", out=tmp_path / "out")
    result, paths = run_build(tmp_path, {**stuff, "categories": lvis["categories"]}, [stuff])
    assert_one_line_error(result, paths[0], "not an LVIS file", out=tmp_path / "out")


def test_out_paths_that_cannot_be_written(good, tmp_path):
    (tmp_path / "file").write_text("x")
    for out, words in [(tmp_path / "file" / "out", "not a directory"), (tmp_path / "file", "not a directory"),
                       (Path("/proc/cocolvis-out"), "")]:
        result, paths = run_build(tmp_path, good[0], [good[1]])
        result = CliRunner().invoke(main, ["build", "--lvis", str(paths[0]), "--coco", str(paths[1]),
                                           "--out", str(out), "--workers", "1"])
        assert result.exit_code == 1, result.output
        lines = [line for line in result.stderr.splitlines() if line.startswith("Error")]
        assert len(lines) == 1 and lines[0].startswith(f"Error: {out}") and words in lines[0], result.stderr


def test_vocab_out_a_directory(tmp_path):
    result = CliRunner().invoke(main, ["vocab", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [f"Error: {tmp_path}: cannot write: Is a directory"]
    assert list(tmp_path.iterdir()) == []


def test_failure_while_painting_leaves_a_fresh_out_empty(good, tmp_path, monkeypatch):
    """What validation cannot foresee (here pycocotools failing) still leaves nothing behind."""
    from cocolvis import paint

    calls = []

    def failing(rle):
        calls.append(1)
        raise ValueError("Invalid RLE mask representation")

    monkeypatch.setattr(paint.mask_utils, "decode", failing)
    lvis, stuff = good
    result, paths = run_build(tmp_path, lvis, [stuff])
    assert result.exit_code == 1 and calls
    assert "cannot decode its segmentation" in result.stderr.splitlines()[-1]
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()  # an empty directory given: emptied again, kept
    result, paths = run_build(tmp_path, lvis, [stuff])
    assert result.exit_code == 1 and list((tmp_path / "out").iterdir()) == []


def test_second_build_into_a_locked_out_is_refused(good, tmp_path):
    import fcntl
    import os

    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242\n")
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        result, paths = run_build(tmp_path, good[0], [good[1]])
    finally:
        os.close(fd)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [f"Error: {out}: another process (pid 4242) is writing into this "
                                                  "directory; wait for it to finish or choose another --out"]
    result, _ = run_build(tmp_path, good[0], [good[1]])  # the lock released: builds
    assert result.exit_code == 0, result.output
    assert not (out / ".lock").exists()


def test_out_holding_other_files_is_refused(good, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    result, _ = run_build(tmp_path, good[0], [good[1]], "--overwrite")
    assert result.exit_code == 1 and "holds no `cocolvis build` output" in result.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_stale_temporaries_are_removed(good, tmp_path):
    out = tmp_path / "out"
    result, paths = run_build(tmp_path, good[0], [good[1]])
    assert result.exit_code == 0
    (out / ".stats.csv.ab_c1234.csv.tmp").write_text("half")
    (out / ".report.json.zz9yy8xx.json.tmp").write_text("half")
    result = CliRunner().invoke(main, ["build", "--lvis", str(paths[0]), "--coco", str(paths[1]), "--out", str(out)])
    assert result.exit_code == 0 and "0 masks painted" in result.output
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".journal.jsonl"]
