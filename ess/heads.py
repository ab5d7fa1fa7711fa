"""The two segmentation heads, interchangeable on top of the same decoder.

A head turns decoder features (B, F, h, w) into an output at input resolution and
knows its own loss and prediction:
    forward(features, size) -> output
    loss(output, mask, normalizer=None) -> scalar, mask (B, H, W) with 0 unlabeled and ids 1..C;
                            per-pixel terms are a mean, or a sum / normalizer when one is given
    predict(output)         -> (B, H, W) int64 class ids 1..C
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ess import distributed
from ess.ivf import IvfSearch
from ess.knn import rows_per_block, search
from ess.losses import (bilinear_taps, block_negatives, ess_pixel_loss, separation_loss, softmax_loss,
                        upsample_rows, upsampled_softmax_loss)


@dataclass(frozen=True)
class UpsampledLogits:
    """The chunked softmax head's output: decoder-resolution logits standing for their bilinear upsampling.

    low (B, C, h, w) logits; size (H, W) they are upsampled to; crop (H', W') <= size, the
    top-left part that is the output (the model crops away its input padding with out[..., :H', :W']).
    """
    low: torch.Tensor
    size: tuple[int, int]
    crop: tuple[int, int]

    def __getitem__(self, key):
        simple = (isinstance(key, tuple) and len(key) == 3 and key[0] is Ellipsis
                  and all(isinstance(s, slice) and s.start in (None, 0) and s.step in (None, 1)
                          and (s.stop is None or s.stop >= 0) for s in key[1:]))
        if not simple:
            raise TypeError(f"UpsampledLogits supports only a top-left crop out[..., :H, :W], not {key!r}")
        h, w = (c if s.stop is None else min(c, s.stop) for c, s in zip(self.crop, key[1:]))
        return replace(self, crop=(h, w))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (*self.low.shape[:2], *self.crop)


def renormalized(mean_loss: torch.Tensor, mask: torch.Tensor, normalizer: float | None) -> torch.Tensor:
    """A mean over the labelled pixels of `mask` turned into their sum divided by `normalizer`.

    Distributed training passes the global batch's labelled-pixel count, so that every rank's
    loss is its share of one mean over the global batch. None keeps the local mean.
    """
    if normalizer is None:
        return mean_loss
    return mean_loss * ((mask > 0).sum() / normalizer)


class SoftmaxHead(nn.Module):
    """The baseline: a C-way 1x1 classifier, logits upsampled bilinearly to the label size.

    softmax_impl "dense" outputs the full-resolution logits; "chunked" outputs `UpsampledLogits` and
    computes the same cross-entropy and argmax a block of rows at a time (at most `chunk`
    logits at once), never holding B x C x H x W logits. The options are ess.config.ModelArgs
    fields of the same names, validated there.
    """

    def __init__(self, in_channels: int, num_classes: int, *, softmax_impl: str, chunk: int):
        super().__init__()
        self.num_classes, self.impl, self.chunk = num_classes, softmax_impl, chunk
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1)

    def forward(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor | UpsampledLogits:
        if self.impl == "chunked":
            return UpsampledLogits(self.classifier(features), tuple(size), tuple(size))
        # Channels-last memory keeps a pixel's C scores side by side, so the softmax over classes
        # reads them in place instead of transposing the full-resolution logits (3x faster on CPU).
        logits = self.classifier(features).contiguous(memory_format=torch.channels_last)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def loss(self, output: torch.Tensor | UpsampledLogits, mask: torch.Tensor,
             normalizer: float | None = None) -> torch.Tensor:
        if isinstance(output, UpsampledLogits):
            if tuple(mask.shape[1:]) != output.crop:
                raise ValueError(f"mask {tuple(mask.shape)} does not match output {output.shape}")
            loss = upsampled_softmax_loss(output.low, mask, output.size, self.chunk)
        else:
            loss = softmax_loss(output, mask)
        return renormalized(loss, mask, normalizer)

    @torch.no_grad()
    def predict(self, output: torch.Tensor | UpsampledLogits) -> torch.Tensor:
        if not isinstance(output, UpsampledLogits):
            return output.argmax(1) + 1
        low = output.low.float().permute(0, 2, 3, 1).contiguous()
        (b, c, _, _), (height, width) = output.low.shape, output.crop
        taps_h = bilinear_taps(low.shape[1], output.size[0], low.device)
        rows = rows_per_block(self.chunk, b * width * c)  # a row: B x W x C logits
        pred = torch.empty(b, height, width, dtype=torch.int64, device=low.device)
        for r in range(0, height, rows):
            block = slice(r, min(r + rows, height))
            pred[:, block] = upsample_rows(low, block, taps_h, output.size, width).argmax(3)
        return pred + 1


class EssHead(nn.Module):
    """Embedding head: d-channel pixel embeddings and a C x d class-embedding matrix.

    The output holds d channels whatever C is; a pixel's class is its nearest class embedding.
    Every option is required and is the ess.config.ModelArgs field of the same name, validated there
    (its help says what it does); `ess.model.build_head(ModelArgs(head="ess", ...), in_channels)`
    builds a head from them. With class_update "gradient" the class embeddings are a parameter the
    loss trains; with "prototype" they are a buffer that every training loss call moves towards the
    mean embedding of each class's labelled pixels (`update_prototypes`), with no gradient.
    """

    def __init__(self, in_channels: int, num_classes: int, *, embed_dim: int, normalize: bool, normalize_at: str,
                 class_update: str, proto_momentum: float, k: int, tau: float, margin: float, reg: bool,
                 sampling: str, knn: str, chunk: int, knn_stride: int, nlist: int | None, nprobe: int | None,
                 ivf_rebuild_every: int):
        super().__init__()
        self.num_classes = num_classes
        self.normalize, self.normalize_at = normalize, normalize_at
        self.k, self.tau, self.margin = k, tau, margin
        self.knn, self.sampling, self.reg, self.chunk, self.knn_stride = knn, sampling, reg, chunk, knn_stride
        # The index is search state, not a parameter: rebuilt from the embeddings, never checkpointed.
        self.ivf = IvfSearch(nlist, nprobe, ivf_rebuild_every, chunk) if knn == "ivf" else None
        self.projection = nn.Conv2d(in_channels, embed_dim, kernel_size=1)
        start = torch.empty(num_classes, embed_dim).uniform_(-1.0, 1.0)
        self.proto_momentum = proto_momentum if class_update == "prototype" else None
        if self.proto_momentum is None:
            self.embeddings = nn.Parameter(start)
        else:
            self.register_buffer("embeddings", start)
            self.register_buffer("proto_batches", torch.zeros(num_classes, dtype=torch.int64))  # batches seen per class

    def forward(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # Channels-last, as in SoftmaxHead: a pixel's d values side by side, so the normalisation, the
        # loss's gather of the labelled pixels and the prediction read them in place.
        low = self.projection(features).contiguous(memory_format=torch.channels_last)
        if self.normalize and self.normalize_at == "decoder":  # unit length at decoder resolution, then upsampled
            low = F.normalize(low.float(), dim=1)
        emb = F.interpolate(low, size=size, mode="bilinear", align_corners=False).float()
        return F.normalize(emb, dim=1) if self.normalize and self.normalize_at == "output" else emb

    def class_embeddings(self) -> torch.Tensor:
        """(C, d) class embeddings as compared with pixels: L2-normalised when the run normalises."""
        emb = self.embeddings.float()
        if self.normalize:
            return F.normalize(emb, dim=1)
        return emb if self.proto_momentum is None else emb.clone()  # update_prototypes changes the buffer in place

    def loss(self, output: torch.Tensor, mask: torch.Tensor, normalizer: float | None = None) -> torch.Tensor:
        labelled = mask > 0
        pixels = output.permute(0, 2, 3, 1)[labelled]  # (P, d), labelled pixels only
        target = mask[labelled].long() - 1
        classes = self.class_embeddings()
        if self.ivf is not None:
            self.ivf.update(classes)  # one update per training step; re-clusters every ivf_rebuild_every
        negatives = None
        if self.sampling == "nearest" and self.knn_stride > 1 and pixels.shape[0]:
            negatives = block_negatives(output, labelled, target, classes, self.k, self.knn_stride, self.knn,
                                        self.chunk, self.ivf)
        loss = ess_pixel_loss(pixels, target, classes, k=self.k, tau=self.tau, sampling=self.sampling,
                              knn=self.knn, chunk=self.chunk, ivf=self.ivf, negatives=negatives)
        loss = renormalized(loss, mask, normalizer)
        if self.proto_momentum is not None:
            if self.training:
                self.update_prototypes(pixels.detach(), target)
        elif self.reg:  # prototypes take no gradient: the regulariser would have nothing to move
            loss = loss + separation_loss(classes, self.margin, self.knn, self.chunk, self.ivf)
        return loss

    @torch.no_grad()
    def update_prototypes(self, pixels: torch.Tensor, target: torch.Tensor) -> None:
        """Move each class embedding towards the mean of this batch's (P, d) labelled pixel embeddings of it.

        A class seen in its n-th batch takes momentum min(proto_momentum, 1 - 1/n): its embedding is the
        plain mean of its batch means until it has been seen in 1 / (1 - proto_momentum) batches, then an
        exponential moving average (ProtoSeg's prototype update, which starts from random prototypes
        instead). One scatter-add per class, memory O(C d); under torchrun the sums and counts are those
        of the global batch, so every process keeps the same embeddings.
        """
        pixels = F.normalize(pixels.float(), dim=1) if self.normalize else pixels.float()
        sums = torch.zeros_like(self.embeddings, dtype=torch.float32).index_add_(0, target, pixels)
        counts = torch.bincount(target, minlength=self.num_classes).to(sums.dtype)
        sums, counts = distributed.all_reduce_sum(sums), distributed.all_reduce_sum(counts)
        seen = counts > 0
        self.proto_batches += seen
        momentum = torch.clamp(1 - 1 / self.proto_batches[seen].to(sums.dtype), max=self.proto_momentum)[:, None]
        mean = sums[seen] / counts[seen, None]
        updated = momentum * self.embeddings[seen].float() + (1 - momentum) * mean
        self.embeddings[seen] = (F.normalize(updated, dim=1) if self.normalize else updated).to(self.embeddings.dtype)

    @torch.no_grad()
    def predict(self, output: torch.Tensor) -> torch.Tensor:
        """The nearest class embedding of every pixel, by exact search whatever the loss's backend."""
        b, d, h, w = output.shape
        classes = self.class_embeddings()
        flat = output.permute(0, 2, 3, 1).reshape(-1, d)  # a view of the channels-last output
        # Without the index, "ivf" resolves to the exact search `auto` would pick (ess.knn.resolve_backend).
        return search(flat, classes, 1, self.knn, self.chunk)[:, 0].view(b, h, w) + 1
