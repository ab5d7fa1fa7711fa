"""`bench longtail` and `bench topn-miou` on small hand-made build and eval outputs with known numbers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from bench.cli import main
from bench.topn import per_class_iou, topn_miou

# id, name, source, frequency, pixels, images, lvis_pixels, coco_pixels, lvis_images, coco_images
CLASSES = [
    (1, "cat", "lvis", "f", 500, 5, 500, 0, 5, 0),
    (2, "sky", "both", "r", 900, 8, 100, 800, 3, 7),
    (3, "grass", "both", "c", 300, 4, 50, 250, 1, 4),
    (4, "wall", "coco", None, 1000, 3, 0, 1000, 0, 3),
    (5, "zebra", "lvis", "r", 40, 1, 40, 0, 1, 0),
    (6, "unicorn", "lvis", "c", 0, 0, 0, 0, 0, 0),
]
# Rows ground truth, columns prediction; zebra (5) is absent from both, unicorn (6) only predicted.
CONFUSION = np.array([
    [8, 2, 0, 0, 0, 0],
    [0, 9, 0, 1, 0, 0],
    [0, 0, 3, 0, 0, 1],
    [1, 0, 0, 6, 0, 0],
    [0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0],
], dtype=np.int64)
IOU = {1: 8 / 11, 2: 9 / 12, 3: 3 / 4, 4: 6 / 8, 5: np.nan, 6: 0.0}


def write_build(root: Path, rows=CLASSES) -> Path:
    root.mkdir(parents=True)
    classes = []
    for cid, name, source, freq, *_ in rows:
        c = {"id": cid, "name": name, "lvis_id": cid if source != "coco" else None,
             "coco_id": 100 + cid if source != "lvis" else None, "source": source}
        if freq:
            c.update(frequency=freq, synset=f"{name}.n.01", image_count=10)
        classes.append(c)
    (root / "classes.json").write_text(json.dumps(classes))
    (root / "images.jsonl").write_text("")
    (root / "dataset.json").write_text(json.dumps({"counts": {}}))
    columns = ["id", "name", "pixels", "images", "lvis_pixels", "coco_pixels", "lvis_images", "coco_images"]
    stats = pd.DataFrame([(r[0], r[1], *r[4:]) for r in rows], columns=columns)
    stats.to_csv(root / "stats.csv", index=False)
    return root


def write_eval(run: Path, data: Path, head: str, confusion: np.ndarray) -> Path:
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"head": head, "data": str(data)}))
    ev = run / "eval"
    ev.mkdir()
    iou = per_class_iou(confusion)
    (ev / "metrics.json").write_text(json.dumps({"miou": float(np.nanmean(iou)), "head": head, "run": str(run),
                                                 "num_classes": len(confusion)}))
    np.savez(ev / "confusion.npz", confusion=confusion)
    return ev


def assert_png(path: Path, min_colors: int = 8):
    """The file opens as a PNG of some size with more than a handful of colours (not blank)."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        arr = np.asarray(im.convert("RGB")).astype(np.uint32)
    assert arr.shape[0] >= 100 and arr.shape[1] >= 100
    packed = (arr[..., 0] << 16) | (arr[..., 1] << 8) | arr[..., 2]
    assert len(np.unique(packed)) >= min_colors, f"{path} looks blank"


@pytest.fixture()
def build(tmp_path) -> Path:
    return write_build(tmp_path / "train")


def test_longtail_counts_equal_stats(build, tmp_path):
    out = tmp_path / "lt"
    result = CliRunner().invoke(main, ["longtail", "--data", str(build), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "# Long tail" in result.output and (out / "summary.md").read_text().strip() == result.output.strip()

    ranked = pd.read_csv(out / "longtail.csv")
    assert ranked["name"].tolist() == ["sky", "cat", "grass", "wall", "zebra", "unicorn"]
    assert ranked["rank"].tolist() == [1, 2, 3, 4, 5, 6]
    stats = pd.read_csv(build / "stats.csv").set_index("id")
    for r in ranked.itertuples():
        assert r.images == stats.at[r.id, "images"] and r.pixels == stats.at[r.id, "pixels"]
    assert ranked["pixel_ratio"].sum() == pytest.approx(1.0)
    assert ranked.set_index("name").at["wall", "pixel_ratio"] == pytest.approx(1000 / 2740)

    groups = pd.read_csv(out / "groups.csv").set_index("group")
    assert groups.loc["f"].tolist() == [1, 0, 0, 1]
    assert groups.loc["c"].tolist() == [1, 0, 1, 2]
    assert groups.loc["r"].tolist() == [1, 0, 1, 2]
    assert groups.loc["none"].tolist() == [0, 1, 0, 1]
    assert groups.loc["total"].tolist() == [3, 1, 2, 6]

    overlaps = pd.read_csv(out / "overlaps.csv").set_index("name")
    assert overlaps.index.tolist() == ["sky", "grass"]
    assert overlaps.loc["sky", ["images", "stuff_only", "lvis_only", "both"]].tolist() == [8, 5, 1, 2]
    assert overlaps.loc["grass", ["images", "stuff_only", "lvis_only", "both"]].tolist() == [4, 3, 0, 1]

    for name in ["longtail.png", "wordcloud.png", "overlaps.png"]:
        assert_png(out / name)
        assert f"`{name}`" in result.output


@pytest.mark.parametrize("column,value,message", [
    ("lvis_images", 9, "class 2 (sky)"),     # more LVIS images than images
    ("pixels", -1, "non-negative"),
])
def test_longtail_bad_stats_is_one_line_error(build, tmp_path, column, value, message):
    stats = pd.read_csv(build / "stats.csv")
    stats.loc[1, column] = value
    stats.to_csv(build / "stats.csv", index=False)
    out = tmp_path / "lt"
    result = CliRunner().invoke(main, ["longtail", "--data", str(build), "--out", str(out)])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {build / 'stats.csv'}: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (out / "summary.md").exists()


def test_longtail_missing_column(build, tmp_path):
    pd.read_csv(build / "stats.csv").drop(columns="coco_images").to_csv(build / "stats.csv", index=False)
    result = CliRunner().invoke(main, ["longtail", "--data", str(build), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "missing column(s) coco_images" in result.output


def test_topn_math_by_hand():
    iou = per_class_iou(CONFUSION)
    np.testing.assert_allclose(iou, [IOU[i] for i in range(1, 7)])
    order = np.array([3, 1, 0, 2, 4, 5])  # wall, sky, cat, grass, zebra, unicorn
    curve = topn_miou(iou, order)
    expected = [0.75, 0.75, (1.5 + 8 / 11) / 3, (2.25 + 8 / 11) / 4, (2.25 + 8 / 11) / 4, (2.25 + 8 / 11) / 5]
    np.testing.assert_allclose(curve, expected)
    assert np.isnan(topn_miou(np.array([np.nan, 0.5]), np.array([0, 1]))[0])


def test_topn_matches_sklearn_and_brute_force():
    from sklearn.metrics import confusion_matrix, jaccard_score

    rng = np.random.default_rng(0)
    c = 30
    gt = rng.integers(1, c - 5, size=4000)  # classes 25..30 never in the ground truth ...
    pred = np.where(rng.random(4000) < 0.6, gt, rng.integers(1, c - 2, size=4000))  # ... 28..30 never predicted
    conf = confusion_matrix(gt, pred, labels=np.arange(1, c + 1))
    iou = per_class_iou(conf)
    present = ~np.isnan(iou)
    assert present.sum() == c - 3
    ref = jaccard_score(gt, pred, labels=np.arange(1, c + 1), average=None, zero_division=0)
    np.testing.assert_allclose(iou[present], ref[present])
    order = rng.permutation(c)
    curve = topn_miou(iou, order)
    for n in range(1, c + 1):
        top = [iou[i] for i in order[:n] if not np.isnan(iou[i])]
        assert (np.isnan(curve[n - 1]) and not top) or curve[n - 1] == pytest.approx(np.mean(top))


def test_topn_cli(build, tmp_path):
    ev_a = write_eval(tmp_path / "runs" / "a", build, "ess", CONFUSION)
    conf_b = CONFUSION.copy()
    conf_b[3, 3] = 0  # the softmax run misses every wall pixel
    ev_b = write_eval(tmp_path / "runs" / "b", build, "softmax", conf_b)
    out = tmp_path / "topn"
    result = CliRunner().invoke(main, ["topn-miou", "--eval", str(ev_a), "--eval", str(ev_b), "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "topn_miou.csv")
    assert len(table) == 6 and table["n"].tolist() == list(range(1, 7))
    assert table["name"].tolist() == ["wall", "sky", "cat", "grass", "zebra", "unicorn"]  # by pixels
    for ev, col in [(ev_a, "miou_ess"), (ev_b, "miou_softmax")]:
        miou = json.loads((ev / "metrics.json").read_text())["miou"]
        assert table[col].iloc[-1] == pytest.approx(miou)
    assert table["miou_ess"].iloc[0] == pytest.approx(IOU[4])
    assert table["miou_softmax"].iloc[0] == pytest.approx(0.0)
    assert "classes absent from both are skipped" in result.output
    assert_png(out / "topn_miou.png")

    by_images = CliRunner().invoke(main, ["topn-miou", "--eval", str(ev_a), "--data", str(build), "--by", "images",
                                          "--out", str(tmp_path / "topn2")])
    assert by_images.exit_code == 0, by_images.output
    table = pd.read_csv(tmp_path / "topn2" / "topn_miou.csv")
    assert table["name"].tolist()[:4] == ["sky", "cat", "grass", "wall"]
    assert table["miou_ess"].iloc[0] == pytest.approx(IOU[2])

    help_text = " ".join(CliRunner().invoke(main, ["topn-miou", "--help"]).output.split())
    assert "classes absent from both are skipped" in help_text and "mIoU@C equals metrics.json's miou" in help_text


def test_topn_class_count_mismatch(build, tmp_path):
    ev = write_eval(tmp_path / "runs" / "a", build, "ess", CONFUSION[:5, :5])
    result = CliRunner().invoke(main, ["topn-miou", "--eval", str(ev), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {ev / 'confusion.npz'}: 5 classes")


def test_topn_missing_run_config(build, tmp_path):
    ev = write_eval(tmp_path / "runs" / "a", build, "ess", CONFUSION)
    (ev.parent / "config.yaml").unlink()
    result = CliRunner().invoke(main, ["topn-miou", "--eval", str(ev), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "config.yaml: missing" in result.output and "--data" in result.output


@pytest.mark.parametrize("content,message", [
    (b"\x00\xff\xfe not text \x89PNG", "not UTF-8 text"),
    (b"", "empty"),
    (b'id,name\n1,"unterminated\n', "malformed CSV"),
    (b"a,b\n1,2\n", "missing column(s) id, name"),
    (b"id,name,pixels,images,lvis_pixels,coco_pixels,lvis_images,coco_images\nx,cat,1,1,1,0,1,0\n", "row 1: class id"),
    (None, "class 2: counts must be non-negative integers"),  # a word among the counts
])
def test_longtail_garbage_stats_is_one_line_error(build, tmp_path, content, message):
    if content is None:
        text = (build / "stats.csv").read_text().splitlines()
        text[2] = text[2].replace(",900,", ",many,")
        content = "\n".join(text).encode()
    (build / "stats.csv").write_bytes(content)
    out = tmp_path / "lt"
    result = CliRunner().invoke(main, ["longtail", "--data", str(build), "--out", str(out)])
    assert result.exit_code == 1 and not isinstance(result.exception, (KeyError, ValueError, TypeError))
    assert result.output.startswith(f"Error: {build / 'stats.csv'}: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("content", [b"garbage", b"PK\x03\x04 cut short", b""])
def test_topn_corrupt_confusion_is_one_line_error(build, tmp_path, content):
    ev = write_eval(tmp_path / "run", build, "ess", CONFUSION)
    (ev / "confusion.npz").write_bytes(content)
    out = tmp_path / "topn"
    result = CliRunner().invoke(main, ["topn-miou", "--eval", str(ev), "--out", str(out)])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {ev / 'confusion.npz'}: unreadable")
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import bench.cli, sys; assert 'torch' not in sys.modules, 'bench.cli imports torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "topn-miou" in result.output


def test_compare_groups_by_hand(build, tmp_path):
    softmax = write_eval(tmp_path / "softmax", build, "softmax", CONFUSION)
    ess = write_eval(tmp_path / "ess", build, "ess", np.diag([10, 10, 4, 7, 0, 0]).astype(np.int64))
    out = tmp_path / "cmp"
    result = CliRunner().invoke(main, ["compare", "--eval", str(softmax), "--eval", str(ess), "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "compare.csv").set_index("run")
    row = table.loc["softmax"]
    # 6 classes: all are in the top 50, so the tail is empty; zebra (5) is absent from both.
    assert row["miou"] == pytest.approx(np.nanmean([IOU[i] for i in range(1, 7)]))
    assert row["miou_top50"] == pytest.approx(row["miou"]) and np.isnan(row["miou_tail"])
    assert row["miou_lvis_f"] == pytest.approx(IOU[1])                     # cat
    assert row["miou_lvis_c"] == pytest.approx((IOU[3] + IOU[6]) / 2)      # grass (both), unicorn
    assert row["miou_lvis_r"] == pytest.approx(IOU[2])                     # sky (both); zebra absent
    assert row["miou_stuff"] == pytest.approx((IOU[2] + IOU[3] + IOU[4]) / 3)  # sky, grass (both), wall
    assert row["classes_present"] == 5 and table.loc["ess", "miou"] == pytest.approx(1.0)
    wins = pd.read_csv(out / "winners.csv").set_index("group")
    assert wins.at["miou", "winner"] == "ess" and wins.at["miou", "difference"] == pytest.approx(1 - row["miou"])
    assert pd.isna(wins.at["miou_tail", "winner"])
    assert "Winner: **ess**, mIoU 1 vs" in result.output and "it wins on all classes" in result.output
    assert "- LVIS rare (miou_lvis_r): **ess** 1 vs 0.75 (+0.25, 1.33x)" in result.output

    one = CliRunner().invoke(main, ["compare", "--eval", str(softmax), "--out", str(tmp_path / "one")])
    assert one.exit_code == 1 and "at least two --eval" in one.output
