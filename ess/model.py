"""DeepLabV3+ (segmentation-models-pytorch encoder and decoder) with a swappable head.

`ModelArgs` holds everything that defines the network; `Segmenter.from_args(args)`
builds it, and a checkpoint's `model_args` rebuild it with this module alone.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ess import options
from ess.heads import HEADS, SOFTMAX_IMPLS, EssHead, SoftmaxHead
from ess.knn import BACKENDS, DEFAULT_CHUNK, DEFAULT_KNN
from ess.losses import SAMPLINGS, STRIDE_BLOCKS
from ess.options import option

ENCODERS = ("resnet18", "resnet50", "resnet101", "mobilenet_v2")
NORMS = ("bn", "gn")


@dataclass(frozen=True)
class ModelArgs:
    """Everything that defines the network, and nothing about training: saved in every checkpoint."""

    head: str | None = option(None, "softmax: C-way classifier; ess: d-dim embeddings + nearest class.", choices=HEADS)
    num_classes: int = option(0, "Number of classes C (taken from the training data).", low=0, cli=False)
    encoder: str = option("resnet50", "Encoder network.", choices=ENCODERS)
    norm: str = option("bn", "Normalisation layers: BatchNorm or GroupNorm.", choices=NORMS)
    pretrained: bool = option(False, "Start the encoder from ImageNet weights (needs network access).")
    output_stride: int = option(16, "Encoder output stride.", choices=(8, 16))
    aspp_rates: tuple[int, ...] = option((6, 12, 18), "ASPP dilation rates.", low=1, cli=False)
    aspp_dropout: float = option(0.5, "Dropout after the ASPP projection (segmentation-models-pytorch's value).",
                                 low=0, high=1, high_open=True)
    encoder_bn_momentum: float = option(0.01, "BatchNorm momentum of the encoder.", low=0, high=1)
    embed_dim: int = option(12, "ESS embedding dimension d.", low=1)
    normalize: bool = option(True, "L2-normalise pixel and class embeddings (--no-norm for the ablation).",
                             flag="--normalize/--no-norm")
    k: int = option(7, "ESS negatives per pixel.", low=1)
    tau: float = option(20.0, "ESS logit scale: logits = -tau * distance.", low=0, low_open=True)
    margin: float = option(0.2, "Margin of the class-separation regulariser.", low=0)
    reg: bool = option(True, "Class-separation regulariser on or off.")
    sampling: str = option("nearest", "Negatives: the nearest classes, or drawn uniformly at random.",
                           choices=SAMPLINGS)
    knn: str = option(DEFAULT_KNN, "Nearest-neighbour search backend.", choices=BACKENDS)
    knn_chunk: int = option(DEFAULT_CHUNK, "Elements of one pixels x classes distance block in the torch search.",
                            low=1)
    knn_stride: int = option(1, "Search once per block of this many pixels (1, 2: 1x2, 4: 2x2, 8: 2x4) and share "
                                "the block's negatives.", choices=tuple(STRIDE_BLOCKS))
    nlist: int | None = option(None, "IVF cells for --knn ivf [default: sqrt(C)].", low=1)
    nprobe: int | None = option(None, "IVF cells searched per query [default: nlist / 5].", low=1)
    ivf_rebuild_every: int = option(100, "Training steps between re-clusterings of the IVF index.", low=1)
    softmax_impl: str = option("dense", "Softmax loss and prediction: dense full-resolution logits, or chunked "
                                        "(the same values, never holding B x C x H x W logits).",
                               choices=SOFTMAX_IMPLS)

    def head_options(self) -> dict:
        """The keyword arguments of this head's module (SoftmaxHead or EssHead)."""
        if self.head == "softmax":
            return dict(impl=self.softmax_impl, chunk=self.knn_chunk)
        return dict(embed_dim=self.embed_dim, normalize=self.normalize, k=self.k, tau=self.tau, margin=self.margin,
                    knn=self.knn, sampling=self.sampling, reg=self.reg, chunk=self.knn_chunk,
                    knn_stride=self.knn_stride, nlist=self.nlist, nprobe=self.nprobe,
                    ivf_rebuild_every=self.ivf_rebuild_every)


def build_head(args: ModelArgs, in_channels: int) -> nn.Module:
    """The head that `args` describe (args.head, args.num_classes and its options), on `in_channels` features."""
    if args.head not in HEADS or args.num_classes < 1:
        raise ValueError(f"model arguments need a head and num_classes >= 1, got {args.head!r}, {args.num_classes}")
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

        args = options.updated(args, dataclasses.asdict(args), "model arguments")  # re-validate every field
        if args.head is None or args.num_classes < 1:
            raise ValueError(f"model arguments need a head and num_classes >= 1, got {args.head!r}, {args.num_classes}")
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
        embeddings = [self.head.embeddings] if isinstance(self.head, EssHead) else []
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
