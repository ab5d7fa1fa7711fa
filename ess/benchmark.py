"""Memory and time of one training step of each head's loss, as the class count grows.

    python -m ess.benchmark [--classes 19,150,1284,10000,20000] [--size 2x256x256]

Each measurement runs in a fresh subprocess (after one warm-up step): the head (1x1 conv, bilinear upsampling
to the label size, loss) forward and backward on decoder features of a B x H x W
batch, every pixel labelled. Peak memory is the process's peak resident set during
the step minus its resident set just before it (Linux /proc/self/clear_refs resets the
peak; elsewhere ru_maxrss is used). A measurement predicted not to fit in the memory
available is skipped and said so. Rows:
    softmax     C-way logits upsampled to the label size, cross-entropy
    ess         d=12 embeddings, chunked nearest-neighbour negatives (the implementation)
    ess-naive   the same loss through one pixels x C and one C x C distance matrix
Then the two kNN backends are timed on the same search (pixels vs C classes, k=8).
"""
from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

import click

from ess.knn import BACKENDS, DEFAULT_KNN

DECODER_CHANNELS = 256
EMBED_DIM = 12
K = 7


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            return int(re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024
    except (OSError, AttributeError):
        return 8 << 30


def predicted_bytes(head: str, classes: int, batch: int, height: int, width: int) -> int:
    """Rough peak of one step: what decides whether a measurement is attempted at all."""
    pixels = batch * height * width
    if head == "softmax":  # upsampled logits, their log-softmax, and the gradients of both, in float32
        return 16 * pixels * classes
    if head == "ess-naive":  # one pixels x C and one C x C distance matrix, besides what `ess` needs
        return 4 * pixels * classes + 4 * classes * classes + 4000 * pixels
    return 4000 * pixels + 64 * classes  # (P, k+1, d) gathers and gradients; flat in C


def naive_ess_loss(pixels, target, classes, k=K, tau=20.0, margin=0.2):
    """The ESS loss the obvious way: full distance matrices (what the chunked search avoids)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        dist = torch.cdist(pixels, classes)  # (P, C)
        dist.scatter_(1, target[:, None], float("inf"))
        negatives = dist.topk(k, dim=1, largest=False).indices
        del dist
        cc = torch.cdist(classes, classes)  # (C, C)
        cc.fill_diagonal_(float("inf"))
        nearest = cc.argmin(1)
        del cc
    candidates = torch.cat([target[:, None], negatives], 1)
    logits = -tau * (pixels[:, None] - classes[candidates]).pow(2).sum(-1).clamp_min(1e-12).sqrt()
    reg = F.relu(margin - (classes - classes[nearest]).pow(2).sum(-1).clamp_min(1e-12).sqrt()).mean()
    return F.cross_entropy(logits, torch.zeros_like(target)) + reg


def measure_step(head: str, classes: int, batch: int, height: int, width: int, repeats: int, knn: str) -> dict:
    """One fresh-process measurement: peak extra memory of the first step, median time of the next ones."""
    import torch
    import torch.nn.functional as F

    from ess.heads import EssHead, SoftmaxHead
    from ess.model import ModelArgs

    torch.manual_seed(0)
    features = torch.randn(batch, DECODER_CHANNELS, height // 4, width // 4, requires_grad=True)
    mask = torch.randint(1, classes + 1, (batch, height, width))
    if head == "softmax":
        module = SoftmaxHead(DECODER_CHANNELS, classes)
    else:
        module = EssHead(DECODER_CHANNELS, classes, **ModelArgs(embed_dim=EMBED_DIM, k=K, knn=knn).head_options())

    def step():
        output = module(features, (height, width))
        if head == "ess-naive":
            labelled = mask > 0
            pixels = output.permute(0, 2, 3, 1)[labelled]
            loss = naive_ess_loss(pixels, mask[labelled] - 1, F.normalize(module.embeddings, dim=1))
        else:
            loss = module.loss(output, mask)
        loss.backward()
        features.grad = None
        module.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()  # warm-up: lazy library set-up is neither timed nor counted
    first = time.perf_counter() - start
    exact = _reset_peak()
    before = _status_kb("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats if first < 5 else 1):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        peak = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"head": head, "classes": classes, "seconds": statistics.median(times),
            "peak_mb": (peak - before) / 1024, "peak_method": "VmHWM" if exact else "ru_maxrss"}


def run_child(head: str, classes: int, size: tuple[int, int, int], repeats: int, knn: str) -> dict:
    cmd = [sys.executable, "-m", "ess.benchmark", "--measure", f"{head}:{classes}",
           "--size", "x".join(map(str, size)), "--repeats", str(repeats), "--knn", knn]
    # A fixed mmap threshold makes glibc hand every large block back to the system when freed,
    # so the warm-up step leaves no cached heap behind to hide the measured step's peak.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        reason = "killed (out of memory?)" if proc.returncode < 0 else proc.stderr.strip().splitlines()[-1:]
        return {"head": head, "classes": classes, "error": str(reason)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def knn_table(class_counts: list[int], queries: int, repeats: int) -> list[dict]:
    """torch vs FAISS on one search of `queries` pixel embeddings among C classes, k=8."""
    import torch
    import torch.nn.functional as F

    from ess.knn import knn_faiss, knn_torch

    rows = []
    for c in class_counts:
        g = torch.Generator().manual_seed(c)
        q = F.normalize(torch.randn(queries, EMBED_DIM, generator=g), dim=1)
        base = F.normalize(torch.rand(c, EMBED_DIM, generator=g) * 2 - 1, dim=1)
        row = {"classes": c}
        results, times = {}, {"torch": [], "faiss": []}
        for _ in range(repeats):  # interleaved, best of: robust to other load on the machine
            for name, fn in (("torch", knn_torch), ("faiss", knn_faiss)):
                start = time.perf_counter()
                results[name] = fn(q, base, K + 1)
                times[name].append(time.perf_counter() - start)
        row.update({name: min(t) for name, t in times.items()})
        row["same"] = float((results["torch"] == results["faiss"]).all(1).float().mean())
        rows.append(row)
    return rows


def _fmt_mb(row: dict) -> str:
    return f"{row['peak_mb']:9.0f}" if "peak_mb" in row else f"{'-':>9}"


def _fmt_s(row: dict) -> str:
    return f"{row['seconds']:8.3f}" if "seconds" in row else f"{'-':>8}"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--classes", default="19,150,1284,10000,20000", show_default=True,
              help="Comma-separated class counts to measure.")
@click.option("--size", default="2x256x256", show_default=True, help="Batch x height x width of the labels.")
@click.option("--heads", default="softmax,ess,ess-naive", show_default=True,
              help="Rows to measure: softmax, ess, ess-naive (the unchunked reference); empty for none.")
@click.option("--repeats", default=3, show_default=True, help="Timed steps after the first (median reported).")
@click.option("--max-gb", type=float, help="Skip measurements predicted above this [default: available memory - 2 GB].")
@click.option("--knn", type=click.Choice(BACKENDS), default=DEFAULT_KNN, show_default=True,
              help="kNN backend of the ESS rows.")
@click.option("--no-knn-table", is_flag=True, help="Skip the kNN backend comparison.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write every figure to this JSON file.")
@click.option("--measure", hidden=True, help="Internal: HEAD:C, measure one step in this process and print JSON.")
def main(classes, size, heads, repeats, max_gb, knn, no_knn_table, json_out, measure):
    """Peak memory and time of one loss step per head and class count, and kNN backend speed."""
    try:
        batch, height, width = (int(v) for v in size.lower().split("x"))
        counts = [int(c) for c in classes.split(",")]
    except ValueError:
        raise click.UsageError(f"--size {size!r} / --classes {classes!r}: expected BxHxW and comma-separated integers")
    if height % 4 or width % 4:
        raise click.UsageError(f"--size {size!r}: height and width must be multiples of 4 (decoder stride)")
    if measure:
        head, c = measure.split(":")
        click.echo(json.dumps(measure_step(head, int(c), batch, height, width, repeats, knn)))
        return
    import torch

    head_names = [h.strip() for h in heads.split(",") if h.strip()]
    limit = max_gb * 1e9 if max_gb is not None else available_bytes() - 2e9
    click.echo(f"One training step (forward + backward) of the loss alone, labels {batch} x {height} x {width}, "
               f"d={EMBED_DIM}, k={K}, {torch.get_num_threads()} threads, kNN backend {knn}")
    click.echo(f"Peak memory: extra resident memory of the step, fresh process each; skip above {limit / 1e9:.1f} GB "
               "predicted.")
    click.echo(f"{'head':<10} {'classes':>7} {'seconds':>8} {'peak MB':>9}  note")
    results = []
    for c in counts:
        for head in head_names:
            need = predicted_bytes(head, c, batch, height, width)
            if need > limit:
                row = {"head": head, "classes": c, "skipped": f"predicted {need / 1e9:.1f} GB > {limit / 1e9:.1f} GB"}
            else:
                row = run_child(head, c, (batch, height, width), repeats, knn)
            results.append(row)
            note = row.get("skipped") or row.get("error") or ""
            click.echo(f"{head:<10} {c:>7} {_fmt_s(row)} {_fmt_mb(row)}  {note}")

    def peak(head, c):
        return next((r["peak_mb"] for r in results if r["head"] == head and r["classes"] == c and "peak_mb" in r), None)

    click.echo("")
    click.echo("Ratios (peak memory)")
    for c in counts:
        parts = []
        if peak("softmax", c) and peak("ess", c):
            parts.append(f"softmax / ess = {peak('softmax', c) / peak('ess', c):6.1f}x")
        if peak("ess-naive", c) and peak("ess", c):
            parts.append(f"ess-naive / ess = {peak('ess-naive', c) / peak('ess', c):6.1f}x")
        click.echo(f"  C={c:<6} " + ("   ".join(parts) if parts else "-"))
    lo, hi = min(counts), max(counts)
    if peak("ess", lo) and peak("ess", hi):
        growth = peak("ess", hi) / peak("ess", lo)
        verdict = "within" if growth <= 1.5 else "NOT within"
        click.echo(f"  ESS peak at C={hi} is {growth:.2f}x its peak at C={lo}: {verdict} the 1.5x target")

    knn_rows = []
    if not no_knn_table:
        queries = batch * height * width
        click.echo("")
        click.echo(f"kNN search: {queries} queries among C classes, d={EMBED_DIM}, k={K + 1}, best of {repeats}")
        click.echo(f"{'classes':>7} {'torch s':>8} {'faiss s':>8} {'faiss/torch':>11} {'same':>6}")
        knn_rows = knn_table(counts, queries, repeats)
        for r in knn_rows:
            click.echo(f"{r['classes']:>7} {r['torch']:8.3f} {r['faiss']:8.3f} {r['faiss'] / r['torch']:11.2f} "
                       f"{r['same']:6.1%}")
    if json_out:
        from cocolvis.io import write_json

        write_json(json_out, {"size": [batch, height, width], "loss_steps": results, "knn": knn_rows})


if __name__ == "__main__":
    main()
