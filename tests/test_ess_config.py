"""Defaults < preset < YAML file < flags, with each bad value named."""
import pytest
import yaml

from cocolvis.io import InputError
from ess import config as cfg


def test_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("crop: 96\nbatch: 3\nlr: 1\n")
    c = cfg.resolve("tiny", f, {"batch": 2, "iters": None})
    assert c["encoder"] == "resnet18"           # from the preset
    assert c["crop"] == 96 and c["lr"] == 1.0   # the file beats the preset; int accepted for a float
    assert c["batch"] == 2                      # the flag beats the file
    assert c["iters"] == cfg.read_yaml(cfg.preset_path("tiny"))["iters"]  # an unset flag changes nothing
    assert c["k"] == 7 and c["tau"] == 20.0 and c["embed_dim"] == 12  # published defaults


def test_presets_are_valid():
    assert {"tiny", "paper"} <= set(cfg.presets())
    paper = cfg.resolve("paper")
    assert (paper["encoder"], paper["batch"], paper["crop"], paper["output_stride"]) == ("resnet50", 16, 512, 16)
    assert paper["aspp_rates"] == [6, 12, 18]


@pytest.mark.parametrize("text, message", [
    ("crops: 3\n", "unknown option 'crops'"),
    ("crop: big\n", "option 'crop' expects int"),
    ("reg: 1\n", "option 'reg' expects bool"),
    ("head: crf\n", "option 'head' must be one of"),
    ("batch: 0\n", "option 'batch' must be positive"),
    ("[1, 2]\n", "expected a mapping"),
    ("crop: [\n", "malformed YAML"),
])
def test_bad_yaml_names_file_and_option(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(InputError) as e:
        cfg.resolve(None, f)
    assert message in e.value.message and str(f) in e.value.message


def test_saved_config_round_trips(tmp_path):
    c = cfg.resolve("tiny", None, {"head": "ess", "data": str(tmp_path)})
    cfg.save(c, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == c
    assert cfg.load(tmp_path / "config.yaml") == c
    assert c["data"] == str(tmp_path.resolve())


def test_training_checks():
    c = cfg.resolve("tiny", None, {"head": "ess", "data": "/x"})
    with pytest.raises(InputError, match="batch 1 cannot train BatchNorm"):
        cfg.check_for_training({**c, "batch": 1})
    cfg.check_for_training({**c, "batch": 1, "norm": "gn"})
    with pytest.raises(InputError, match="no head given"):
        cfg.check_for_training({**c, "head": None})
    with pytest.raises(InputError, match="--val-every needs --val-data"):
        cfg.check_for_training({**c, "val_every": 5})
