"""`make gpu-check` (`python -m bench.gpu_check --out DIR`): one command that checks a GPU machine.

On one CUDA card, within BUDGET_SECONDS (8 minutes), each step a child process whose output goes to
DIR/logs/<step>.log:
    cuda-tests           pytest -m cuda: the CUDA-only paths (float16 autocast with the scaler, faiss-gpu and
                         torch searches of CUDA tensors, SyncBatchNorm under torchrun with nccl)
    synth, build-*       synthetic data (`cocolvis synth`) built into a train and a val split
    train-<head>         `ess train` of the softmax and ESS heads under torchrun (one process), tiny preset,
                         mixed precision (float16 autocast with gradient scaling), TRAIN_ITERS iterations
    eval-<head>          `ess eval` of each on the val split
    timing               `bench timing --preset paper --heads softmax,ess` (19, 150, 1284 and 10000 classes)
then DIR/gpu-report.md: the card, driver, CUDA, torch and faiss versions, each step's status and time, and
every figure. Exit status 0 when every step passed, 1 when one did not, 2 without a CUDA device (one line,
nothing run). A step whose inputs failed is not run; a step is stopped when it would overrun the budget.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench.report import markdown_table
from segkit.errors import OneLineError
from segkit.io import write_text
from segkit.outdir import claim_output

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
REPORT = "gpu-report.md"
OUTPUTS = {"data", "runs", "logs", "timing", "cuda-tests.xml", REPORT}  # what the check writes in --out
BUDGET_SECONDS = 480
HEADS = ("softmax", "ess")
TRAIN_ITERS = 300
# The paper preset's timing, with fewer timed iterations (medians of 5 after 2 warm-up ones) to fit the budget.
TIMING_ARGS = ("--preset", "paper", "--heads", ",".join(HEADS), "--repeats", "5", "--warmup", "2")


@dataclass(frozen=True)
class Step:
    name: str
    argv: list[str]
    timeout: float  # seconds; the budget left may cut it shorter
    needs: tuple[str, ...] = ()  # steps that must have passed first


@dataclass(frozen=True)
class Outcome:
    name: str
    status: str  # passed, failed, timed out, not run
    seconds: float
    detail: str = ""  # why it failed or was not run


def cuda_missing() -> str | None:
    """Why this machine cannot run the check, in one line; None when it has a CUDA device."""
    import torch

    if torch.cuda.is_available():
        return None
    return (f"No CUDA device: torch {torch.__version__} sees none, so there is no GPU to check here "
            "(`make test` runs the CPU suite)")


def plan(out: Path, python: str = sys.executable, tests: Path | None = TESTS) -> list[Step]:
    """The check's commands, in order; `tests` None (not a source checkout): no CUDA tests."""
    data, runs = out / "data", out / "runs"
    ann = data / "synth" / "annotations"
    steps = []
    if tests is not None:
        steps.append(Step("cuda-tests", [python, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                                         "--junitxml", str(out / "cuda-tests.xml"), str(tests)], 240))
    steps += [
        Step("synth", [python, "-m", "cocolvis.cli", "synth", "--out", str(data / "synth")], 60),
        Step("build-train", [python, "-m", "cocolvis.cli", "build", "--lvis", str(ann / "lvis_v1_train.json"),
                             "--coco", str(ann / "stuff_train2017.json"), "--images-root",
                             str(data / "synth" / "images"), "--out", str(data / "train")], 90, ("synth",)),
        Step("build-val", [python, "-m", "cocolvis.cli", "build", "--lvis", str(ann / "lvis_v1_val.json"),
                           "--coco", str(ann / "stuff_train2017.json"), "--coco", str(ann / "stuff_val2017.json"),
                           "--images-root", str(data / "synth" / "images"), "--out", str(data / "val")], 90,
             ("synth",)),
    ]
    for head in HEADS:
        steps.append(Step(f"train-{head}", [
            python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "ess", "train",
            "--preset", "tiny", "--head", head, "--data", str(data / "train"), "--out", str(runs / head),
            "--iters", str(TRAIN_ITERS), "--ckpt-every", str(TRAIN_ITERS), "--amp", "--device", "cuda",
            "--workers", "4", "--quiet"], 150, ("build-train",)))
        steps.append(Step(f"eval-{head}", [python, "-m", "ess", "eval", "--run", str(runs / head), "--data",
                                           str(data / "val"), "--device", "cuda", "--quiet"], 60,
                          (f"train-{head}", "build-val")))
    steps.append(Step("timing", [python, "-m", "bench.cli", "timing", *TIMING_ARGS, "--device", "cuda",
                                 "--out", str(out / "timing")], 300))
    return steps


def run_command(argv: list[str], log: Path, timeout: float) -> tuple[int | None, float]:
    """Run `argv` from the repository root with its output in `log`: (exit status, None if stopped at `timeout`;
    seconds). A command that overruns is stopped with all its children (torchrun's, bench timing's workers)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    start = time.monotonic()
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(argv) + "\n")
        f.flush()
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            status = process.wait(timeout=max(timeout, 0))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = None
    return status, time.monotonic() - start


def run_steps(steps: list[Step], logs: Path, budget: float = BUDGET_SECONDS, echo=print) -> list[Outcome]:
    """Run the steps in order, each within its timeout and the budget left; say each outcome with `echo`."""
    outcomes: dict[str, Outcome] = {}
    deadline = time.monotonic() + budget
    for step in steps:
        failed_needs = [n for n in step.needs if outcomes.get(n) is None or outcomes[n].status != "passed"]
        left = deadline - time.monotonic()
        if failed_needs:
            outcome = Outcome(step.name, "not run", 0.0, f"needs {', '.join(failed_needs)}")
        elif left <= 0:
            outcome = Outcome(step.name, "not run", 0.0, f"the {budget:.0f} s budget was spent")
        else:
            status, seconds = run_command(step.argv, logs / f"{step.name}.log", min(step.timeout, left))
            if status == 0:
                outcome = Outcome(step.name, "passed", seconds)
            elif status is None:
                limit = "its" if step.timeout <= left else "the budget's"
                outcome = Outcome(step.name, "timed out", seconds, f"stopped at {limit} {min(step.timeout, left):.0f} s")
            else:
                outcome = Outcome(step.name, "failed", seconds, f"exit status {status}; see logs/{step.name}.log")
        outcomes[step.name] = outcome
        echo(f"{step.name}: {outcome.status} ({outcome.seconds:.0f} s){' - ' + outcome.detail if outcome.detail else ''}")
    return list(outcomes.values())


# --------------------------------------------------------------------------------------------------------
# What the report holds


def environment() -> dict[str, str]:
    """The card, its driver and the libraries, for the report (needs a CUDA device)."""
    import torch

    from ess.knn import faiss_module, faiss_uses_gpu

    props = torch.cuda.get_device_properties(0)
    faiss = faiss_module()
    if faiss is None:
        faiss_text = "not installed (searches by torch)"
    elif not hasattr(faiss, "StandardGpuResources"):
        faiss_text = f"{faiss.__version__}, CPU build (CUDA searches by torch)"
    else:
        runs = faiss_uses_gpu(torch.device("cuda", 0))
        faiss_text = f"{faiss.__version__}, GPU build, " + ("searches on this card" if runs else
                                                             "cannot search on this card (searches by torch)")
    return {
        "card": f"{props.name}, compute capability {props.major}.{props.minor}, {props.total_memory / 2 ** 30:.0f} GiB"
                + (f" (1 of {torch.cuda.device_count()})" if torch.cuda.device_count() > 1 else ""),
        "driver": nvidia_driver(),
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})",
        "faiss": faiss_text,
        "python": f"{platform.python_version()} on {platform.platform()}",
    }


def nvidia_driver() -> str:
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"
    lines = result.stdout.split()
    return lines[0] if result.returncode == 0 and lines else "unknown (nvidia-smi failed)"


def test_results(junit: Path) -> dict | None:
    """Counts of the CUDA tests and the failures' names and first lines, from pytest's JUnit XML."""
    if not junit.exists():
        return None
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in suite.iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            message = (problem.get("message") or "").strip().splitlines()
            failed.append(f"{case.get('classname')}::{case.get('name')}: {message[0][:200] if message else ''}")
    skipped = [f"{c.get('classname')}::{c.get('name')}: {(c.find('skipped').get('message') or '')[:200]}"
               for c in suite.iter("testcase") if c.find("skipped") is not None]
    return {**counts, "failed": failed, "skipped_tests": skipped}


def training_results(runs: Path) -> pd.DataFrame:
    """One row per trained head: iterations, seconds, iterations/s, first and last loss, val mIoU, pixel accuracy."""
    rows = []
    for head in HEADS:
        log = runs / head / "log.csv"
        if not log.exists():
            continue
        frame = pd.read_csv(log)
        if frame.empty:
            continue
        last = frame.iloc[-1]
        metrics_path = runs / head / "eval" / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        rows.append({"head": head, "iterations": int(last["iteration"]), "seconds": float(last["seconds"]),
                     "iterations/s": float(last["iteration"]) / max(float(last["seconds"]), 1e-9),
                     "first loss": float(frame["loss"].iloc[0]), "last loss": float(last["loss"]),
                     "val mIoU": metrics.get("miou"), "val pixel acc": metrics.get("pixel_acc")})
    return pd.DataFrame(rows)


def timing_results(timing_csv: Path) -> pd.DataFrame:
    """The timing table as the report shows it."""
    if not timing_csv.exists():
        return pd.DataFrame()
    t = pd.read_csv(timing_csv, keep_default_na=False, na_values=[""])
    return pd.DataFrame({
        "C": t["classes"], "input": t["size"], "head": t["head"],
        "inference s/image": t["inference_s_per_image"], "training s/iter": t["training_s_per_iter"],
        **{f"{phase} peak MiB": [mib(v) for v in t[f"{phase}_peak_mib"]] for phase in ("inference", "training")},
        "error": t["error"].fillna(""),
    })


def mib(value: float) -> str:
    return "n/a" if pd.isna(value) else f"{value:,.0f}"


def log_warnings(logs: Path) -> list[str]:
    """The `Warning:` lines of the steps' logs (e.g. faiss-gpu falling back to torch), each once."""
    found = []
    for log in sorted(logs.glob("*.log")):
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("Warning:") and f"- {log.stem}: {line}" not in found:
                found.append(f"- {log.stem}: {line}")
    return found


def report(env: dict[str, str], outcomes: list[Outcome], out: Path, budget: float = BUDGET_SECONDS) -> str:
    """gpu-report.md: the machine, the steps, and the figures each left in `out`."""
    total = sum(o.seconds for o in outcomes)
    passed = all(o.status == "passed" for o in outcomes)
    card = env.get("card", "?").split(",")[0]
    lines = [f"# GPU check: {card}", "",
             f"**{'Passed' if passed else 'Not passed'}**: {sum(o.status == 'passed' for o in outcomes)} of "
             f"{len(outcomes)} steps, {total:.0f} s of a {budget:.0f} s budget.", "",
             *[f"- {k}: {v}" for k, v in env.items()], "", "## Steps", "",
             markdown_table(pd.DataFrame([{"step": o.name, "status": o.status, "seconds": round(o.seconds, 1),
                                           "detail": o.detail} for o in outcomes])), ""]
    tests = test_results(out / "cuda-tests.xml")
    lines += ["## CUDA tests (`pytest -m cuda`)", ""]
    if tests is None:
        lines += ["No results (the step did not run, or this is not a source checkout).", ""]
    else:
        ran = tests["tests"] - tests["skipped"] - tests["failures"] - tests["errors"]
        lines += [f"{ran} passed, {tests['failures'] + tests['errors']} failed, {tests['skipped']} skipped.", ""]
        lines += [f"- failed: {f}" for f in tests["failed"]] + [f"- skipped: {s}" for s in tests["skipped_tests"]]
        lines.append("")
    training = training_results(out / "runs")
    lines += [f"## Training (tiny preset, torchrun with one process, float16 autocast with gradient scaling, "
              f"{TRAIN_ITERS} iterations) and evaluation on the val split", ""]
    lines += [markdown_table(training), ""] if len(training) else ["No runs.", ""]
    timing = timing_results(out / "timing" / "timing.csv")
    lines += [f"## Timing (`bench timing {' '.join(TIMING_ARGS)}`, float32, batch 2)", ""]
    lines += [markdown_table(timing), "", f"Details: `{out / 'timing' / 'summary.md'}`.", ""] if len(timing) \
        else ["No timing.", ""]
    warnings = log_warnings(out / "logs")
    if warnings:
        lines += ["## Warnings", "", *warnings, ""]
    lines += [f"Logs of every step: `{out / 'logs'}`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="Directory for the data, runs, logs and gpu-report.md.")
    parser.add_argument("--why-not", action="store_true",
                        help="Print why this machine cannot run the check (nothing when it can) and exit 0.")
    args = parser.parse_args(argv)
    missing = cuda_missing()
    if args.why_not:
        if missing:
            print(missing)
        return 0
    if missing:
        print(missing, file=sys.stderr)
        return 2
    if args.out is None:
        parser.error("--out is required")
    out = args.out.resolve()
    try:
        with claim_output(out, "bench gpu-check", lambda name: name in OUTPUTS, keep=lambda e: True):
            for head in HEADS:  # `ess train` does not overwrite a run: in a directory of our own, start afresh
                shutil.rmtree(out / "runs" / head, ignore_errors=True)
            outcomes = run_steps(plan(out, tests=TESTS if TESTS.is_dir() else None), out / "logs")
            path = out / REPORT
            write_text(path, report(environment(), outcomes, out) + "\n")
    except OneLineError as e:  # an --out that holds something else, or is being written by another check
        print(f"Error: {e}", file=sys.stderr)
        return 1
    print(f"Report: {path}")
    return 0 if all(o.status == "passed" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
