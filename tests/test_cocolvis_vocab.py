"""The merged vocabulary: 1284 classes for LVIS v1, 1312 for v0.5, by one rule."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cocolvis.cli import main
from segkit.io import InputError
from cocolvis.vocab import (STUFF_CATEGORIES, build_vocabulary, merge_vocabularies, read_lvis_categories,
                            read_stuff_categories, stuff_table)

FIXTURES = Path(__file__).parent / "fixtures"
V1_OVERLAPS = ["banner", "blanket", "cabinet", "cupboard", "curtain", "napkin", "pillow", "salad", "table", "towel"]


@pytest.fixture(scope="module")
def v1():
    return build_vocabulary()


def test_v1_has_1284_classes_with_the_id_rule(v1):
    lvis = read_lvis_categories()
    stuff = [c for c in read_stuff_categories() if 92 <= c["id"] <= 182]
    assert len(lvis) == 1203 and len(stuff) == 91
    assert len(v1) == 1284
    assert [c["id"] for c in v1] == list(range(1, 1285))
    for cls, cat in zip(v1[:1203], lvis):  # every LVIS category keeps its id, name and LVIS fields
        assert (cls["id"], cls["lvis_id"], cls["name"]) == (cat["id"], cat["id"], cat["name"])
        assert (cls["frequency"], cls["synset"], cls["image_count"]) == (cat["frequency"], cat["synset"],
                                                                         cat["image_count"])
    merged = sorted(c["name"] for c in v1 if c["source"] == "both")
    assert merged == V1_OVERLAPS
    for c in v1:
        if c["source"] == "both":
            assert c["coco_id"] == next(s["id"] for s in stuff if s["name"] == c["name"])
    appended = v1[1203:]
    assert all(c["source"] == "coco" and c["lvis_id"] is None and "frequency" not in c for c in appended)
    assert [c["coco_id"] for c in appended] == sorted(s["id"] for s in stuff if s["name"] not in V1_OVERLAPS)
    assert [c["name"] for c in appended][:3] == ["branch", "bridge", "building-other"]
    names = [c["name"] for c in v1]
    assert "other" not in names and "unlabeled" not in names
    assert {"desk-stuff", "mirror-stuff", "desk", "mirror"} <= set(names)  # not merged: different names
    assert all(c["coco_id"] is None for c in v1 if c["source"] == "lvis")


def test_stuff_table_maps_coco_ids(v1):
    table = stuff_table(v1)
    by_name = {c["name"]: c["id"] for c in v1}
    assert table[165] == by_name["table"] <= 1203  # table: merged into LVIS's
    assert table[92] == by_name["banner"]
    assert table[94] == 1204  # branch: the first appended
    assert table[182] == 1284  # wood: the last
    assert table[183] == 0 and table[0] == 0  # `other` and unlabeled
    assert not table[1:92].any()  # thing ids are not stuff
    assert sorted(table[92:183].tolist()) == sorted(c["id"] for c in v1 if c["coco_id"] is not None)


def test_v05_gives_1312_with_9_overlaps():
    classes = build_vocabulary(FIXTURES / "lvis_v0.5_val_100.json", FIXTURES / "cocostuff_stuff_examples.json")
    assert len(classes) == 1312
    assert sorted(c["name"] for c in classes if c["source"] == "both") == [n for n in V1_OVERLAPS if n != "cupboard"]
    assert classes[1230]["id"] == 1231 and classes[1230]["source"] == "coco"


def test_shipped_label_list_and_real_stuff_file_agree():
    txt = {c["id"]: c["name"] for c in read_stuff_categories() if c["id"] > 0}
    real = {c["id"]: c["name"] for c in read_stuff_categories(FIXTURES / "cocostuff_stuff_examples.json")}
    shipped = {c["id"]: c["name"] for c in json.loads(STUFF_CATEGORIES.read_text())}
    assert real == shipped
    assert {i: n for i, n in txt.items() if 92 <= i <= 182} == {i: n for i, n in real.items() if i != 183}
    assert len(txt) == 182  # 1..182; 183 `other` is not listed


def test_merge_rule_is_general():
    lvis = [{"id": 1, "name": "sky-other"}, {"id": 2, "name": "dog"}]
    stuff = [{"id": 183, "name": "other"}, {"id": 157, "name": "sky-other"}, {"id": 96, "name": "building-other"},
             {"id": 18, "name": "dog"}]
    classes = merge_vocabularies(lvis, stuff)
    assert [(c["id"], c["name"], c["source"], c["lvis_id"], c["coco_id"]) for c in classes] == [
        (1, "sky-other", "both", 1, 157), (2, "dog", "lvis", 2, None), (3, "building-other", "coco", None, 96)]


def test_cli_without_input_writes_the_1284_table(tmp_path, v1):
    out = tmp_path / "classes.json"
    result = CliRunner().invoke(main, ["vocab", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "1284 classes" in result.output
    assert json.loads(out.read_text()) == v1


def test_cli_with_v05(tmp_path):
    out = tmp_path / "classes.json"
    result = CliRunner().invoke(main, ["vocab", "--lvis", str(FIXTURES / "lvis_v0.5_val_100.json"),
                                       "--coco", str(FIXTURES / "cocostuff_stuff_examples.json"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(json.loads(out.read_text())) == 1312


@pytest.mark.parametrize("cats, message", [
    ([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}], "duplicate category id"),
    ([{"id": 1, "name": "a"}, {"id": 2, "name": "a"}], "duplicate category name"),
    ([{"id": 1, "name": "a"}, {"id": 3, "name": "b"}], "1..N"),
    ([{"id": "1", "name": "a"}], "integer `id`"),
])
def test_bad_lvis_categories(tmp_path, cats, message):
    path = tmp_path / "cats.json"
    path.write_text(json.dumps({"categories": cats}))
    with pytest.raises(InputError, match=message) as e:
        read_lvis_categories(path)
    assert str(path) in e.value.message


def test_bad_label_list(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("0: unlabeled\n92 banner\n")
    result = CliRunner().invoke(main, ["vocab", "--coco", str(path), "--out", str(tmp_path / "c.json")])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: {path}: line 2: expected `id: name`, got '92 banner'"
    assert not (tmp_path / "c.json").exists()
