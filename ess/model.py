"""DeepLabV3+ (segmentation-models-pytorch encoder and decoder) with a swappable head."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from cocolvis.io import InputError
from ess.heads import HEADS, EssHead, SoftmaxHead

ENCODERS = ("resnet18", "resnet50", "resnet101", "mobilenet_v2")
NORMS = ("bn", "gn")
ESS_OPTIONS = ("k", "tau", "margin", "knn", "sampling", "reg", "chunk", "knn_stride", "nlist", "nprobe",
               "ivf_rebuild_every")
SOFTMAX_OPTIONS = ("softmax_impl",)


class Segmenter(nn.Module):
    """encoder -> decoder -> head; input of any size, output at input resolution."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, head: nn.Module, output_stride: int = 16):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.head = head
        self.output_stride = output_stride

    @property
    def head_name(self) -> str:
        return "ess" if isinstance(self.head, EssHead) else "softmax"

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

    def loss(self, output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head.loss(output, mask)

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


def build_model(head: str, num_classes: int, *, encoder: str = "resnet50", embed_dim: int = 12, norm: str = "bn",
                normalize: bool = True, pretrained: bool = False, output_stride: int = 16,
                aspp_rates: tuple[int, ...] = (6, 12, 18), encoder_bn_momentum: float = 0.01,
                **head_options) -> Segmenter:
    """A DeepLabV3+ Segmenter with the `softmax` or `ess` head.

    `head_options` are the ESS loss settings (ESS_OPTIONS) and the softmax head's `softmax_impl`;
    each head ignores the other's.
    """
    import segmentation_models_pytorch as smp

    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {', '.join(HEADS)}")
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; expected one of {', '.join(ENCODERS)}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {', '.join(NORMS)}")
    unknown = set(head_options) - set(ESS_OPTIONS) - set(SOFTMAX_OPTIONS)
    if unknown:
        raise TypeError(f"unknown head options: {', '.join(sorted(unknown))}")
    try:
        net = smp.DeepLabV3Plus(encoder_name=encoder, encoder_weights="imagenet" if pretrained else None,
                                encoder_output_stride=output_stride, decoder_atrous_rates=tuple(aspp_rates), classes=1)
    except Exception as e:  # smp fetches weights from the network; offline this fails in many ways
        if not pretrained:
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(None, f"--pretrained: could not load ImageNet weights for {encoder} "
                               f"(no network or no weights available): {reason}") from None
    for m in net.encoder.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = encoder_bn_momentum
    if norm == "gn":
        batchnorm_to_groupnorm(net.encoder)
        batchnorm_to_groupnorm(net.decoder)
    channels = net.segmentation_head[0].in_channels
    if head == "softmax":
        head_module = SoftmaxHead(channels, num_classes, impl=head_options.get("softmax_impl", "dense"))
    else:
        ess_options = {k: v for k, v in head_options.items() if k in ESS_OPTIONS}
        head_module = EssHead(channels, num_classes, embed_dim=embed_dim, normalize=normalize, **ess_options)
    return Segmenter(net.encoder, net.decoder, head_module, output_stride)
