"""Memory and time of one training step of each head's loss, as the class count grows.

    python -m benchmarks.loss_step [--classes 19,150,1284,10000,20000] [--size 2x256x256]

Each measurement runs in fresh subprocesses (after one warm-up step): the head (1x1 conv, bilinear upsampling
to the label size, loss) forward and backward on decoder features of a B x H x W
batch, every pixel labelled. Time: the median of the timed steps, in a process that allocates
as training does; with --rounds N, every time measurement is repeated in N interleaved rounds and the
median taken. Peak memory (ess.measure.PeakMemory), in a process of its own whose allocator hands every
large freed block back to the system: the process's peak resident set during one step minus its
resident set just before it. A measurement predicted not to fit in the memory available is skipped
and said so. Rows:
    softmax          C-way logits upsampled to the label size, cross-entropy
    softmax-chunked  the same loss from the decoder-resolution logits, upsampled a block of rows at a time
    ess              d=12 embeddings, exact nearest-neighbour negatives (the implementation: the whole
                     pixels x C distance block up to DENSE_MAX_CLASSES classes, a chunked search above)
    ess-stride4      one search per 2x2 block of pixels, negatives shared within the block
    ess-ivf          IVF search of the negatives (exact below the class count where it cannot win)
    ess-stride4-ivf  both
    ess-naive        the same loss through one pixels x C and one C x C distance matrix
Then the search itself: the exact kNN backends, and what stride and IVF change in the
negatives (share of pixels whose shared negatives differ from their own k nearest;
recall@k of IVF against exact search) and in search time.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import click

from ess.config import KNN_BACKENDS, ModelArgs
from ess.knn import faiss_available
from ess.losses import DENSE_MAX_CLASSES
from ess.measure import PeakMemory, time_calls
from ess.variants import VARIANTS, default
from segkit.memory import available_bytes

DECODER_CHANNELS = 256
DEFAULTS = ModelArgs()  # d, k, tau, margin and the search's chunk: the model's defaults
EMBED_DIM, K = DEFAULTS.embed_dim, DEFAULTS.k
ROWS = (*default("speed"), "ess-naive")


def predicted_bytes(head: str, classes: int, batch: int, height: int, width: int) -> int:
    """Rough peak of one step: what decides whether a measurement is attempted at all."""
    pixels = batch * height * width
    if head == "softmax":  # upsampled logits, their log-softmax, and the gradients of both, in float32
        return 16 * pixels * classes
    if head == "softmax-chunked":  # decoder-resolution logits and their gradient, one block of rows
        return 8 * pixels * classes // 16 + (64 << 20)
    if head == "ess-naive":  # one pixels x C and one C x C distance matrix, besides what `ess` needs
        return 4 * pixels * classes + 4 * classes * classes + 4000 * pixels
    return 4000 * pixels + 64 * classes  # (P, k+1, d) gathers and gradients; flat in C


def naive_ess_loss(pixels, target, classes, k: int, tau: float, margin: float):
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


def measure_step(head: str, classes: int, batch: int, height: int, width: int, repeats: int, knn: str,
                 memory: bool = False) -> dict:
    """One fresh-process measurement after a warm-up step: the median time of `repeats` steps, or with
    `memory` the peak extra memory of one step."""
    import torch
    import torch.nn.functional as F

    from ess.model import build_head

    torch.manual_seed(0)
    features = torch.randn(batch, DECODER_CHANNELS, height // 4, width // 4, requires_grad=True)
    mask = torch.randint(1, classes + 1, (batch, height, width))
    variant = "ess" if head == "ess-naive" else head
    args = ModelArgs(**{"num_classes": classes, "knn": knn, **VARIANTS[variant].model_options})
    module = build_head(args, DECODER_CHANNELS)

    def step():
        output = module(features, (height, width))
        if head == "ess-naive":
            labelled = mask > 0
            pixels = output.permute(0, 2, 3, 1)[labelled]
            loss = naive_ess_loss(pixels, mask[labelled] - 1, F.normalize(module.embeddings, dim=1), args.k, args.tau,
                                  args.margin)
        else:
            loss = module.loss(output, mask)
        loss.backward()
        features.grad = None
        module.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()  # warm-up: lazy library set-up (and the IVF index's first clustering) is neither timed nor counted
    first = time.perf_counter() - start
    if memory:
        with PeakMemory("cpu") as mem:
            step()
        return {"head": head, "classes": classes, "peak_mb": mem.increase_bytes() / 2 ** 20, "peak_method": mem.method}
    return {"head": head, "classes": classes, "seconds": median(time_calls(step, repeats if first < 5 else 1))}


def run_child(head: str, classes: int, size: tuple[int, int, int], repeats: int, knn: str, memory: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", f"{head}:{classes}",
           "--size", "x".join(map(str, size)), "--repeats", str(repeats), "--knn", knn] + (["--memory"] if memory else [])
    env = dict(os.environ)
    if memory:
        # A fixed mmap threshold makes glibc hand every large block back to the system when freed, so the
        # warm-up step leaves no cached heap behind to hide the measured step's peak. It also makes every
        # large allocation fault its pages in afresh, which no training run pays: time is measured without it.
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
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
            for name, fn in (("torch", lambda: knn_torch(q, base, K + 1, DEFAULTS.chunk)),
                             ("faiss", lambda: knn_faiss(q, base, K + 1))):
                start = time.perf_counter()
                results[name] = fn()
                times[name].append(time.perf_counter() - start)
        row.update({name: min(t) for name, t in times.items()})
        row["same"] = float((results["torch"] == results["faiss"]).all(1).float().mean())
        rows.append(row)
    return rows


def search_table(class_counts: list[int], batch: int, height: int, width: int, repeats: int) -> list[dict]:
    """What knn_stride and IVF change in the negatives of one batch, and the search time they take.

    Pixel embeddings as the head makes them (random decoder-resolution embeddings, upsampled
    bilinearly and normalised), targets in 32x32 blocks, normalised random class embeddings.
    "differ": share of pixels whose k negatives (as a set) are not their own exact k nearest;
    recall@k: share of the exact k negatives that the search found. Exact search: the auto backend.
    """
    import torch
    import torch.nn.functional as F

    from ess.ivf import IvfSearch, recall_at_k
    from ess.knn import knn_excluding
    from ess.losses import block_negatives

    chunk = DEFAULTS.chunk

    def differ(a, b):
        return float((a.sort(1).values != b.sort(1).values).any(1).float().mean())

    def timed(fn):
        out = []
        times = time_calls(lambda: out.append(fn()), repeats if c < 5000 else 1)
        return out[-1], median(times)

    rows = []
    for c in class_counts:
        g = torch.Generator().manual_seed(c)
        low = torch.randn(batch, EMBED_DIM, height // 4, width // 4, generator=g)
        emb = F.normalize(F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False), dim=1)
        blocks = torch.randint(0, c, (batch, 1, -(-height // 32), -(-width // 32)), generator=g).float()
        target = F.interpolate(blocks, scale_factor=32, mode="nearest")[:, 0, :height, :width].long().flatten()
        labelled = torch.ones(batch, height, width, dtype=torch.bool)
        pixels = emb.permute(0, 2, 3, 1).reshape(-1, EMBED_DIM)
        base = F.normalize(torch.rand(c, EMBED_DIM, generator=g) * 2 - 1, dim=1)
        exact, t_exact = timed(lambda: knn_excluding(pixels, base, target, K, "auto", chunk))
        row = {"classes": c, "exact_s": t_exact}
        for stride in (2, 4, 8):
            shared, t = timed(lambda: block_negatives(emb, labelled, target, base, K, stride, "auto", chunk, None))
            row[f"stride{stride}_s"], row[f"stride{stride}_differ"] = t, differ(shared, exact)
            row[f"stride{stride}_recall"] = recall_at_k(shared, exact)
        ivf = IvfSearch(DEFAULTS.nlist, DEFAULTS.nprobe, DEFAULTS.ivf_rebuild_every, chunk)
        row["ivf_exact"] = ivf.exact(c)
        row["nlist"], row["nprobe"] = ivf.cells(c)
        start = time.perf_counter()
        ivf.update(base)  # the first update clusters the class embeddings
        row["ivf_build_s"] = time.perf_counter() - start
        found, row["ivf_s"] = timed(lambda: knn_excluding(pixels, base, target, K, "ivf", chunk, ivf))
        row["ivf_recall"] = recall_at_k(found, exact)
        both, row["stride4_ivf_s"] = timed(lambda: block_negatives(emb, labelled, target, base, K, 4, "ivf", chunk, ivf))
        row["stride4_ivf_recall"] = recall_at_k(both, exact)
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
@click.option("--heads", default=",".join(ROWS), show_default=True,
              help=f"Rows to measure, any of {', '.join(ROWS)} (see the module docstring); empty for none.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1),
              help="Timed steps after the first (median reported).")
@click.option("--rounds", default=1, show_default=True, type=click.IntRange(min=1),
              help="Rounds of the time measurements, interleaved; the median over rounds is reported.")
@click.option("--max-gb", type=float, help="Skip measurements predicted above this [default: available memory - 2 GB].")
@click.option("--knn", type=click.Choice(KNN_BACKENDS), default=DEFAULTS.knn, show_default=True,
              help="kNN backend of the ESS rows.")
@click.option("--no-knn-table", is_flag=True, help="Skip the kNN backend comparison and the stride / IVF table.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write every figure to this JSON file.")
@click.option("--measure", hidden=True, help="Internal: HEAD:C, measure one step in this process and print JSON.")
@click.option("--memory", is_flag=True, hidden=True, help="Internal: with --measure, measure peak memory, not time.")
def main(classes, size, heads, repeats, rounds, max_gb, knn, no_knn_table, json_out, measure, memory):
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
        click.echo(json.dumps(measure_step(head, int(c), batch, height, width, repeats, knn, memory)))
        return
    head_names = [h.strip() for h in heads.split(",") if h.strip()]
    unknown = [h for h in head_names if h not in ROWS]
    if unknown:
        raise click.UsageError(f"--heads: unknown row {unknown[0]!r}; expected any of {', '.join(ROWS)}")
    limit = max_gb * 1e9 if max_gb is not None else available_bytes() - 2e9
    results = loss_steps(counts, head_names, (batch, height, width), repeats, rounds, knn, limit)
    print_ratios(results, counts)
    knn_rows, search_rows = ([], []) if no_knn_table else search_tables(counts, batch, height, width, repeats)
    if json_out:
        from segkit.io import write_json

        write_json(json_out, {"size": [batch, height, width], "loss_steps": results, "knn": knn_rows,
                              "search": search_rows})


def loss_steps(counts: list[int], head_names: list[str], size: tuple[int, int, int], repeats: int, rounds: int,
               knn: str, limit: float) -> list[dict]:
    """Every (C, row) measured in fresh processes, its time the median over `rounds` interleaved rounds; printed."""
    import torch

    batch, height, width = size
    click.echo(f"One training step (forward + backward) of the loss alone, labels {batch} x {height} x {width}, "
               f"d={EMBED_DIM}, k={K}, {torch.get_num_threads()} threads, kNN backend {knn}")
    click.echo(f"Seconds: median of {repeats} steps{f' and of {rounds} interleaved rounds' if rounds > 1 else ''}; peak "
               f"memory: extra resident memory of one step; fresh processes; skip above {limit / 1e9:.1f} GB predicted.")

    def child(head, c, memory):
        return run_child(head, c, size, repeats, knn, memory)

    need = {(head, c): predicted_bytes(head, c, batch, height, width) for c in counts for head in head_names}
    fits = [key for key, n in need.items() if n <= limit]
    earlier = {key: [] for key in fits}  # seconds of the rounds before the last
    for r in range(rounds - 1):
        click.echo(f"(time round {r + 1} of {rounds})")
        for key in fits:
            earlier[key].append(child(*key, memory=False).get("seconds"))
    click.echo(f"{'head':<16} {'classes':>7} {'seconds':>8} {'peak MB':>9}  note")
    results = []
    for c in counts:
        for head in head_names:
            if need[head, c] > limit:
                row = {"head": head, "classes": c, "skipped": f"predicted {need[head, c] / 1e9:.1f} GB > {limit / 1e9:.1f} GB"}
            else:
                row = {**child(head, c, memory=True), **child(head, c, memory=False)}
                if "seconds" in row:
                    row["seconds"] = median([t for t in earlier[head, c] if t is not None] + [row["seconds"]])
            results.append(row)
            note = row.get("skipped") or row.get("error") or ""
            click.echo(f"{head:<16} {c:>7} {_fmt_s(row)} {_fmt_mb(row)}  {note}")
    return results


def print_ratios(results: list[dict], counts: list[int]) -> None:
    """Time and memory ratios of the row pairs per C, and whether ESS's peak memory stays flat in C."""
    def value(key, head, c):
        return next((r[key] for r in results if r["head"] == head and r["classes"] == c and key in r), None)

    click.echo("")
    click.echo("Ratios (time / peak memory; above 1 means the second row is faster / smaller)")
    pairs = [("softmax", "ess"), ("softmax-chunked", "ess"), ("softmax", "softmax-chunked"),
             ("ess", "ess-stride4"), ("ess", "ess-ivf"), ("ess", "ess-stride4-ivf"), ("ess-naive", "ess")]
    for c in counts:
        parts = []
        for a, b in pairs:
            ta, tb, ma, mb = (value(key, h, c) for key in ("seconds", "peak_mb") for h in (a, b))
            if ta and tb and ma and mb:
                parts.append(f"{a}/{b} {ta / tb:5.2f}x time {ma / mb:5.1f}x memory")
        click.echo(f"  C={c:<6} " + ("\n           ".join(parts) if parts else "-"))
    lo, hi = min(counts), max(counts)
    # Up to DENSE_MAX_CLASSES the loss takes the dense path, which needs less memory than the gather
    # path every larger C takes: flatness is judged against both the smallest C and the smallest gather-path C.
    gathered = min((c for c in counts if c > DENSE_MAX_CLASSES and c != hi), default=None)
    for base in dict.fromkeys(c for c in (lo, gathered) if c is not None):
        if value("peak_mb", "ess", base) and value("peak_mb", "ess", hi):
            growth = value("peak_mb", "ess", hi) / value("peak_mb", "ess", base)
            verdict = "within" if growth <= 1.2 else "NOT within"
            path = "dense path" if base <= DENSE_MAX_CLASSES else "gather path"
            click.echo(f"  ESS peak at C={hi} is {growth:.2f}x its peak at C={base} ({path}): {verdict} the 1.2x target")


def search_tables(counts: list[int], batch: int, height: int, width: int, repeats: int) -> tuple[list, list]:
    """The kNN backends compared, and what stride and IVF change in the negatives; printed and returned."""
    queries = batch * height * width
    click.echo("")
    click.echo(f"kNN search: {queries} queries among C classes, d={EMBED_DIM}, k={K + 1}, best of {repeats}")
    click.echo(f"{'classes':>7} {'torch s':>8} {'faiss s':>8} {'faiss/torch':>11} {'same':>6}")
    knn_rows = knn_table(counts, queries, repeats) if faiss_available() else []
    if not knn_rows:
        click.echo("  (faiss is not installed: nothing to compare)")
    for r in knn_rows:
        click.echo(f"{r['classes']:>7} {r['torch']:8.3f} {r['faiss']:8.3f} {r['faiss'] / r['torch']:11.2f} "
                   f"{r['same']:6.1%}")
    click.echo("")
    click.echo(f"Negatives of {queries} pixels, k={K}: exact search (auto backend) against one search per block "
               "(stride) and IVF. differ: share of pixels whose negatives are not their own exact k nearest; "
               "recall: share of the exact k negatives found; s: search seconds (IVF: search only; build: its "
               "first clustering, redone every ivf_rebuild_every steps).")
    click.echo(f"{'classes':>7} {'exact s':>8} {'s2 differ':>9} {'s4 s':>7} {'s4 differ':>9} {'s4 recall':>9} {'s8 differ':>9} "
               f"{'nlist/probe':>11} {'build s':>7} {'ivf s':>7} {'recall':>7} {'s4+ivf s':>8} {'recall':>7} "
               f"{'exact/(s4+ivf)':>14}")
    search_rows = search_table(counts, batch, height, width, repeats)
    for r in search_rows:
        cells = "exact" if r["ivf_exact"] else f"{r['nlist']}/{r['nprobe']}"
        click.echo(f"{r['classes']:>7} {r['exact_s']:8.3f} {r['stride2_differ']:9.1%} {r['stride4_s']:7.3f} "
                   f"{r['stride4_differ']:9.1%} {r['stride4_recall']:9.1%} {r['stride8_differ']:9.1%} {cells:>11} {r['ivf_build_s']:7.3f} "
                   f"{r['ivf_s']:7.3f} {r['ivf_recall']:7.2%} {r['stride4_ivf_s']:8.3f} "
                   f"{r['stride4_ivf_recall']:7.2%} {r['exact_s'] / r['stride4_ivf_s']:13.1f}x")
    return knn_rows, search_rows


if __name__ == "__main__":
    main()
