"""The two training losses: softmax cross-entropy and the ESS nearest-negatives loss.

ESS (embedding-based scalable segmentation) never forms a pixels x C or C x C matrix:
for each labelled pixel it gathers the target class embedding and k negatives found
by a chunked nearest-neighbour search, so its memory is flat in the number of classes.

With a knn stride s > 1 the search runs once per block of s pixels (1x2, 2x2 or 2x4, rows x
columns), for the block's mean embedding, and the block's pixels share its k+1 nearest
classes; each pixel drops its own target from them (or the farthest when its target is not
among them), so every pixel's loss stays a cross-entropy over its target and k other classes.

Under autocast (mixed precision) both losses compute in float32 whatever the autocast dtype: the
custom autograd Functions cast their inputs to float32 and run forward and backward with autocast
off (ess.device.float32_forward / float32_backward), and the searches and close pairs that pick the
negatives and the regulariser's pairs do the same (ess.knn, ess.pairs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ess.config import STRIDE_BLOCKS
from ess.device import float32_backward, float32_forward, full_precision
from ess.ivf import IvfSearch
from ess.knn import FAISS_MIN_CLASSES, drop_excluded, knn_excluding, resolve_backend, rows_per_block, search
from ess.pairs import close_pairs
# Up to this class count the exact nearest-negatives loss works on the whole pixels x C distance
# block (C scores per pixel) instead of gathering (k+1) x d class-embedding values per pixel.
# Loss forward + backward, 32768 pixels, d=12, k=7, 2 CPU cores, gather path (torch search) vs
# dense: 57 vs 22 ms at 19 classes, 93 vs 56 at 150, 115 vs 103 at 256.
DENSE_MAX_CLASSES = FAISS_MIN_CLASSES - 1  # where `auto` searches with torch (ess.knn.resolve_backend)
# From this class count the regulariser finds close class pairs by the exact cell-pruned search
# (ess.pairs.close_pairs) instead of a nearest-neighbour search of every class among all the others.
PRUNED_SEPARATION_MIN_CLASSES = 2048


def softmax_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (B, C, H, W) logits against a (B, H, W) mask of ids 1..C, 0 ignored."""
    target = mask.long().reshape(-1) - 1  # class id c -> channel c-1; unlabeled -> -1
    # (B*H*W, C) rows: a view when the logits are channels-last, as the softmax head makes them.
    rows = logits.float().permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    total = F.cross_entropy(rows, target, ignore_index=-1, reduction="sum")
    # An all-unlabeled batch gives 0, not the NaN of a mean over no pixels.
    return total / (target >= 0).sum().clamp_min(1)


def euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance along the last dim, with a finite gradient at zero distance."""
    return (a - b).pow(2).sum(-1).clamp_min(1e-12).sqrt()


def sample_negatives(pixels: torch.Tensor, class_emb: torch.Tensor, target: torch.Tensor, k: int, sampling: str,
                     knn: str, chunk: int, ivf: IvfSearch | None) -> torch.Tensor:
    """(P, k) class indices != target: the k nearest to each pixel, or k drawn uniformly."""
    num_classes = class_emb.shape[0]
    k = min(k, num_classes - 1)
    if sampling == "nearest":
        return knn_excluding(pixels, class_emb, target, k, knn, chunk, ivf)
    # random: uniform over the C-1 other classes: draw from 0..C-2 and step over the target.
    draw = torch.randint(0, max(num_classes - 1, 1), (pixels.shape[0], k), device=pixels.device)
    return draw + (draw >= target[:, None]).long()


def block_negatives(embeddings: torch.Tensor, labelled: torch.Tensor, target: torch.Tensor, class_emb: torch.Tensor,
                    k: int, knn_stride: int, knn: str, chunk: int, ivf: IvfSearch | None) -> torch.Tensor:
    """(P, k) nearest negatives of the labelled pixels, one search per block of `stride` pixels.

    embeddings (B, d, H, W); labelled (B, H, W) bool; target (P,) class indices of the labelled
    pixels in row-major order. Each block's mean embedding is searched for its k+1 nearest
    classes (only blocks holding a labelled pixel); each pixel keeps the k that are not its target.
    """
    bh, bw = STRIDE_BLOCKS[knn_stride]
    k = min(k, class_emb.shape[0] - 1)
    if k <= 0:
        return torch.empty(target.shape[0], 0, dtype=torch.int64, device=target.device)
    # A partial block at the bottom or right edge averages the pixels it has.
    means = F.avg_pool2d(embeddings.detach().float(), (bh, bw), ceil_mode=True)  # (B, d, H', W')
    grid_h, grid_w = means.shape[-2:]
    b, y, x = labelled.nonzero(as_tuple=True)
    block = (b * grid_h + torch.div(y, bh, rounding_mode="floor")) * grid_w + torch.div(x, bw, rounding_mode="floor")
    used, of_pixel = torch.unique(block, return_inverse=True)
    queries = means.permute(0, 2, 3, 1).reshape(-1, means.shape[1]).index_select(0, used)
    shared = search(queries, class_emb, k + 1, knn, chunk, ivf)  # (blocks, k+1)
    return drop_excluded(shared.index_select(0, of_pixel), target)


def ess_pixel_loss(pixels: torch.Tensor, target: torch.Tensor, class_emb: torch.Tensor, *, k: int, tau: float,
                   sampling: str, knn: str, chunk: int, ivf: IvfSearch | None,
                   negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over [target, k negatives] with logits -tau * distance.

    pixels (P, d) embeddings of labelled pixels, target (P,) class indices 0..C-1,
    class_emb (C, d). The search runs without gradient (or `negatives` (P, k) are given,
    e.g. by `block_negatives`); the (k+1) distances per pixel are recomputed with gradient,
    in float32, so both pixels and classes learn.
    """
    if pixels.shape[0] == 0:
        return pixels.sum() * 0 + class_emb.sum() * 0
    pixels = pixels.float()
    class_emb = class_emb.float()
    k = min(k, class_emb.shape[0] - 1)
    if negatives is None and sampling == "nearest" and uses_dense_path(class_emb.shape[0], knn, class_emb.device, ivf):
        rows = rows_per_block(chunk, class_emb.shape[0])
        return _DenseNearestNegativesCrossEntropy.apply(pixels, class_emb, target, k, float(tau), rows)
    if negatives is None:
        negatives = sample_negatives(pixels, class_emb, target, k, sampling, knn, chunk, ivf)
    candidates = torch.cat([target[:, None], negatives], dim=1)  # (P, k+1), target first
    return _NearestNegativesCrossEntropy.apply(pixels, class_emb, candidates, float(tau))


class _NearestNegativesCrossEntropy(torch.autograd.Function):
    """mean over pixels of CE([-tau * ||p - c_j||, j = candidates], target first), with a hand-written backward.

    The same function as gathering the candidates with index_select and composing `euclidean`
    and F.cross_entropy under autograd (`ess_pixel_loss_reference`), in a handful of kernels
    instead of some thirty: at small C the loss, not the search, dominated ESS's step.
    The class gradient is accumulated with index_add_, deterministic on the CPU.
    """

    @staticmethod
    @float32_forward
    def forward(ctx, pixels, class_emb, candidates, tau):
        gathered = class_emb.index_select(0, candidates.flatten()).view(*candidates.shape, -1)
        diff = pixels[:, None, :] - gathered  # (P, k+1, d)
        sq = (diff * diff).sum(-1)
        dist = sq.clamp_min(1e-12).sqrt()
        logits = dist * -tau
        lse = torch.logsumexp(logits, dim=1)
        ctx.save_for_backward(diff, dist, sq > 1e-12, logits, lse, candidates)
        ctx.tau, ctx.num_classes = tau, class_emb.shape[0]
        return (lse - logits[:, 0]).mean()

    @staticmethod
    @float32_backward
    def backward(ctx, grad):
        diff, dist, live, logits, lse, candidates = ctx.saved_tensors
        g = torch.exp(logits - lse[:, None])  # d CE / d logits = softmax - one-hot(target first)
        g[:, 0] -= 1
        # d logits / d dist = -tau; d dist / d diff = diff / dist (0 where the distance was clamped)
        coef = g * (grad * -ctx.tau / diff.shape[0]) / dist * live
        g_diff = diff * coef[..., None]
        g_pixels = g_diff.sum(1)
        g_classes = torch.zeros(ctx.num_classes, diff.shape[2], dtype=diff.dtype, device=diff.device)
        # d/dc_j = -d/d(p - c_j); negating the sum afterwards is exact and half the time of alpha=-1
        g_classes.index_add_(0, candidates.flatten(), g_diff.view(-1, diff.shape[2])).neg_()
        return g_pixels, g_classes, None, None


def uses_dense_path(num_classes: int, knn: str, device: torch.device, ivf: IvfSearch | None) -> bool:
    """Whether the exact nearest-negatives loss goes through the whole pixels x C distance block: where the
    search is torch's (ess.knn.resolve_backend) and C is at most DENSE_MAX_CLASSES."""
    return num_classes <= DENSE_MAX_CLASSES and resolve_backend(knn, device, num_classes, ivf) == "torch"


class _DenseNearestNegativesCrossEntropy(torch.autograd.Function):
    """`_NearestNegativesCrossEntropy` with the exact k nearest negatives found inside it, for small C.

    Per block of `rows` pixels one (rows, C) matmul gives ||c||^2 - 2 p.c for every class: the search
    (top-k with the target masked out) and the negatives' squared distances at once. The target's
    distance is computed from the difference p - c, so it stays accurate near zero, where training
    drives it. Backward assembles the gradients from a (rows, C) weight matrix W holding each
    pixel's k+1 coefficients: d/dp = p * sum_j W_pj - W C and d/dC = C * sum_p W_pj - W^T P,
    two matmuls instead of gathering and scattering (P, k+1, d) class embeddings.
    """

    @staticmethod
    @float32_forward
    def forward(ctx, pixels, class_emb, target, k, tau, rows):
        n, num_classes = pixels.shape[0], class_emb.shape[0]
        class_sq, class_t = (class_emb * class_emb).sum(1), class_emb.t()
        candidates = torch.empty(n, k + 1, dtype=torch.int64, device=pixels.device)
        candidates[:, 0] = target
        sq = torch.empty(n, k + 1, dtype=pixels.dtype, device=pixels.device)
        for start in range(0, n, rows):
            block = slice(start, start + rows)
            scores = torch.addmm(class_sq, pixels[block], class_t, alpha=-2.0)  # ||p - c||^2 - ||p||^2
            scores.scatter_(1, target[block, None], float("inf"))
            sq[block, 1:], candidates[block, 1:] = scores.topk(k, dim=1, largest=False, sorted=True)
        sq[:, 1:] += (pixels * pixels).sum(1, keepdim=True)
        own = pixels - class_emb.index_select(0, target)
        sq[:, 0] = (own * own).sum(1)
        dist = sq.clamp_min(1e-12).sqrt()
        logits = dist * -tau
        lse = torch.logsumexp(logits, dim=1)
        ctx.save_for_backward(pixels, class_emb, own, candidates, dist, sq > 1e-12, logits, lse)
        ctx.tau, ctx.rows, ctx.num_classes = tau, rows, num_classes
        return (lse - logits[:, 0]).mean()

    @staticmethod
    @float32_backward
    def backward(ctx, grad):
        pixels, class_emb, own, candidates, dist, live, logits, lse = ctx.saved_tensors
        g = torch.exp(logits - lse[:, None])
        g[:, 0] -= 1
        coef = g * (grad * -ctx.tau / pixels.shape[0]) / dist * live  # (P, k+1): d loss / d (p - c_j), per unit
        g_pixels = own * coef[:, :1]  # the target's term from the exact difference
        g_classes = torch.zeros_like(class_emb)
        weight_sums = torch.zeros(ctx.num_classes, dtype=pixels.dtype, device=pixels.device)
        for start in range(0, pixels.shape[0], ctx.rows):
            block = slice(start, start + ctx.rows)
            w = torch.zeros(coef[block].shape[0], ctx.num_classes, dtype=coef.dtype, device=coef.device)
            w.scatter_(1, candidates[block], coef[block])  # candidates are distinct within a row
            g_classes.addmm_(w.t(), pixels[block], alpha=-1)
            weight_sums += w.sum(0)
            w.scatter_(1, candidates[block, :1], 0.0)  # now the negatives' weights only
            g_pixels[block] += pixels[block] * coef[block, 1:].sum(1, keepdim=True) - w @ class_emb
        g_classes += class_emb * weight_sums[:, None]
        return g_pixels, g_classes, None, None, None, None


def ess_pixel_loss_reference(pixels: torch.Tensor, class_emb: torch.Tensor, candidates: torch.Tensor,
                             tau: float) -> torch.Tensor:
    """The ESS cross-entropy through autograd: what `_NearestNegativesCrossEntropy` computes."""
    gathered = class_emb.index_select(0, candidates.flatten()).view(*candidates.shape, -1)
    logits = -tau * euclidean(pixels[:, None, :], gathered)
    return F.cross_entropy(logits, torch.zeros_like(candidates[:, 0]))


def separation_loss(class_emb: torch.Tensor, margin: float, knn: str, chunk: int, ivf: IvfSearch | None) -> torch.Tensor:
    """Mean over classes of max(0, margin - distance to the nearest other class)."""
    num_classes = class_emb.shape[0]
    if num_classes < 2:
        return class_emb.sum() * 0
    class_emb = class_emb.float()
    if num_classes >= PRUNED_SEPARATION_MIN_CLASSES:
        # Only classes with another within the margin have a non-zero term; found exactly.
        rows, nearest = close_pairs(class_emb, margin, chunk)
        gaps = euclidean(class_emb.index_select(0, rows), class_emb.index_select(0, nearest))
        return F.relu(margin - gaps).sum() / num_classes  # no close pair: 0, still in the graph
    own = torch.arange(num_classes, device=class_emb.device)
    nearest = knn_excluding(class_emb, class_emb, own, 1, knn, chunk, ivf)[:, 0]
    return F.relu(margin - euclidean(class_emb, class_emb.index_select(0, nearest))).mean()


# ----------------------------------------------------------------------------------------------------------
# Softmax cross-entropy of bilinearly upsampled logits, without the full-resolution logits


def bilinear_taps(in_size: int, out_size: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """F.interpolate's bilinear weights (align_corners=False) along one axis, for an output of `out_size`.

    Output position i is l0[i] * input[i0[i]] + l1[i] * input[i1[i]]; computed in float32 as torch does.
    """
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    src = ((torch.arange(out_size, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(in_size - 1)
    i1 = (i0 + 1).clamp_max(in_size - 1)
    l1 = src - i0.float()
    return i0.to(device), i1.to(device), (1 - l1).to(device), l1.to(device)


def _height_weights(taps_h, rows: slice) -> tuple[slice, torch.Tensor]:
    """The input rows that output rows `rows` read, and the (R, n) matrix of their bilinear weights."""
    i0, i1, l0, l1 = (t[rows] for t in taps_h)
    lo, hi = int(i0.min()), int(i1.max()) + 1
    weights = torch.zeros(i0.shape[0], hi - lo, dtype=l0.dtype, device=l0.device)
    r = torch.arange(i0.shape[0], device=l0.device)
    weights.index_put_((r, i0 - lo), l0, accumulate=True).index_put_((r, i1 - lo), l1, accumulate=True)
    return slice(lo, hi), weights


def _upsample_height(low: torch.Tensor, rows: slice, taps_h) -> torch.Tensor:
    """Rows `rows` of the height-only upsampling of channels-last `low` (B, h, w, C): (B, R, w, C)."""
    src, weights = _height_weights(taps_h, rows)
    b, _, w, c = low.shape
    return torch.matmul(weights, low[:, src].reshape(b, -1, w * c)).view(b, -1, w, c)


def _upsample_width(part: torch.Tensor, out_width: int, width: int) -> torch.Tensor:
    """(B, R, w, C) -> (B, R, width, C): the first `width` of `out_width` bilinearly upsampled columns.

    F.interpolate on the channels-last layout; R rows to R rows is the identity (weights 1 and 0), so
    this is exactly the width pass of the full-size bilinear upsampling.
    """
    up = F.interpolate(part.permute(0, 3, 1, 2), size=(part.shape[1], out_width), mode="bilinear",
                       align_corners=False)
    return up.permute(0, 2, 3, 1)[:, :, :width]


@full_precision()
def upsample_rows(low: torch.Tensor, rows: slice, taps_h, size: tuple[int, int], width: int) -> torch.Tensor:
    """Rows `rows` (and the first `width` columns) of the bilinear upsampling to `size` of channels-last
    `low` (B, h, w, C), as (B, R, width, C); in `low`'s dtype under autocast too (the chunked prediction's
    argmax compares logits at float32 resolution)."""
    return _upsample_width(_upsample_height(low, rows, taps_h), size[1], width)


class _UpsampledCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of upsampled logits, rows at a time; backward recomputes each block."""

    @staticmethod
    @float32_forward
    def forward(ctx, low, target, size, rows_per_block):
        low_cl = low.float().permute(0, 2, 3, 1).contiguous()  # (B, h, w, C): one pixel's scores side by side
        taps_h = bilinear_taps(low.shape[2], size[0], low.device)
        height, width = target.shape[1:]
        total = low_cl.new_zeros(())
        for r in range(0, height, rows_per_block):
            rows = slice(r, min(r + rows_per_block, height))
            logits = upsample_rows(low_cl, rows, taps_h, size, width)
            t = target[:, rows]
            valid = t >= 0
            picked = logits.gather(3, t.clamp_min(0)[..., None])[..., 0]
            total += ((torch.logsumexp(logits, dim=3) - picked) * valid).sum()
        ctx.save_for_backward(low_cl, target)
        ctx.size, ctx.rows_per_block, ctx.dtype = size, rows_per_block, low.dtype
        return total

    @staticmethod
    @float32_backward
    def backward(ctx, grad_total):
        low_cl, target = ctx.saved_tensors
        taps_h = bilinear_taps(low_cl.shape[1], ctx.size[0], low_cl.device)
        height, width = target.shape[1:]
        grad_low = torch.zeros_like(low_cl)
        for r in range(0, height, ctx.rows_per_block):
            rows = slice(r, min(r + ctx.rows_per_block, height))
            with torch.enable_grad():  # the width pass's own backward; the height pass's is its matrix transposed
                part = _upsample_height(low_cl, rows, taps_h).requires_grad_()
                logits = _upsample_width(part, ctx.size[1], width)
            t = target[:, rows]
            g = torch.softmax(logits.detach(), dim=3)  # d CE / d logits = softmax - one-hot, on labelled pixels
            g.scatter_add_(3, t.clamp_min(0)[..., None], torch.full_like(g[..., :1], -1.0))
            g *= (t >= 0)[..., None] * grad_total
            (g_part,) = torch.autograd.grad(logits, part, g)
            src, weights = _height_weights(taps_h, rows)
            b, _, w, c = grad_low.shape
            grad_low[:, src] += torch.matmul(weights.t(), g_part.reshape(b, -1, w * c)).view(b, -1, w, c)
        return grad_low.permute(0, 3, 1, 2).to(ctx.dtype), None, None, None


def upsampled_softmax_loss(low_logits: torch.Tensor, mask: torch.Tensor, size: tuple[int, int],
                           chunk: int) -> torch.Tensor:
    """`softmax_loss` of F.interpolate(low_logits, size, bilinear)[..., :H, :W] for a (B, H, W) mask, exactly,
    without forming the full-resolution logits.

    Bilinear upsampling commutes with the 1x1 classifier, so the head's low-resolution logits
    (B, C, h, w) are upsampled a block of rows at a time (`chunk` elements at most), the
    cross-entropy summed, and the block recomputed in backward: memory O(B C h w + chunk).
    """
    height, width = mask.shape[1:]
    if height > size[0] or width > size[1]:
        raise ValueError(f"mask {height}x{width} is larger than the upsampled size {size[0]}x{size[1]}")
    target = mask.long() - 1  # class id c -> channel c-1; unlabeled -> -1
    rows = rows_per_block(chunk, low_logits.shape[0] * width * low_logits.shape[1])  # a row: B x W x C logits
    total = _UpsampledCrossEntropy.apply(low_logits, target, tuple(size), rows)
    return total / (target >= 0).sum().clamp_min(1)
