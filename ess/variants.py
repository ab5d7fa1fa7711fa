"""The named variants: a head and the model options it changes, with how tables and figures show it.

One registry for `bench study` (which variants it trains by default), `bench timing` (which it
times by default) and `python -m benchmarks.loss_step` (its rows). A variant changes ess.config.ModelArgs
fields and, for the published code's optimiser, how the class embeddings are trained (CLASS_SIDE);
everything else comes from the run's configuration (a preset, a YAML file, flags), so a study's
variants share data, iterations, seed, batch and the network's schedule. Imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from ess.config import ModelArgs
from segkit.errors import InputError

# The training settings a variant may change: the class embeddings' optimiser, and min_lr, the published
# code's floor of 1e-6 under every group's LR (it binds only in the last 0.002% of a schedule from LR 0.02).
CLASS_SIDE = ("embed_optimizer", "embed_momentum", "embed_weight_decay", "embed_poly_power", "embed_lr_mult", "min_lr")


@dataclass(frozen=True)
class Variant:
    name: str
    options: dict  # ModelArgs fields it sets (`head` always among them), and CLASS_SIDE training settings
    label: str  # how tables and legends name it
    color: str  # its matplotlib colour
    study: bool = False  # trained by `bench study` unless --variants says otherwise
    timing: bool = False  # timed by `bench timing` unless --heads says otherwise
    speed: bool = False  # a speed set-up: a row of the loss-step benchmark

    @property
    def model_options(self) -> dict:
        """The options that are ModelArgs fields: what a speed measurement builds."""
        return {k: v for k, v in self.options.items() if k in ModelArgs.__dataclass_fields__}


VARIANTS = {v.name: v for v in (
    Variant("softmax", {"head": "softmax"}, "softmax", "#d62728", study=True, timing=True, speed=True),
    Variant("softmax-chunked", {"head": "softmax", "softmax_impl": "chunked"}, "softmax (chunked loss)", "#ff7f0e",
            timing=True, speed=True),
    Variant("ess", {"head": "ess"}, "ESS", "#1f77b4", study=True, timing=True, speed=True),
    Variant("ess-published", {"head": "ess", "normalize_at": "decoder", "embed_optimizer": "sgd", "embed_momentum": 0.9,
                              "embed_weight_decay": 1e-4, "embed_poly_power": 0.95, "embed_lr_mult": 1.0,
                              "min_lr": 1e-6}, "ESS, published code's choices", "#393b79", study=True),
    Variant("ess-proto", {"head": "ess", "class_update": "prototype"}, "ESS, prototype class embeddings", "#e7969c",
            study=True),
    Variant("ess-proto-fast", {"head": "ess", "class_update": "prototype", "proto_momentum": 0.9},
            "ESS, prototypes with momentum 0.9", "#31a354", study=True),
    Variant("ess-random", {"head": "ess", "sampling": "random"}, "ESS, random negatives", "#8c564b", study=True),
    Variant("ess-no-norm", {"head": "ess", "normalize": False}, "ESS, no normalisation", "#e377c2", study=True),
    Variant("ess-no-reg", {"head": "ess", "reg": False}, "ESS, no regulariser", "#7f7f7f", study=True),
    Variant("softmax-gn", {"head": "softmax", "norm": "gn"}, "softmax, GroupNorm", "#ff9896", study=True),
    Variant("ess-gn", {"head": "ess", "norm": "gn"}, "ESS, GroupNorm", "#aec7e8", study=True),
    Variant("ess-stride4", {"head": "ess", "knn_stride": 4}, "ESS, stride 4", "#17becf", study=True, speed=True),
    Variant("ess-stride8", {"head": "ess", "knn_stride": 8}, "ESS, stride 8", "#bcbd22", study=True),
    Variant("ess-ivf", {"head": "ess", "knn": "ivf"}, "ESS, IVF", "#9467bd", speed=True),
    Variant("ess-stride4-ivf", {"head": "ess", "knn_stride": 4, "knn": "ivf"}, "ESS, stride 4 + IVF", "#2ca02c",
            timing=True, speed=True),
)}


def default(role: str) -> list[str]:
    """The variants with `role` ("study", "timing" or "speed") set, in registry order."""
    return [name for name, v in VARIANTS.items() if getattr(v, role)]


def parse(text: str | None, role: str, flag: str) -> list[str]:
    """Variant names from a comma-separated list (None: the `role` defaults), in the order given, checked."""
    if text is None:
        return default(role)
    names = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise InputError(None, f"{flag}: unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    if not names:
        raise InputError(None, f"{flag}: give at least one variant")
    return names
