"""Checkpoints load with weights_only=True, rebuild their model alone; bad files are one clear error."""
import dataclasses

import pytest
import torch

from segkit.io import InputError
from ess.checkpoint import load_checkpoint, load_model, load_weights, save_checkpoint
from ess.model import build_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("ess", 11, encoder="resnet18", embed_dim=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    save_checkpoint(path, {"iteration": 3, "model_args": dataclasses.asdict(model.args),
                           "model": model.state_dict(), "optimizer": opt.state_dict(),
                           "config": {"head": "ess", "aspp_rates": [6, 12, 18], "crop_val": None},
                           "best_miou": None})
    return path, model


def test_round_trip_with_weights_only(saved):
    path, model = saved
    raw = torch.load(path, weights_only=True)  # plain torch, no allow-listing needed
    assert raw["format"] == "ess-checkpoint" and raw["iteration"] == 3
    state = load_checkpoint(path)
    fresh = build_model("ess", 11, encoder="resnet18", embed_dim=4)
    load_weights(fresh, state, path)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert state["optimizer"]["state"]  # momentum buffers survive


def test_the_checkpoint_alone_rebuilds_the_model(saved):
    path, model = saved
    rebuilt, state = load_model(path)
    assert rebuilt.args == model.args and rebuilt.args.embed_dim == 4 and not rebuilt.training
    for (name, a), b in zip(model.state_dict().items(), rebuilt.state_dict().values()):
        assert torch.equal(a, b), name


def test_model_args_of_another_version(saved, tmp_path):
    path, _ = saved
    state = torch.load(path, weights_only=True)
    state["model_args"]["temperature"] = 3
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(InputError, match="bad.pt: model_args do not describe a model"):
        load_model(bad)


def test_truncated_checkpoint(saved, tmp_path):
    path, _ = saved
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(InputError, match="cut.pt: not a readable checkpoint"):
        load_checkpoint(cut)


@pytest.mark.parametrize("content", ["text", "pickle", "tensor-list", "dict"])
def test_foreign_files(tmp_path, content):
    path = tmp_path / "foreign.pt"
    if content == "text":
        path.write_text("hello\n")
    elif content == "pickle":
        import pickle

        path.write_bytes(pickle.dumps(object()))
    elif content == "tensor-list":
        torch.save([torch.zeros(3)], path)
    else:
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(InputError) as e:
        load_checkpoint(path)
    assert str(path) in e.value.message and "\n" not in e.value.message


def test_missing_checkpoint(tmp_path):
    with pytest.raises(InputError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "none.pt")


def test_weights_of_another_model(saved):
    path, _ = saved
    other = build_model("ess", 11, encoder="resnet18", embed_dim=8)
    with pytest.raises(InputError, match="weights do not fit this model"):
        load_weights(other, load_checkpoint(path), path)


def test_a_checkpoint_of_another_head_is_refused_first(saved):
    path, _ = saved
    other = build_model("softmax", 11, encoder="resnet18")
    with pytest.raises(InputError, match="holds a checkpoint of the ess head, but its run is of the softmax head"):
        load_weights(other, load_checkpoint(path), path)
