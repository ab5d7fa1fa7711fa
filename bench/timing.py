"""`bench timing`: speed and memory of the softmax and ESS heads as the class count grows.

Each (head, C, phase) is measured in a fresh worker process, so one measurement's
allocations never inflate another's peak. Workers are forked from a server that has
already imported torch and the models (multiprocessing "forkserver" with preloading),
which makes a fresh process cost a fraction of a second instead of several.

Memory (ess.measure.PeakMemory): on CUDA the allocator's peak (`torch.cuda.max_memory_allocated`
after `reset_peak_memory_stats`); on a CPU the worker's peak resident set size (Linux VmHWM,
reset when the model is built; elsewhere getrusage ru_maxrss), which includes the interpreter,
torch and the model, so the increase over the memory in use after the model was built is
reported as well.

Heads are the named variants of ess.variants.VARIANTS.
"""
from __future__ import annotations

import multiprocessing
import platform
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from bench.report import (files_section, fmt, markdown_table, new_figure, plain_log_ticks, plural,
                          save_figure, save_table, write_summary)
from ess.config import ModelArgs
from ess.variants import VARIANTS
from ess.variants import default as default_variants
from segkit.errors import out_of_memory

# The published table's data sets, by class count.
DATASETS = {19: "Cityscapes", 150: "ADE20K", 1284: "COCO+LVIS"}
PHASES = ("inference", "training")
MIB = 2 ** 20


@dataclass(frozen=True)
class Setup:
    """One class count and the input size it is timed at."""
    num_classes: int
    size: tuple[int, int]

    @property
    def dataset(self) -> str:
        return DATASETS.get(self.num_classes, "synthetic")


@dataclass(frozen=True)
class TimingPlan:
    setups: tuple[Setup, ...]
    heads: tuple[str, ...] = tuple(default_variants("timing"))
    encoder: str = "resnet18"
    batch: int = 2
    repeats: int = 5
    warmup: int = 2
    device: str = "cpu"
    amp: bool = False
    threads: int | None = None  # CPU threads of torch; None keeps torch's default
    preset: str = "cpu"
    rounds: int = 1  # every measurement repeated round after round; medians reported


PRESETS = {
    # Small enough for a few minutes on 2 CPU cores, wide enough in C to show the trend.
    "cpu": dict(encoder="resnet18", batch=2, repeats=5, warmup=2,
                setups=(Setup(19, (128, 128)), Setup(150, (128, 128)), Setup(1284, (128, 128)), Setup(10000, (128, 128)))),
    # The published set-up: ResNet-50 DeepLabV3+, Cityscapes at full resolution, the others at 512x512; and
    # 10000 classes, where the softmax head's full-resolution logits alone take 2 x 10000 x 512 x 512 floats.
    "paper": dict(encoder="resnet50", batch=2, repeats=10, warmup=3,
                  setups=(Setup(19, (1024, 2048)), Setup(150, (512, 512)), Setup(1284, (512, 512)),
                          Setup(10000, (512, 512)))),
}


def timing_plan(preset: str = "cpu", *, classes: list[int] | None = None, size: tuple[int, int] | None = None,
                batch: int | None = None, encoder: str | None = None, heads: list[str] | None = None,
                repeats: int | None = None, warmup: int | None = None, device: str = "auto", amp: bool = False,
                threads: int | None = None, rounds: int = 1) -> TimingPlan:
    """The preset's set-up with any explicitly given option overriding it."""
    p = PRESETS[preset]
    from ess.device import pick_device

    device = str(pick_device(device))
    setups = p["setups"]
    if classes is not None:
        sizes = {s.num_classes: s.size for s in setups}
        default = setups[-1].size
        setups = tuple(Setup(c, sizes.get(c, default)) for c in classes)
    if size is not None:
        setups = tuple(replace(s, size=tuple(size)) for s in setups)
    return TimingPlan(setups=tuple(setups), heads=tuple(heads or default_variants("timing")),
                      encoder=encoder or p["encoder"], batch=batch or p["batch"],
                      repeats=repeats or p["repeats"], warmup=p["warmup"] if warmup is None else warmup,
                      device=device, amp=amp, threads=threads, preset=preset, rounds=rounds)


def synthetic_batch(num_classes: int, size: tuple[int, int], batch: int, device, seed: int = 0):
    """A random normalised image batch and a mask of 32x32-pixel blocks of random class ids.

    Blocks rather than independent pixels, so a batch holds a realistic handful of classes.
    """
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    h, w = size
    x = torch.randn(batch, 3, h, w, generator=g)
    blocks = torch.randint(1, num_classes + 1, (batch, 1, -(-h // 32), -(-w // 32)), generator=g)
    mask = F.interpolate(blocks.float(), scale_factor=32, mode="nearest")[:, 0, :h, :w].long()
    return x.to(device), mask.to(device)


def measure(head: str, num_classes: int, phase: str, plan: TimingPlan) -> dict:
    """Time one phase of one model; meant to run alone in a fresh process."""
    import torch

    from statistics import median

    from ess.config import TrainConfig
    from ess.device import precision
    from ess.measure import PeakMemory, time_calls
    from ess.model import Segmenter
    from ess.optim import make_optimizer
    from ess.train import State, optimisation_step

    if plan.threads is not None:
        torch.set_num_threads(plan.threads)
    torch.manual_seed(0)
    device = torch.device(plan.device)
    mixed = precision(device, plan.amp)
    size = next(s.size for s in plan.setups if s.num_classes == num_classes)
    model = Segmenter.from_args(ModelArgs(**{"num_classes": num_classes, "encoder": plan.encoder,
                                              **VARIANTS[head].model_options})).to(device)
    x, mask = synthetic_batch(num_classes, size, plan.batch, device)
    autocast = mixed.autocast()

    if phase == "inference":
        model.eval()

        def step():
            with torch.inference_mode(), autocast:
                model.predict(model(x))
    else:  # the training loop's own step, with its optimiser at the default settings
        model.train()
        state = State(model, make_optimizer(model, TrainConfig()), mixed.grad_scaler())

        def step():
            optimisation_step(model, state, mixed, x, mask)

    with PeakMemory(device) as mem:
        times = time_calls(step, plan.repeats, plan.warmup, device)
    return {"seconds": median(times), "times": times, "peak_bytes": mem.peak_bytes(),
            "increase_bytes": mem.increase_bytes(), "threads": torch.get_num_threads()}


def _pool_context():
    """Fresh processes forked from a server that has torch and the models imported already."""
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["torch", "segmentation_models_pytorch", "ess.model", "ess.train", "bench.timing"])
    return ctx


def measure_isolated(head: str, num_classes: int, phase: str, plan: TimingPlan, ctx) -> dict:
    """`measure` in a new worker process; an out-of-memory failure becomes a row with an error."""
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        try:
            return pool.submit(measure, head, num_classes, phase, plan).result()
        except BrokenProcessPool:
            return {"error": "worker process died (likely killed for lack of memory)"}
        except (MemoryError, RuntimeError) as e:  # torch.cuda.OutOfMemoryError and CPU allocation failures
            if not out_of_memory(e):
                raise
            return {"error": (str(e).strip().splitlines() or [type(e).__name__])[0]}


def median_run(runs: list[dict]) -> dict:
    """One measurement from several rounds of it: the median of each figure; an error if any round failed."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    merged = {key: float(np.median([r[key] for r in runs])) for key in ("seconds", "peak_bytes", "increase_bytes")}
    return {**runs[0], **merged, "times": [t for r in runs for t in r["times"]]}


def time_heads(plan: TimingPlan, progress: bool = True) -> pd.DataFrame:
    """One row per (C, head): median seconds and peak memory of inference and of training."""
    from tqdm import tqdm

    ctx = _pool_context()
    jobs = [(s, head, phase) for _ in range(plan.rounds) for s in plan.setups for head in plan.heads for phase in PHASES]
    runs = {}
    for setup, head, phase in tqdm(jobs, desc="timing", unit="run", disable=not progress):
        runs.setdefault((setup.num_classes, head, phase), []).append(
            measure_isolated(head, setup.num_classes, phase, plan, ctx))
    results = {key: median_run(measured) for key, measured in runs.items()}
    rows = []
    for s in plan.setups:
        for head in plan.heads:
            inf, tr = results[s.num_classes, head, "inference"], results[s.num_classes, head, "training"]
            rows.append({
                "dataset": s.dataset, "model": f"DeepLabV3+ {plan.encoder}, {VARIANTS[head].label}", "head": head,
                "classes": s.num_classes, "size": f"{s.size[0]}x{s.size[1]}", "batch": plan.batch,
                "inference_s_per_image": inf.get("seconds", np.nan) / plan.batch,
                "training_s_per_iter": tr.get("seconds", np.nan),
                "inference_peak_mib": inf.get("peak_bytes", np.nan) / MIB,
                "inference_increase_mib": inf.get("increase_bytes", np.nan) / MIB,
                "training_peak_mib": tr.get("peak_bytes", np.nan) / MIB,
                "training_increase_mib": tr.get("increase_bytes", np.nan) / MIB,
                "error": "; ".join(r["error"] for r in (inf, tr) if "error" in r),
                "threads": inf.get("threads", tr.get("threads")),
            })
    return pd.DataFrame(rows)


def environment(plan: TimingPlan) -> dict[str, str]:
    """Device and library versions, for the summary."""
    import segmentation_models_pytorch as smp
    import torch

    from ess.knn import faiss_module

    faiss = faiss_module()
    if plan.device.startswith("cuda"):
        device = f"CUDA: {torch.cuda.get_device_name(torch.device(plan.device))} (CUDA {torch.version.cuda})"
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        except OSError:
            pass
        device = f"CPU: {cpu}, {plural(plan.threads or torch.get_num_threads(), 'torch thread')}"
    return {"device": device, "python": platform.python_version(), "torch": torch.__version__,
            "segmentation-models-pytorch": smp.__version__,
            "faiss": faiss.__version__ if faiss is not None else "not installed (kNN by torch)"}


def plot_timing(table: pd.DataFrame, plan: TimingPlan):
    fig = new_figure(12, 4.5)
    ax_t, ax_m = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    memory = "increase_mib" if plan.device == "cpu" else "peak_mib"
    for head, rows in table.groupby("head", sort=False):
        c = rows["classes"].to_numpy()
        ax_t.plot(c, rows["training_s_per_iter"], "o-", color=VARIANTS[head].color, label=f"{VARIANTS[head].label} training / iter")
        ax_t.plot(c, rows["inference_s_per_image"], "s--", color=VARIANTS[head].color, label=f"{VARIANTS[head].label} inference / image")
        ax_m.plot(c, rows[f"training_{memory}"], "o-", color=VARIANTS[head].color, label=f"{VARIANTS[head].label} training")
        ax_m.plot(c, rows[f"inference_{memory}"], "s--", color=VARIANTS[head].color, label=f"{VARIANTS[head].label} inference")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log")
        plain_log_ticks(ax.xaxis)
        ax.set_xlabel("classes C")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("seconds (median)")
    ax_t.set_title("Time")
    ax_m.set_ylabel("MiB")
    ax_m.set_title("Peak memory" + (" increase over the built model (RSS)" if plan.device == "cpu" else " (CUDA allocator)"))
    sizes = sorted(set(table["size"]))
    fig.suptitle(f"DeepLabV3+ {plan.encoder}, batch {plan.batch}, input {', '.join(sizes)}, {plan.device}")
    return fig


def ratios(table: pd.DataFrame) -> pd.DataFrame:
    """softmax / ESS-variant ratios per class count (> 1 means the ESS variant is faster or smaller), and the
    chunked softmax's memory increase over ESS's (the target: at most 2)."""
    heads = list(dict.fromkeys(table["head"]))
    if "softmax" not in heads or not any(h.startswith("ess") for h in heads):
        return pd.DataFrame()
    wide = table.set_index(["classes", "head"])
    out = []
    for c in table["classes"].unique():
        s = wide.loc[(c, "softmax")]
        row = {"C": int(c)}
        for head in (h for h in heads if h.startswith("ess")):
            e, name = wide.loc[(c, head)], VARIANTS[head].label
            row[f"inference time softmax/{name}"] = s["inference_s_per_image"] / e["inference_s_per_image"]
            row[f"training time softmax/{name}"] = s["training_s_per_iter"] / e["training_s_per_iter"]
            row[f"training memory increase softmax/{name}"] = s["training_increase_mib"] / e["training_increase_mib"]
        if "softmax-chunked" in heads and "ess" in heads:
            k, e = wide.loc[(c, "softmax-chunked")], wide.loc[(c, "ess")]
            row["training time softmax/softmax (chunked loss)"] = s["training_s_per_iter"] / k["training_s_per_iter"]
            row["training memory increase softmax (chunked loss)/ESS"] = (k["training_increase_mib"]
                                                                          / e["training_increase_mib"])
        out.append(row)
    return pd.DataFrame(out)


def timing_summary(table: pd.DataFrame, plan: TimingPlan, env: dict[str, str], out: Path) -> str:
    from ess.device import precision

    cpu = plan.device == "cpu"
    mem_note = ("CPU: the measuring process's peak resident set size (Linux VmHWM reset after the model and inputs "
                "were built, elsewhere getrusage ru_maxrss; includes the Python interpreter, torch and the model), and "
                "in brackets its increase over the resident set right after the model and inputs were built."
                if cpu else
                "CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats (model, activations, gradients, "
                "optimizer state), and in brackets its increase over the memory allocated before the first step.")
    shown = pd.DataFrame({
        "dataset": table["dataset"], "model": table["model"], "C": table["classes"], "input": table["size"],
        "inference s/image": table["inference_s_per_image"], "training s/iter": table["training_s_per_iter"],
        **{f"{phase} MiB": [f"{fmt(p)} (+{fmt(i)})" for p, i in zip(table[f"{phase}_peak_mib"],
                                                                    table[f"{phase}_increase_mib"])]
           for phase in PHASES},
    })
    errors = [f"- C={r.classes} {r.head}: {r.error}" for r in table.itertuples() if r.error]
    ratio_table = ratios(table)
    lines = [
        f"# Timing of the softmax and ESS heads (`{plan.preset}` preset)",
        "",
        *[f"- {k}: {v}" for k, v in env.items()],
        f"- set-up: DeepLabV3+ {plan.encoder} (no pretrained weights), embedding dimension "
        f"{ModelArgs.embed_dim}, "
        f"batch {plan.batch}, {plan.warmup} warm-up and {plan.repeats} timed iterations, median reported"
        + (f"; {plan.rounds} rounds of every measurement, interleaved, median of the rounds" if plan.rounds > 1 else "")
        + f", {precision(plan.device, plan.amp).describe()}",
        "- inference: forward pass and prediction (argmax / nearest class embedding) under inference mode, "
        "seconds per image = seconds per batch / batch; training: the training loop's step (forward, loss, "
        "backward, the optimiser's step at the default settings), seconds per iteration. Model set-up excluded. Inputs are synthetic: random images and masks of "
        "32x32-pixel blocks of random class ids.",
        f"- memory: {mem_note}",
        "- each (head, C, phase) ran in a fresh process.",
        "",
        markdown_table(shown),
        "",
    ]
    if len(ratio_table):
        lines += ["Ratios (softmax / ESS variant: above 1 means the ESS variant is faster or smaller; the chunked "
                  "softmax's training memory increase over ESS's):", "",
                  markdown_table(ratio_table.set_index("C").T.reset_index(names="ratio"), 3), ""]
    if errors:
        lines += ["Measurements that failed:", "", *errors, ""]
    lines.append(files_section(out, {
        "timing.csv": "one row per (C, head): dataset, model, head, classes, size, batch, inference_s_per_image, "
                      "training_s_per_iter, peak and increase MiB of each phase, error (empty when it ran)",
        "timing.png": "time (log) and memory against C (log) for both heads",
    }))
    return "\n".join(lines)


def run_timing(plan: TimingPlan, out: str | Path, echo: bool = True, progress: bool = True) -> dict[str, Path]:
    """Measure every (C, head) of `plan`, then write timing.csv, timing.png and summary.md into `out`."""
    out = Path(out)
    table = time_heads(plan, progress=progress)
    env = environment(plan)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"timing.csv": save_table(table, out / "timing.csv"),
             "timing.png": save_figure(plot_timing(table, plan), out / "timing.png")}

    text = timing_summary(table, plan, env, out)
    paths["summary.md"] = write_summary(out, text, echo=echo)
    return paths
