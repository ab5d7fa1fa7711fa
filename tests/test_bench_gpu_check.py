"""`make gpu-check` without a GPU: its plan of commands, how it runs them, and the report it writes from what
they leave behind; on a machine without CUDA, one line and exit status 2."""
import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from bench import gpu_check
from bench.gpu_check import Outcome, Step, plan, report, run_steps


def test_without_cuda_it_says_so_in_one_line_and_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "check")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("No CUDA device")
    assert not (tmp_path / "check").exists()
    assert gpu_check.main(["--why-not"]) == 0  # what `make gpu-check` stops with
    assert capsys.readouterr().out.startswith("No CUDA device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu_check.main(["--why-not"]) == 0 and capsys.readouterr().out == ""


def test_an_out_that_holds_other_files_is_refused_and_left_as_it_was(tmp_path, monkeypatch, capsys):
    """The check starts its runs afresh, so it claims --out first: a directory it did not write is not touched."""
    monkeypatch.setattr(gpu_check, "cuda_missing", lambda: None)
    monkeypatch.setattr(gpu_check, "run_steps", lambda *a, **k: pytest.fail("ran in a directory it does not own"))
    mine = tmp_path / "runs" / "softmax" / "mine.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("a user's file")
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("Error: ") and str(tmp_path) in err
    assert mine.read_text() == "a user's file" and sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_the_command_on_a_machine_without_cuda(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path / "check")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "No CUDA device" in result.stderr


def test_the_plan_tests_cuda_trains_both_heads_under_torchrun_with_amp_and_times_the_paper_preset(tmp_path):
    steps = {s.name: s for s in plan(tmp_path, python="PY", tests=tmp_path / "tests")}
    assert list(steps) == ["cuda-tests", "synth", "build-train", "build-val", "train-softmax", "eval-softmax",
                           "train-ess", "eval-ess", "timing"]
    tests = steps["cuda-tests"].argv
    assert tests[:5] == ["PY", "-m", "pytest", "-m", "cuda"] and str(tmp_path / "cuda-tests.xml") in tests
    for head in ("softmax", "ess"):
        train = steps[f"train-{head}"].argv
        assert train[:6] == ["PY", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
        assert train[train.index("--head") + 1] == head and "--amp" in train
        assert train[train.index("--device") + 1] == "cuda" and int(train[train.index("--iters") + 1]) >= 200
        assert train[train.index("--out") + 1] == str(tmp_path / "runs" / head)
        assert steps[f"eval-{head}"].needs == (f"train-{head}", "build-val")
    timing = steps["timing"].argv
    assert timing[:4] == ["PY", "-m", "bench.cli", "timing"]
    assert timing[timing.index("--preset") + 1] == "paper" and timing[timing.index("--heads") + 1] == "softmax,ess"
    from bench.timing import PRESETS

    assert [s.num_classes for s in PRESETS["paper"]["setups"]] == [19, 150, 1284, 10000]
    # Each step's own limit fits the budget: the whole check stays under 8 minutes.
    assert gpu_check.BUDGET_SECONDS <= 480 and all(s.timeout <= gpu_check.BUDGET_SECONDS for s in steps.values())
    assert "cuda-tests" not in [s.name for s in plan(tmp_path, tests=None)]


def test_steps_run_in_order_with_logs_limits_and_dependencies(tmp_path):
    py = sys.executable
    steps = [Step("ok", [py, "-c", "print('hello')"], 60),
             Step("fails", [py, "-c", "import sys; sys.exit(3)"], 60),
             Step("after-fails", [py, "-c", "print('never')"], 60, ("fails",)),
             Step("slow", [py, "-c", "import time; time.sleep(60)"], 1),
             Step("after-ok", [py, "-c", "pass"], 60, ("ok",))]
    said = []
    outcomes = run_steps(steps, tmp_path / "logs", budget=100, echo=said.append)
    assert [(o.name, o.status) for o in outcomes] == [("ok", "passed"), ("fails", "failed"), ("after-fails", "not run"),
                                                      ("slow", "timed out"), ("after-ok", "passed")]
    assert "exit status 3" in outcomes[1].detail and outcomes[2].detail == "needs fails"
    assert outcomes[3].seconds < 30 and "stopped at its 1 s" in outcomes[3].detail
    assert (tmp_path / "logs" / "ok.log").read_text().splitlines()[-1] == "hello"
    assert not (tmp_path / "logs" / "after-fails.log").exists() and len(said) == 5
    spent = run_steps([Step("slow", [py, "-c", "import time; time.sleep(60)"], 60), Step("next", [py, "-c", ""], 60)],
                      tmp_path / "logs", budget=1, echo=said.append)
    assert [(o.status, o.detail) for o in spent] == [("timed out", "stopped at the budget's 1 s"),
                                                     ("not run", "the 1 s budget was spent")]


def _leave_figures(out):
    """What the steps leave in OUT: the tests' JUnit XML, both runs' logs and metrics, the timing table, logs."""
    (out / "cuda-tests.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="4" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_cuda" name="test_a"/>'
        '<testcase classname="tests.test_cuda" name="test_b"><failure message="assert 1 == 2&#10;more"/></testcase>'
        '<testcase classname="tests.test_cuda" name="test_c"><skipped message="faiss-gpu not installed"/></testcase>'
        '<testcase classname="tests.test_cuda" name="test_d"/></testsuite></testsuites>')
    for head, miou in (("softmax", 0.0123), ("ess", 0.0456)):
        run = out / "runs" / head
        (run / "eval").mkdir(parents=True)
        pd.DataFrame({"iteration": [1, 2, 300], "loss": [7.5, 7.0, 3.25], "lr": [0.02] * 3,
                      "seconds": [0.5, 0.6, 30.0]}).to_csv(run / "log.csv", index=False)
        (run / "eval" / "metrics.json").write_text(json.dumps({"miou": miou, "pixel_acc": 0.5}))
    (out / "timing").mkdir()
    pd.DataFrame({"classes": [19, 10000], "size": ["1024x2048", "512x512"], "head": ["softmax", "softmax"],
                  "inference_s_per_image": [0.0321, 0.25], "training_s_per_iter": [0.111, float("nan")],
                  "inference_peak_mib": [1500.0, 42000.0], "training_peak_mib": [9000.0, float("nan")],
                  "error": ["", "CUDA out of memory"]}).to_csv(out / "timing" / "timing.csv", index=False)
    (out / "logs").mkdir()
    (out / "logs" / "train-ess.log").write_text("Warning: faiss 1.15.1 cannot search on cuda:0 (X): no kernel image\n")


def test_the_report_holds_the_card_the_versions_and_every_figure(tmp_path):
    _leave_figures(tmp_path)
    env = {"card": "NVIDIA H200, compute capability 9.0, 140 GiB", "driver": "575.57.08",
           "torch": "2.14.1+cu130 (CUDA 13.0, cuDNN 92400)", "faiss": "1.15.1, GPU build, searches on this card"}
    outcomes = [Outcome("cuda-tests", "failed", 61.0, "exit status 1"), Outcome("train-ess", "passed", 42.4),
                Outcome("timing", "timed out", 200.0, "stopped at the budget's 200 s")]
    text = report(env, outcomes, tmp_path)
    assert text.startswith("# GPU check: NVIDIA H200\n") and "**Not passed**: 1 of 3 steps, 303 s of a 480 s" in text
    for value in env.values():
        assert value in text
    assert "2 passed, 1 failed, 1 skipped." in text and "tests.test_cuda::test_b: assert 1 == 2" in text
    assert "faiss-gpu not installed" in text
    training = [line for line in text.splitlines() if line.startswith("| ess ")]
    assert training == ["| ess | 300 | 30 | 10 | 7.5 | 3.25 | 0.0456 | 0.5 |"]
    assert "| 19 | 1024x2048 | softmax | 0.0321 | 0.111 | 1,500 | 9,000 |  |" in text
    assert "| 10000 | 512x512 | softmax | 0.25 | n/a | 42,000 | n/a | CUDA out of memory |" in text
    assert "- train-ess: Warning: faiss 1.15.1 cannot search on cuda:0 (X): no kernel image" in text
    assert "| timing | timed out | 200 | stopped at the budget's 200 s |" in text
    empty = report(env, [Outcome("synth", "passed", 1.0)], tmp_path / "nothing")
    assert "**Passed**: 1 of 1 steps" in empty and "No runs." in empty and "No timing." in empty
