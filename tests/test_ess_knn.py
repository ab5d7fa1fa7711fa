"""kNN backends against brute force and against each other."""
import numpy as np
import pytest
import torch

from ess.config import ModelArgs
from ess.knn import knn_excluding, knn_faiss, knn_torch

CHUNK = ModelArgs.chunk


def brute_force(queries, base, k):
    d = torch.cdist(queries.double(), base.double())
    return d.argsort(dim=1, stable=True)[:, :k]


@pytest.mark.parametrize("num_classes", [1, 5, 300])
@pytest.mark.parametrize("normalize", [True, False])
def test_torch_and_faiss_match_brute_force(num_classes, normalize):
    g = torch.Generator().manual_seed(num_classes)
    queries = torch.randn(500, 12, generator=g)
    base = torch.rand(num_classes, 12, generator=g) * 2 - 1
    if normalize:
        queries, base = torch.nn.functional.normalize(queries, dim=1), torch.nn.functional.normalize(base, dim=1)
    k = 8
    expected = brute_force(queries, base, k)
    # A tiny chunk exercises the block loop: 7 rows of 300 classes at a time.
    got_torch = knn_torch(queries, base, k, 7 * max(num_classes, 1))
    got_faiss = knn_faiss(queries, base, k)
    assert got_torch.shape == got_faiss.shape == (500, min(k, num_classes))
    assert torch.equal(got_torch, expected)
    assert torch.equal(got_faiss, expected)
    assert got_torch.dtype == got_faiss.dtype == torch.int64


def test_chunk_size_does_not_change_the_result():
    g = torch.Generator().manual_seed(1)
    queries, base = torch.randn(1000, 6, generator=g), torch.randn(97, 6, generator=g)
    full = knn_torch(queries, base, 5, 1 << 30)
    for chunk in (1, 97, 1000, 12345):
        assert torch.equal(knn_torch(queries, base, 5, chunk), full)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_excluding_drops_the_excluded_row_and_keeps_k(backend):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(40, 12, generator=g)
    target = torch.randint(0, 40, (600,), generator=g)
    # Half the queries sit right on their target, so it is their nearest neighbour.
    queries = torch.randn(600, 12, generator=g)
    queries[::2] = base[target[::2]] + 1e-3 * torch.randn(300, 12, generator=g)
    got = knn_excluding(queries, base, target, 7, backend, CHUNK)
    assert got.shape == (600, 7)
    assert not (got == target[:, None]).any()
    d = torch.cdist(queries.double(), base.double())
    d[torch.arange(600), target] = float("inf")
    assert torch.equal(got, d.argsort(dim=1, stable=True)[:, :7])


def test_excluding_with_fewer_classes_than_k():
    base = torch.randn(3, 4)
    got = knn_excluding(torch.randn(10, 4), base, torch.zeros(10, dtype=torch.long), 7, "auto", CHUNK)
    assert got.shape == (10, 2)
    assert set(np.unique(got.numpy())) <= {1, 2}
    assert knn_excluding(torch.randn(10, 4), base[:1], torch.zeros(10, dtype=torch.long), 7, "auto", CHUNK).shape == (10, 0)

