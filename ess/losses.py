"""The two training losses: softmax cross-entropy and the ESS nearest-negatives loss.

ESS (embedding-based scalable segmentation) never forms a pixels x C or C x C matrix:
for each labelled pixel it gathers the target class embedding and k negatives found
by a chunked nearest-neighbour search, so its memory is flat in the number of classes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ess.knn import DEFAULT_CHUNK, knn_excluding

SAMPLINGS = ("nearest", "random")


def softmax_loss(logits: torch.Tensor, mask: torch.Tensor, normalizer: float | None = None) -> torch.Tensor:
    """Cross-entropy of (B, C, H, W) logits against a (B, H, W) mask of ids 1..C, 0 ignored.

    Summed over the labelled pixels and divided by their count, or by `normalizer` when given.
    """
    target = mask.long().reshape(-1) - 1  # class id c -> channel c-1; unlabeled -> -1
    # (B*H*W, C) rows: a view when the logits are channels-last, as the softmax head makes them.
    rows = logits.float().permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    total = F.cross_entropy(rows, target, ignore_index=-1, reduction="sum")
    if normalizer is not None:
        return total / normalizer
    # An all-unlabeled batch gives 0, not the NaN of a mean over no pixels.
    return total / (target >= 0).sum().clamp_min(1)


def euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance along the last dim, with a finite gradient at zero distance."""
    return (a - b).pow(2).sum(-1).clamp_min(1e-12).sqrt()


def sample_negatives(pixels: torch.Tensor, class_emb: torch.Tensor, target: torch.Tensor, k: int,
                     sampling: str, knn: str, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """(P, k) class indices != target: the k nearest to each pixel, or k drawn uniformly."""
    num_classes = class_emb.shape[0]
    k = min(k, num_classes - 1)
    if sampling == "nearest":
        return knn_excluding(pixels, class_emb, target, k, knn, chunk)
    if sampling == "random":
        # Uniform over the C-1 other classes: draw from 0..C-2 and step over the target.
        draw = torch.randint(0, max(num_classes - 1, 1), (pixels.shape[0], k), device=pixels.device)
        return draw + (draw >= target[:, None]).long()
    raise ValueError(f"unknown sampling {sampling!r}; expected one of {', '.join(SAMPLINGS)}")


def ess_pixel_loss(pixels: torch.Tensor, target: torch.Tensor, class_emb: torch.Tensor, *, k: int,
                   tau: float, sampling: str, knn: str, chunk: int = DEFAULT_CHUNK,
                   normalizer: float | None = None) -> torch.Tensor:
    """Cross-entropy over [target, k negatives] with logits -tau * distance, averaged over
    the pixels (or summed and divided by `normalizer` when given).

    pixels (P, d) embeddings of labelled pixels, target (P,) class indices 0..C-1,
    class_emb (C, d). The search runs without gradient; the (k+1) distances per pixel
    are recomputed with gradient, in float32, so both pixels and classes learn.
    """
    if pixels.shape[0] == 0:
        return pixels.sum() * 0 + class_emb.sum() * 0
    pixels = pixels.float()
    class_emb = class_emb.float()
    negatives = sample_negatives(pixels, class_emb, target, k, sampling, knn, chunk)
    candidates = torch.cat([target[:, None], negatives], dim=1)  # (P, k+1), target first
    # index_select, not class_emb[candidates]: its backward (index_add_) is deterministic on CPU,
    # which exact resuming relies on; advanced indexing's accumulating backward is not.
    gathered = class_emb.index_select(0, candidates.flatten()).view(*candidates.shape, -1)
    logits = -tau * euclidean(pixels[:, None, :], gathered)
    if normalizer is not None:
        return F.cross_entropy(logits, torch.zeros_like(target), reduction="sum") / normalizer
    return F.cross_entropy(logits, torch.zeros_like(target))


def separation_loss(class_emb: torch.Tensor, margin: float, knn: str, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Mean over classes of max(0, margin - distance to the nearest other class)."""
    num_classes = class_emb.shape[0]
    if num_classes < 2:
        return class_emb.sum() * 0
    class_emb = class_emb.float()
    own = torch.arange(num_classes, device=class_emb.device)
    nearest = knn_excluding(class_emb, class_emb, own, 1, knn, chunk)[:, 0]
    return F.relu(margin - euclidean(class_emb, class_emb.index_select(0, nearest))).mean()
