"""The ESS loss and regulariser against brute-force references; the softmax loss against torch."""
import math

import pytest
import torch
import torch.nn.functional as F

from ess.config import ModelArgs
from conftest import ess_head
from ess.losses import ess_pixel_loss, sample_negatives, separation_loss, softmax_loss

CHUNK = ModelArgs.chunk


def reference_ess_loss(pixels, target, classes, k, tau):
    """Per pixel, in float64 with plain Python loops: all distances, drop the target, k nearest."""
    total = 0.0
    for x, t in zip(pixels.double(), target.tolist()):
        dist = [math.dist(x.tolist(), c.tolist()) for c in classes.double()]
        others = sorted((d, j) for j, d in enumerate(dist) if j != t)[:k]
        logits = [-tau * dist[t]] + [-tau * d for d, _ in others]
        top = max(logits)
        total += -(logits[0] - top - math.log(sum(math.exp(v - top) for v in logits)))
    return total / len(target)


def reference_separation(classes, margin):
    c = classes.double()
    d = torch.cdist(c, c)
    d.fill_diagonal_(float("inf"))
    return torch.clamp(margin - d.min(1).values, min=0).mean().item()


@pytest.mark.parametrize("knn", ["torch", "faiss"])
@pytest.mark.parametrize("normalize", [True, False])
def test_ess_loss_equals_brute_force(knn, normalize):
    g = torch.Generator().manual_seed(0)
    classes = torch.rand(23, 5, generator=g) * 2 - 1
    pixels = torch.randn(64, 5, generator=g)
    if normalize:
        classes, pixels = F.normalize(classes, dim=1), F.normalize(pixels, dim=1)
    target = torch.randint(0, 23, (64,), generator=g)
    pixels[:20] = classes[target[:20]] + 0.01 * torch.randn(20, 5, generator=g)  # target nearest: must be skipped
    got = ess_pixel_loss(pixels, target, classes, k=7, tau=20.0, sampling="nearest", knn=knn, chunk=CHUNK, ivf=None)
    assert got.item() == pytest.approx(reference_ess_loss(pixels, target, classes, 7, 20.0), rel=1e-5, abs=1e-6)


def test_ess_loss_with_fewer_classes_than_k():
    g = torch.Generator().manual_seed(1)
    classes, pixels = torch.randn(4, 3, generator=g), torch.randn(10, 3, generator=g)
    target = torch.randint(0, 4, (10,), generator=g)
    got = ess_pixel_loss(pixels, target, classes, k=7, tau=2.0, sampling="nearest", knn="torch", chunk=CHUNK, ivf=None)
    assert got.item() == pytest.approx(reference_ess_loss(pixels, target, classes, 3, 2.0), rel=1e-5)


@pytest.mark.parametrize("sampling", ["nearest", "random"])
def test_target_never_among_negatives(sampling):
    g = torch.Generator().manual_seed(2)
    classes = torch.randn(10, 4, generator=g)
    target = torch.randint(0, 10, (5000,), generator=g)
    pixels = classes[target] + 0.001 * torch.randn(5000, 4, generator=g)
    torch.manual_seed(0)
    neg = sample_negatives(pixels, classes, target, 7, sampling, "torch", CHUNK, None)
    assert neg.shape == (5000, 7)
    assert not (neg == target[:, None]).any()
    assert neg.min() >= 0 and neg.max() <= 9


def test_random_negatives_are_uniform_over_the_other_classes():
    torch.manual_seed(0)
    target = torch.full((20000,), 3)
    neg = sample_negatives(torch.zeros(20000, 2), torch.randn(6, 2), target, 5, "random", "torch", CHUNK, None)
    counts = torch.bincount(neg.flatten(), minlength=6).double()
    assert counts[3] == 0
    others = counts[[0, 1, 2, 4, 5]]
    expected = 20000 * 5 / 5
    assert ((others - expected).abs() / expected).max() < 0.03  # one sigma is 0.6% here


def test_separation_loss_equals_brute_force():
    g = torch.Generator().manual_seed(3)
    classes = F.normalize(torch.randn(50, 12, generator=g), dim=1)
    classes[7] = classes[3] + 0.01  # a close pair, inside the margin
    for margin in (0.2, 1.0, 5.0):
        assert separation_loss(classes, margin, "torch", CHUNK, None).item() == pytest.approx(reference_separation(classes, margin), rel=1e-5)
    assert separation_loss(classes[:1], 0.2, "torch", CHUNK, None).item() == 0.0


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("margin", [0.0, 0.2, 0.6, 3.0])
def test_pruned_close_pairs_equal_brute_force(normalize, margin):
    from ess.pairs import close_pairs

    g = torch.Generator().manual_seed(int(margin * 10) + normalize)
    classes = torch.randn(600, 12, generator=g)
    classes[:40] = classes[40:80] + 0.03 * torch.randn(40, 12, generator=g)  # close pairs across cells
    classes[80] = classes[81]  # a duplicate: distance 0
    if normalize:
        classes = F.normalize(classes, dim=1)
    rows, nearest = close_pairs(classes, margin, CHUNK, cells=85)
    _assert_nearest_within(classes, margin, rows, nearest)


@pytest.mark.parametrize("margin", [0.01, 0.2])
def test_pruned_close_pairs_across_cell_boundaries_equal_brute_force(margin):
    """Pairs straddling the bisector of two cell centres, where the pruning bounds are tightest."""
    from ess.pairs import close_pairs

    g = torch.Generator().manual_seed(11)
    classes = F.normalize(torch.randn(600, 12, generator=g), dim=1)
    centre = torch.linspace(0, 599, 85).round().long()  # the rows close_pairs(cells=85) centres its cells on
    a, b = centre[:-1], centre[1:]
    middle = (classes[a] + classes[b]) / 2
    step = (classes[b] - classes[a]) * (0.4 * margin / (classes[b] - classes[a]).norm(dim=1, keepdim=True))
    free = torch.ones(600, dtype=torch.bool)
    free[centre] = False
    slots = free.nonzero()[:, 0]
    classes[slots[:84]] = middle - step + 1e-7 * torch.randn(84, 12, generator=g)  # on a's side of the bisector
    classes[slots[84:168]] = middle + step  # on b's side, 0.8 margin away
    classes[slots[168]] = classes[a[0]]  # a duplicate of a centre
    rows, nearest = close_pairs(classes, margin, CHUNK, cells=85)
    _assert_nearest_within(classes, margin, rows, nearest)
    assert rows.numel() >= 168


def _assert_nearest_within(classes, margin, rows, nearest):
    """rows: exactly the rows with another within `margin` (float64 brute force); nearest: a nearest other."""
    d = torch.cdist(classes.double(), classes.double()).fill_diagonal_(float("inf"))
    gap, expected_nearest = d.min(1)
    expected_rows = (gap < margin).nonzero()[:, 0]
    assert torch.equal(rows, expected_rows)
    torch.testing.assert_close(d[rows, nearest], gap[rows])  # a nearest other (ties may pick either)


def test_separation_loss_over_pruned_pairs_equals_brute_force():
    from ess.losses import PRUNED_SEPARATION_MIN_CLASSES

    g = torch.Generator().manual_seed(5)
    classes = F.normalize(torch.rand(PRUNED_SEPARATION_MIN_CLASSES, 12, generator=g) * 2 - 1, dim=1)
    classes[:30] = F.normalize(classes[30:60] + 0.05 * torch.randn(30, 12, generator=g), dim=1)
    classes.requires_grad_()
    got = separation_loss(classes, 0.2, "torch", CHUNK, None)
    (grad,) = torch.autograd.grad(got, classes)
    d = torch.cdist(classes.detach().double(), classes.detach().double()).fill_diagonal_(float("inf"))
    nearest = d.argmin(1)
    expected = F.relu(0.2 - (classes - classes[nearest]).norm(dim=1)).mean()
    (expected_grad,) = torch.autograd.grad(expected, classes)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5) and expected.item() > 0
    torch.testing.assert_close(grad, expected_grad)


def test_gradients_reach_class_and_pixel_embeddings():
    torch.manual_seed(0)
    head = ess_head(16, 30, embed_dim=12, k=7)
    features = torch.randn(2, 16, 8, 8, requires_grad=True)
    out = head(features, (32, 32))
    mask = torch.randint(0, 31, (2, 32, 32))
    head.loss(out, mask).backward()
    grad = head.embeddings.grad
    assert grad is not None and torch.isfinite(grad).all()
    # Every class that is a target somewhere, or a negative, gets a gradient; most of the 30 here.
    assert (grad.abs().sum(1) > 0).sum() >= 20
    assert features.grad.abs().sum() > 0
    assert head.projection.weight.grad.abs().sum() > 0


def test_regulariser_adds_to_the_loss():
    torch.manual_seed(0)
    head = ess_head(8, 5, embed_dim=3, margin=5.0)  # every pair is inside a margin of 5
    out = head(torch.randn(1, 8, 4, 4), (8, 8))
    mask = torch.randint(1, 6, (1, 8, 8))
    with_reg = head.loss(out, mask)
    head.reg = False
    without = head.loss(out, mask)
    expected = reference_separation(head.class_embeddings().detach(), 5.0)
    assert (with_reg - without).item() == pytest.approx(expected, rel=1e-5)


def test_softmax_loss_ignores_unlabeled():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 6, 5, 7, generator=g)
    mask = torch.randint(0, 7, (2, 5, 7), generator=g)
    expected = F.cross_entropy(logits, mask - 1, ignore_index=-1)
    assert softmax_loss(logits, mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_all_unlabeled_batches_give_zero_not_nan():
    assert softmax_loss(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long)).item() == 0.0
    head = ess_head(4, 3, embed_dim=2, reg=False)
    out = head(torch.randn(1, 4, 2, 2), (4, 4))
    loss = head.loss(out, torch.zeros(1, 4, 4, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
