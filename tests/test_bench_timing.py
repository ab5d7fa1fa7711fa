"""`bench timing` pieces that need no worker process: the plan, the synthetic batch, one in-process measurement."""
from __future__ import annotations

import statistics

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from bench.cli import main
from bench.timing import PRESETS, Setup, measure, ratios, synthetic_batch, timing_plan


def test_presets_and_overrides():
    paper = timing_plan("paper", device="cpu")
    assert paper.encoder == "resnet50"
    assert [(s.dataset, s.num_classes, s.size) for s in paper.setups] == [
        ("Cityscapes", 19, (1024, 2048)), ("ADE20K", 150, (512, 512)), ("COCO+LVIS", 1284, (512, 512)),
        ("synthetic", 10000, (512, 512))]
    cpu = timing_plan("cpu", device="cpu")
    assert cpu.setups == PRESETS["cpu"]["setups"] and cpu.encoder == "resnet18"
    # explicit options win over the preset; known class counts keep their preset size
    plan = timing_plan("paper", classes=[150, 7], batch=4, encoder="resnet18", repeats=2, warmup=0, device="cpu")
    assert plan.setups == (Setup(150, (512, 512)), Setup(7, (512, 512)))
    assert (plan.batch, plan.encoder, plan.repeats, plan.warmup) == (4, "resnet18", 2, 0)
    assert timing_plan("paper", size=(64, 96), device="cpu").setups[0].size == (64, 96)


def test_synthetic_batch_is_blocks_of_valid_ids():
    x, mask = synthetic_batch(7, (70, 100), 3, "cpu")
    assert x.shape == (3, 3, 70, 100) and mask.shape == (3, 70, 100) and mask.dtype == torch.int64
    assert mask.min() >= 1 and mask.max() <= 7
    assert (mask[:, :32, :32] == mask[:, :1, :1]).all()  # constant over a 32x32 block
    x2, mask2 = synthetic_batch(7, (70, 100), 3, "cpu")
    assert torch.equal(x, x2) and torch.equal(mask, mask2)


@pytest.mark.parametrize("amp", [False, True])  # --amp on the CPU: bfloat16 autocast
@pytest.mark.parametrize("phase", ["inference", "training"])
def test_measure_in_process(phase, amp):
    plan = timing_plan("cpu", classes=[4], size=(32, 32), repeats=2, warmup=1, device="cpu", threads=1, amp=amp)
    threads = torch.get_num_threads()
    try:
        result = measure("ess", 4, phase, plan)  # in this process: set its thread count back afterwards
    finally:
        torch.set_num_threads(threads)
    assert result["threads"] == 1
    assert result["seconds"] > 0 and len(result["times"]) == 2
    assert result["seconds"] == pytest.approx(statistics.median(result["times"]))
    assert result["peak_bytes"] > 0 and result["increase_bytes"] >= 0


def test_ratios():
    table = pd.DataFrame({"classes": [10, 10], "head": ["softmax", "ess"], "inference_s_per_image": [2.0, 1.0],
                          "training_s_per_iter": [3.0, 1.5], "training_increase_mib": [100.0, 25.0]})
    r = ratios(table).iloc[0]
    assert r["inference time softmax/ESS"] == 2 and r["training time softmax/ESS"] == 2
    assert r["training memory increase softmax/ESS"] == 4


def test_cli_rejects_bad_options(tmp_path):
    runner = CliRunner()
    for args, message, status in [(["--classes", "19,x"], "comma-separated integers", 2), (["--size", "64"], "HxW", 2),
                                  (["--batch", "1"], "1 is not in the range", 2),
                                  (["--heads", "softmax,crf"], "--heads: unknown variant 'crf'; known: softmax, ", 1)]:
        result = runner.invoke(main, ["timing", *args, "--out", str(tmp_path / "o")])
        assert result.exit_code == status and message in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_rounds_are_merged_by_median_and_a_failed_round_is_reported():
    from bench.timing import median_run

    runs = [{"seconds": s, "peak_bytes": 10 * s, "increase_bytes": s, "times": [s], "threads": 2} for s in (3.0, 1.0, 2.0)]
    merged = median_run(runs)
    assert (merged["seconds"], merged["peak_bytes"], merged["times"]) == (2.0, 20.0, [3.0, 1.0, 2.0])
    assert median_run([*runs, {"error": "worker process died"}]) == {"error": "worker process died"}
    assert timing_plan("cpu", device="cpu", rounds=3).rounds == 3
