"""The optimiser of a run: one parameter group per part of the model, and the LR schedule.

The network (encoder, decoder with the head's layers) trains with SGD. The class
embeddings train with SGD too, or with Adam (`embed_optimizer: adam`): a class embedding's
SGD step is proportional to its share of the labelled pixels, so rare classes barely move
from their random start; Adam's step is about the LR whatever the gradient's size. Prototype
class embeddings (`class_update: prototype`) are no parameter and have no group.
"""
from __future__ import annotations

import torch

from ess.config import TrainConfig
from ess.model import Segmenter


class Optimizers:
    """Several torch optimisers stepped as one, with what the loop, the schedule, GradScaler and
    the checkpoint use: param_groups (in order), zero_grad, step, state_dict, load_state_dict."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)


def make_optimizer(model: Segmenter, train: TrainConfig) -> torch.optim.Optimizer | Optimizers:
    """The model's parameter groups, each with its own base LR, momentum, decay and poly power."""
    network = dict(momentum=train.momentum, weight_decay=train.weight_decay, power=train.poly_power)
    settings = {
        "encoder": dict(base_lr=train.lr * train.encoder_lr_mult, **network),
        "decoder": dict(base_lr=train.lr, **network),
        "class_embeddings": dict(base_lr=train.lr * train.embed_lr_mult, weight_decay=train.embed_weight_decay,
                                 power=train.embed_poly_power),
    }
    groups = [dict(name=name, params=params, lr=settings[name]["base_lr"], **settings[name])
              for name, params in model.param_groups().items()]
    embed = [g for g in groups if g["name"] == "class_embeddings"]
    network_groups = [g for g in groups if g["name"] != "class_embeddings"]
    if embed and train.embed_optimizer == "adam":
        return Optimizers(torch.optim.SGD(network_groups, lr=train.lr), torch.optim.Adam(embed))
    for g in embed:
        g["momentum"] = train.embed_momentum
    return torch.optim.SGD(network_groups + embed, lr=train.lr)


def set_lr(optimizer: torch.optim.Optimizer | Optimizers, iteration: int, total: int, min_lr: float) -> float:
    """Polynomial decay lr = max(base * (1 - i/total)^power, min_lr) per group; returns the decoder's LR."""
    for g in optimizer.param_groups:
        g["lr"] = max(g["base_lr"] * (1 - iteration / total) ** g["power"], min_lr)
    return next(g["lr"] for g in optimizer.param_groups if g["name"] == "decoder")
