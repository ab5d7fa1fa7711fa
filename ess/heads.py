"""The two segmentation heads, interchangeable on top of the same decoder.

A head turns decoder features (B, F, h, w) into an output at input resolution and
knows its own loss and prediction:
    forward(features, size) -> output
    loss(output, mask, normalizer=None) -> scalar, mask (B, H, W) with 0 unlabeled and ids 1..C
    predict(output)         -> (B, H, W) int64 class ids 1..C
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ess.knn import knn
from ess.losses import ess_pixel_loss, separation_loss, softmax_loss

HEADS = ("softmax", "ess")


class SoftmaxHead(nn.Module):
    """The baseline: a C-way 1x1 classifier, logits upsampled bilinearly to the label size."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1)

    def forward(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # Channels-last memory keeps a pixel's C scores side by side, so the softmax over classes
        # reads them in place instead of transposing the full-resolution logits (3x faster on CPU).
        logits = self.classifier(features).contiguous(memory_format=torch.channels_last)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def loss(self, output: torch.Tensor, mask: torch.Tensor, normalizer: float | None = None) -> torch.Tensor:
        return softmax_loss(output, mask, normalizer)

    @torch.no_grad()
    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return output.argmax(1) + 1


class EssHead(nn.Module):
    """Embedding head: d-channel pixel embeddings and a learned C x d class-embedding matrix.

    The output holds d channels whatever C is; a pixel's class is its nearest class embedding.
    """

    def __init__(self, in_channels: int, num_classes: int, *, embed_dim: int, normalize: bool, k: int, tau: float,
                 margin: float, knn: str, sampling: str, reg: bool, chunk: int):
        """The loss settings are `ess.model.ModelArgs` fields (see their help there): k negatives per
        pixel, logits -tau * distance, the regulariser's margin and switch, the search backend and chunk."""
        super().__init__()
        self.num_classes = num_classes
        self.normalize = normalize
        self.k, self.tau, self.margin = k, tau, margin
        self.knn, self.sampling, self.reg, self.chunk = knn, sampling, reg, chunk
        self.projection = nn.Conv2d(in_channels, embed_dim, kernel_size=1)
        self.embeddings = nn.Parameter(torch.empty(num_classes, embed_dim).uniform_(-1.0, 1.0))

    def forward(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        emb = F.interpolate(self.projection(features), size=size, mode="bilinear", align_corners=False).float()
        return F.normalize(emb, dim=1) if self.normalize else emb

    def class_embeddings(self) -> torch.Tensor:
        """(C, d) class embeddings as compared with pixels: L2-normalised when the run normalises."""
        emb = self.embeddings.float()
        return F.normalize(emb, dim=1) if self.normalize else emb

    def loss(self, output: torch.Tensor, mask: torch.Tensor, normalizer: float | None = None) -> torch.Tensor:
        labelled = mask > 0
        pixels = output.permute(0, 2, 3, 1)[labelled]  # (P, d), labelled pixels only
        target = mask[labelled].long() - 1
        classes = self.class_embeddings()
        loss = ess_pixel_loss(pixels, target, classes, k=self.k, tau=self.tau, sampling=self.sampling,
                              knn=self.knn, chunk=self.chunk, normalizer=normalizer)
        if self.reg:
            loss = loss + separation_loss(classes, self.margin, self.knn, self.chunk)
        return loss

    @torch.no_grad()
    def predict(self, output: torch.Tensor) -> torch.Tensor:
        b, d, h, w = output.shape
        flat = output.permute(0, 2, 3, 1).reshape(-1, d)
        nearest = knn(flat, self.class_embeddings(), 1, self.knn, self.chunk)[:, 0]
        return nearest.view(b, h, w) + 1
