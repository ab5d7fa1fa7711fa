"""Reading a build directory: every corruption is one line naming the file; ess refuses it cleanly."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cocolvis.dataset import BuiltDataset
from segkit.io import InputError

ROOT = Path(__file__).parents[1]


def _copy(built, tmp_path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(built, data)
    return data


def _images(data: Path) -> list[str]:
    return (data / "images.jsonl").read_text().splitlines()


CORRUPTIONS = {  # name: (change to the build directory, file named, words)
    "classes not a list": (lambda d: (d / "classes.json").write_text('{"id": 1}'), "classes.json", "list of class"),
    "classes of numbers": (lambda d: (d / "classes.json").write_text("[1, 2]"), "classes.json", "list of class"),
    "class without name": (lambda d: (d / "classes.json").write_text('[{"id": 1}]'), "classes.json", "`name`"),
    "classes not JSON": (lambda d: (d / "classes.json").write_bytes(b"\xff\xfe["), "classes.json", "malformed"),
    "record without file": (lambda d: (d / "images.jsonl").write_text('{"id": 1, "height": 5, "width": 5}\n'),
                            "images.jsonl", "line 1: needs a string `file`"),
    "record leaving the root": (lambda d: (d / "images.jsonl").write_text(
        '{"id": 1, "file": "../../etc/passwd", "height": 5, "width": 5}\n'), "images.jsonl", "leaves the images root"),
    "record a list": (lambda d: (d / "images.jsonl").write_text("[1]\n"), "images.jsonl", "expected a JSON object"),
    "record bool id": (lambda d: (d / "images.jsonl").write_text(
        '{"id": true, "file": "a.jpg", "height": 5, "width": 5}\n'), "images.jsonl", "integer `id`"),
    "images not UTF-8": (lambda d: (d / "images.jsonl").write_bytes(b"\xff\xff\n"), "images.jsonl", "UTF-8"),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corrupt_build_is_one_error(built_train, tmp_path, name):
    data = _copy(built_train, tmp_path)
    change, file, words = CORRUPTIONS[name]
    change(data)
    with pytest.raises(InputError) as e:
        BuiltDataset(data)
    assert str(e.value).startswith(f"{data / file}: ") and words in str(e.value), str(e.value)


def test_missing_and_corrupt_masks_and_images(built_train, tmp_path):
    data = _copy(built_train, tmp_path)
    ds = BuiltDataset(data)
    first, second = ds.images[0], ds.images[1]
    ds.mask_path(first["id"]).unlink()
    with pytest.raises(InputError, match="missing or unreadable mask"):
        ds.read_mask(first["id"])
    ds.mask_path(second["id"]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(InputError, match="missing or unreadable mask"):
        ds.read_mask(second["id"])
    with pytest.raises(InputError, match="missing or unreadable under the images root"):
        BuiltDataset(data, images_root=tmp_path).read_image(first)


def test_stats_with_other_columns(built_train, tmp_path):
    data = _copy(built_train, tmp_path)
    from cocolvis.dataset import read_stats

    (data / "stats.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="missing column"):
        read_stats(data / "stats.csv")
    header = "id,name,pixels,images,lvis_pixels,coco_pixels,lvis_images,coco_images"
    for count in ("nan", "-1", "\u00b2", "9" * 30):  # the last two: a unicode digit, past int64
        (data / "stats.csv").write_text(f"{header}\n1,x,{count},1,1,1,1,1\n", encoding="utf-8")
        with pytest.raises(InputError, match="class 1: counts must be non-negative integers"):
            read_stats(data / "stats.csv")
    (data / "stats.csv").write_text(f"{header}\n1,x,1,1,1,1,1\n")
    with pytest.raises(InputError, match="row 1: 7 fields, expected 8"):
        read_stats(data / "stats.csv")
    (data / "stats.csv").write_text(f"extra,{header}\nz,2,y,5,1,4,1,0,1\n")  # other columns, any order
    stats = read_stats(data / "stats.csv")
    assert stats["id"].tolist() == [2] and stats["name"].tolist() == ["y"] and stats["coco_images"].tolist() == [1]


def _ess(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ess.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("name", ["classes of numbers", "missing mask", "missing image"])
def test_ess_train_on_a_corrupt_build_is_one_error(built_train, synth_root, tmp_path, name):
    data = _copy(built_train, tmp_path)
    if name == "missing mask":
        for mask in (data / "masks").iterdir():
            mask.unlink()
    elif name == "missing image":
        images = tmp_path / "images"
        shutil.copytree(synth_root / "images", images)
        for image in images.rglob("*.jpg"):
            image.unlink()
        data_args = ["--images-root", images]
    else:
        CORRUPTIONS[name][0](data)
    extra = data_args if name == "missing image" else []
    result = _ess("train", "--preset", "tiny", "--head", "softmax", "--iters", 2, "--crop", 32, "--batch", 2, "--device", "cpu",
                  "--data", data, "--out", tmp_path / "run", *extra)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "[ WARN" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"Error: {data if name != 'missing image' else images}"), errors[0]


def test_ess_eval_on_a_corrupt_build_is_one_error(built_val, tiny_runs, tmp_path):
    data = _copy(built_val, tmp_path)
    CORRUPTIONS["record leaving the root"][0](data)
    result = _ess("eval", "--run", tiny_runs["softmax"], "--data", data, "--out", tmp_path / "eval", "--device", "cpu",
                  "--quiet")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"Error: {data / 'images.jsonl'}: line 1: `file` "
                                                  "'../../etc/passwd' leaves the images root"]
    assert not (tmp_path / "eval").exists()
