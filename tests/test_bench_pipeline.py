"""The four bench commands on the shared synthetic build and the tiny trained runs, then the notebook on their outputs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from bench.cli import main
from test_bench_tables import assert_png

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "analysis.ipynb"
TIMING_CLASSES = (5, 50)
TIMING_HEADS = ("softmax", "ess")  # each (C, head, phase) is a fresh process: two heads show the table's shape


def invoke(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def bench_dir(tiny_runs, built_train, built_val, tmp_path_factory) -> Path:
    """All four commands' outputs, laid out as `make demo` lays them out."""
    out = tmp_path_factory.mktemp("bench")
    invoke("longtail", "--data", built_train, "--out", out / "longtail")
    invoke("topn-miou", "--eval", tiny_runs["softmax"] / "eval", "--eval", tiny_runs["ess"] / "eval",
           "--out", out / "topn")
    invoke("timing", "--classes", ",".join(map(str, TIMING_CLASSES)), "--size", "64x64", "--repeats", "1",
           "--warmup", "1", "--threads", "1", "--device", "cpu", "--heads", ",".join(TIMING_HEADS),
           "--out", out / "timing")
    invoke("embeddings", "--run", tiny_runs["ess"], "--data", built_val, "--clusters", "70", "--device", "cpu",
           "--out", out / "embeddings")
    return out


def test_longtail_on_build(bench_dir, built_train):
    out = bench_dir / "longtail"
    stats = pd.read_csv(built_train / "stats.csv").set_index("id")
    classes = json.loads((built_train / "classes.json").read_text())
    ranked = pd.read_csv(out / "longtail.csv").set_index("id")
    assert sorted(ranked.index) == list(stats.index)
    pd.testing.assert_series_equal(ranked.loc[stats.index, "images"], stats["images"])
    pd.testing.assert_series_equal(ranked.loc[stats.index, "pixels"], stats["pixels"])
    assert (np.diff(ranked["images"].to_numpy()) <= 0).all()  # most frequent first

    groups = pd.read_csv(out / "groups.csv").set_index("group")
    assert groups.at["total", "total"] == len(classes)
    for source in ("lvis", "coco", "both"):
        assert groups.at["total", source] == sum(c["source"] == source for c in classes)
    assert groups.loc["r", "total"] == sum(c.get("frequency") == "r" for c in classes)

    overlaps = pd.read_csv(out / "overlaps.csv").set_index("id")
    both = [c["id"] for c in classes if c["source"] == "both"]
    assert list(overlaps.index) == both
    s = stats.loc[both]
    assert (overlaps["stuff_only"] + overlaps["both"]).tolist() == s["coco_images"].tolist()
    assert (overlaps["lvis_only"] + overlaps["both"]).tolist() == s["lvis_images"].tolist()
    assert (overlaps["stuff_only"] + overlaps["lvis_only"] + overlaps["both"]).tolist() == s["images"].tolist()
    for name in ("longtail.png", "wordcloud.png", "overlaps.png"):
        assert_png(out / name)


def test_topn_on_runs(bench_dir, tiny_runs, built_train):
    table = pd.read_csv(bench_dir / "topn" / "topn_miou.csv")
    stats = pd.read_csv(built_train / "stats.csv").set_index("id")
    assert table["n"].tolist() == list(range(1, len(stats) + 1))
    assert table["id"].iloc[0] == stats["pixels"].idxmax()
    for head, run in tiny_runs.items():
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
        per_class = pd.read_csv(run / "eval" / "per_class.csv").set_index("id")
        assert table[f"miou_{head}"].iloc[-1] == pytest.approx(metrics["miou"])
        assert table[f"miou_{head}"].iloc[0] == pytest.approx(per_class.at[table["id"].iloc[0], "iou"], nan_ok=True)
        # every class's IoU agrees with the evaluator's own per-class table
        np.testing.assert_allclose(table.set_index("id")[f"iou_{head}"].loc[per_class.index], per_class["iou"])
    assert_png(bench_dir / "topn" / "topn_miou.png")


def test_timing_table(bench_dir):
    table = pd.read_csv(bench_dir / "timing" / "timing.csv")
    assert sorted(zip(table["classes"], table["head"])) == sorted((c, h) for c in TIMING_CLASSES for h in TIMING_HEADS)
    numbers = ["inference_s_per_image", "training_s_per_iter", "inference_peak_mib", "training_peak_mib"]
    assert (table[numbers] > 0).all().all()
    assert table["error"].isna().all()
    summary = (bench_dir / "timing" / "summary.md").read_text()
    for word in ("torch", "segmentation-models-pytorch", "faiss", "ru_maxrss", "CPU"):
        assert word in summary
    assert_png(bench_dir / "timing" / "timing.png")


def test_embeddings_outputs(bench_dir, built_train):
    out = bench_dir / "embeddings"
    stats = pd.read_csv(built_train / "stats.csv").set_index("id")
    per_class = pd.read_csv(out / "embeddings.csv").set_index("id")
    assert list(per_class.index) == list(stats.index)
    assert (per_class["length"] > 0).all()
    assert per_class["cluster"].nunique() == min(70, len(stats))
    clusters = pd.read_csv(out / "clusters.csv")
    assert clusters["size"].sum() == len(stats)
    assert sorted(n for names in clusters["classes"] for n in names.split("; ")) == sorted(stats["name"])
    assert len((out / "clusters.txt").read_text().splitlines()) == len(clusters)

    leaves = pd.read_csv(out / "dendrogram.csv")
    seen = stats[stats["pixels"] > 0]
    assert len(leaves) == min(100, len(seen))  # one leaf per class shown
    assert set(leaves["id"]) == set(seen.sort_values("pixels", ascending=False, kind="stable").index[:len(leaves)])
    summary = (out / "summary.md").read_text()
    assert "only meaningful for a run trained with `--no-norm`" in summary
    for name in ("frequency_length.png", "pixels_2d.png", "pixels_rgb.png", "dendrogram.png"):
        assert_png(out / name)


def test_embeddings_image_choice_and_errors(tiny_runs, built_val, tmp_path):
    records = [json.loads(line) for line in (built_val / "images.jsonl").read_text().splitlines() if line.strip()]
    image_id = records[-1]["id"]
    result = invoke("embeddings", "--run", tiny_runs["ess"], "--data", built_val, "--image-id", image_id,
                    "--clusters", "3", "--dendrogram-classes", "5", "--device", "cpu", "--out", tmp_path / "e")
    assert f"image: id {image_id}" in result.output and "chosen with --image-id" in result.output
    assert len(pd.read_csv(tmp_path / "e" / "dendrogram.csv")) == 5
    assert pd.read_csv(tmp_path / "e" / "clusters.csv")["cluster"].nunique() == 3

    bad = CliRunner().invoke(main, ["embeddings", "--run", str(tiny_runs["ess"]), "--data", str(built_val),
                                    "--image-id", "-7", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and bad.output.startswith(f"Error: {built_val / 'images.jsonl'}: no image with id -7")

    softmax = CliRunner().invoke(main, ["embeddings", "--run", str(tiny_runs["softmax"]), "--data", str(built_val),
                                        "--out", str(tmp_path / "s")])
    assert softmax.exit_code == 1
    assert len(softmax.output.strip().splitlines()) == 1 and "config.yaml: head is 'softmax'" in softmax.output
    assert not (tmp_path / "s").exists()


def test_notebook_runs_on_outputs(bench_dir, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    # The kernel must be this interpreter (the project's venv), not whatever `python` is on PATH.
    assert KernelManager(kernel_name="python3").format_kernel_cmd()[0] == sys.executable
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "store the notebook without outputs"
    monkeypatch.setenv("BENCH_DIR", str(bench_dir))
    monkeypatch.delenv("STUDY_DIR", raising=False)
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == len(list(bench_dir.glob("*/*.png")))  # every figure is shown


def test_embeddings_of_unnormalised_run(built_train, built_val, tmp_path):
    from ess.cli import main as ess_main

    run = tmp_path / "no-norm"
    trained = CliRunner().invoke(ess_main, ["train", "--out", str(run), "--data", str(built_train), "--head", "ess",
                                            "--no-norm", "--encoder", "resnet18", "--iters", "2", "--batch", "2",
                                            "--crop", "64", "--device", "cpu", "--quiet"])
    assert trained.exit_code == 0, trained.output
    result = invoke("embeddings", "--run", run, "--data", built_val, "--clusters", "5", "--dendrogram-classes", "10",
                    "--device", "cpu", "--out", tmp_path / "e")
    assert "normalize False" in result.output and "lengths shape the decision regions" in result.output
    assert "only meaningful" not in result.output
    assert_png(tmp_path / "e" / "frequency_length.png")
