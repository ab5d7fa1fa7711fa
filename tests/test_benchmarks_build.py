"""The benchmark's variants paint the same pixels, and its report states each target (no timing asserted)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks import build as benchmark



def test_naive_algorithm_paints_what_file_order_paints(tmp_path):
    from cocolvis.dataset import mask_name, read_label_png
    from cocolvis.inputs import read_inputs
    from cocolvis.paint import write_mask
    from cocolvis.plan import mask_tasks, plan_build
    from cocolvis.synth import write_synthetic

    info = write_synthetic(tmp_path / "s", train=5, val=0, size=(60, 80), seed=4, n_things=12, n_stuff=8,
                           images=False)
    inputs = read_inputs([info["stuff_train2017"]], info["lvis_v1_train"])
    (tmp_path / "ours").mkdir()
    (tmp_path / "naive").mkdir()
    for task in mask_tasks(inputs, plan_build(inputs).records, tmp_path / "ours", "file"):
        write_mask(task)
    naive = benchmark._naive_tasks(Path(info["stuff_train2017"]), Path(info["lvis_v1_train"]), inputs.classes,
                                   tmp_path / "naive")
    assert len(naive) == 5
    for task in naive:
        benchmark.naive_write(task)
        ours = read_label_png(tmp_path / "ours" / mask_name(task.image_id))
        np.testing.assert_array_equal(read_label_png(tmp_path / "naive" / mask_name(task.image_id)), ours)
        assert len(np.unique(ours)) > 5


def test_report_states_every_target():
    fig = {"images": 10, "wall": {"naive/1": 1.0, "naive/2": 0.5, "ours/1": 0.1, "ours/2": 0.05, "floor/1": 0.08},
           "cpu": {"naive/1": 1.0, "naive/2": 1.0, "ours/1": 0.1, "ours/2": 0.1, "floor/1": 0.08},
           "end_to_end": {1: 0.25, 2: 0.15}, "process_cpu": {1: 0.24, 2: 0.26}, "cpu_loop": 1.6,
           "phases": {"start-up": 0.05, "paint": 0.15}}
    text = benchmark.report(fig, 2)
    assert "whole process vs naive, 1 core:  4.00x the throughput (4.17x by CPU time); target >= 4x: met" in text
    assert "a CPU loop, 2 processes vs 1:  1.60x" in text and "ours reaches 125% of it" in text
    assert "paint" in text and "75.0%" in text
    assert "10.00x the throughput" in text and "target >= 5x: met" in text
    assert "1.25x the floor's time" in text and "target <= 1.5x: met" in text
    assert "2.00x the throughput; target >= 1.8x: met" in text
    fig["wall"]["ours/2"] = 0.1
    assert "target >= 1.8x: MISSED" in benchmark.report(fig, 2)
