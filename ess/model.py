"""DeepLabV3+ (segmentation-models-pytorch encoder and decoder) with a swappable head.

`ess.config.ModelArgs` holds everything that defines the network; `Segmenter.from_args(args)`
builds it, and a checkpoint's `model_args` rebuild it with this module alone.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ess.config import ModelArgs
from ess.heads import EssHead, SoftmaxHead


def build_head(args: ModelArgs, in_channels: int) -> nn.Module:
    """The head that `args` describe (args.head, args.num_classes and its options), on `in_channels` features."""
    module = SoftmaxHead if args.head == "softmax" else EssHead
    return module(in_channels, args.num_classes, **args.head_options())


class PretrainedWeightsError(RuntimeError):
    """The ImageNet weights of the encoder could not be loaded (e.g. no network)."""


class Segmenter(nn.Module):
    """encoder -> decoder -> head; input of any size, output at input resolution."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, head: nn.Module, args: ModelArgs):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.head = head
        self.args = args

    @classmethod
    def from_args(cls, args: ModelArgs) -> Segmenter:
        """The DeepLabV3+ network that `args` describe, freshly initialised (or ImageNet-pretrained)."""
        import segmentation_models_pytorch as smp

        if args.head is None or args.num_classes is None:
            raise ValueError(f"model arguments need a head and num_classes, got head {args.head!r}, "
                             f"num_classes {args.num_classes}")
        try:
            net = smp.DeepLabV3Plus(encoder_name=args.encoder, encoder_weights="imagenet" if args.pretrained else None,
                                    encoder_output_stride=args.output_stride,
                                    decoder_atrous_rates=tuple(args.aspp_rates),
                                    decoder_aspp_dropout=args.aspp_dropout, classes=1)
        except Exception as e:  # smp fetches weights from the network; offline this fails in many ways
            if not args.pretrained:
                raise
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PretrainedWeightsError(f"could not load ImageNet weights for {args.encoder}: {reason}") from None
        for m in net.encoder.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = args.encoder_bn_momentum
        if args.norm == "gn":
            batchnorm_to_groupnorm(net.encoder)
            batchnorm_to_groupnorm(net.decoder)
        head = build_head(args, net.segmentation_head[0].in_channels)
        return cls(net.encoder, net.decoder, head, args)

    @property
    def output_stride(self) -> int:
        return self.args.output_stride

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The parameters by optimiser group: encoder, decoder (with the head's layers), class_embeddings."""
        learned = isinstance(self.head, EssHead) and isinstance(self.head.embeddings, nn.Parameter)
        embeddings = [self.head.embeddings] if learned else []
        taken = {id(p) for p in embeddings} | {id(p) for p in self.encoder.parameters()}
        groups = {"encoder": list(self.encoder.parameters()),
                  "decoder": [p for p in self.parameters() if id(p) not in taken]}
        if embeddings:
            groups["class_embeddings"] = embeddings
        return groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        # The decoder joins stride-4 and stride-16 features: pad (with the mean colour, 0 after
        # normalisation) to a multiple of the output stride and crop the output back.
        s = self.output_stride
        ph, pw = math.ceil(h / s) * s, math.ceil(w / s) * s
        if (ph, pw) != (h, w):
            x = F.pad(x, (0, pw - w, 0, ph - h))
        out = self.head(self.decoder(self.encoder(x)), (ph, pw))
        return out[..., :h, :w]

    def loss(self, output: torch.Tensor, mask: torch.Tensor, normalizer: float | None = None) -> torch.Tensor:
        """The head's loss; `normalizer` replaces the labelled-pixel count its per-pixel terms are divided by."""
        return self.head.loss(output, mask, normalizer)

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return self.head.predict(output)


def _groups(channels: int, most: int = 32) -> int:
    """The largest group count <= `most` that divides `channels`."""
    return max(g for g in range(1, most + 1) if channels % g == 0)


def batchnorm_to_groupnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a GroupNorm over the same channels, keeping its affine weights."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            gn = nn.GroupNorm(_groups(child.num_features), child.num_features, eps=child.eps, affine=child.affine)
            if child.affine:
                with torch.no_grad():
                    gn.weight.copy_(child.weight)
                    gn.bias.copy_(child.bias)
            setattr(module, name, gn)
        else:
            batchnorm_to_groupnorm(child)
    return module


def build_model(head: str, num_classes: int, **args) -> Segmenter:
    """Shorthand for `Segmenter.from_args(ModelArgs(head=head, num_classes=num_classes, **args))`."""
    return Segmenter.from_args(ModelArgs(head=head, num_classes=num_classes, **args))
