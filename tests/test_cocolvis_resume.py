"""Stopping and re-running a build: no truncated mask, finished masks are not repainted."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from cocolvis import paint
from cocolvis.build import build_split
from cocolvis.journal import JOURNAL
from cocolvis.dataset import BuiltDataset, read_label_png
from segkit.io import InputError



def inputs(synth_root):
    ann = synth_root / "annotations"
    return {"coco": [ann / "stuff_train2017.json"], "lvis": ann / "lvis_v1_train.json", "progress": False}


def outputs(out):
    """Every output file's bytes (masks decoded), the report without its resume count."""
    files = {name: (out / name).read_bytes() for name in ("classes.json", "images.jsonl", "stats.csv")}
    masks = {p.name: read_label_png(p).tobytes() for p in sorted((out / "masks").iterdir())}
    report = json.loads((out / "report.json").read_text())
    report.pop("images_resumed")
    return files, masks, report


@pytest.fixture(scope="module")
def fresh(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("fresh") / "train"
    build_split(out=out, workers=1, **inputs(synth_root))
    return outputs(out)


def interrupt_after(monkeypatch, n: int):
    """Make the n+1-th PNG write die half-way, as a killed process would."""
    real = cv2.imwrite
    calls = []

    def imwrite(path, img, *args):
        calls.append(path)
        if len(calls) > n:
            ok, buf = cv2.imencode(".png", img)
            with open(path, "wb") as f:
                f.write(buf.tobytes()[: len(buf) // 2])
            raise KeyboardInterrupt
        return real(path, img, *args)

    monkeypatch.setattr(paint.cv2, "imwrite", imwrite)


def test_interrupted_build_leaves_no_truncated_mask_and_resumes(synth_root, tmp_path, monkeypatch, fresh):
    out = tmp_path / "train"
    interrupt_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        build_split(out=out, workers=1, **inputs(synth_root))
    monkeypatch.undo()
    names = sorted(p.name for p in (out / "masks").iterdir())
    assert len(names) == 5 and all(n.endswith(".png") and not n.startswith(".") for n in names)
    for name in names:
        assert read_label_png(out / "masks" / name).shape == (96, 128)
    assert not (out / "images.jsonl").exists() and not (out / "stats.csv").exists()

    summary = build_split(out=out, workers=1, **inputs(synth_root))
    assert summary["images_resumed"] == 5
    assert summary["images_painted"] == summary["images_written"] - 5
    assert outputs(out) == fresh


def test_rerun_of_a_finished_build_paints_nothing(synth_root, tmp_path, fresh):
    out = tmp_path / "train"
    build_split(out=out, workers=1, **inputs(synth_root))
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "masks").iterdir()}
    summary = build_split(out=out, workers=1, **inputs(synth_root))
    assert summary["images_painted"] == 0 and summary["images_resumed"] == summary["images_written"] == 24
    assert {p.name: p.stat().st_mtime_ns for p in (out / "masks").iterdir()} == stamps
    assert outputs(out) == fresh


def test_lost_masks_cut_journal_and_stale_temporaries_are_repaired(synth_root, tmp_path, fresh):
    out = tmp_path / "train"
    build_split(out=out, workers=1, **inputs(synth_root))
    masks = sorted((out / "masks").iterdir())
    masks[0].unlink()  # a mask lost after its journal line
    journal = (out / JOURNAL).read_text()
    last = json.loads(journal.splitlines()[-1])["image_id"]
    (out / JOURNAL).write_text(journal[: journal.rstrip("\n").rfind("\n") + 12])  # the last line cut short
    (out / "masks" / ".000000000001.png.x1y2.png").write_bytes(b"\x89PNG half")  # a killed run's temporary
    summary = build_split(out=out, workers=1, **inputs(synth_root))
    repainted = len({int(masks[0].stem), last})
    assert summary["images_painted"] == repainted and summary["images_resumed"] == 24 - repainted
    assert not (out / "masks" / ".000000000001.png.x1y2.png").exists()
    assert outputs(out) == fresh


def test_other_options_are_refused_unless_overwrite(synth_root, tmp_path):
    out = tmp_path / "train"
    build_split(out=out, workers=1, **inputs(synth_root))
    with pytest.raises(InputError, match="pass --overwrite"):
        build_split(out=out, workers=1, order="file", **inputs(synth_root))
    (out / "masks" / "000999999999.png").write_bytes(b"a stale mask of another split")
    summary = build_split(out=out, workers=1, order="file", overwrite=True, **inputs(synth_root))
    assert summary["images_resumed"] == 0 and summary["images_painted"] == 24
    assert json.loads((out / "dataset.json").read_text())["options"]["order"] == "file"
    assert len(list((out / "masks").iterdir())) == 24  # the stale mask is gone


def test_limit_then_the_rest(synth_root, tmp_path, fresh):
    out = tmp_path / "train"
    first = build_split(out=out, workers=1, limit=10, **inputs(synth_root))
    assert first["images_written"] == 10 and len(BuiltDataset(out).images) == 10
    rest = build_split(out=out, workers=2, **inputs(synth_root))
    assert rest["images_resumed"] == 10 and rest["images_painted"] == 14
    assert outputs(out) == fresh


def test_outputs_get_the_usual_file_mode(built_train):
    """Temporaries are created 0600; the renamed outputs get what a plain open() would give."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    for path in [built_train / "images.jsonl", built_train / "stats.csv", next((built_train / "masks").iterdir())]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_masks_match_the_synthetic_label_maps(built_train, synth_root):
    """The round trip: pixels of the synthetic images follow the class in the built mask."""
    from cocolvis.synth import Appearance

    ds = BuiltDataset(built_train)
    assert ds.images_root == synth_root / "images"
    appearance = Appearance(ds.num_classes)
    for rec in ds.images:
        mask = ds.read_mask(rec["id"])
        image = ds.read_image(rec).astype(np.float32)
        clean = appearance.render(mask, np.random.default_rng(0), noise=0).astype(np.float32)
        assert np.abs(image - clean).mean() < 10, rec["id"]
        assert (mask > 0).all()  # synthetic stuff covers every pixel no instance covers


_SCRIPT = """
import os, signal, sys, time
from cocolvis import pool
from cocolvis.cli import main
real = pool.write_mask
def patched(task):
    if {die!r} and task.image_id == {die!r}:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep({sleep})
    return real(task)
pool.write_mask = patched
main()
"""


def _build_process(synth_root, out, die=None, sleep=0.0):
    import os
    import subprocess
    import sys
    from pathlib import Path

    ann = synth_root / "annotations"
    args = ["build", "--lvis", str(ann / "lvis_v1_train.json"), "--coco", str(ann / "stuff_train2017.json"),
            "--out", str(out), "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.Popen([sys.executable, "-c", _SCRIPT.format(die=die, sleep=sleep), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_a_dead_worker_stops_the_build_with_one_line(synth_root, tmp_path):
    from cocolvis.dataset import BuiltDataset as _  # noqa: F401  (the module imports cleanly)

    ann = json.loads((synth_root / "annotations" / "lvis_v1_train.json").read_text())
    proc = _build_process(synth_root, tmp_path / "out", die=ann["images"][5]["id"])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("Error")]
    assert errors == ["Error: a worker process died (killed, or out of memory?); the build stopped"]
    assert not (tmp_path / "out").exists()  # a fresh --out is removed


def test_ctrl_c_exits_130_without_worker_tracebacks_and_resumes(synth_root, tmp_path, fresh):
    import os
    import signal
    import time

    out = tmp_path / "out"
    proc = _build_process(synth_root, out, sleep=0.3)
    deadline = time.monotonic() + 60
    while not (out / JOURNAL).exists() or len((out / JOURNAL).read_text().splitlines()) < 4:  # 3 masks done
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: to the parent and its workers
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "re-run the same command to resume" in err
    summary = build_split(out=out, workers=1, **inputs(synth_root))
    assert summary["images_resumed"] >= 3
    assert outputs(out) == fresh
