"""Fuzzing `cocolvis build` with mutated real-format annotation files.

Every example must end with exit status 0 or 1 within a time limit, never a signal or a
traceback; a failure is one `Error:` line naming an input file, and leaves no --out
behind. Most examples run the build in-process; a few run the command as a process.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cocolvis.cli import main
from cocolvis.synth import write_synthetic

ROOT = Path(__file__).parents[1]
NUMBERS = [math.nan, math.inf, -math.inf, 1e308, 10 ** 30, -5, -0.5, 0.5, 7.0, True, False, "7", None, 2 ** 63]
TIME_LIMIT = 60


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny synthetic pair in the real formats: LVIS polygons, COCO-Stuff RLEs."""
    info = write_synthetic(tmp_path_factory.mktemp("fuzz"), train=2, val=0, size=(24, 32), seed=3, n_things=3,
                           n_stuff=3, images=False)
    lvis = json.loads(Path(info["lvis_v1_train"]).read_text())
    stuff = json.loads(Path(info["stuff_train2017"]).read_text())
    lvis["categories"] = lvis["categories"][:300]  # keep the examples quick; the used ids stay
    lvis["annotations"] = [a for a in lvis["annotations"] if a["category_id"] <= 300]
    for img in lvis["images"]:
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            img[key] = [c for c in img[key] if c <= 300]
    return {"lvis": lvis, "stuff": stuff}


def _places(doc, path=()):
    """Every value of the images, annotations and the first categories, with its path."""
    if isinstance(doc, dict):
        items = doc.items()
    elif isinstance(doc, list):
        items = enumerate(doc if path[-1:] != ("categories",) else doc[:2])
    else:
        return
    for key, value in items:
        yield path + (key,), value
        yield from _places(value, path + (key,))


def _mutated(value, kind: int, draw):
    if isinstance(value, str):
        return [value[: len(value) // 2], value[:-1] + "P", value[:3] + "~\x00" + value[3:], 5, ""][kind % 5]
    if isinstance(value, list):
        return [5, "x", [], [value], {}][kind % 5]
    if isinstance(value, dict):
        return None  # the key is deleted below
    return draw(st.sampled_from(NUMBERS))


@st.composite
def mutations(draw, base):
    """A copy of the (LVIS, COCO-Stuff) pair with 1 to 3 values changed."""
    docs = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        which = draw(st.sampled_from(["lvis", "stuff"]))
        places = [p for p in _places(docs[which]) if p[0][0] in ("images", "annotations", "categories")]
        if draw(st.integers(0, 3)) == 0:  # often enough, an RLE string or a polygon
            places = [p for p in places if p[0][-1] == "counts" or p[0][-2:-1] == ("segmentation",)] or places
        path, value = draw(st.sampled_from(places))
        parent = docs[which]
        for key in path[:-1]:
            parent = parent[key]
        kind = draw(st.integers(0, 9))
        if isinstance(parent, dict) and (isinstance(value, dict) or kind == 9):
            del parent[path[-1]]
        else:
            parent[path[-1]] = _mutated(value, kind, draw)
    return docs


def _write(tmp: Path, docs) -> tuple[Path, Path, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    lvis, stuff = tmp / "lvis.json", tmp / "stuff.json"
    lvis.write_text(json.dumps(docs["lvis"]))
    stuff.write_text(json.dumps(docs["stuff"]))
    return lvis, stuff, tmp / "out"


def _check(code: int, stderr: str, files, out: Path) -> None:
    assert code in (0, 1), (code, stderr)
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    if code == 0:
        assert not errors and (out / "images.jsonl").exists()
    elif "sizes disagree" in stderr:  # by design: mismatched images are skipped, the rest is written
        assert (out / "images.jsonl").exists()
    else:
        assert len(errors) == 1, stderr
        assert any(errors[0].startswith(f"Error: {f}: ") for f in files), errors[0]
        assert not out.exists()


def _alarm(signum, frame):
    raise TimeoutError(f"build ran past {TIME_LIMIT} s")


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_annotation_files_in_process(base, tmp_path_factory, data):
    docs = data.draw(mutations(base))
    lvis, stuff, out = _write(tmp_path_factory.mktemp("ex"), docs)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIME_LIMIT)
    try:
        result = CliRunner().invoke(main, ["build", "--lvis", str(lvis), "--coco", str(stuff), "--out", str(out),
                                           "--workers", "1", "--top", "0"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert isinstance(result.exception, (SystemExit, type(None))), repr(result.exception)
    _check(result.exit_code, result.stderr, (lvis, stuff), out)


@settings(max_examples=6, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_annotation_files_as_a_process(base, tmp_path_factory, data):
    docs = data.draw(mutations(base))
    lvis, stuff, out = _write(tmp_path_factory.mktemp("ex"), docs)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "cocolvis.cli", "build", "--lvis", lvis, "--coco", stuff,
                           "--out", out, "--workers", "2", "--top", "0"], env=env, capture_output=True, text=True,
                          timeout=TIME_LIMIT)
    _check(proc.returncode, proc.stderr, (lvis, stuff), out)
