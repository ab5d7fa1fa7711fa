"""Run configuration: defaults < preset < YAML file < command-line flags.

A run's configuration is two typed parts: `ModelArgs` (ess.model: what the network is)
and `TrainConfig` (below: data, optimisation, augmentation, bookkeeping). Their fields
are the one source of every option's type, default, bounds, choices and `--help` text.
YAML files and flags use one flat namespace (`k: 7`, `lr: 0.01`); `ess/configs/<preset>.yaml`
holds the named presets, and the resolved configuration is saved flat as RUN/config.yaml.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from cocolvis.io import InputError, write_text
from ess import options
from ess.device import DEVICE_PATTERN
from ess.model import HEADS, ModelArgs
from ess.options import option


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
    iters: int = option(90000, "Total training iterations.", low=1)
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
    amp: bool = option(True, "Mixed precision on CUDA (no effect on CPU).")
    sync_bn: bool = option(False, "BatchNorm statistics over the global batch (SyncBatchNorm) under torchrun "
                                  "on CUDA; no effect in one process.")
    # augmentation and evaluation
    crop: int = option(512, "Training crop size in pixels.", low=1)
    scale_min: float = option(0.5, "Smallest random scale.", low=0, low_open=True)
    scale_max: float = option(2.0, "Largest random scale.", low=0, low_open=True)
    flip: bool = option(True, "Random horizontal flips.")
    crop_val: int | None = option(None, "Validate on resized centre crops of this size instead of whole images.",
                                  low=1)
    # bookkeeping
    seed: int = option(0, "Seed of weights, data order and augmentation.", low=0)
    workers: int = option(0, "DataLoader worker processes.", low=0)
    device: str = option("auto", "auto, cpu, cuda or cuda:N (under torchrun: cuda means cuda:LOCAL_RANK).",
                         pattern=DEVICE_PATTERN)
    ckpt_every: int = option(1000, "Write RUN/last.pt every N iterations.", low=1)
    val_every: int = option(0, "Validate every N iterations and keep RUN/best.pt (0: never).", low=0)


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


def resolve(preset: str | None = None, config_file: str | os.PathLike | None = None,
            overrides: dict | None = None, base: Config | None = None) -> Config:
    """The full configuration: `base` (the defaults) < preset < YAML file < overrides (None: not given)."""
    config = base or Config()
    if preset:
        path = preset_path(preset)
        config = config.updated(read_yaml(path), path)
    if config_file:
        config = config.updated(read_yaml(config_file), config_file)
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
    """A copy with training settings changed (unvalidated: for values the code itself derives)."""
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **changes))
