"""The training loop, top to bottom: data, model, optimiser, resume, iterate, checkpoint.

Everything random in an iteration is a function of (seed, iteration): the batch
(see ess.data) and torch's RNG (dropout, random negatives), reseeded every step.
Together with the saved weights, optimiser and scaler state this makes
`--iters 2N --stop-after N` then `--resume` equal to one run of 2N iterations.

Under torchrun (see ess.distributed) each of W processes trains on its slice of the
global batch in DistributedDataParallel. Its summed per-pixel loss is divided by the
global batch's labelled pixels over W (`loss_normalizer`), so that DDP's mean of the
ranks' gradients is the gradient of the one-process loss: N processes train the same
weights as one wherever nothing depends on the split (GroupNorm, no dropout). The
class-separation regulariser is the same on every rank and DDP's mean leaves it whole.
Rank 0 alone writes the run directory; every rank resumes from last.pt, whatever the
world size it was written with (the global batch is the unit).
"""
from __future__ import annotations

import csv
import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cocolvis.dataset import BuiltDataset
from segkit.errors import OneLineError
from segkit.io import InputError, atomic_open, write_json
from ess import config as cfg
from ess import distributed
from ess.checkpoint import load_checkpoint, load_weights, save_checkpoint
from ess.config import Config, ModelArgs, TrainConfig
from ess.data import TrainSamples, train_loader
from ess.device import precision
from ess.evaluate import evaluate_model
from ess.model import PretrainedWeightsError, Segmenter
from ess.memory import check_training_memory
from ess.optim import make_optimizer, set_lr
from ess.outputs import claim_run
from ess.stopping import StopPlan

LOG_FIELDS = ("iteration", "loss", "lr", "seconds")
VAL_FIELDS = ("iteration", "miou", "pixel_acc")


class TrainingError(OneLineError):
    """Training cannot go on (e.g. the loss diverged): one line at the command line, exit status 1."""


def step_seed(seed: int, iteration: int, rank: int = 0) -> int:
    """The torch seed of one iteration on one rank (ranks draw different dropout masks and negatives)."""
    entropy = [seed, 2, iteration] + ([rank] if rank else [])
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def loss_normalizer(masks: torch.Tensor) -> float | None:
    """What this rank divides its summed per-pixel loss by: the global batch's labelled pixels over the
    world size, so that DDP's mean of the ranks' gradients is that of the global mean. None in one
    process: the heads' own mean over the batch."""
    world = distributed.world_size()
    if world == 1:
        return None
    labelled = distributed.all_reduce_sum((masks > 0).sum())
    return max(int(labelled), 1) / world


def check_same_classes(train: BuiltDataset, val: BuiltDataset | None) -> None:
    if val is not None and val.class_names != train.class_names:
        raise InputError(val.root / "classes.json",
                         f"classes differ from the training classes in {train.root / 'classes.json'}")


def tensorboard_writer(out: Path):
    """A SummaryWriter in RUN/tb when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tb"))


def start_run_directory(out: Path, config: Config, classes: list[dict]) -> None:
    """RUN/config.yaml (the resolved configuration) and RUN/classes.json: written by rank 0 alone."""
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(config, out / "config.yaml")
        write_json(out / "classes.json", classes)


def open_log(path: Path, fields: tuple[str, ...], keep_until: int):
    """Open a RUN/*.csv log for appending, first dropping rows past `keep_until` (a resumed run redoes them)."""
    rows = []
    if keep_until > 0 and path.exists():
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= keep_until]
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    return open(path, "a", newline="", encoding="utf-8")


def open_datasets(train: TrainConfig) -> tuple[TrainConfig, BuiltDataset, BuiltDataset | None]:
    """The training and validation builds; the returned settings record the images root actually used."""
    train_set = BuiltDataset(train.data, train.images_root)
    recorded = train_set.meta.get("images_root")
    if train.images_root is None and recorded is not None:
        train = dataclasses.replace(train, images_root=str(Path(recorded).resolve()))  # saved in config.yaml
    # The validation split reads its own recorded root unless the training one was overridden.
    overridden = recorded is None or train.images_root != str(Path(recorded).resolve())
    val_set = BuiltDataset(train.val_data, train.images_root if overridden else None) if train.val_data else None
    check_same_classes(train_set, val_set)
    return train, train_set, val_set


def new_model(args: ModelArgs) -> Segmenter:
    try:
        return Segmenter.from_args(args)
    except PretrainedWeightsError as e:
        raise InputError(None, f"{e}; train from scratch with --no-pretrained") from None


class Records:
    """RUN/log.csv, val.csv, TensorBoard events and the progress bar: rank 0's alone, silent on other ranks."""

    def __init__(self, out: Path, start: int, stop: int, validating: bool, desc: str, progress: bool):
        self.main = distributed.is_main()
        self.log = open_log(out / "log.csv", LOG_FIELDS, start) if self.main else None
        self.val_log = open_log(out / "val.csv", VAL_FIELDS, start) if self.main and validating else None
        self.log_rows = csv.DictWriter(self.log, LOG_FIELDS) if self.log is not None else None
        self.val_rows = csv.DictWriter(self.val_log, VAL_FIELDS) if self.val_log is not None else None
        self.tb = tensorboard_writer(out) if self.main else None
        self.bar = tqdm(total=stop, initial=start, desc=desc, unit="it", disable=not (progress and self.main),
                        dynamic_ncols=True)

    def iteration(self, done: int, loss: float, lr: float, seconds: float) -> None:
        if self.log is not None:
            self.log_rows.writerow(
                {"iteration": done, "loss": f"{loss:.6g}", "lr": f"{lr:.6g}", "seconds": f"{seconds:.3f}"})
            self.log.flush()
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, done)
            self.tb.add_scalar("train/lr", lr, done)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        self.bar.update()

    def validation(self, done: int, metrics: dict) -> None:
        if self.val_log is not None:
            self.val_rows.writerow(
                {"iteration": done, "miou": f"{metrics['miou']:.6g}", "pixel_acc": f"{metrics['pixel_acc']:.6g}"})
            self.val_log.flush()
        if self.tb is not None:
            self.tb.add_scalar("val/miou", metrics["miou"], done)
        if self.main:
            self.bar.write(f"iteration {done}: val mIoU {metrics['miou']:.4f}")

    def close(self) -> None:
        self.bar.close()
        for f in (self.log, self.val_log, self.tb):
            if f is not None:
                f.close()


def train(config: Config, out: str | Path, resume: bool = False, stop_after: int | None = None,
          progress: bool = True) -> dict:
    """Train one run into `out`; returns {"iteration", "best_miou", "seconds"}.

    Under torchrun, every process runs this with its share of each batch; rank 0 writes the run.
    A run that fails before its first checkpoint leaves nothing behind it (ess.outputs.claim_run);
    a stop signal ends it at an iteration's end (ess.stopping).
    """
    out = Path(out).resolve()
    with distributed.process_group(config.train.device) as device:
        cfg.check_for_training(config, world=distributed.world_size())
        if not resume and (out / "last.pt").exists():
            raise InputError(out, "already holds a run (last.pt): pass --resume to continue it, or another --out")
        with claim_run(out, config.train):  # the lock, and no half-written run left by a failure
            return _train(config, out, device, resume, stop_after, progress)


@dataclasses.dataclass
class State:
    """What a run carries from iteration to iteration, and what last.pt saves and --resume restores."""
    model: Segmenter
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    iteration: int = 0
    best_miou: float | None = None
    seconds: float = 0.0

    def save(self, path: Path, config: Config) -> None:
        if distributed.is_main():
            save_checkpoint(path, {"iteration": self.iteration, "model_args": dataclasses.asdict(self.model.args),
                                   "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                                   "scaler": self.scaler.state_dict(), "config": config.to_dict(),
                                   "best_miou": self.best_miou, "seconds": self.seconds})

    def restore(self, path: Path, device: torch.device) -> None:
        """Weights, optimiser (with this configuration's LRs and the like), scaler and counters of `path`."""
        state = load_checkpoint(path, map_location=device)
        load_weights(self.model, state, path)
        own = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, mine in zip(self.optimizer.param_groups, own):  # this config's LRs etc. win over the saved ones
            group.update(mine)
        if state["scaler"]:  # empty when saved unscaled (float32, bfloat16): this scaler then starts afresh
            self.scaler.load_state_dict(state["scaler"])
        self.iteration, self.best_miou, self.seconds = state["iteration"], state.get("best_miou"), state.get("seconds", 0.0)


def new_state(args: ModelArgs, settings: TrainConfig, device: torch.device, amp) -> State:
    """A freshly initialised model (seeded by the run's seed), its optimiser and mixed-precision scaler."""
    torch.manual_seed(settings.seed)
    model = new_model(args).to(device)
    # Under DDP the scaled gradients are averaged before the scaler unscales them, so every rank
    # finds the same inf/NaN and skips (or takes) the same steps.
    return State(model, make_optimizer(model, settings), amp.grad_scaler())


def optimisation_step(net: torch.nn.Module, state: State, amp, images: torch.Tensor, masks: torch.Tensor) -> float:
    """Forward (under autocast), the loss (in float32), backward and the optimiser's step; the global batch's loss."""
    with amp.autocast():
        output = net(images)
    loss = state.model.loss(output, masks, loss_normalizer(masks))  # in float32, outside autocast
    loss_value = distributed.mean_over_ranks(loss)  # the global batch's loss
    if not math.isfinite(loss_value):
        raise TrainingError(f"iteration {state.iteration + 1}: loss is {loss_value}")
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    return loss_value


def _train(config: Config, out: Path, device: torch.device, resume: bool, stop_after: int | None,
           progress: bool) -> dict:
    settings, train_set, val_set = open_datasets(config.train)
    amp = precision(device, settings.amp)
    total = settings.iters
    stop = total if stop_after is None else min(stop_after, total)
    samples = TrainSamples(train_set, settings.crop, (settings.scale_min, settings.scale_max), settings.flip,
                           settings.seed)
    args = dataclasses.replace(config.model, num_classes=train_set.num_classes,
                               pretrained=config.model.pretrained and not resume)
    check_training_memory(args, settings, device, distributed.world_size(), train_set.images)
    state = new_state(args, settings, device, amp)
    if resume:
        state.restore(out / "last.pt", device)
        if state.iteration >= stop:
            return {"iteration": state.iteration, "best_miou": state.best_miou, "seconds": state.seconds}
    start = state.iteration
    # `net`, what runs forward, is DistributedDataParallel around the model under torchrun (DDP averages the
    # ranks' gradients in backward).
    net = distributed.wrap(state.model, device, settings.sync_bn)
    config = dataclasses.replace(config, train=settings)
    start_run_directory(out, config, train_set.classes)
    loader = train_loader(samples, settings.batch, start, stop, settings.workers, pin_memory=device.type == "cuda",
                          rank=distributed.rank(), world=distributed.world_size())
    state.model.train()
    last_saved = start if resume else None
    records = Records(out, start, stop, val_set is not None, f"train {args.head}", progress)  # closed below
    stopping = StopPlan(start, stop, settings.ckpt_every, state.seconds)  # a stop signal acts at an iteration's end
    tick = time.perf_counter()
    try:
        for iteration, (images, masks) in zip(range(start, stop), loader):
            lr = set_lr(state.optimizer, iteration, total, settings.min_lr)
            torch.manual_seed(step_seed(settings.seed, iteration, distributed.rank()))
            try:
                loss_value = optimisation_step(net, state, amp, images.to(device, non_blocking=True),
                                               masks.to(device, non_blocking=True))
            except TrainingError as e:
                kept = (f"last good checkpoint {out / 'last.pt'} (iteration {last_saved}) kept"
                        if last_saved is not None else "no checkpoint had been written yet")
                raise TrainingError(f"{e}; stopped, {kept}") from None
            state.iteration = done = iteration + 1
            now = time.perf_counter()
            state.seconds, tick = state.seconds + now - tick, now
            records.iteration(done, loss_value, lr, state.seconds)
            stop_here = stopping.check(done, state.seconds)
            if val_set is not None and settings.val_every and (done % settings.val_every == 0 or done == total) \
                    and not stopping.requested:
                validate(state, val_set, device, settings, records, stopping, out, config)
                tick = time.perf_counter()  # validation time is not training time
            if done % settings.ckpt_every == 0 or done == stop:
                state.save(out / "last.pt", config)
                last_saved = done
            if stop_here:
                raise stopping.interrupted()
        if stopping.signalled:  # during the last iteration or its checkpoint: complete, and still a stop
            raise stopping.interrupted()
    except (KeyboardInterrupt, RuntimeError) as e:  # Ctrl-C, SIGTERM, SIGHUP: one line on what is kept
        if not stopping.ends(e):
            raise
        raise stopping.stopped(e, state.iteration, last_saved, out) from None
    finally:
        stopping.close()
        records.close()
    return {"iteration": stop, "best_miou": state.best_miou, "seconds": state.seconds}


def validate(state: State, val_set: BuiltDataset, device: torch.device, settings: TrainConfig, records: Records,
             stopping: StopPlan, out: Path, config: Config) -> None:
    """Evaluate on the validation build (each rank its share of the images), log it, keep best.pt."""
    with stopping.immediate():
        metrics = evaluate_model(state.model, val_set, device, crop=settings.crop_val, amp=settings.amp,
                                 progress=False)
    state.model.train()
    records.validation(state.iteration, metrics)
    if state.best_miou is None or metrics["miou"] > state.best_miou:
        state.best_miou = metrics["miou"]
        state.save(out / "best.pt", config)
