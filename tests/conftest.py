"""Session-wide fixtures: one small synthetic dataset, built once, shared by every test."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """`cocolvis synth` output: annotations/ and images/ in the real COCO-Stuff and LVIS formats."""
    from cocolvis.synth import write_synthetic

    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, train=24, val=8, size=(96, 128), seed=0)
    return root


@pytest.fixture(scope="session")
def built_train(synth_root, tmp_path_factory) -> Path:
    """The train split built from the synthetic annotations."""
    from cocolvis.build import build_split

    out = tmp_path_factory.mktemp("built") / "train"
    ann = synth_root / "annotations"
    build_split(coco=[ann / "stuff_train2017.json"], lvis=ann / "lvis_v1_train.json",
                out=out, images_root=synth_root / "images", workers=1)
    return out


@pytest.fixture(scope="session")
def built_val(synth_root, tmp_path_factory) -> Path:
    """The val split: LVIS val images come from both COCO-Stuff files, as in the real set."""
    from cocolvis.build import build_split

    out = tmp_path_factory.mktemp("built") / "val"
    ann = synth_root / "annotations"
    build_split(coco=[ann / "stuff_train2017.json", ann / "stuff_val2017.json"], lvis=ann / "lvis_v1_val.json",
                out=out, images_root=synth_root / "images", workers=1)
    return out


# Settings of the `tiny_runs` fixture: the tiny preset shrunk to a few seconds per head.
TINY_RUN_OPTIONS = {"crop": 64, "batch": 4, "iters": 60, "ckpt_every": 60, "lr": 0.02, "device": "cpu"}


@pytest.fixture(scope="session")
def tiny_runs(built_train, built_val, tmp_path_factory) -> dict:
    """{"softmax": RUN, "ess": RUN}: each briefly trained on `built_train`, evaluated on `built_val` into RUN/eval/."""
    from ess import config as cfg
    from ess.evaluate import evaluate_run
    from ess.train import train

    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for head in ("softmax", "ess"):
        config = cfg.resolve("tiny", None, {**TINY_RUN_OPTIONS, "head": head, "data": str(built_train)})
        run = root / head
        train(config, run, progress=False)
        evaluate_run(run, built_val, device="cpu", progress=False)
        runs[head] = run
    return runs


def ess_head(in_channels: int, num_classes: int, **args):
    """An ESS head with the default model arguments (ess.config.ModelArgs), some overridden."""
    from ess.config import ModelArgs
    from ess.heads import EssHead

    return EssHead(in_channels, num_classes, **ModelArgs(head="ess", **args).head_options())


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a CUDA device: skipped without one (`make gpu-check` runs them on a GPU machine)."""
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if not marked:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (run by `make gpu-check`)")
        for item in marked:
            item.add_marker(skip)
