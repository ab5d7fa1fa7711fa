"""`cocolvis synth`: the real formats, deterministic, a long tail, and a round trip through the build."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
from click.testing import CliRunner

from cocolvis.cli import main
from cocolvis.dataset import BuiltDataset
from cocolvis.synth import write_synthetic
from cocolvis.vocab import read_lvis_categories



def load(root, name):
    return json.loads((root / "annotations" / name).read_text())


def test_files_are_in_the_real_formats(synth_root):
    lvis_train, lvis_val = load(synth_root, "lvis_v1_train.json"), load(synth_root, "lvis_v1_val.json")
    stuff_train, stuff_val = load(synth_root, "stuff_train2017.json"), load(synth_root, "stuff_val2017.json")
    assert len(lvis_train["images"]) == 24 and len(lvis_val["images"]) == 8
    assert lvis_train["categories"] == read_lvis_categories()
    for img in lvis_train["images"] + lvis_val["images"]:
        assert "file_name" not in img and img["coco_url"].endswith(f"/{img['id']:012d}.jpg")
        assert (img["height"], img["width"]) == (96, 128)
        assert {"not_exhaustive_category_ids", "neg_category_ids"} <= img.keys()
    for ann in lvis_train["annotations"]:
        assert isinstance(ann["segmentation"], list) and all(len(p) >= 6 for p in ann["segmentation"])
        assert ann["area"] > 0 and len(ann["bbox"]) == 4
    assert len(stuff_train["categories"]) == 92 and stuff_train["categories"][-1]["name"] == "other"
    assert all("supercategory" in c for c in stuff_train["categories"])
    ids = Counter(a["category_id"] for a in stuff_train["annotations"])
    assert ids[183] > 0 and set(ids) <= set(range(92, 184))
    for ann in stuff_train["annotations"]:
        assert isinstance(ann["segmentation"]["counts"], str) and ann["segmentation"]["size"] == [96, 128]
    for img in stuff_train["images"]:
        assert img["file_name"] == f"{img['id']:012d}.jpg"
        assert (synth_root / "images" / "train2017" / img["file_name"]).is_file()
    assert all((synth_root / "images" / "val2017" / i["file_name"]).is_file() for i in stuff_val["images"])


def test_some_val_images_come_from_train2017(synth_root):
    lvis_train, lvis_val = load(synth_root, "lvis_v1_train.json"), load(synth_root, "lvis_v1_val.json")
    stuff_train, stuff_val = load(synth_root, "stuff_train2017.json"), load(synth_root, "stuff_val2017.json")
    val_ids = {i["id"] for i in lvis_val["images"]}
    assert not val_ids & {i["id"] for i in lvis_train["images"]}
    from_train = val_ids & {i["id"] for i in stuff_train["images"]}
    assert len(from_train) == 2 and val_ids - from_train == {i["id"] for i in stuff_val["images"]}
    for img in lvis_val["images"]:
        assert ("/train2017/" in img["coco_url"]) == (img["id"] in from_train)


def test_val_build_reads_both_coco_files(built_val):
    ds = BuiltDataset(built_val)
    dirs = Counter(rec["file"].split("/")[0] for rec in ds.images)
    assert dirs == {"val2017": 6, "train2017": 2}
    assert all(ds.read_image(rec).shape == (96, 128, 3) for rec in ds.images)


def test_deterministic_for_a_seed(tmp_path):
    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    write_synthetic(tmp_path / "a", train=3, val=2, size=(40, 56), seed=5)
    write_synthetic(tmp_path / "b", train=3, val=2, size=(40, 56), seed=5)
    write_synthetic(tmp_path / "c", train=3, val=2, size=(40, 56), seed=6)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert len(a) == 4 + 5 and a == b
    assert a.keys() != c.keys() or a != c


def test_lvis_classes_follow_the_real_long_tail(tmp_path):
    info = write_synthetic(tmp_path, train=300, val=0, size=(32, 32), seed=1, images=False)
    anns = json.loads(open(info["lvis_v1_train"]).read())["annotations"]
    cats = {c["id"]: c for c in read_lvis_categories()}
    counts = np.array([cats[a["category_id"]]["image_count"] for a in anns])
    population = np.array([c["image_count"] for c in cats.values()])
    assert len(anns) > 600
    assert np.median(counts) > 3 * np.median(population)
    freq = Counter(cats[a["category_id"]]["frequency"] for a in anns)
    assert freq["f"] > 0.6 * len(anns) and freq["r"] < 0.05 * len(anns)
    assert not (tmp_path / "images").exists()


def test_fixed_instance_and_region_counts(tmp_path):
    info = write_synthetic(tmp_path, train=4, val=0, size=(120, 160), seed=2, n_things=12, n_stuff=8, images=False)
    lvis = json.loads(open(info["lvis_v1_train"]).read())
    stuff = json.loads(open(info["stuff_train2017"]).read())
    assert Counter(a["image_id"] for a in lvis["annotations"]) == {i["id"]: 12 for i in lvis["images"]}
    regions = Counter(a["image_id"] for a in stuff["annotations"] if a["category_id"] != 183)
    assert all(6 <= n <= 8 for n in regions.values())  # a region may vanish under the instances


def test_cli_synth_build_summary_round_trip(tmp_path):
    runner = CliRunner()
    root = tmp_path / "synth"
    r = runner.invoke(main, ["synth", "--out", str(root), "--train", "6", "--val", "3", "--size", "48x64"])
    assert r.exit_code == 0, r.output
    ann = root / "annotations"
    r = runner.invoke(main, ["build", "--coco", str(ann / "stuff_train2017.json"), "--coco",
                             str(ann / "stuff_val2017.json"), "--lvis", str(ann / "lvis_v1_val.json"),
                             "--out", str(tmp_path / "val"), "--images-root", str(root / "images"), "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "1284 classes" in r.output and "images: 3 written" in r.output and "most frequent" in r.output
    r = runner.invoke(main, ["summary", str(tmp_path / "val"), "--top", "3"])
    assert r.exit_code == 0, r.output
    assert "3 most frequent classes" in r.output and "least frequent" in r.output
    ds = BuiltDataset(tmp_path / "val")
    assert all(ds.read_image(rec).shape == (48, 64, 3) for rec in ds.images)


def test_cli_rejects_a_bad_size(tmp_path):
    r = CliRunner().invoke(main, ["synth", "--out", str(tmp_path), "--size", "big"])
    assert r.exit_code == 2 and "HxW" in r.output
