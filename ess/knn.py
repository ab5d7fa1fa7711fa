"""Exact k-nearest-neighbour search of query vectors among class embeddings.

Two backends return the same indices (ties aside):
    torch  chunked matmul + top-k, on whatever device the tensors live on
    faiss  IndexFlatL2 (GpuIndexFlatL2 when faiss-gpu sees a GPU and the tensors are on CUDA)

Both search without gradient and bound their memory by the chunk size, never by
queries x classes: the ESS loss recomputes the distances it needs with gradient.
"""
from __future__ import annotations

import functools

import torch

BACKENDS = ("torch", "faiss")
# The faster backend in the ESS loss step, as measured by `python -m ess.benchmark --heads ess --knn B`
# on 2 CPU cores, 2 x 256 x 256 labels: faiss 0.52 s vs torch 0.86 s at 1284 classes, 2.9 s vs 7.7 s at 20000.
DEFAULT_KNN = "faiss"

# Elements of one queries x classes distance block (float32): 4M elements = 16 MB.
DEFAULT_CHUNK = 1 << 22


@torch.no_grad()
def knn_torch(queries: torch.Tensor, base: torch.Tensor, k: int, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Indices (N, k) of the k nearest rows of `base` (C, d) to each row of `queries` (N, d), nearest first."""
    queries = queries.detach().float()
    base = base.detach().float()
    k = min(k, base.shape[0])
    # ||q - b||^2 = ||q||^2 - 2 q.b + ||b||^2; ||q||^2 is constant along a row, so it cannot change the ranking.
    base_sq = (base * base).sum(1)
    base_t = base.t().contiguous()
    rows = max(1, chunk // max(1, base.shape[0]))
    out = torch.empty(queries.shape[0], k, dtype=torch.int64, device=queries.device)
    for start in range(0, queries.shape[0], rows):
        block = torch.addmm(base_sq, queries[start:start + rows], base_t, alpha=-2.0)
        if k == 1:  # a reduction is cheaper than a selection
            out[start:start + rows, 0] = block.argmin(dim=1)
        else:
            out[start:start + rows] = block.topk(k, dim=1, largest=False, sorted=True).indices
    return out


@functools.lru_cache(maxsize=None)
def _faiss_gpu_resources(device: int):
    import faiss

    return faiss.StandardGpuResources()


def faiss_uses_gpu(device: torch.device) -> bool:
    """True when faiss-gpu is installed, sees a GPU, and the data lives on CUDA."""
    import faiss

    return device.type == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@torch.no_grad()
def knn_faiss(queries: torch.Tensor, base: torch.Tensor, k: int) -> torch.Tensor:
    """Same contract as `knn_torch`, through a FAISS flat L2 index (exact search)."""
    import faiss

    k = min(k, base.shape[0])
    device = queries.device
    d = base.shape[1]
    if faiss_uses_gpu(device):
        import faiss.contrib.torch_utils  # noqa: F401  (lets GPU indexes take CUDA tensors directly)

        config = faiss.GpuIndexFlatConfig()
        config.device = device.index if device.index is not None else torch.cuda.current_device()
        index = faiss.GpuIndexFlatL2(_faiss_gpu_resources(config.device), d, config)
        index.add(base.detach().float().contiguous())
        _, idx = index.search(queries.detach().float().contiguous(), k)
        return idx.to(device=device, dtype=torch.int64)
    index = faiss.IndexFlatL2(d)
    index.add(base.detach().float().cpu().contiguous().numpy())
    _, idx = index.search(queries.detach().float().cpu().contiguous().numpy(), k)
    return torch.from_numpy(idx).to(device=device, dtype=torch.int64)


def knn(queries: torch.Tensor, base: torch.Tensor, k: int, backend: str = "torch", chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Dispatch to a backend by name ("torch" or "faiss")."""
    if backend == "torch":
        return knn_torch(queries, base, k, chunk)
    if backend == "faiss":
        return knn_faiss(queries, base, k)
    raise ValueError(f"unknown kNN backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def knn_excluding(queries: torch.Tensor, base: torch.Tensor, exclude: torch.Tensor, k: int,
                  backend: str = "torch", chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """The k nearest rows of `base` to each query, never the row `exclude[i]` (e.g. the query's own class).

    Searches k+1 neighbours, then drops the excluded row where it is among them and the
    farthest of the k+1 otherwise, so every query keeps exactly k = min(k, C-1) neighbours.
    """
    k = min(k, base.shape[0] - 1)
    if k <= 0:
        return torch.empty(queries.shape[0], 0, dtype=torch.int64, device=queries.device)
    idx = knn(queries, base, k + 1, backend, chunk)
    drop = idx == exclude[:, None]
    drop[:, -1] |= ~drop.any(1)
    return idx[~drop].view(-1, k)
