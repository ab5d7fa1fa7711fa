"""The training loop, top to bottom: data, model, optimiser, resume, iterate, checkpoint.

Everything random in an iteration is a function of (seed, iteration): the batch
(see ess.data) and torch's RNG (dropout, random negatives), reseeded every step.
Together with the saved weights, optimiser and scaler state this makes
`--iters 2N --stop-after N` then `--resume` equal to one run of 2N iterations.
"""
from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from cocolvis.dataset import BuiltDataset
from cocolvis.io import InputError, atomic_open, write_json
from ess import config as cfg
from ess.checkpoint import load_checkpoint, load_weights, save_checkpoint
from ess.data import TrainSamples, train_loader
from ess.model import Segmenter, build_model

LOG_FIELDS = ("iteration", "loss", "lr", "seconds")


class TrainingError(click.ClickException):
    """Training cannot go on (e.g. the loss diverged): one line, exit status 1."""


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_from_config(config: dict, num_classes: int) -> Segmenter:
    """The Segmenter a run's config describes."""
    head_options = {}
    if config["head"] == "ess":
        head_options = dict(k=config["k"], tau=config["tau"], margin=config["margin"], knn=config["knn"],
                            sampling=config["sampling"], reg=config["reg"], chunk=config["knn_chunk"])
    return build_model(config["head"], num_classes, encoder=config["encoder"], embed_dim=config["embed_dim"],
                       norm=config["norm"], normalize=config["normalize"], pretrained=config["pretrained"],
                       output_stride=config["output_stride"], aspp_rates=tuple(config["aspp_rates"]),
                       encoder_bn_momentum=config["encoder_bn_momentum"], **head_options)


def make_optimizer(model: Segmenter, config: dict) -> torch.optim.SGD:
    """SGD with three parameter groups, each with its own base LR, momentum and poly power."""
    embeddings = [model.head.embeddings] if hasattr(model.head, "embeddings") else []
    taken = {id(p) for p in embeddings} | {id(p) for p in model.encoder.parameters()}
    rest = [p for p in model.parameters() if id(p) not in taken]
    groups = [
        dict(name="encoder", params=list(model.encoder.parameters()), base_lr=config["lr"] * config["encoder_lr_mult"],
             momentum=config["momentum"], weight_decay=config["weight_decay"], power=config["poly_power"]),
        dict(name="decoder", params=rest, base_lr=config["lr"],
             momentum=config["momentum"], weight_decay=config["weight_decay"], power=config["poly_power"]),
    ]
    if embeddings:
        groups.append(dict(name="class_embeddings", params=embeddings, base_lr=config["lr"],
                           momentum=config["embed_momentum"], weight_decay=config["embed_weight_decay"],
                           power=config["embed_poly_power"]))
    for g in groups:
        g["lr"] = g["base_lr"]
    return torch.optim.SGD(groups, lr=config["lr"])


def set_lr(optimizer: torch.optim.Optimizer, iteration: int, total: int) -> float:
    """Polynomial decay lr = base * (1 - i/total)^power per group; returns the decoder's LR."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * (1 - iteration / total) ** g["power"]
    return optimizer.param_groups[1]["lr"]


def step_seed(seed: int, iteration: int) -> int:
    return int(np.random.SeedSequence([seed, 2, iteration]).generate_state(1, dtype=np.uint64)[0] >> 1)


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


def open_log(path: Path, keep_until: int):
    """Open RUN/log.csv for appending, first dropping rows past `keep_until` (a resumed run redoes them)."""
    rows = []
    if keep_until > 0 and path.exists():
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= keep_until]
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return open(path, "a", newline="", encoding="utf-8")


def train(config: dict, out: str | Path, resume: bool = False, stop_after: int | None = None,
          progress: bool = True) -> dict:
    """Train one run into `out`; returns {"iteration", "best_miou", "seconds"}."""
    from ess.evaluate import evaluate_model  # evaluate imports this module's helpers

    out = Path(out).resolve()
    cfg.check_for_training(config)
    if not resume and (out / "last.pt").exists():
        raise InputError(out, "already holds a run (last.pt): pass --resume to continue it, or another --out")
    device = pick_device(config["device"])
    amp = config["amp"] and device.type == "cuda"
    total = config["iters"]
    stop = total if stop_after is None else min(stop_after, total)

    # Data.
    train_set = BuiltDataset(config["data"], config["images_root"])
    recorded = train_set.meta.get("images_root")
    if config["images_root"] is None and recorded is not None:
        config = {**config, "images_root": str(Path(recorded).resolve())}  # saved resolved in config.yaml
    # The validation split reads its own recorded root unless the training one was overridden.
    overridden = recorded is None or config["images_root"] != str(Path(recorded).resolve())
    val_set = (BuiltDataset(config["val_data"], config["images_root"] if overridden else None)
               if config["val_data"] else None)
    check_same_classes(train_set, val_set)
    samples = TrainSamples(train_set, config["crop"], (config["scale_min"], config["scale_max"]),
                           config["flip"], config["seed"])

    # Model, optimiser, mixed-precision scaler.
    torch.manual_seed(config["seed"])
    model = model_from_config({**config, "pretrained": config["pretrained"] and not resume},
                              train_set.num_classes).to(device)
    optimizer = make_optimizer(model, config)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    start, best_miou, seconds = 0, None, 0.0
    if resume:
        state = load_checkpoint(out / "last.pt", map_location=device)
        load_weights(model, state, out / "last.pt")
        settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        for group, own in zip(optimizer.param_groups, settings):  # this config's LRs etc. win over the saved ones
            group.update(own)
        scaler.load_state_dict(state["scaler"])
        start, best_miou, seconds = state["iteration"], state.get("best_miou"), state.get("seconds", 0.0)
        if start >= stop:
            return {"iteration": start, "best_miou": best_miou, "seconds": seconds}
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(config, out / "config.yaml")
    write_json(out / "classes.json", train_set.classes)

    def checkpoint(path: Path, iteration: int) -> None:
        save_checkpoint(path, {"iteration": iteration, "model": model.state_dict(),
                               "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                               "config": config, "best_miou": best_miou, "seconds": seconds,
                               "num_classes": train_set.num_classes})

    log = open_log(out / "log.csv", start)
    log_writer = csv.DictWriter(log, LOG_FIELDS)
    tb = tensorboard_writer(out)
    loader = train_loader(samples, config["batch"], start, stop, config["workers"], pin_memory=device.type == "cuda")
    bar = tqdm(total=stop, initial=start, desc=f"train {config['head']}", unit="it", disable=not progress,
               dynamic_ncols=True)
    model.train()
    last_saved = start if resume else None
    tick = time.perf_counter()
    try:
        for iteration, (images, masks) in zip(range(start, stop), loader):
            lr = set_lr(optimizer, iteration, total)
            torch.manual_seed(step_seed(config["seed"], iteration))
            images = images.to(device, non_blocking=True)
            masks = masks.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                output = model(images)
            loss = model.loss(output, masks)  # in float32, outside autocast
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                kept = (f"last good checkpoint {out / 'last.pt'} (iteration {last_saved}) kept"
                        if last_saved is not None else "no checkpoint had been written yet")
                raise TrainingError(f"iteration {iteration + 1}: loss is {loss_value}; stopped, {kept}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

            done = iteration + 1
            now = time.perf_counter()
            seconds, tick = seconds + now - tick, now
            log_writer.writerow({"iteration": done, "loss": f"{loss_value:.6g}", "lr": f"{lr:.6g}",
                                 "seconds": f"{seconds:.3f}"})
            log.flush()
            if tb is not None:
                tb.add_scalar("train/loss", loss_value, done)
                tb.add_scalar("train/lr", lr, done)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update()

            if val_set is not None and config["val_every"] and (done % config["val_every"] == 0 or done == total):
                metrics = evaluate_model(model, val_set, device, crop=config["crop_val"], amp=amp, progress=False)
                model.train()
                miou = metrics["miou"]
                if tb is not None:
                    tb.add_scalar("val/miou", miou, done)
                bar.write(f"iteration {done}: val mIoU {miou:.4f}")
                if best_miou is None or miou > best_miou:
                    best_miou = miou
                    checkpoint(out / "best.pt", done)
                tick = time.perf_counter()  # validation time is not training time
            if done % config["ckpt_every"] == 0 or done == stop:
                checkpoint(out / "last.pt", done)
                last_saved = done
    finally:
        bar.close()
        log.close()
        if tb is not None:
            tb.close()
    return {"iteration": stop, "best_miou": best_miou, "seconds": seconds}
