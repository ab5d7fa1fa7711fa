"""Lower bounds on the memory of a training step and of an inference, checked before anything is allocated.

Every size an option sets (--batch, --crop, --scale-max, --embed-dim, --k, --chunk) or a file
claims (an image's header, the class count) reaches an allocator. The estimates here are lower
bounds in bytes, each the sum of a few parts, so a refusal never stops work that would fit:

  training, per process (B = --batch / processes, P = B x crop^2 pixels, C classes)
    activations    P x (20 + ACTIVATION_BYTES[encoder]): the input and labels, and what the encoder
                   and decoder keep for backward (halved under mixed precision)
    augmentation   the largest image of the build x scale_max^2 x 5 bytes (its RGB and label map rescaled)
    parameters     4 bytes x 3 (weights, gradients, momentum) x the network's parameters, with the
                   head's: 256 x C (softmax) or (C + 256) x d (ESS)
    head           softmax: P x C x 8 (the logits and their gradient; chunked: one --chunk block and the
                   logits at the decoder's stride 4); ESS: P x d x 8 (the embeddings, normalised) plus, per pixel, its
                   k' + 1 candidate classes (k' = min(k, C - 1)): 12 bytes each, and 8 d more where the
                   loss gathers their embeddings (above DENSE_MAX_CLASSES classes, or another search),
                   or else one --chunk block of distances
  inference, per image of P pixels
    P x (INFERENCE_BYTES + the head's output: 8 C for the dense softmax, 8 d for ESS) + 4 x parameters

The estimate is compared with what the device can still allocate (`segkit.memory.available_bytes`
on the CPU, the free memory of a CUDA device), and the largest part is named in the one-line refusal.
"""
from __future__ import annotations

import torch

from ess.config import ModelArgs, TrainConfig
from ess.device import precision
from ess.losses import uses_dense_path
from segkit.memory import available_bytes, check_fits, gigabytes

ACTIVATION_BYTES = {"resnet18": 900, "resnet50": 2400, "resnet101": 3200, "mobilenet_v2": 2300}
"""Bytes per input pixel the encoder and decoder keep for backward in float32 at output stride 16 (measured
with torch.autograd.graph.saved_tensors_hooks, parameters excluded; stride 8 keeps more)."""
NETWORK_PARAMETERS = {"resnet18": 12.3e6, "resnet50": 26.7e6, "resnet101": 45.7e6, "mobilenet_v2": 4.4e6}
"""Parameters of DeepLabV3+ on each encoder, without the head."""
INFERENCE_BYTES = 150
"""Bytes per input pixel an inference holds at least: the input and the decoder's stride-4 features."""
DECODER_CHANNELS = 256
DECODER_STRIDE = 4
"""DeepLabV3+'s decoder output, the features every head reads, is at 1/4 of the input's resolution."""


def device_available(device: torch.device) -> int:
    """Bytes the device can still allocate: a CUDA device's free memory, else the process's (segkit.memory)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_bytes()


def _head_parameters(args: ModelArgs) -> float:
    c = args.num_classes
    return DECODER_CHANNELS * c if args.head == "softmax" else (c + DECODER_CHANNELS) * args.embed_dim


def _head_training(args: ModelArgs, pixels: int, size: str, device: torch.device) -> tuple[str, float]:
    """(what sets it, bytes) of the head's part of a training step on `pixels` pixels (`size` says how many)."""
    c = args.num_classes
    if args.head == "softmax":
        if args.softmax_impl == "chunked":
            stride_logits = pixels / DECODER_STRIDE ** 2 * c * 8  # the classifier's logits and their gradient
            return f"--chunk {args.chunk} and the logits of {c} classes for {size}", \
                min(args.chunk, pixels * c) * 4 + stride_logits
        return f"the logits of {c} classes for {size}", pixels * c * 8.0
    k = max(min(args.k, c - 1), 0)
    dense = uses_dense_path(c, args.knn, device, None)
    per_candidate = 12 + (0 if dense else 8 * args.embed_dim)
    block = min(args.chunk, pixels * c) * 4 if dense else 0
    return (f"--k {args.k} negatives ({k} of {c} classes) and --embed-dim {args.embed_dim} for {size}",
            pixels * (8.0 * args.embed_dim + (k + 1) * per_candidate) + block)


def training_parts(args: ModelArgs, train: TrainConfig, device: torch.device, world: int,
                   largest_image: int) -> dict[str, tuple[str, float]]:
    """part -> (the values that set it, bytes at least) of one training step of one process."""
    pixels = train.batch // world * train.crop ** 2
    size = f"--batch {train.batch} x --crop {train.crop}" + (f" over {world} processes" if world > 1 else "")
    halved = 0.5 if precision(device, train.amp).enabled else 1.0  # --amp's default follows the device
    activation = ACTIVATION_BYTES.get(args.encoder, max(ACTIVATION_BYTES.values())) * halved
    parameters = NETWORK_PARAMETERS.get(args.encoder, max(NETWORK_PARAMETERS.values())) + _head_parameters(args)
    head_size = f"--embed-dim {args.embed_dim}" if args.head == "ess" else f"{args.num_classes} classes"
    return {
        "activations": (f"the activations of {size}", pixels * (20 + activation)),
        "augmentation": (f"the largest image rescaled by --scale-max {train.scale_max}",
                         largest_image * train.scale_max ** 2 * 5),
        "parameters": (f"the parameters of {args.encoder} and a head of {head_size}", 12 * parameters),
        "head": _head_training(args, pixels, size, device),
    }


def _check(parts: dict[str, tuple[str, float]], what: str, device: torch.device, source: object = None) -> None:
    """Refuse when the parts add up to more than the device has, naming the largest part."""
    total = sum(bytes_ for _, bytes_ in parts.values())
    described, largest = max(parts.values(), key=lambda part: part[1])
    check_fits(source, what, total, device_available(device), "CUDA memory" if device.type == "cuda" else "memory",
               detail=f"most of it {described} ({gigabytes(largest)})")


def check_training_memory(args: ModelArgs, train: TrainConfig, device: torch.device, world: int,
                          images: list[dict]) -> None:
    """Refuse, in one line, a training step that cannot fit (`args` with the data's num_classes, `images` the
    build's image records)."""
    largest = max((record["height"] * record["width"] for record in images), default=0)
    _check(training_parts(args, train, device, world, largest), "training", device, source="command line")


def inference_bytes(args: ModelArgs, pixels: int) -> dict[str, tuple[str, float]]:
    """part -> (what sets it, bytes at least) of the inference of one image of `pixels` pixels."""
    dense = args.head == "softmax" and args.softmax_impl == "dense"
    per_pixel = 8 * (args.num_classes if dense else 0 if args.head == "softmax" else args.embed_dim)
    parameters = NETWORK_PARAMETERS.get(args.encoder, max(NETWORK_PARAMETERS.values())) + _head_parameters(args)
    return {"activations": (f"the activations of its {pixels} pixels", pixels * (INFERENCE_BYTES + per_pixel)),
            "parameters": (f"the parameters of {args.encoder}", 4 * parameters)}


def check_inference_memory(args: ModelArgs, height: int, width: int, device: torch.device,
                           source: object = None) -> None:
    """Refuse, in one line naming `source`, an image whose inference cannot fit."""
    _check(inference_bytes(args, height * width), f"inference of a {height}x{width} image", device, source)


def check_eval_memory(args: ModelArgs, images: list[dict], crop: int | None, device: torch.device,
                      source: object) -> None:
    """Refuse an evaluation whose largest image (or its `crop` x `crop` centre crop) cannot fit."""
    if crop:
        height = width = crop
    else:
        height, width = max(((r["height"], r["width"]) for r in images), key=lambda s: s[0] * s[1], default=(0, 0))
    check_inference_memory(args, height, width, device, source)
