"""Exact k-nearest-neighbour search of query vectors among class embeddings, and what `--knn` means.

Backends (all return int64 indices (N, k), nearest first, on the queries' device):
    torch  exact: chunked matmul + top-k, on whatever device the tensors live on
    faiss  exact: IndexFlatL2 (GpuIndexFlatL2 when the tensors are on CUDA and faiss-gpu runs on that GPU)
    ivf    approximate: an inverted file (ess.ivf.IvfSearch)
`resolve_backend` is the one place that decides what `auto` (and `ivf` where it cannot win) means.

The exact backends search without gradient and bound their memory by the chunk size, never
by queries x classes: the ESS loss recomputes the distances it needs with gradient. They rank
in float32 under autocast too (the torch search runs with autocast off; faiss takes float32).
faiss is optional (`pip install -e '.[cpu]'` or `'.[gpu]'`); without it auto means torch. A faiss-gpu
build carries kernels for some GPUs only (docs/gpu.md): before its first use on a CUDA device a child
process searches a tiny index there (`faiss_gpu_runs`), and where that fails auto searches with torch.
"""
from __future__ import annotations

import functools
import importlib
import subprocess
import sys

import torch

from ess.device import cuda_ordinal, describe_cuda, full_precision
from segkit.errors import InputError

# Below this class count `auto` searches with torch, on any device: a flat search of so few classes is one
# small matmul, and the ESS loss then takes its dense path (ess.losses.uses_dense_path). From here, on the
# CPU, faiss: `python -m benchmarks.loss_step --heads ""` on 2 CPU cores, 131072 queries, k=8, faiss / torch
# time: 3.39 at 19 classes, 0.88 at 150, 0.63 at 500, 0.73 at 1284.
FAISS_MIN_CLASSES = 192


@functools.lru_cache(maxsize=None)
def faiss_module():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_available() -> bool:
    return faiss_module() is not None


def require_faiss():
    faiss = faiss_module()
    if faiss is None:
        raise InputError(None, "--knn faiss needs the faiss package: pip install -e '.[cpu]' (or '.[gpu]' for "
                               "faiss-gpu), or use --knn torch or auto")
    return faiss


def faiss_uses_gpu(device: torch.device) -> bool:
    """True when the data lives on CUDA and faiss-gpu is installed, sees a GPU and runs on this one."""
    faiss = faiss_module()
    return (faiss is not None and device.type == "cuda" and hasattr(faiss, "StandardGpuResources")
            and faiss.get_num_gpus() > 0 and faiss_gpu_runs(cuda_ordinal(device)))


# A search of four points on one GPU by faiss alone, in a child process: faiss reports a failed CUDA call (such
# as "no kernel image is available for execution on the device", from a build without kernels for the card)
# by aborting the process, which no exception handler survives. Prints the nearest point of each query.
FAISS_GPU_PROBE = """
import sys
import numpy as np
import faiss
config = faiss.GpuIndexFlatConfig()
config.device = int(sys.argv[1])
index = faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), 4, config)
points = np.eye(4, dtype=np.float32)
index.add(points)
print(*index.search(np.ascontiguousarray(points[::-1]), 1)[1].reshape(-1).tolist())
"""
FAISS_GPU_PROBE_SECONDS = 300  # a card newer than the build's kernels JIT-compiles their PTX on first use


@functools.lru_cache(maxsize=None)
def faiss_gpu_runs(ordinal: int) -> bool:
    """Whether faiss-gpu searches correctly on CUDA device `ordinal`: checked once per device and process,
    before faiss's first use there. Where it does not, one warning line, and False: `auto` then searches with
    torch, and an explicit `faiss` search copies to faiss's CPU index."""
    problem = faiss_gpu_problem(ordinal)
    if problem is None:
        return True
    version = getattr(faiss_module(), "__version__", "?")
    print(f"Warning: faiss {version} cannot search on {describe_cuda(ordinal)}: {problem}; searching with torch "
          "instead (docs/gpu.md: which faiss build serves which card)", file=sys.stderr)
    return False


def faiss_gpu_problem(ordinal: int) -> str | None:
    """None when FAISS_GPU_PROBE finds the right neighbours on CUDA device `ordinal`, else why not, in one line."""
    try:
        result = subprocess.run([sys.executable, "-c", FAISS_GPU_PROBE, str(ordinal)], capture_output=True,
                                text=True, timeout=FAISS_GPU_PROBE_SECONDS)
    except subprocess.TimeoutExpired:
        return f"its test search did not finish in {FAISS_GPU_PROBE_SECONDS} s"
    found = result.stdout.split()
    if result.returncode == 0:
        return None if found == ["3", "2", "1", "0"] else f"its test search found {found}, not ['3', '2', '1', '0']"
    said = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    # faiss's assertion or Python's exception: the last line it wrote
    return " ".join(said[-1].split())[-300:] if said else f"its test search ended with exit status {result.returncode}"


def resolve_backend(knn: str, device: torch.device, num_classes: int, ivf=None) -> str:
    """The search that `knn` means for this device and class count: "torch", "faiss" or "ivf".

    "ivf" stays "ivf" only where the index `ivf` (an ess.ivf.IvfSearch) is approximate at this class
    count; otherwise it, like "auto", means an exact search: torch below FAISS_MIN_CLASSES classes;
    from there faiss where it searches on the data's own device (any faiss on the CPU, faiss-gpu on
    CUDA), so CUDA tensors never make a host round trip; torch otherwise.
    """
    if knn in ("torch", "faiss"):
        return knn
    if knn == "ivf" and ivf is not None and not ivf.exact(num_classes):
        return "ivf"
    if num_classes < FAISS_MIN_CLASSES:
        return "torch"
    return "faiss" if faiss_searches_on(device) else "torch"


def faiss_searches_on(device: torch.device) -> bool:
    """Whether faiss searches data on `device` where it lives: any faiss on the CPU, faiss-gpu on a card it runs on."""
    return faiss_uses_gpu(device) if device.type == "cuda" else faiss_available()


def rows_per_block(chunk: int, row_size: int) -> int:
    """Rows of `row_size` elements per block, so a block holds at most `chunk` elements (at least one row)."""
    return max(1, chunk // max(1, row_size))


@torch.no_grad()
@full_precision()
def knn_torch(queries: torch.Tensor, base: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Indices (N, k) of the k nearest rows of `base` (C, d) to each row of `queries` (N, d), nearest first."""
    queries = queries.detach().float()
    base = base.detach().float()
    k = min(k, base.shape[0])
    # ||q - b||^2 = ||q||^2 - 2 q.b + ||b||^2; ||q||^2 is constant along a row, so it cannot change the ranking.
    base_sq = (base * base).sum(1)
    base_t = base.t().contiguous()
    rows = rows_per_block(chunk, base.shape[0])
    out = torch.empty(queries.shape[0], k, dtype=torch.int64, device=queries.device)
    for start in range(0, queries.shape[0], rows):
        block = torch.addmm(base_sq, queries[start:start + rows], base_t, alpha=-2.0)
        if k == 1:  # a reduction is cheaper than a selection
            out[start:start + rows, 0] = block.argmin(dim=1)
        else:
            out[start:start + rows] = block.topk(k, dim=1, largest=False, sorted=True).indices
    return out


@functools.lru_cache(maxsize=None)
def faiss_gpu_resources(device: int):
    return faiss_module().StandardGpuResources()


def gpu_ordinal(device: torch.device) -> int:
    """The CUDA ordinal of `device`, once faiss's GPU indexes take CUDA tensors directly: importing
    faiss.contrib.torch_utils makes their add() and search() accept torch tensors (its side effect)."""
    importlib.import_module("faiss.contrib.torch_utils")
    return cuda_ordinal(device)


@torch.no_grad()
def knn_faiss(queries: torch.Tensor, base: torch.Tensor, k: int) -> torch.Tensor:
    """Same contract as `knn_torch`, through a FAISS flat L2 index (exact search)."""
    faiss = require_faiss()
    k = min(k, base.shape[0])
    device = queries.device
    d = base.shape[1]
    if faiss_uses_gpu(device):
        config = faiss.GpuIndexFlatConfig()
        config.device = gpu_ordinal(device)
        index = faiss.GpuIndexFlatL2(faiss_gpu_resources(config.device), d, config)
        index.add(base.detach().float().contiguous())
        _, idx = index.search(queries.detach().float().contiguous(), k)
        return idx.to(device=device, dtype=torch.int64)
    index = faiss.IndexFlatL2(d)
    index.add(base.detach().float().cpu().contiguous().numpy())
    _, idx = index.search(queries.detach().float().cpu().contiguous().numpy(), k)
    return torch.from_numpy(idx).to(device=device, dtype=torch.int64)


def search(queries: torch.Tensor, base: torch.Tensor, k: int, knn: str, chunk: int, ivf=None) -> torch.Tensor:
    """The k nearest rows of `base` to each query by the search `knn` means here (`resolve_backend`);
    "ivf" searches through `ivf`, an ess.ivf.IvfSearch whose index holds `base`."""
    name = resolve_backend(knn, queries.device, base.shape[0], ivf)
    if name == "ivf":
        return ivf.search(queries, base, k)
    if name == "torch":
        return knn_torch(queries, base, k, chunk)
    return knn_faiss(queries, base, k)


def drop_excluded(candidates: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """From (N, k+1) candidates, nearest first, the k that are not `exclude[i]`.

    Drops the excluded row where it is among them and the farthest candidate otherwise.
    """
    k = candidates.shape[1] - 1
    drop = candidates == exclude[:, None]
    drop[:, -1] |= ~drop.any(1)
    return candidates[~drop].view(-1, k)


def knn_excluding(queries: torch.Tensor, base: torch.Tensor, exclude: torch.Tensor, k: int, knn: str, chunk: int,
                  ivf=None) -> torch.Tensor:
    """The k nearest rows of `base` to each query, never the row `exclude[i]` (e.g. the query's own class).

    Searches k+1 neighbours, then drops the excluded row where it is among them and the
    farthest of the k+1 otherwise, so every query keeps exactly k = min(k, C-1) neighbours.
    """
    k = min(k, base.shape[0] - 1)
    if k <= 0:
        return torch.empty(queries.shape[0], 0, dtype=torch.int64, device=queries.device)
    return drop_excluded(search(queries, base, k + 1, knn, chunk, ivf), exclude)
