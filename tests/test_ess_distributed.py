"""Training and evaluating under torchrun (gloo, 2 CPU processes) against one process.

The global batch is the unit: 2 processes with --batch B train the weights of one
process with --batch B (GroupNorm, no dropout), resume exactly, and resume across world
sizes; `ess eval` shards the images and gives the one-process confusion matrix.
"""
import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cocolvis.dataset import read_label_png
from segkit.io import InputError
from ess import config as cfg
from ess.checkpoint import load_checkpoint
from ess.data import BatchShare
from ess.device import pick_device
from ess.evaluate import evaluate_run
from ess.heads import EssHead, SoftmaxHead
from ess.config import ModelArgs
from ess.train import train

ROOT = Path(__file__).resolve().parents[1]
# Nothing in these runs depends on how the batch is split: GroupNorm, no dropout, nearest negatives.
OPTIONS = ["--head", "ess", "--encoder", "resnet18", "--norm", "gn", "--aspp-dropout", "0", "--crop", "32",
           "--batch", "4", "--iters", "4", "--ckpt-every", "2", "--device", "cpu", "--quiet"]
# Runs the command and prints the peak resident set (kB) of its largest process, torchrun's workers included.
PEAK_RSS = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def ess_command(*args: str, processes: int = 1) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "ess", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--standalone",
            "-m", "ess", *args]


def run(command: list[str]) -> int:
    """Run an `ess` command from this tree, one thread per process; returns its peak RSS in kB."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, *command], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return int(result.stdout.strip().splitlines()[-1])


# Runs that add the same float32 terms in another order (one batch of 4; two of 2 and an all-reduce) differ by
# rounding, about sqrt(N) eps of the terms' size for a sum of N: 1e-7 of a tensor's scale after one step here,
# under 1e-6 after four (the global batch against the mean of two halves, in one process). RTOL keeps 1e-4 for it.
# Rounding also settles near-ties: a ReLU input within ~1e-7 of zero (likewise a max-pool or a nearest negative)
# can fall on the other side in one of the runs, and one term of a gradient sum then changes by its whole size.
# What that moves a parameter by is set by the model's gradients and learning rates, not by the parameter's own
# size: a tensor still near zero (a normalisation bias after four steps at the encoder's LR, |b| <= 6e-4) fails any
# tolerance relative to itself on such an event (this machine: one ReLU input of encoder.layer1.1 at -8e-8 in one
# run and 4e-7 in the other at step 3, and that bias 3e-4 of its own size apart by step 4, 2e-7 in absolute
# terms). So the absolute floor is RTOL of the model's largest parameter (~1, the normalisation weights): 1e-4,
# while a wrong gradient moves weights by a share of their updates, up to 1e-2 in these four steps: a loss scaled
# 1% off (a labelled-pixel count 1% wrong) already puts 22 of the model's tensors beyond this tolerance.
RTOL = 1e-4


def assert_same_weights(a: Path, b: Path, exact: bool = False) -> None:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    floats = [t for t in wa.values() if t.is_floating_point()]
    atol = RTOL * max(t.abs().max().item() for t in floats)
    for name, tensor in wa.items():
        if exact or not tensor.is_floating_point():
            assert torch.equal(tensor, wb[name]), name
        else:
            torch.testing.assert_close(wb[name], tensor, rtol=RTOL, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture(scope="module")
def runs(built_train, built_val, tmp_path_factory) -> dict:
    """One process and 2 processes training the same 4 iterations (validating at the end), and their peak RSS."""
    root = tmp_path_factory.mktemp("dist")
    train_args = ["train", "--data", str(built_train), "--val-data", str(built_val), "--val-every", "4", *OPTIONS]
    out = {"root": root, "train_args": train_args}
    out["rss_one"] = run(ess_command(*train_args, "--out", str(root / "one")))
    out["rss_two"] = run(ess_command(*train_args, "--out", str(root / "two"), processes=2))
    return out


def test_two_processes_train_the_weights_of_one(runs):
    one, two = runs["root"] / "one", runs["root"] / "two"
    assert_same_weights(one / "last.pt", two / "last.pt")
    log_one, log_two = pd.read_csv(one / "log.csv"), pd.read_csv(two / "log.csv")
    # Rank 0 alone writes: one row per iteration, one validation, no stray files from rank 1.
    assert log_two["iteration"].tolist() == [1, 2, 3, 4]
    assert np.allclose(log_one["loss"], log_two["loss"], rtol=1e-4)  # the logged loss is the global batch's
    assert pd.read_csv(two / "val.csv")["iteration"].tolist() == [4]
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir()) == [
        ".segkit.json", "best.pt", "classes.json", "config.yaml", "last.pt", "log.csv", "val.csv"]
    # Validation under torchrun shards the images and sums the confusion: the one-process metrics.
    assert pd.read_csv(one / "val.csv")["miou"].tolist() == pd.read_csv(two / "val.csv")["miou"].tolist()
    # Each process holds half the batch: its peak memory must not exceed the one process's (generous bound).
    assert runs["rss_two"] < 1.25 * runs["rss_one"], (runs["rss_two"], runs["rss_one"])


def test_resume_under_torchrun_is_exact_and_works_across_world_sizes(runs):
    root, args = runs["root"], runs["train_args"]
    # 2 + 2 iterations under torchrun == 4 iterations under torchrun, bit for bit.
    run(ess_command(*args, "--out", str(root / "split"), "--stop-after", "2", processes=2))
    shutil.copytree(root / "split", root / "switch")
    run(ess_command("train", "--out", str(root / "split"), "--resume", "--quiet", processes=2))
    assert_same_weights(root / "two" / "last.pt", root / "split" / "last.pt", exact=True)
    assert pd.read_csv(root / "split" / "log.csv")["iteration"].tolist() == [1, 2, 3, 4]
    # The same checkpoint resumed by one process: the global batch is the unit, so the weights match too.
    config = cfg.load(root / "switch" / "config.yaml")
    train(config, root / "switch", resume=True, progress=False)
    assert_same_weights(root / "one" / "last.pt", root / "switch" / "last.pt")


def test_eval_under_torchrun_matches_one_process(runs, built_val):
    one = runs["root"] / "one"
    evaluate_run(one, built_val, out=runs["root"] / "eval-one", device="cpu", progress=False,
                             save_predictions=True)
    run(ess_command("eval", "--run-dir", str(one), "--data", str(built_val), "--out", str(runs["root"] / "eval-two"),
                    "--device", "cpu", "--save-predictions", "--quiet", processes=2))
    a, b = runs["root"] / "eval-one", runs["root"] / "eval-two"
    assert np.array_equal(np.load(a / "confusion.npz")["confusion"], np.load(b / "confusion.npz")["confusion"])
    assert (a / "per_class.csv").read_text() == (b / "per_class.csv").read_text()  # gt_images summed too
    assert (b / "metrics.json").read_text() == (a / "metrics.json").read_text()
    # Each rank wrote its own images' predictions: together, all of them, as one process writes them.
    names = sorted(p.name for p in (a / "predictions").iterdir())
    assert names == sorted(p.name for p in (b / "predictions").iterdir()) and names
    for name in names:
        if not name.endswith("_color.png"):
            assert np.array_equal(read_label_png(a / "predictions" / name), read_label_png(b / "predictions" / name))


# --- the pieces, in one process -------------------------------------------------------------

def test_ranks_share_each_global_batch():
    whole = list(BatchShare(6, 3, 5))
    assert whole == list(range(18, 30))
    shares = [list(BatchShare(6, 3, 5, rank, 3)) for rank in range(3)]
    assert shares[1] == [20, 21, 26, 27] and len(BatchShare(6, 3, 5, 2, 3)) == 4
    assert sorted(sum(shares, [])) == whole
    with pytest.raises(ValueError):
        BatchShare(5, 0, 1, 0, 2)


@pytest.mark.parametrize("head", ["softmax", "ess"])
def test_normalised_shares_average_to_the_global_loss_and_gradient(head):
    """What DDP computes: the mean over ranks of (rank's summed pixel loss / (global count / W)) + regulariser."""
    g = torch.Generator().manual_seed(0)
    num_classes, world = 9, 2
    if head == "softmax":
        module = SoftmaxHead(4, num_classes, **ModelArgs(head="softmax").head_options())
        output = torch.randn(4, num_classes, 6, 5, generator=g, requires_grad=True)
    else:
        module = EssHead(4, num_classes, **ModelArgs(head="ess", knn="torch").head_options())
        output = torch.nn.functional.normalize(torch.randn(4, 12, 6, 5, generator=g), dim=1).requires_grad_()
    mask = torch.randint(0, num_classes + 1, (4, 6, 5), generator=g)
    mask[0] = 0  # one image without labels: the shares have different pixel counts
    full = module.loss(output, mask)
    grad_full = torch.autograd.grad(full, [output, *module.parameters()], allow_unused=True)
    normalizer = (mask > 0).sum().item() / world
    shares = [module.loss(output[r * 2:(r + 1) * 2], mask[r * 2:(r + 1) * 2], normalizer) for r in range(world)]
    mean = sum(shares) / world
    grad_mean = torch.autograd.grad(mean, [output, *module.parameters()], allow_unused=True)
    assert mean.item() == pytest.approx(full.item(), rel=1e-6)
    for a, b in zip(grad_full, grad_mean):
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_global_batch_checks():
    c = cfg.resolve("tiny", None, {"head": "ess", "data": "/x", "batch": 6})
    cfg.check_for_training(c, world=3)
    with pytest.raises(InputError, match="--batch 6 is the global batch and must divide evenly over the 4"):
        cfg.check_for_training(c, world=4)
    with pytest.raises(InputError, match="1 image per process, too few for BatchNorm"):
        cfg.check_for_training(c, world=6)
    cfg.check_for_training(cfg.replace_train(c, sync_bn=True), world=6)
    gn = dataclasses.replace(c, model=dataclasses.replace(c.model, norm="gn"))
    with pytest.raises(InputError, match="--sync-bn needs --norm bn"):
        cfg.check_for_training(cfg.replace_train(gn, sync_bn=True))


def test_every_flag_reaches_ess_through_torchrun():
    """torchrun's parser rejects a flag that abbreviates one of its own (--run: --run-path); --run has --run-dir."""
    from torch.distributed.run import get_args_parser

    from ess.cli import main

    flags = {o for command in main.commands.values() for p in command.params for o in p.opts + p.secondary_opts
             if o.startswith("--")}
    passed = set()
    for flag in sorted(flags - {"--run"}):
        args = get_args_parser().parse_args(["--standalone", "--nproc_per_node", "2", "-m", "ess", "eval", flag, "1"])
        passed |= {flag} & set(args.training_script_args)
    assert passed == flags - {"--run"} and "--run-dir" in passed


def test_local_rank_devices():
    assert pick_device("cpu", local_rank=1) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pick_device("auto", local_rank=1) == torch.device("cpu")
        with pytest.raises(InputError, match="--device cuda: no CUDA device"):
            pick_device("cuda", local_rank=1)
    else:
        assert pick_device("auto", local_rank=0) == torch.device("cuda", 0)
    with pytest.raises(InputError, match="under torchrun every process takes cuda:LOCAL_RANK"):
        pick_device("cuda:1", local_rank=0)
