"""The speed paths against their exact references: chunked softmax, shared (strided) negatives,
IVF search, the auto backend and the prediction in either memory layout; the loss-step benchmark's report."""
import pytest
import torch
import torch.nn.functional as F

from conftest import ess_head
from ess.config import STRIDE_BLOCKS, ModelArgs
from ess.heads import SoftmaxHead, UpsampledLogits
from ess.ivf import IvfSearch, recall_at_k
from ess.knn import faiss_available, knn_excluding, knn_torch, resolve_backend
from ess.losses import block_negatives, ess_pixel_loss, softmax_loss, upsampled_softmax_loss
from ess.model import build_model
from segkit.errors import InputError

CHUNK = ModelArgs.chunk


def ivf_search(nlist, nprobe, rebuild_every=ModelArgs.ivf_rebuild_every, **kwargs):
    return IvfSearch(nlist, nprobe, rebuild_every, CHUNK, **kwargs)


needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss not installed")


@pytest.mark.parametrize("low_size,size,crop", [((4, 4), (16, 16), (16, 16)), ((5, 7), (18, 25), (17, 23)),
                                                ((3, 6), (12, 24), (10, 24))])
@pytest.mark.parametrize("chunk", [1, 500, 1 << 22])
def test_chunked_softmax_equals_dense(low_size, size, crop, chunk):
    g = torch.Generator().manual_seed(sum(size) + chunk)
    low = (3 * torch.randn(2, 11, *low_size, generator=g)).requires_grad_()
    mask = torch.randint(0, 12, (2, *crop), generator=g)  # 0 = unlabeled
    dense = F.interpolate(low, size=size, mode="bilinear", align_corners=False)[..., :crop[0], :crop[1]]
    expected = softmax_loss(dense, mask)
    (grad_expected,) = torch.autograd.grad(expected, low)
    got = upsampled_softmax_loss(low, mask, size, chunk)
    (grad_got,) = torch.autograd.grad(got, low)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-4, atol=1e-6)
    head = SoftmaxHead(1, 11, softmax_impl="chunked", chunk=chunk)
    lazy = UpsampledLogits(low.detach(), size, size)[..., :crop[0], :crop[1]]
    assert lazy.shape == (2, 11, *crop)
    assert torch.equal(head.predict(lazy), dense.argmax(1) + 1)


def test_chunked_softmax_model_matches_dense_model():
    torch.manual_seed(0)
    dense = build_model("softmax", 9, encoder="resnet18", norm="gn")
    chunked = build_model("softmax", 9, encoder="resnet18", norm="gn", softmax_impl="chunked", k=3)
    chunked.load_state_dict(dense.state_dict())
    x, mask = torch.randn(2, 3, 40, 56), torch.randint(0, 10, (2, 40, 56))  # padded to 48x64 and cropped back
    torch.manual_seed(1)  # the same dropout masks in both
    out_d = dense(x)
    torch.manual_seed(1)
    out_c = chunked(x)
    assert isinstance(out_c, UpsampledLogits) and out_c.shape == out_d.shape
    loss_d, loss_c = dense.loss(out_d, mask), chunked.loss(out_c, mask)
    assert loss_c.item() == pytest.approx(loss_d.item(), rel=1e-5)
    loss_d.backward()
    loss_c.backward()
    torch.testing.assert_close(chunked.head.classifier.weight.grad, dense.head.classifier.weight.grad,
                               rtol=1e-4, atol=1e-6)
    assert torch.equal(chunked.predict(out_c), dense.predict(out_d))


def test_upsampled_logits_rejects_other_indexing():
    lazy = UpsampledLogits(torch.zeros(1, 2, 3, 3), (12, 12), (12, 12))
    with pytest.raises(TypeError, match="top-left crop"):
        lazy[0]
    with pytest.raises(ValueError, match="larger than"):
        upsampled_softmax_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 13, 12, dtype=torch.long), (12, 12), CHUNK)


def reference_block_negatives(emb, labelled, target, classes, k, stride):
    """Brute force in float64: each block's mean, its k+1 nearest classes, the pixel's target dropped."""
    bh, bw = STRIDE_BLOCKS[stride]
    out = []
    b_idx, ys, xs = labelled.nonzero(as_tuple=True)
    for b, y, x, t in zip(b_idx.tolist(), ys.tolist(), xs.tolist(), target.tolist()):
        y0, x0 = y // bh * bh, x // bw * bw
        mean = emb[b, :, y0:y0 + bh, x0:x0 + bw].double().mean((1, 2))
        order = torch.cdist(mean[None], classes.double())[0].argsort(stable=True)[:k + 1].tolist()
        out.append([c for c in order if c != t][:k])
    return torch.tensor(out)


@pytest.mark.parametrize("stride", [1, 2, 4, 8])
def test_block_negatives_equal_brute_force_and_exclude_the_target(stride):
    g = torch.Generator().manual_seed(stride)
    classes = F.normalize(torch.randn(30, 6, generator=g), dim=1)
    emb = F.normalize(F.interpolate(torch.randn(2, 6, 3, 4, generator=g), size=(9, 13), mode="bilinear"), dim=1)
    mask = torch.randint(0, 31, (2, 9, 13), generator=g)  # odd sizes: partial blocks at the edges
    labelled = mask > 0
    target = mask[labelled] - 1
    # Put some targets on their block's nearest class, so the shared list holds them and they must be dropped.
    nearest = knn_torch(emb.permute(0, 2, 3, 1)[labelled], classes, 1, CHUNK)[:, 0]
    target[::3] = nearest[::3]
    got = block_negatives(emb, labelled, target, classes, 7, stride, "torch", CHUNK, None)
    assert got.shape == (target.shape[0], 7)
    assert not (got == target[:, None]).any()
    assert torch.equal(got, reference_block_negatives(emb, labelled, target, classes, 7, stride))
    if stride == 1:  # one search per pixel is the per-pixel search
        assert torch.equal(got, knn_excluding(emb.permute(0, 2, 3, 1)[labelled], classes, target, 7, "torch", CHUNK))


def test_strided_head_loss_is_the_loss_over_shared_negatives():
    torch.manual_seed(0)
    head = ess_head(8, 40, embed_dim=6, knn="torch", knn_stride=4, reg=False)
    out = head(torch.randn(2, 8, 4, 4), (16, 16))
    mask = torch.randint(0, 41, (2, 16, 16))
    labelled = mask > 0
    target = mask[labelled] - 1
    classes = head.class_embeddings()
    negatives = reference_block_negatives(out.detach(), labelled, target, classes.detach(), 7, 4)
    pixels = out.permute(0, 2, 3, 1)[labelled]
    expected = ess_pixel_loss(pixels, target, classes, k=7, tau=head.tau, sampling="nearest", knn="torch", chunk=CHUNK,
                              ivf=None, negatives=negatives)
    assert head.loss(out, mask).item() == pytest.approx(expected.item(), rel=1e-6)


def reference_ivf(queries, base, centroids, nprobe, k, stored=None):
    """Brute force restricted to the classes filed in each query's nprobe nearest cells, ranked by the
    distance to `stored` (the index's copy of `base`; base itself by default)."""
    cell_of = torch.cdist(base.double(), centroids.double()).argmin(1)
    probes = torch.cdist(queries.double(), centroids.double()).argsort(dim=1, stable=True)[:, :nprobe]
    d = torch.cdist(queries.double(), (base if stored is None else stored).double())
    allowed = (cell_of[None, None, :] == probes[:, :, None]).any(1)
    d[~allowed] = float("inf")
    return d.argsort(dim=1, stable=True)[:, :k], allowed.sum(1)


@pytest.mark.parametrize("use_faiss", [False, pytest.param(True, marks=needs_faiss)])
def test_ivf_search_is_exact_within_the_probed_cells(use_faiss):
    g = torch.Generator().manual_seed(5)
    base = F.normalize(torch.randn(400, 8, generator=g), dim=1)
    queries = F.normalize(torch.randn(300, 8, generator=g), dim=1)
    ivf = ivf_search(16, 3, min_classes=0, use_faiss=use_faiss)
    ivf.update(base)
    got = ivf.search(queries, base, 6)
    # faiss on the CPU stores float16 codes of the embeddings and ranks by them
    stored = base.half().float() if use_faiss else base
    expected, reachable = reference_ivf(queries, base, ivf.centroids, 3, 6, stored)
    full = reachable >= 6  # rows whose probed cells hold k classes; the others fall back to exact search
    assert full.float().mean() > 0.9
    same = (got[full] == expected[full]).all(1).float().mean()
    assert same > 0.99  # float32 vs float64 ties aside
    exact = knn_torch(queries, base, 6, CHUNK)
    assert torch.equal(got[~full], exact[~full])
    assert (got >= 0).all() and recall_at_k(got, exact) > 0.8


@needs_faiss
def test_ivf_keeps_float32_lists_beyond_float16_range():
    """Embeddings that float16 cannot hold (an unnormalised run) are filed as they are, not as infinities."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(400, 8, generator=g) * 1e5
    queries = torch.randn(300, 8, generator=g) * 1e5
    ivf = ivf_search(16, 3, min_classes=0, use_faiss=True)
    ivf.update(base)
    got = ivf.search(queries, base, 6)
    expected, reachable = reference_ivf(queries, base, ivf.centroids, 3, 6)
    full = reachable >= 6
    assert full.float().mean() > 0.9 and (got[full] == expected[full]).all(1).float().mean() > 0.99


def test_ivf_rebuilds_every_n_updates_and_refiles_moved_embeddings():
    g = torch.Generator().manual_seed(6)
    base = torch.randn(300, 4, generator=g)
    ivf = ivf_search(10, 2, 3, min_classes=0, use_faiss=False)
    ivf.update(base)
    first = ivf.centroids
    moved = base + 0.5
    ivf.update(moved)
    ivf.update(moved)
    assert ivf.centroids is first  # not yet due
    # The kept cells hold the current embeddings: a query on a moved class finds it.
    assert torch.equal(ivf.search(moved[:50], moved, 1)[:, 0], torch.arange(50))
    ivf.update(moved)
    assert ivf.centroids is not first


def test_ivf_falls_back_to_exact_where_it_cannot_win():
    g = torch.Generator().manual_seed(7)
    base, queries = torch.randn(50, 4, generator=g), torch.randn(20, 4, generator=g)
    ivf = ivf_search(8, 2)  # 50 classes < IVF_MIN_CLASSES
    assert ivf.exact(50)
    ivf.update(base)
    assert ivf.centroids is None and torch.equal(ivf.search(queries, base, 5), knn_torch(queries, base, 5, CHUNK))
    assert ivf_search(8, 8, min_classes=0).exact(50)


def test_ess_head_with_ivf_trains_and_predicts_exactly():
    torch.manual_seed(0)
    head = ess_head(8, 300, embed_dim=6, knn="ivf", nlist=12, nprobe=3, knn_stride=2)
    head.ivf.min_classes = 0
    head.ivf.prefer_faiss = False
    out = head(torch.randn(2, 8, 4, 4), (16, 16))
    loss = head.loss(out, torch.randint(0, 301, (2, 16, 16)))
    loss.backward()
    assert torch.isfinite(loss) and head.ivf.updates == 1 and head.ivf.centroids is not None
    flat = out.detach().permute(0, 2, 3, 1).reshape(-1, 6)
    assert torch.equal(head.predict(out.detach()).flatten() - 1, knn_torch(flat, head.class_embeddings(), 1, CHUNK)[:, 0])


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("knn", ["torch", "faiss"])
def test_ess_prediction_is_the_nearest_class_in_either_memory_layout(normalize, knn):
    if knn == "faiss" and not faiss_available():
        pytest.skip("faiss not installed")
    torch.manual_seed(8)
    head = ess_head(4, 23, embed_dim=5, normalize=normalize, knn=knn, chunk=100)
    out = head(torch.randn(2, 4, 7, 9), (14, 18)).detach()
    assert out.is_contiguous(memory_format=torch.channels_last)
    flat = out.permute(0, 2, 3, 1).reshape(-1, 5).double()
    expected = torch.cdist(flat, head.class_embeddings().detach().double()).argmin(1).view(2, 14, 18) + 1
    assert torch.equal(head.predict(out), expected)
    assert torch.equal(head.predict(out.contiguous()), expected)  # channels-first input too


def test_auto_backend():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, 19) == "torch" and resolve_backend("auto", cuda, 19) == "torch"
    assert resolve_backend("auto", cpu, 10000) == ("faiss" if faiss_available() else "torch")
    assert resolve_backend("ivf", cpu, 10000, ivf_search(100, 20)) == "ivf"
    assert resolve_backend("ivf", cpu, 50, ivf_search(8, 2)) == "torch"  # the index would be exact here
    assert resolve_backend("faiss", cpu, 19) == "faiss" and resolve_backend("torch", cpu, 10000) == "torch"
    # On CUDA without faiss-gpu (faiss-cpu has no GPU indexes): torch, never a host copy through faiss-cpu.
    from ess.knn import faiss_uses_gpu
    if not faiss_uses_gpu(cuda):
        assert resolve_backend("auto", cuda, 10000) == "torch"
    from ess.ivf import ivf_uses_faiss
    assert ivf_uses_faiss(cpu) == faiss_available() and not ivf_uses_faiss(cpu, prefer=False)
    assert ivf_uses_faiss(cuda) == faiss_uses_gpu(cuda)  # faiss-cpu never serves CUDA embeddings


@pytest.mark.parametrize("kwargs,message", [({"knn_stride": 3}, "'knn_stride' must be one of 1, 2, 4, 8"),
                                            ({"knn": "annoy"}, "'knn' must be one of"), ({"k": 0}, "'k' must be"),
                                            ({"tau": 0}, "'tau' must be positive"), ({"nprobe": 0}, "'nprobe'"),
                                            ({"ivf_rebuild_every": 0}, "'ivf_rebuild_every'"), ({"nlist": 0}, "'nlist'"),
                                            ({"softmax_impl": "fused"}, "'softmax_impl' must be one of dense, chunked")])
def test_head_options_are_validated_once_by_the_model_arguments(kwargs, message):
    with pytest.raises(InputError, match=message):
        ModelArgs(head="ess", **kwargs)


def test_fused_ess_loss_equals_autograd_composition():
    from ess.losses import ess_pixel_loss_reference

    g = torch.Generator().manual_seed(9)
    classes = F.normalize(torch.randn(30, 6, generator=g), dim=1).requires_grad_()
    pixels = F.normalize(torch.randn(500, 6, generator=g), dim=1)
    target = torch.randint(0, 30, (500,), generator=g)
    pixels[:50] = classes.detach()[target[:50]]  # zero distance to the target: the clamped, gradient-free case
    pixels.requires_grad_()
    negatives = knn_excluding(pixels, classes, target, 7, "torch", CHUNK)
    got = ess_pixel_loss(pixels, target, classes, k=7, tau=20.0, sampling="nearest", knn="torch", chunk=CHUNK, ivf=None,
                         negatives=negatives)
    grads = torch.autograd.grad(got, (pixels, classes))
    candidates = torch.cat([target[:, None], negatives], 1)
    expected = ess_pixel_loss_reference(pixels, classes, candidates, 20.0)
    expected_grads = torch.autograd.grad(expected, (pixels, classes))
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("num_classes,k,rows", [(30, 7, 1 << 20), (30, 7, 37), (5, 7, 64), (2, 1, 1)])
@pytest.mark.parametrize("normalize", [True, False])
def test_dense_small_class_path_equals_the_gather_path(num_classes, k, rows, normalize):
    from ess.losses import _DenseNearestNegativesCrossEntropy, ess_pixel_loss_reference

    g = torch.Generator().manual_seed(num_classes + rows)
    classes = torch.randn(num_classes, 6, generator=g, dtype=torch.float64)
    pixels = torch.randn(400, 6, generator=g, dtype=torch.float64)
    if normalize:
        classes, pixels = F.normalize(classes, dim=1), F.normalize(pixels, dim=1)
    target = torch.randint(0, num_classes, (400,), generator=g)
    pixels[:40] = classes[target[:40]]  # zero distance to the target: the clamped, gradient-free case
    pixels[40:80] = classes[target[40:80]] + 1e-3 * torch.randn(40, 6, generator=g, dtype=torch.float64)
    k = min(k, num_classes - 1)
    negatives = knn_excluding(pixels, classes, target, k, "torch", CHUNK)
    reference = (pixels.clone().requires_grad_(), classes.clone().requires_grad_())
    expected = ess_pixel_loss_reference(*reference, torch.cat([target[:, None], negatives], 1), 20.0)
    expected_grads = torch.autograd.grad(expected, reference)
    inputs = (pixels.float().requires_grad_(), classes.float().requires_grad_())
    got = _DenseNearestNegativesCrossEntropy.apply(*inputs, target, k, 20.0, rows)
    grads = torch.autograd.grad(got, inputs)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_dense_path_is_taken_for_small_exact_torch_searches_only():
    from ess.losses import DENSE_MAX_CLASSES, uses_dense_path

    cpu = torch.device("cpu")
    assert uses_dense_path(19, "auto", cpu, None) and uses_dense_path(DENSE_MAX_CLASSES, "torch", cpu, None)
    assert not uses_dense_path(DENSE_MAX_CLASSES + 1, "auto", cpu, None)
    assert not uses_dense_path(19, "faiss", cpu, None)  # an explicit faiss backend keeps faiss
    assert uses_dense_path(19, "ivf", cpu, ivf_search(None, None))
    assert not uses_dense_path(5000, "ivf", cpu, ivf_search(64, None))


def test_loss_step_benchmark_reports_time_and_memory_of_every_row(tmp_path):
    import json

    from click.testing import CliRunner

    from benchmarks.loss_step import main

    out = tmp_path / "steps.json"
    result = CliRunner().invoke(main, ["--classes", "19", "--size", "1x8x8", "--heads", "softmax,ess", "--rounds", "2",
                                       "--no-knn-table", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["loss_steps"]
    assert [(r["head"], r["classes"]) for r in rows] == [("softmax", 19), ("ess", 19)]
    assert all("error" not in r and r["seconds"] > 0 and r["peak_mb"] >= 0 for r in rows), rows
    assert "time round 1 of 2" in result.output
