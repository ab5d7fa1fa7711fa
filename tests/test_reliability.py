"""Hostile inputs, signals and concurrent runs, each command run as a process.

Every case must end in one `Error:` line (or, on a signal, one line and exit status 128 + the
signal's number), no traceback, no process left behind, and a file system as it was: no user
file deleted or replaced, no output directory left half-written.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TRAIN = ["train", "--head", "ess", "--preset", "tiny", "--crop", "32", "--batch", "2", "--device", "cpu", "--quiet"]
CAP = 6 << 30
"""The address-space cap (ulimit -v) some cases run under."""


def command(package: str, *args, script: str | None = None) -> list[str]:
    """The command line of `cocolvis`, `ess` or `bench` with `args` (optionally after a patching `script`)."""
    code = (script or "") + f"\nfrom {package}.cli import main\nmain()\n"
    return [sys.executable, "-c", code, *map(str, args)]


def run(package: str, *args, cap: int | None = None, script: str | None = None) -> subprocess.CompletedProcess:
    """Run a command to its end (under an address-space cap of `cap` bytes if given)."""
    limit = (lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap))) if cap else None
    return subprocess.run(command(package, *args, script=script), env=ENV, capture_output=True, text=True,
                          timeout=300, preexec_fn=limit)


def one_line_error(result: subprocess.CompletedProcess, *needles) -> str:
    """The one `Error:` line of a failed command, which names each of `needles`."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert str(needle) in lines[0], lines[0]
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for a directory)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def user_dir(path: Path) -> dict[str, bytes | None]:
    """A directory of the user's own files (a masks/ folder and a note), and its snapshot."""
    (path / "masks").mkdir(parents=True)
    (path / "masks" / "000000000001.png").write_bytes(b"my own mask")
    (path / "notes.txt").write_text("mine")
    return snapshot(path)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (its data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def jpeg_header(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims width x height pixels."""
    import cv2

    data = bytearray(cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    frame = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, frame + 5, height, width)
    return bytes(data)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def run_dir(built_train, tmp_path_factory) -> Path:
    """An ESS run of 2 iterations on the synthetic build."""
    from ess import config as cfg
    from ess.train import train

    run = tmp_path_factory.mktemp("rel") / "ess"
    train(cfg.resolve("tiny", None, {"head": "ess", "data": str(built_train), "crop": 32, "batch": 2, "iters": 2,
                                     "device": "cpu"}), run, progress=False)
    return run


# --- never delete or replace what the toolkit did not write ---------------------------------------------------

@pytest.mark.parametrize("overwrite", [False, True])
def test_build_never_replaces_a_directory_that_holds_no_build(synth_root, tmp_path, overwrite):
    out = tmp_path / "mydata"
    before = user_dir(out)
    ann = synth_root / "annotations"
    result = run("cocolvis", "build", "--lvis", ann / "lvis_v1_train.json", "--coco", ann / "stuff_train2017.json",
                 "--out", out, "--workers", "1", *(["--overwrite"] if overwrite else []))
    line = one_line_error(result, out, "holds no `cocolvis build` output (found masks, notes.txt)")
    assert "other input files" not in line
    assert snapshot(out) == before


def test_every_command_refuses_a_directory_of_user_files(built_train, built_val, run_dir, tmp_path):
    out = tmp_path / "mine"
    before = user_dir(out)
    image = tmp_path / "photo.png"
    shutil.copy(next((built_val / "masks").iterdir()), image)
    cases = [("ess", *TRAIN, "--iters", "1", "--data", built_train, "--out", out),
             ("ess", "eval", "--run", run_dir, "--data", built_val, "--out", out, "--quiet"),
             ("ess", "predict", "--run", run_dir, image, "--out", out, "--quiet"),
             ("bench", "longtail", "--data", built_train, "--out", out)]
    for package, *args in cases:
        one_line_error(run(package, *args), out, "holds no", "output (found masks, notes.txt)")
        assert snapshot(out) == before, args


def test_output_written_before_directories_were_marked_is_still_accepted(built_train, tmp_path):
    """A bench output (summary.md) or a synthetic dataset (annotations/, images/) from before the marker."""
    bench_out, synth_out = tmp_path / "longtail", tmp_path / "synth"
    bench_out.mkdir()
    (bench_out / "summary.md").write_text("an earlier run\n")
    for name in ("annotations", "images"):
        (synth_out / name).mkdir(parents=True)
    assert run("bench", "longtail", "--data", built_train, "--out", bench_out).returncode == 0
    assert run("cocolvis", "synth", "--out", synth_out, "--train", "1", "--val", "1", "--size", "32x32").returncode == 0
    assert (synth_out / "annotations" / "lvis_v1_train.json").is_file()


def test_no_command_writes_inside_its_input_build(built_train, built_val, run_dir):
    before = snapshot(built_val)
    for package, *args in [("ess", *TRAIN, "--iters", "1", "--data", built_train, "--val-data", built_val,
                            "--out", built_val / "run"),
                           ("ess", "eval", "--run", run_dir, "--data", built_val, "--out", built_val / "eval"),
                           ("bench", "longtail", "--data", built_val, "--out", built_val)]:
        one_line_error(run(package, *args), "lies inside the input directory")
    assert snapshot(built_val) == before


def test_a_failed_training_removes_only_what_it_wrote(built_train, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(built_train, data)
    shutil.rmtree(data / "masks")  # the first batch fails, after config.yaml, classes.json and log.csv were written
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new"):
        one_line_error(run("ess", *TRAIN, "--iters", "2", "--data", data, "--out", out), "missing or unreadable mask")
    assert list((tmp_path / "empty").iterdir()) == []  # given empty, left empty
    assert not (tmp_path / "new").exists()  # made by the run, removed


def test_eval_refuses_a_checkpoint_of_another_head(run_dir, built_val, tmp_path):
    from ess.checkpoint import save_checkpoint
    from ess.model import build_model

    mixed = tmp_path / "run"
    shutil.copytree(run_dir, mixed)
    softmax = build_model("softmax", 1284, encoder="resnet18")
    save_checkpoint(mixed / "last.pt", {"iteration": 2, "model_args": dataclasses.asdict(softmax.args),
                                        "model": softmax.state_dict(), "config": {}})
    one_line_error(run("ess", "eval", "--run", mixed, "--data", built_val, "--quiet"),
                   mixed / "last.pt", "checkpoint of the softmax head, but its run is of the ess head")
    assert not (mixed / "eval").exists()


# --- one writer per output directory ----------------------------------------------------------------------------

_WAIT_AFTER_FIRST_ITERATION = """
import sys, time
from pathlib import Path
from ess import train
ready, go = Path(sys.argv.pop(1)), Path(sys.argv.pop(1))
real = train.Records.iteration
def iteration(self, done, *args):
    real(self, done, *args)
    if done == 1:
        ready.touch()
        while not go.exists():
            time.sleep(0.05)
train.Records.iteration = iteration
"""


def start_waiting_training(tmp_path: Path, *args, script: str = "") -> tuple[subprocess.Popen, Path]:
    """An `ess train` (patched by `script` too) that stops after its first iteration until the returned `go`
    file exists."""
    ready, go = tmp_path / "ready", tmp_path / "go"
    proc = subprocess.Popen(command("ess", ready, go, *args, script=_WAIT_AFTER_FIRST_ITERATION + script), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    return proc, go


def test_two_concurrent_trainings_into_one_directory(built_train, tmp_path):
    out = tmp_path / "R"
    first, go = start_waiting_training(tmp_path, *TRAIN, "--iters", "2", "--seed", "1", "--data", built_train,
                                       "--out", out)
    try:
        second = run("ess", *TRAIN, "--iters", "2", "--seed", "2", "--data", built_train, "--out", out)
        one_line_error(second, out, f"another `ess train` (pid {first.pid}) is writing into this directory")
        resumed = run("ess", "train", "--resume", "--out", out, "--quiet")
        one_line_error(resumed, out, "is writing into this directory")
    finally:
        go.touch()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert "seed: 1" in (out / "config.yaml").read_text()  # the first run's, intact
    assert [line.split(",")[0] for line in (out / "log.csv").read_text().splitlines()] == ["iteration", "1", "2"]
    assert not (out / ".lock").exists()


# --- SIGTERM, SIGHUP, SIGKILL -------------------------------------------------------------------------------------

_SLOW_WORKERS = """
import time
from cocolvis import pool
real = pool.write_mask
def slow(task):
    time.sleep(0.25)
    return real(task)
pool.write_mask = slow
"""


def start_build(synth_root: Path, out: Path) -> tuple[subprocess.Popen, list[int]]:
    """A 2-worker build read through pipes, once it has written a few masks; and its workers' pids."""
    ann = synth_root / "annotations"
    proc = subprocess.Popen(command("cocolvis", "build", "--lvis", ann / "lvis_v1_train.json", "--coco",
                                    ann / "stuff_train2017.json", "--out", out, "--workers", "2",
                                    script=_SLOW_WORKERS), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = out / ".journal.jsonl"
    while not journal.exists() or len(journal.read_text().splitlines()) < 3:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    workers = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    assert len(workers) >= 2
    return proc, workers


def test_sigterm_of_a_build_read_through_a_pipe(synth_root, built_train, tmp_path):
    out = tmp_path / "out"
    proc, workers = start_build(synth_root, out)
    proc.send_signal(signal.SIGTERM)  # the parent alone, as `kill -TERM` does
    _, err = proc.communicate(timeout=5)  # the reader sees EOF: no worker holds the pipes
    assert proc.returncode == 143, err
    assert err.decode().strip().splitlines()[-1] == f"Terminated (SIGTERM): re-run the same command to resume {out}"
    assert b"Traceback" not in err
    assert not any(alive(pid) for pid in workers)
    result = run("cocolvis", "build", "--lvis", synth_root / "annotations" / "lvis_v1_train.json", "--coco",
                 synth_root / "annotations" / "stuff_train2017.json", "--out", out, "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "masks painted" in result.stdout
    assert snapshot(out / "masks") == snapshot(built_train / "masks")  # resumed to byte-identical masks


def test_workers_die_with_a_killed_build(synth_root, tmp_path):
    proc, workers = start_build(synth_root, tmp_path / "out")
    proc.kill()
    proc.communicate(timeout=30)  # EOF: the workers were killed with their parent
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, [pid for pid in workers if alive(pid)]
        time.sleep(0.05)


def test_sigterm_stops_training_at_the_checkpoint_due_and_it_resumes(built_train, tmp_path):
    out = tmp_path / "R"
    proc, go = start_waiting_training(tmp_path, *TRAIN, "--iters", "3", "--ckpt-every", "2", "--data", built_train,
                                      "--out", out, script="import ess.stopping\ness.stopping.GRACE_SECONDS = 1e9\n")
    proc.send_signal(signal.SIGTERM)  # recorded at iteration 1's end; iteration 2's checkpoint is due (no time limit)
    go.touch()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == [f"Terminated (SIGTERM): stopped at iteration 2, the checkpoint due then "
                                        f"written to {out / 'last.pt'}; continue with --resume"]
    resumed = run("ess", "train", "--resume", "--out", out, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith(f"{out}: 3 iterations")


def test_sighup_before_the_first_checkpoint_leaves_nothing(built_train, tmp_path):
    out = tmp_path / "R"
    proc, go = start_waiting_training(tmp_path, *TRAIN, "--iters", "50", "--ckpt-every", "50", "--data", built_train,
                                      "--out", out)
    proc.send_signal(signal.SIGHUP)
    proc.send_signal(signal.SIGHUP)  # a second signal stops at once
    go.touch()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 129, err
    assert err.strip().splitlines() == ["Hung up (SIGHUP): stopped at iteration 1, before the first checkpoint: "
                                        "nothing kept"]
    assert not out.exists()


# --- sizes a user types or a file claims --------------------------------------------------------------------------

def test_predict_refuses_image_sizes_before_decoding(run_dir, tmp_path):
    from PIL import Image

    images = {"huge.png": png_header(50000, 50000), "huge.jpg": jpeg_header(65000, 65000)}
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
    Image.new("1", (12000, 12000)).save(tmp_path / "valid.png")  # a valid PNG of 144 M pixels
    out = tmp_path / "pred"
    for name in [*images, "valid.png"]:
        one_line_error(run("ess", "predict", "--run", run_dir, tmp_path / name, "--out", out, "--quiet"),
                       tmp_path / name, "image header: size", "outside the limits")
    Image.new("1", (8192, 8192)).save(tmp_path / "big.png")  # within the limits, not within 6 GB
    one_line_error(run("ess", "predict", "--run", run_dir, tmp_path / "big.png", "--out", out, "--quiet", cap=CAP),
                   tmp_path / "big.png", "inference of a 8192x8192 image needs at least", "GB available")
    assert not out.exists()


@pytest.mark.parametrize("options, needles", [
    (["--crop", "50000"], ["option 'crop' must be at most 8192, got 50000"]),
    (["--embed-dim", "100000000"], ["option 'embed_dim' must be at most 65536, got 100000000"]),
    (["--k", "5000", "--crop", "96", "--batch", "4"], ["training needs at least", "--k 5000 negatives"]),
    (["--crop", "4096", "--batch", "64"], ["training needs at least", "--batch 64 x --crop 4096"]),
])
def test_training_sizes_are_bounded_before_allocation(built_train, tmp_path, options, needles):
    out = tmp_path / "R"
    result = run("ess", *TRAIN, "--iters", "1", "--data", built_train, "--out", out, *options, cap=CAP)
    one_line_error(result, *needles)
    assert not out.exists()


def fake_eval(eval_dir: Path, confusion_npy: bytes) -> None:
    import zipfile

    eval_dir.mkdir()
    (eval_dir / "metrics.json").write_text(json.dumps({"miou": 0.5, "head": "ess", "run": None}))
    with zipfile.ZipFile(eval_dir / "confusion.npz", "w") as z:
        z.writestr("confusion.npy", confusion_npy)


def npy(shape: tuple, dtype: str, data: bytes = b"") -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


@pytest.mark.parametrize("confusion, needles", [
    (npy((100000, 100000), "<i8"), ["header claims a 100000 x 100000 confusion matrix: at most 32767 classes"]),
    (npy((2, 2), "<u8", np.array([2 ** 64 - 1, 0, 0, 1], np.uint64).tobytes()),
     ["a count of 18446744073709551615 is beyond the int64 range"]),
])
def test_confusion_matrices_are_checked_before_use(built_train, tmp_path, confusion, needles):
    fake_eval(tmp_path / "eval", confusion)
    out = tmp_path / "topn"
    result = run("bench", "topn-miou", "--eval", tmp_path / "eval", "--data", built_train, "--out", out)
    one_line_error(result, tmp_path / "eval" / "confusion.npz", *needles)
    assert not out.exists()


# --- names, ids and encodings -------------------------------------------------------------------------------------

def test_bench_refuses_a_class_name_with_a_newline_and_writes_nothing(built_train, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(built_train, data)
    classes = (data / "classes.json").read_text()
    (data / "classes.json").write_text(classes.replace('"name": "aerosol_can"', '"name": "aerosol\\ncan"', 1))
    out = tmp_path / "longtail"
    one_line_error(run("bench", "longtail", "--data", data, "--out", out), data / "classes.json", "class 1",
                   "control character '\\n'")
    assert not out.exists()


def annotation_files(tmp_path: Path) -> tuple[Path, Path, dict]:
    """A tiny synthetic LVIS file and COCO-Stuff file; the LVIS content, to edit and write again."""
    from cocolvis.synth import write_synthetic

    info = write_synthetic(tmp_path / "synth", train=2, val=0, size=(24, 32), seed=1, images=False)
    lvis = Path(info["lvis_v1_train"])
    return lvis, Path(info["stuff_train2017"]), json.loads(lvis.read_text())


def test_build_refuses_newline_names_and_ids_past_12_digits(tmp_path):
    lvis_path, stuff_path, lvis = annotation_files(tmp_path)
    named = json.loads(json.dumps(lvis))
    named["categories"][4]["name"] = "a\nb"
    big = json.loads(json.dumps(lvis))
    old_id, new_id = big["images"][0]["id"], 2 ** 64 + 5
    big["images"][0]["id"] = new_id
    for ann in big["annotations"]:
        ann["image_id"] = new_id if ann["image_id"] == old_id else ann["image_id"]
    for content, needles in [(named, ["category 5", "control character '\\n'"]),
                             (big, [f"image {new_id}: id above 999999999999"])]:
        lvis_path.write_text(json.dumps(content))
        out = tmp_path / "out"
        one_line_error(run("cocolvis", "build", "--lvis", lvis_path, "--coco", stuff_path, "--out", out,
                           "--workers", "1"), lvis_path, *needles)
        assert not out.exists()


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32-le"])
def test_json_in_utf8_with_a_bom_utf16_and_utf32_is_read(tmp_path, encoding):
    lvis_path, stuff_path, lvis = annotation_files(tmp_path)
    lvis_path.write_bytes(json.dumps(lvis).encode(encoding))
    result = run("cocolvis", "build", "--lvis", lvis_path, "--coco", stuff_path, "--out", tmp_path / "out",
                 "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert "2 written" in result.stdout


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(built_train, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from ess import checkpoint
    from ess.cli import main

    def full(obj, path):
        Path(path).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    result = CliRunner().invoke(main, [*TRAIN, "--iters", "1", "--data", str(built_train), "--out",
                                       str(tmp_path / "R")])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [
        f"Error: {tmp_path / 'R' / 'last.pt'}: cannot write the checkpoint (is the disk full?): [enforce fail at "
        "inline_container.cc:664] . unexpected pos 64 vs 0"]
    assert not (tmp_path / "R").exists()
