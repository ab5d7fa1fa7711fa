"""Approximate nearest-neighbour search among class embeddings through an inverted file (IVF).

faiss IndexIVFScalarQuantizer with float16 codes on the CPU, GpuIndexIVFFlat on CUDA with
faiss-gpu, or a torch k-means and per-cell search without faiss. Below IVF_MIN_CLASSES classes
it searches exactly, where an index cannot win (`python -m benchmarks.loss_step`, search table).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ess.device import full_precision
from ess.knn import (faiss_gpu_resources, faiss_searches_on, faiss_uses_gpu, gpu_ordinal, knn_torch, require_faiss,
                     search)

IVF_MIN_CLASSES = 2048


def default_nlist(num_classes: int) -> int:
    """Cells of the IVF index when not given: about sqrt(C), at least 1."""
    return max(1, int(round(num_classes ** 0.5)))


def default_nprobe(nlist: int) -> int:
    """Cells probed per query when not given: a fifth of them. In d=12 a class's nearest others spread over
    several cells; at 20000 classes, nlist 128 and nprobe 24 gave recall@8 99.3% against exact search."""
    return max(1, -(-nlist // 5))


@torch.no_grad()
def kmeans_torch(points: torch.Tensor, clusters: int, chunk: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means of (C, d) points into `clusters` centroids, seeded from a fixed-seed sample of the points.

    Uses its own generator, so the global random state (and with it training) is untouched.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    pick = torch.randperm(points.shape[0], generator=g)[:clusters].to(points.device)
    centroids = points[pick].clone()
    for _ in range(iters):
        assign = knn_torch(points, centroids, 1, chunk)[:, 0]
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=clusters).to(points.dtype)
        filled = counts > 0  # an empty cell keeps its old centroid
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


def _padded(x: torch.Tensor, d: int):
    """(N, d) float32 numpy copy of (N, d') rows, d' <= d, zero-padded: L2 distances between padded rows are unchanged."""
    x = x.detach().float().cpu()
    return F.pad(x, (0, d - x.shape[1])).contiguous().numpy()


def ivf_uses_faiss(device: torch.device, prefer: bool | None = None) -> bool:
    """Whether IVF goes through faiss: `prefer` when given; else where faiss searches on the data's own
    device (any faiss on the CPU, faiss-gpu on CUDA), so CUDA embeddings never make a host round trip."""
    return faiss_searches_on(device) if prefer is None else prefer


class IvfSearch:
    """Approximate k-nearest-neighbour search among class embeddings through an inverted file.

    The class embeddings are clustered into `nlist` cells (k-means); a query is compared with
    the classes of its `nprobe` nearest cells only. The clustering is redone every
    `rebuild_every` calls of `update` (one per training step) as the embeddings move; in
    between, every `update` files the current embeddings into the kept cells, so the search
    always ranks the current embeddings, only the partition is stale.

    faiss when it can search where the tensors live (use_faiss=None: faiss-gpu for CUDA tensors,
    any faiss for CPU ones): on the CPU IndexIVFScalarQuantizer holding float16 codes of the
    embeddings (a search is exact among those codes), on CUDA GpuIndexIVFFlat; else a torch
    k-means and a per-cell search on the tensors' device. Below `min_classes` classes, or with
    nprobe >= nlist, `search` is exact. A query whose probed cells hold fewer than k classes is
    searched exactly, so every row has k valid indices.
    """

    def __init__(self, nlist: int | None, nprobe: int | None, ivf_rebuild_every: int, chunk: int, *,
                 min_classes: int = IVF_MIN_CLASSES, use_faiss: bool | None = None):
        """nlist, nprobe, ivf_rebuild_every and chunk as in ess.config.ModelArgs (validated there)."""
        self.nlist, self.nprobe, self.rebuild_every = nlist, nprobe, ivf_rebuild_every
        self.min_classes, self.chunk = min_classes, chunk
        self.prefer_faiss = use_faiss
        self.use_faiss = False  # decided by update() for the device of the embeddings
        self.updates = 0
        self.centroids: torch.Tensor | None = None  # (nlist, d) of the last clustering
        self._index = None  # faiss index, trained on `centroids`
        self._cells = None  # torch path: (order, starts) of the classes sorted by cell

    def cells(self, num_classes: int) -> tuple[int, int]:
        """(nlist, nprobe) used for `num_classes` classes."""
        nlist = min(self.nlist or default_nlist(num_classes), num_classes)
        return nlist, min(self.nprobe or default_nprobe(nlist), nlist)

    def exact(self, num_classes: int) -> bool:
        """Whether a search among `num_classes` classes is exact (no index)."""
        nlist, nprobe = self.cells(num_classes)
        return num_classes < self.min_classes or nprobe >= nlist

    def update(self, base: torch.Tensor) -> None:
        """File the current class embeddings (C, d); re-cluster when due (every `rebuild_every` updates)."""
        base = base.detach().float()
        if self.exact(base.shape[0]):
            self.updates += 1
            return
        stale = (self.centroids is None or self.updates % self.rebuild_every == 0
                 or self.centroids.shape[1] != base.shape[1] or self.centroids.device != base.device)
        if stale:
            self.use_faiss = ivf_uses_faiss(base.device, self.prefer_faiss)
            self.centroids = self._cluster(base, self.cells(base.shape[0])[0])
        self._file(base)
        self.updates += 1

    def _cluster(self, base: torch.Tensor, nlist: int) -> torch.Tensor:
        if not self.use_faiss:
            return kmeans_torch(base, nlist, self.chunk)
        faiss = require_faiss()
        kmeans = faiss.Kmeans(base.shape[1], nlist, niter=10, seed=1234, verbose=False)
        kmeans.cp.min_points_per_centroid = 1  # few classes per cell is the point here, not an error
        kmeans.train(base.cpu().contiguous().numpy())
        return torch.from_numpy(kmeans.centroids).to(base.device)

    def _file(self, base: torch.Tensor) -> None:
        if self.use_faiss:
            self._index = self._faiss_index(base)
            return
        assign = knn_torch(base, self.centroids, 1, self.chunk)[:, 0]
        order = torch.argsort(assign, stable=True)
        counts = torch.bincount(assign, minlength=self.centroids.shape[0])
        starts = torch.cumsum(counts, 0) - counts
        self._cells = (order, starts.tolist(), counts.tolist())

    def _faiss_index(self, base: torch.Tensor):
        """The index of the current embeddings. On the CPU its lists hold float16 codes of them, zero-padded to
        a multiple of 8 dimensions (distances unchanged), which faiss scans with SIMD, where IndexIVFFlat
        computes one float32 distance at a time. 8192 queries, 20000 / 10000 classes on 2 CPU cores: 1.9x /
        1.7x faster, recall@8 99.56 -> 99.51% / 98.66 -> 98.63%. Only the candidates come from the codes: the
        loss recomputes every distance in float32. Embeddings beyond float16's range (their codes would be
        infinite) and faiss-gpu keep float32 lists (IndexIVFFlat)."""
        faiss = require_faiss()
        nlist = self.centroids.shape[0]
        gpu = faiss_uses_gpu(base.device)
        codes = not gpu and float(base.abs().max()) <= torch.finfo(torch.float16).max
        d = -(-base.shape[1] // 8) * 8 if codes else base.shape[1]
        quantizer = faiss.IndexFlatL2(d)
        quantizer.add(_padded(self.centroids, d))
        # A quantizer holding exactly nlist centroids trains the coarse level; faiss keeps a reference to it.
        if codes:
            index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                                  faiss.METRIC_L2, False)
        else:
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_L2)
        if gpu:  # the empty trained index moves to the GPU; CUDA tensors go in directly
            ordinal = gpu_ordinal(base.device)
            index = faiss.index_cpu_to_gpu(faiss_gpu_resources(ordinal), ordinal, index)
            index.add(base.contiguous())
        else:
            vectors = _padded(base, d)
            if not index.is_trained:
                index.train(vectors[:1])  # float16 codes need no statistics: this only marks the index trained
            index.add(vectors)
        index.nprobe = self.cells(base.shape[0])[1]
        return index

    @torch.no_grad()
    def search(self, queries: torch.Tensor, base: torch.Tensor, k: int) -> torch.Tensor:
        """(N, k) indices of the (approximately) k nearest classes, nearest first; `base` as last given to update."""
        k = min(k, base.shape[0])
        if self.exact(base.shape[0]):
            return search(queries, base, k, "auto", self.chunk)
        if self.centroids is None:
            raise RuntimeError("IvfSearch.search before update: call update(class_embeddings) first")
        queries = queries.detach().float()
        idx = self._search_faiss(queries, k) if self.use_faiss else self._search_torch(queries, base.detach().float(), k)
        short = (idx < 0).any(1)  # probed cells held fewer than k classes
        if short.any():
            idx[short] = search(queries[short], base, k, "auto", self.chunk)
        return idx

    def _search_faiss(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        if faiss_uses_gpu(queries.device):
            _, idx = self._index.search(queries.contiguous(), k)
            return idx.to(dtype=torch.int64)
        _, idx = self._index.search(_padded(queries, self._index.d), k)
        return torch.from_numpy(idx).to(device=queries.device, dtype=torch.int64)

    @full_precision()
    def _search_torch(self, queries: torch.Tensor, base: torch.Tensor, k: int) -> torch.Tensor:
        """Per cell: the queries probing it against its classes; then the best k of the probed cells' bests."""
        order, starts, counts = self._cells
        n, nlist = queries.shape[0], len(starts)
        nprobe = self.cells(base.shape[0])[1]
        probes = knn_torch(queries, self.centroids, nprobe, self.chunk).flatten()  # (N * nprobe) cells
        # The (query, slot) pairs sorted by cell, so each cell's queries are one slice.
        pairs = torch.argsort(probes, stable=True)
        pair_counts = torch.bincount(probes, minlength=nlist).tolist()
        best_d = torch.full((n * nprobe, k), float("inf"), device=queries.device)
        best_i = torch.full((n * nprobe, k), -1, dtype=torch.int64, device=queries.device)
        pair_start = 0
        for start, count, npairs in zip(starts, counts, pair_counts):
            mine, pair_start = pairs[pair_start:pair_start + npairs], pair_start + npairs
            if count == 0 or npairs == 0:
                continue
            rows = mine // nprobe
            members = order[start:start + count]
            vecs = base.index_select(0, members)
            dist = torch.addmm((vecs * vecs).sum(1), queries.index_select(0, rows), vecs.t(), alpha=-2.0)
            top = min(k, count)
            d, j = dist.topk(top, dim=1, largest=False, sorted=True)
            best_d[mine, :top] = d
            best_i[mine, :top] = members[j]
        d, j = best_d.view(n, -1).topk(k, dim=1, largest=False, sorted=True)
        idx = best_i.view(n, -1).gather(1, j)
        idx[torch.isinf(d)] = -1
        return idx


def recall_at_k(approximate: torch.Tensor, exact: torch.Tensor) -> float:
    """Share of the exact k nearest neighbours that the approximate search also returned (rows as sets)."""
    if exact.numel() == 0:
        return 1.0
    hits = (approximate[:, :, None] == exact[:, None, :]).any(1)
    return float(hits.float().mean())
