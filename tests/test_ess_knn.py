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



# --- faiss-gpu on a card it has no kernels for ------------------------------------------------

FAKE_FAISS = '''
"""A stand-in faiss-gpu whose GPU search does what FAKE_FAISS says: works, aborts as faiss does on a failed
CUDA call, or returns wrong neighbours."""
import os
import sys

import numpy as np

__version__ = "0.0-fake"
BEHAVIOUR = os.environ.get("FAKE_FAISS", "works")


class StandardGpuResources:
    pass


class GpuIndexFlatConfig:
    device = 0


def get_num_gpus():
    return 1


class GpuIndexFlatL2:
    def __init__(self, resources, d, config):
        self.points = np.zeros((0, d), dtype=np.float32)

    def add(self, points):
        self.points = np.asarray(points)

    def search(self, queries, k):
        if BEHAVIOUR == "abort":
            sys.stderr.write("Faiss assertion 'err__ == cudaSuccess' failed in void faiss::gpu::runL2Norm() at "
                             "L2Norm.cu:262; details: CUDA error 209 no kernel image is available for execution "
                             "on the device\\n")
            sys.stderr.flush()
            os.abort()
        d = ((np.asarray(queries)[:, None] - self.points[None]) ** 2).sum(-1)
        idx = np.argsort(d, axis=1)[:, :k]
        return np.take_along_axis(d, idx, 1), np.zeros_like(idx) if BEHAVIOUR == "wrong" else idx
'''


@pytest.fixture
def fake_faiss_gpu(tmp_path, monkeypatch):
    """Install the stand-in for this process (ess.knn.faiss_module) and for the probe's child (PYTHONPATH);
    returns a function that sets its behaviour."""
    import importlib.util
    import os

    from ess import knn

    (tmp_path / "faiss").mkdir()
    (tmp_path / "faiss" / "__init__.py").write_text(FAKE_FAISS)
    spec = importlib.util.spec_from_file_location("fake_faiss", tmp_path / "faiss" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(knn, "faiss_module", lambda: module)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    knn.faiss_gpu_runs.cache_clear()
    yield lambda behaviour: monkeypatch.setenv("FAKE_FAISS", behaviour)
    knn.faiss_gpu_runs.cache_clear()


@pytest.mark.parametrize("behaviour,reason", [("abort", "CUDA error 209 no kernel image is available"),
                                              ("wrong", "its test search found ['0', '0', '0', '0']")])
def test_faiss_gpu_that_cannot_search_on_the_card_falls_back_to_torch_with_one_warning(
        fake_faiss_gpu, capsys, behaviour, reason):
    from ess.ivf import ivf_uses_faiss
    from ess.knn import faiss_uses_gpu, resolve_backend

    fake_faiss_gpu(behaviour)
    cuda = torch.device("cuda", 0)
    assert not faiss_uses_gpu(cuda)
    assert resolve_backend("auto", cuda, 10000) == "torch" and not ivf_uses_faiss(cuda)
    assert resolve_backend("auto", torch.device("cuda", 0), 5000) == "torch"
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines  # checked once per device, said once
    assert lines[0].startswith("Warning: faiss 0.0-fake cannot search on cuda:0") and reason in lines[0]
    assert lines[0].endswith("searching with torch instead (docs/gpu.md: which faiss build serves which card)")


def test_faiss_gpu_that_searches_right_is_used_on_cuda_only(fake_faiss_gpu, capsys):
    from ess.knn import faiss_uses_gpu, resolve_backend

    fake_faiss_gpu("works")
    assert faiss_uses_gpu(torch.device("cuda", 0)) and resolve_backend("auto", torch.device("cuda", 0), 10000) == "faiss"
    assert not faiss_uses_gpu(torch.device("cpu"))
    assert capsys.readouterr().err == ""
