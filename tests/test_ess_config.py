"""Defaults < preset < YAML file < flags, with each bad value named; the typed options behind them."""
import dataclasses

import pytest
import yaml
from click.testing import CliRunner

from segkit.io import InputError
from ess import config as cfg
from ess.cli import main
from ess.config import ModelArgs


def test_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("crop: 96\nbatch: 3\nlr: 1\n")
    c = cfg.resolve("tiny", f, {"batch": 2, "iters": None})
    assert c.model.encoder == "resnet18"                  # from the preset
    assert c.train.crop == 96 and c.train.lr == 1.0       # the file beats the preset; int accepted for a float
    assert isinstance(c.train.lr, float)
    assert c.train.batch == 2                             # the flag beats the file
    assert c.train.iters == cfg.read_yaml(cfg.preset_path("tiny"))["iters"]  # an unset flag changes nothing
    assert (c.model.k, c.model.tau, c.model.embed_dim) == (7, 20.0, 12)    # published defaults


def test_presets_are_valid():
    assert {"tiny", "paper"} <= set(cfg.presets())
    paper = cfg.resolve("paper")
    assert (paper.model.encoder, paper.train.batch, paper.train.crop, paper.model.output_stride) == ("resnet50", 16, 512, 16)
    assert paper.model.aspp_rates == (6, 12, 18) and paper.model.pretrained and paper.train.iters == 200000
    assert (paper.model.normalize_at, paper.train.embed_momentum, paper.train.embed_weight_decay, paper.train.min_lr) == (
        "decoder", 0.9, 1e-4, 1e-6)


def test_presets_inherit_with_base(tmp_path):
    tiny, study = cfg.resolve("tiny"), cfg.resolve("study")
    own = cfg.read_yaml(cfg.preset_path("study"))
    assert own.pop("base") == "tiny"
    flat_tiny, flat_study = tiny.to_dict(), study.to_dict()
    assert {k for k in flat_tiny if flat_tiny[k] != flat_study[k]} <= set(own)  # only its own changes differ
    assert study.model.softmax_impl == "chunked"  # inherited, not copied
    f = tmp_path / "mine.yaml"
    f.write_text("base: study\nseed: 3\n")
    mine = cfg.resolve(None, f)
    assert mine.train.seed == 3 and mine.train.iters == study.train.iters
    f.write_text("base: nope\n")
    with pytest.raises(InputError, match="unknown preset 'nope'"):
        cfg.resolve(None, f)


@pytest.mark.parametrize("text, message", [
    ("crops: 3\n", "unknown option 'crops'"),
    ("crop: big\n", "option 'crop' expects int"),
    ("reg: 1\n", "option 'reg' expects bool"),
    ("k: true\n", "option 'k' expects int"),
    ("lr: .nan\n", "option 'lr' must be a finite number"),
    ("tau: .inf\n", "option 'tau' must be a finite number"),
    ("tau: 0\n", "option 'tau' must be positive"),
    ("momentum: 1.0\n", "option 'momentum' must be below 1"),
    ("head: crf\n", "option 'head' must be one of"),
    ("batch: 0\n", "option 'batch' must be at least 1"),
    ("crop_val: -4\n", "option 'crop_val' must be at least 1"),
    ("device: banana\n", "option 'device' must match"),
    ("data: 5\n", "option 'data' expects a directory path"),
    ("aspp_rates: 6\n", "option 'aspp_rates' expects a non-empty list of int"),
    ("num_classes: 5\n", "unknown option 'num_classes'"),
    ("[1, 2]\n", "expected a mapping"),
    ("crop: [\n", "malformed YAML"),
])
def test_bad_yaml_names_file_and_option(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(InputError) as e:
        cfg.resolve(None, f)
    assert message in e.value.message and str(f) in e.value.message


def test_unreadable_yaml(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("crop: 96 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        cfg.resolve(None, f)
    with pytest.raises(InputError, match="is a directory"):
        cfg.resolve(None, tmp_path)


def test_saved_config_round_trips(tmp_path):
    c = cfg.resolve("tiny", None, {"head": "ess", "data": str(tmp_path)})
    cfg.save(c, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved == c.to_dict() and list(saved)[0] == "head" and "num_classes" not in saved
    assert cfg.load(tmp_path / "config.yaml") == c
    assert c.train.data == str(tmp_path.resolve())


def test_every_option_has_one_home_and_a_flag():
    """Model and training options never share a name; every CLI option is a flag of `ess train`."""
    model, train = (set(f.name for f in dataclasses.fields(cls)) for cls in cfg.PARTS.values())
    assert not model & train
    help_text = CliRunner().invoke(main, ["train", "--help"], terminal_width=200).output
    for name in (model | train) - {"num_classes", "aspp_rates"}:
        flag = "--no-norm" if name == "normalize" else "--" + name.replace("_", "-")
        assert flag in help_text, name


@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "option 'lr' must be a finite number"),
    (["--device", "banana"], "option 'device' must match"),
    (["--k", "0"], "option 'k' must be at least 1"),
])
def test_bad_flags_are_one_line(tmp_path, flags, message):
    result = CliRunner().invoke(main, ["train", "--head", "ess", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                                       *flags])
    assert result.exit_code == 1 and message in result.output
    assert "Traceback" not in result.output and not (tmp_path / "r").exists()


def test_model_args_are_validated_when_built():
    from ess.model import Segmenter

    with pytest.raises(ValueError, match="option 'encoder' must be one of"):
        Segmenter.from_args(ModelArgs(head="ess", num_classes=3, encoder="vgg11"))
    with pytest.raises(ValueError, match="need a head and num_classes"):
        Segmenter.from_args(ModelArgs(head="ess"))


def test_training_checks():
    c = cfg.resolve("tiny", None, {"head": "ess", "data": "/x"})
    with pytest.raises(InputError, match="batch 1 cannot train BatchNorm"):
        cfg.check_for_training(cfg.replace_train(c, batch=1))
    cfg.check_for_training(dataclasses.replace(cfg.replace_train(c, batch=1),
                                               model=dataclasses.replace(c.model, norm="gn")))
    with pytest.raises(InputError, match="no head given"):
        cfg.check_for_training(dataclasses.replace(c, model=dataclasses.replace(c.model, head=None)))
    with pytest.raises(InputError, match="--val-every needs --val-data"):
        cfg.check_for_training(cfg.replace_train(c, val_every=5))
