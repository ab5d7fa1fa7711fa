"""A run's configuration: defaults < preset < YAML file < command-line flags. Imports no torch.

A run's configuration is two typed parts: `ModelArgs` (what the network is, saved in every
checkpoint) and `TrainConfig` (data, optimisation, augmentation, bookkeeping). Their fields
are the one source of every option's type, default, bounds, choices and `--help` text, and
each is validated once, when it is constructed: the heads, losses and searches take the
values as they are. YAML files and flags use one flat namespace (`k: 7`, `lr: 0.01`);
`ess/configs/<preset>.yaml` holds the named presets, a YAML file may start from another with
`base: <preset>`, and the resolved configuration is saved flat as RUN/config.yaml.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from cocolvis.vocab import MAX_CLASSES
from segkit.errors import InputError
from segkit.io import write_text
from ess import options
from ess.options import option

HEADS = ("softmax", "ess")
ENCODERS = ("resnet18", "resnet50", "resnet101", "mobilenet_v2")
NORMS = ("bn", "gn")
SOFTMAX_IMPLS = ("dense", "chunked")
SAMPLINGS = ("nearest", "random")
NORMALIZE_AT = ("output", "decoder")
CLASS_UPDATES = ("gradient", "prototype")
# auto: see ess.knn.resolve_backend, the one place that says what it means.
KNN_BACKENDS = ("auto", "torch", "faiss", "ivf")
# knn stride -> block (rows, columns) of pixels that share one search
STRIDE_BLOCKS = {1: (1, 1), 2: (1, 2), 4: (2, 2), 8: (2, 4)}
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
# How `ess eval` reads out an ESS network's classes: its learned class embeddings, or each class's mean pixel
# embedding over the training data (ess.readout).
READOUTS = ("learned", "pixel-mean")


def eval_dir(run_dir: str | os.PathLike, readout: str = "learned") -> Path:
    """Where `ess eval` writes by default: RUN/eval, or RUN/eval-<readout> for the other readout."""
    return Path(run_dir) / ("eval" if readout == "learned" else f"eval-{readout}")
# Hard limits on sizes; what depends on the machine's memory is checked by ess.memory before allocation.
MAX_CROP = 8192
MAX_EMBED_DIM = 1 << 16
MAX_K = MAX_CLASSES  # negatives: no more than a build's classes (15-bit ids)
MAX_ITERS = 10 ** 9
MAX_WORKERS = 256


@dataclass(frozen=True)
class ModelArgs:
    """Everything that defines the network, and nothing about training: saved in every checkpoint."""

    head: str | None = option(None, "softmax: C-way classifier; ess: d-dim embeddings + nearest class.", choices=HEADS)
    num_classes: int | None = option(None, "Number of classes C (taken from the training data).", low=1, cli=False)
    encoder: str = option("resnet50", "Encoder network.", choices=ENCODERS)
    norm: str = option("bn", "Normalisation layers: BatchNorm or GroupNorm.", choices=NORMS)
    pretrained: bool = option(False, "Start the encoder from ImageNet weights (needs network access).")
    output_stride: int = option(16, "Encoder output stride.", choices=(8, 16))
    aspp_rates: tuple[int, ...] = option((6, 12, 18), "ASPP dilation rates.", low=1, high=512, cli=False)
    aspp_dropout: float = option(0.5, "Dropout after the ASPP projection (segmentation-models-pytorch's value).",
                                 low=0, high=1, high_open=True)
    encoder_bn_momentum: float = option(0.01, "BatchNorm momentum of the encoder.", low=0, high=1)
    embed_dim: int = option(12, "ESS embedding dimension d.", low=1, high=MAX_EMBED_DIM)
    normalize: bool = option(True, "L2-normalise pixel and class embeddings (--no-norm for the ablation).",
                             flag="--normalize/--no-norm")
    normalize_at: str = option("output", "Where a pixel embedding is L2-normalised: output (after the bilinear "
                                         "upsampling: every pixel unit length) or decoder (before it, at decoder "
                                         "resolution, as the published ESSNet code does).", choices=NORMALIZE_AT)
    class_update: str = option("gradient", "How the class embeddings learn: gradient (the paper), or prototype: "
                                           "no gradient, each kept as a moving average of its labelled pixels' "
                                           "embeddings (beyond the paper; see --proto-momentum).",
                               choices=CLASS_UPDATES)
    proto_momentum: float = option(0.999, "With --class-update prototype: the moving average's momentum once a "
                                          "class has been seen in 1 / (1 - momentum) batches; before that, the "
                                          "plain mean of every batch so far.", low=0, high=1, high_open=True)
    k: int = option(7, "ESS negatives per pixel (at most C - 1 are used).", low=1, high=MAX_K)
    tau: float = option(20.0, "ESS logit scale: logits = -tau * distance.", low=0, low_open=True)
    margin: float = option(0.2, "Margin of the class-separation regulariser.", low=0)
    reg: bool = option(True, "Class-separation regulariser on or off.")
    sampling: str = option("nearest", "Negatives: the nearest classes, or drawn uniformly at random.",
                           choices=SAMPLINGS)
    knn: str = option("auto", "Nearest-neighbour search: auto, torch (exact), faiss (exact) or ivf (approximate).",
                      choices=KNN_BACKENDS)
    chunk: int = option(1 << 22, "Elements of one block of pixels x classes scores (the torch search, the small-C "
                                 "ESS loss, the chunked softmax): what bounds their memory.", low=1)
    knn_stride: int = option(1, "Search once per block of this many pixels (1, 2: 1x2, 4: 2x2, 8: 2x4) and share "
                                "the block's negatives.", choices=tuple(STRIDE_BLOCKS))
    nlist: int | None = option(None, "IVF cells for --knn ivf [default: sqrt(C)].", low=1, high=MAX_K)
    nprobe: int | None = option(None, "IVF cells searched per query [default: nlist / 5].", low=1, high=MAX_K)
    ivf_rebuild_every: int = option(100, "Training steps between re-clusterings of the IVF index.", low=1)
    softmax_impl: str = option("dense", "Softmax loss and prediction: dense full-resolution logits, or chunked "
                                        "(the same values, never holding B x C x H x W logits).",
                               choices=SOFTMAX_IMPLS)

    def __post_init__(self):
        options.validate(self)

    def head_options(self) -> dict:
        """The keyword arguments of this head's module (ess.heads.SoftmaxHead or EssHead): the fields of the same names."""
        return {name: getattr(self, name) for name in HEAD_OPTIONS[self.head]}


# The ModelArgs fields each head's module takes, under the same names.
HEAD_OPTIONS = {
    "softmax": ("softmax_impl", "chunk"),
    "ess": ("embed_dim", "normalize", "normalize_at", "class_update", "proto_momentum", "k", "tau", "margin", "reg",
            "sampling", "knn", "chunk", "knn_stride", "nlist", "nprobe", "ivf_rebuild_every"),
}


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained: data, optimisation, augmentation, evaluation and bookkeeping."""

    # data
    data: str | None = option(None, "Training build directory (a `cocolvis build` output).", directory=True)
    val_data: str | None = option(None, "Validation build directory, evaluated every --val-every iterations.",
                                  directory=True)
    images_root: str | None = option(None, "Images root of both splits [default: the one in each dataset.json].",
                                     directory=True)
    # optimisation
    iters: int = option(90000, "Total training iterations.", low=1, high=MAX_ITERS)
    batch: int = option(16, "Images per iteration: the global batch, split evenly over torchrun's processes.",
                        low=1)
    lr: float = option(0.01, "Base learning rate (decoder, head, class embeddings).", low=0)
    encoder_lr_mult: float = option(0.1, "Encoder LR as a fraction of --lr.", low=0)
    momentum: float = option(0.9, "SGD momentum of the network.", low=0, high=1, high_open=True)
    weight_decay: float = option(1e-4, "Weight decay of the network.", low=0)
    poly_power: float = option(0.9, "Power of the polynomial LR decay.", low=0)
    embed_momentum: float = option(0.95, "SGD momentum of the class embeddings (with embed_optimizer sgd).",
                                   low=0, high=1, high_open=True)
    embed_poly_power: float = option(0.95, "Poly LR power of the class embeddings.", low=0)
    embed_weight_decay: float = option(0.0, "Weight decay of the class embeddings.", low=0)
    embed_optimizer: str = option("sgd", "Optimiser of the class embeddings: sgd (published), or adam, whose step "
                                         "does not shrink with a class's share of the pixels.", choices=("sgd", "adam"))
    embed_lr_mult: float = option(1.0, "Class-embedding LR as a multiple of --lr.", low=0, low_open=True)
    min_lr: float = option(0.0, "Floor of every group's polynomial LR decay (the published code's MultiPolyLR: "
                                "1e-6).", low=0)
    amp: bool | None = option(None, "Mixed precision: float16 autocast with gradient scaling on CUDA, bfloat16 "
                                    "autocast on the CPU; the losses compute in float32 [default: on for CUDA, "
                                    "off for the CPU].")
    sync_bn: bool = option(False, "BatchNorm statistics over the global batch (SyncBatchNorm) under torchrun "
                                  "on CUDA; no effect in one process.")
    # augmentation and evaluation
    crop: int = option(512, "Training crop size in pixels.", low=1, high=MAX_CROP)
    scale_min: float = option(0.5, "Smallest random scale.", low=0, low_open=True)
    scale_max: float = option(2.0, "Largest random scale.", low=0, low_open=True)
    flip: bool = option(True, "Random horizontal flips.")
    crop_val: int | None = option(None, "Validate on resized centre crops of this size instead of whole images.",
                                  low=1, high=MAX_CROP)
    # bookkeeping
    seed: int = option(0, "Seed of weights, data order and augmentation.", low=0, high=2 ** 63 - 1)
    workers: int = option(0, "DataLoader worker processes.", low=0, high=MAX_WORKERS)
    device: str = option("auto", "auto, cpu, cuda or cuda:N (under torchrun: cuda means cuda:LOCAL_RANK).",
                         pattern=DEVICE_PATTERN)
    ckpt_every: int = option(1000, "Write RUN/last.pt every N iterations.", low=1)
    val_every: int = option(0, "Validate every N iterations and keep RUN/best.pt (0: never).", low=0)

    def __post_init__(self):
        options.validate(self)


# Options that YAML and flags may set, and the part each belongs to. num_classes comes from the data.
PARTS = {"model": ModelArgs, "train": TrainConfig}
KEYS = {name: part for part, cls in PARTS.items() for name in options.fields(cls) if name != "num_classes"}


@dataclass(frozen=True)
class Config:
    """A run's resolved configuration: the model's arguments and the training settings."""

    model: ModelArgs = field(default_factory=ModelArgs)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        """Flat, plain YAML types, model options first: what RUN/config.yaml holds."""
        flat = {**options.plain(self.model), **options.plain(self.train)}
        return {k: flat[k] for k in KEYS}

    def updated(self, values: dict, source) -> Config:
        """A copy with flat `values` validated and applied; an unknown key is an InputError naming `source`."""
        parts = {part: {} for part in PARTS}
        for key, value in values.items():
            if key not in KEYS:
                raise InputError(source, f"unknown option {key!r}")
            parts[KEYS[key]][key] = value
        return Config(model=options.updated(self.model, parts["model"], source),
                      train=options.updated(self.train, parts["train"], source))


def presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("ess").joinpath("configs").iterdir() if p.name.endswith(".yaml"))


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML mapping; a missing, unreadable or malformed file, or a non-mapping, is an InputError."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except IsADirectoryError:
        raise InputError(path, "is a directory, expected a YAML file") from None
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise InputError(path, "not UTF-8 text") from None
    except (yaml.YAMLError, RecursionError) as e:
        raise InputError(path, f"malformed YAML: {' '.join(str(e).split())[:200]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(path, f"expected a mapping of option: value, got {type(data).__name__}")
    return data


def preset_path(name: str) -> Path:
    path = Path(str(resources.files("ess").joinpath("configs", f"{name}.yaml")))
    if not path.exists():
        raise InputError(None, f"unknown preset {name!r}; available: {', '.join(presets())}")
    return path


def layers(path: str | os.PathLike, seen: tuple = ()) -> list[tuple[dict, str | os.PathLike]]:
    """The settings a YAML file gives, as (values, file) layers to apply in order: first those of the preset
    its `base:` key names (recursively), then its own."""
    values = read_yaml(path)
    base = values.pop("base", None)
    if base is None:
        return [(values, path)]
    if not isinstance(base, str):
        raise InputError(path, f"'base' names a preset, got {base!r}")
    if base in seen:
        raise InputError(path, f"'base: {base}' makes a cycle of presets ({' -> '.join((*seen, base))})")
    return [*layers(preset_path(base), (*seen, base)), (values, path)]


def resolve(preset: str | None = None, config_file: str | os.PathLike | None = None,
            overrides: dict | None = None, base: Config | None = None) -> Config:
    """The full configuration: `base` (the defaults) < preset < YAML file < overrides (None: not given)."""
    config = base or Config()
    files = ([preset_path(preset)] if preset else []) + ([config_file] if config_file else [])
    for path in files:
        for values, source in layers(path):
            config = config.updated(values, source)
    return config.updated({k: v for k, v in (overrides or {}).items() if v is not None}, "command line")


def check_for_training(config: Config, source="config", world: int = 1) -> None:
    """Cross-option checks that only matter once a run starts, in `world` processes."""
    model, train = config.model, config.train
    if not model.head:
        raise InputError(source, f"no head given: pass --head {'|'.join(HEADS)}")
    if not train.data:
        raise InputError(source, "no training data given: pass --data TRAIN_DIR")
    if train.scale_min > train.scale_max:
        raise InputError(source, f"scale range {train.scale_min}-{train.scale_max} is not a valid range")
    if train.batch % world:
        raise InputError(source, f"--batch {train.batch} is the global batch and must divide evenly over "
                                 f"the {world} processes: use a multiple of {world}")
    if model.norm == "bn" and train.batch < 2:
        raise InputError(source, "batch 1 cannot train BatchNorm layers: use --batch 2 or more, or --norm gn")
    if model.norm == "bn" and train.batch // world < 2 and not train.sync_bn:
        raise InputError(source, f"--batch {train.batch} over {world} processes leaves 1 image per process, too "
                                 "few for BatchNorm: use a larger --batch, --sync-bn, or --norm gn")
    if train.sync_bn and model.norm != "bn":
        raise InputError(source, f"--sync-bn needs --norm bn: there are no BatchNorm layers with --norm {model.norm}")
    if train.val_every and not train.val_data:
        raise InputError(source, "--val-every needs --val-data VAL_DIR")


def save(config: Config, path: str | os.PathLike) -> None:
    write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def load(path: str | os.PathLike) -> Config:
    """A saved RUN/config.yaml, validated against the current options."""
    return Config().updated(read_yaml(path), path)


def replace_train(config: Config, **changes) -> Config:
    """A copy with training settings changed (values the code itself derives)."""
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **changes))
