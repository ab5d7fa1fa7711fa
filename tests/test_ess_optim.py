"""The class embeddings' own optimiser settings: each changes exactly what it names; resuming stays exact."""
import dataclasses

import pytest
import torch

from ess import config as cfg
from ess.model import Segmenter
from ess.optim import make_optimizer, set_lr


def ess_model_and_config(**options):
    config = cfg.resolve("tiny", overrides=dict(head="ess", embed_dim=4, **options))
    return Segmenter.from_args(dataclasses.replace(config.model, num_classes=7)), config


def test_class_embeddings_get_their_own_learning_rate():
    model, config = ess_model_and_config(lr=0.02, embed_lr_mult=10.0, embed_optimizer="sgd")
    groups = {g["name"]: g for g in make_optimizer(model, config.train).param_groups}
    assert groups["class_embeddings"]["base_lr"] == pytest.approx(0.2)
    assert groups["decoder"]["base_lr"] == pytest.approx(0.02)
    assert groups["class_embeddings"]["params"] == [model.head.embeddings]
    assert groups["class_embeddings"]["momentum"] == config.train.embed_momentum


def test_adam_for_the_class_embeddings_only():
    model, config = ess_model_and_config(lr=0.01, embed_optimizer="adam")
    optimizer = make_optimizer(model, config.train)
    assert [g["name"] for g in optimizer.param_groups] == ["encoder", "decoder", "class_embeddings"]
    kinds = {g["name"]: type(o).__name__ for o in optimizer.optimizers for g in o.param_groups}
    assert kinds == {"encoder": "SGD", "decoder": "SGD", "class_embeddings": "Adam"}
    assert set_lr(optimizer, 0, 100, 0.0) == pytest.approx(0.01)
    # A class with a 1000x smaller gradient takes the same first step: Adam's step is the LR.
    before = model.head.embeddings.detach().clone()
    model.head.embeddings.grad = torch.zeros_like(before)
    model.head.embeddings.grad[0] = 1.0
    model.head.embeddings.grad[1] = 1e-3
    optimizer.step()
    moved = (model.head.embeddings.detach() - before).abs()
    assert torch.allclose(moved[:2], torch.full_like(moved[:2], 0.01), rtol=1e-3)
    assert moved[2:].max() == 0
    again = make_optimizer(model, config.train)
    again.load_state_dict(optimizer.state_dict())
    assert torch.equal(again.optimizers[1].state_dict()["state"][0]["exp_avg"],
                       optimizer.optimizers[1].state_dict()["state"][0]["exp_avg"])


def test_resume_is_exact_with_adam_embeddings(built_train, tmp_path):
    from ess.train import train

    config = cfg.resolve(None, None, dict(crop=32, batch=2, iters=4, ckpt_every=4, device="cpu", encoder="resnet18",
                                          head="ess", data=str(built_train), embed_optimizer="adam",
                                          embed_lr_mult=5.0))
    train(config, tmp_path / "straight", progress=False)
    train(config, tmp_path / "split", stop_after=2, progress=False)
    train(config, tmp_path / "split", resume=True, progress=False)
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
