"""Training configuration: defaults < preset < YAML file < command-line flags.

The defaults are the published settings; `ess/configs/<preset>.yaml` holds the named
presets. The resolved dict (plain YAML types only) is saved as RUN/config.yaml.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import yaml

from cocolvis.io import InputError
from ess.heads import HEADS
from ess.knn import BACKENDS, DEFAULT_CHUNK, DEFAULT_KNN
from ess.losses import SAMPLINGS
from ess.model import ENCODERS, NORMS

DEFAULTS: dict = {
    # data
    "head": None,            # softmax | ess (required)
    "data": None,            # training build directory (required)
    "val_data": None,        # validation build directory for --val-every
    "images_root": None,     # overrides the images root recorded in each dataset.json
    # network
    "encoder": "resnet50",
    "norm": "bn",
    "pretrained": False,
    "output_stride": 16,
    "aspp_rates": [6, 12, 18],
    "encoder_bn_momentum": 0.01,
    # ESS head
    "embed_dim": 12,
    "normalize": True,
    "k": 7,
    "tau": 20.0,
    "margin": 0.2,
    "reg": True,
    "sampling": "nearest",
    "knn": DEFAULT_KNN,
    "knn_chunk": DEFAULT_CHUNK,
    # optimisation
    "iters": 90000,
    "batch": 16,
    "lr": 0.01,
    "encoder_lr_mult": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "poly_power": 0.9,
    "embed_momentum": 0.95,
    "embed_poly_power": 0.95,
    "embed_weight_decay": 0.0,
    "amp": True,
    # augmentation and evaluation
    "crop": 512,
    "scale_min": 0.5,
    "scale_max": 2.0,
    "flip": True,
    "crop_val": None,
    # bookkeeping
    "seed": 0,
    "workers": 0,
    "device": "auto",
    "ckpt_every": 1000,
    "val_every": 0,
}

CHOICES = {"head": HEADS, "encoder": ENCODERS, "norm": NORMS, "knn": BACKENDS, "sampling": SAMPLINGS}
PATHS = ("data", "val_data", "images_root")
OPTIONAL = ("head", "data", "val_data", "images_root", "crop_val")
POSITIVE = ("embed_dim", "k", "iters", "batch", "crop", "ckpt_every", "knn_chunk", "output_stride")
NON_NEGATIVE = ("workers", "val_every", "seed", "tau", "margin", "lr", "weight_decay", "embed_weight_decay")


def presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("ess").joinpath("configs").iterdir() if p.name.endswith(".yaml"))


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML mapping; a missing or malformed file, or a non-mapping, is an InputError."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except yaml.YAMLError as e:
        raise InputError(path, f"malformed YAML: {' '.join(str(e).split())}") from None
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


def _check_value(key: str, value, source) -> object:
    """Validate one value against the type of its default; return it in canonical form."""
    if key not in DEFAULTS:
        raise InputError(source, f"unknown option {key!r}")
    default = DEFAULTS[key]
    if value is None:
        if key in OPTIONAL:
            return None
        raise InputError(source, f"option {key!r} cannot be empty")
    if key in PATHS:
        return str(Path(value).expanduser().resolve())
    if key == "crop_val":
        default = 0
    if key == "head":
        default = ""
    expected = type(default)
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is list:
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        value = list(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise InputError(source, f"option {key!r} expects {expected.__name__}, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise InputError(source, f"option {key!r} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    if key in POSITIVE and value <= 0:
        raise InputError(source, f"option {key!r} must be positive, got {value!r}")
    if key in NON_NEGATIVE and value < 0:
        raise InputError(source, f"option {key!r} must not be negative, got {value!r}")
    return value


def merge(config: dict, updates: dict, source) -> dict:
    """`config` updated with validated `updates`; `source` names where they came from, for errors."""
    out = dict(config)
    for key, value in updates.items():
        out[key] = _check_value(key, value, source)
    return out


def resolve(preset: str | None = None, config_file: str | os.PathLike | None = None,
            overrides: dict | None = None, base: dict | None = None) -> dict:
    """The full training config: `base` (the defaults) < preset < YAML file < overrides."""
    config = dict(DEFAULTS if base is None else base)
    if preset:
        path = preset_path(preset)
        config = merge(config, read_yaml(path), path)
    if config_file:
        config = merge(config, read_yaml(config_file), config_file)
    config = merge(config, {k: v for k, v in (overrides or {}).items() if v is not None}, "command line")
    return config


def check_for_training(config: dict, source="config") -> None:
    """Cross-option checks that only matter once a run starts."""
    if not config.get("head"):
        raise InputError(source, f"no head given: pass --head {'|'.join(HEADS)}")
    if not config.get("data"):
        raise InputError(source, "no training data given: pass --data TRAIN_DIR")
    if config["scale_min"] > config["scale_max"] or config["scale_min"] <= 0:
        raise InputError(source, f"scale range {config['scale_min']}-{config['scale_max']} is not a valid range")
    if config["norm"] == "bn" and config["batch"] < 2:
        raise InputError(source, "batch 1 cannot train BatchNorm layers: use --batch 2 or more, or --norm gn")
    if config["val_every"] and not config.get("val_data"):
        raise InputError(source, "--val-every needs --val-data VAL_DIR")


def save(config: dict, path: str | os.PathLike) -> None:
    from cocolvis.io import write_text

    write_text(path, yaml.safe_dump(config, sort_keys=False))


def load(path: str | os.PathLike) -> dict:
    """A saved RUN/config.yaml, validated against the current options."""
    data = read_yaml(path)
    return merge(DEFAULTS, data, path)
