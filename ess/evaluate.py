"""Evaluate a run on a build directory: streaming confusion matrix, metrics, optional predictions.

Writes into EVAL (default RUN/eval):
    metrics.json    miou, pixel_acc, mean_acc, fw_iou, num_classes, classes_present, head, readout, run, data
    per_class.csv   id,name,source,frequency,iou,acc,gt_pixels,gt_images,pred_pixels
    confusion.npz   key "confusion": int64 C x C, rows ground truth, columns prediction
    predictions/    <12-digit id>.png (uint16 class ids) and <12-digit id>_color.png, with --save-predictions

Under torchrun every process evaluates every world_size-th image and the confusion
matrices and image counts are summed over the processes, so the metrics are those of
one process; rank 0 writes the files, and each process its own images' predictions.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from cocolvis.dataset import BuiltDataset, mask_name
from segkit.io import InputError, atomic_open, atomic_path, write_json
from segkit.signals import ignore_stop_signals
from ess.config import eval_dir
from ess.data import EvalSamples
from ess.device import precision
from ess import distributed
from ess.metrics import ConfusionMatrix, compute_metrics
from ess.memory import check_eval_memory
from ess.outputs import claim_eval
from ess.readout import pixel_mean_readout
from ess.run import load_run
from ess.visualize import colorize

PER_CLASS_FIELDS = ("id", "name", "source", "frequency", "iou", "acc", "gt_pixels", "gt_images", "pred_pixels")
SUMMARY_KEYS = ("miou", "pixel_acc", "mean_acc", "fw_iou", "num_classes", "classes_present")


def write_label_png(path: Path, labels: np.ndarray) -> None:
    with atomic_path(path, suffix=".png") as tmp:  # cv2 picks the codec from the extension
        if not cv2.imwrite(str(tmp), labels.astype(np.uint16)):
            raise InputError(path, "could not write PNG")


def write_rgb_png(path: Path, rgb: np.ndarray) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise InputError(path, "could not write PNG")


@torch.no_grad()
def evaluate_model(model, dataset: BuiltDataset, device: torch.device, crop: int | None = None, amp: bool | None = False,
                   predictions_dir: Path | None = None, progress: bool = True, workers: int = 0) -> dict:
    """Run the model over every image of `dataset` (whole images, or centre crops of `crop`).

    `amp` is a run's --amp setting (ess.device.precision; None: on for CUDA, off for the CPU).
    Returns compute_metrics() of the confusion matrix, plus "confusion" and "gt_images".
    Under torchrun each rank takes its share of the images and the results are of all of them.
    """
    was_training = model.training
    model.eval()
    confusion = ConfusionMatrix(dataset.num_classes)
    samples = EvalSamples(dataset, crop)
    shard = torch.utils.data.Subset(samples, distributed.shard(len(samples)))
    loader = torch.utils.data.DataLoader(shard, batch_size=1, num_workers=workers, worker_init_fn=ignore_stop_signals)
    show = progress and distributed.is_main()
    for image, mask, image_id in tqdm(loader, desc="eval", unit="img", disable=not show, dynamic_ncols=True):
        with precision(device, amp).autocast():
            output = model(image.to(device))
        pred = model.predict(output)
        confusion.update(pred, mask.to(device))
        if predictions_dir is not None:
            labels = pred[0].cpu().numpy()
            name = mask_name(int(image_id[0]))
            write_label_png(predictions_dir / name, labels)
            write_rgb_png(predictions_dir / name.replace(".png", "_color.png"), colorize(labels))
    model.train(was_training)
    confusion.matrix = distributed.all_reduce_sum(confusion.matrix)  # every rank's images (one process: as is)
    confusion.gt_images = distributed.all_reduce_sum(torch.from_numpy(confusion.gt_images)).numpy()
    metrics = compute_metrics(confusion.confusion)
    metrics["confusion"] = confusion.confusion
    metrics["gt_images"] = confusion.gt_images
    return metrics


def _number(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def eval_summary(metrics: dict, head: str, run_dir: Path, data_dir: Path) -> dict:
    """The content of metrics.json."""
    summary = {k: _number(metrics[k]) for k in SUMMARY_KEYS}
    summary.update(head=head, readout=metrics.get("readout", "learned"), run=str(Path(run_dir).resolve()),
                   data=str(Path(data_dir).resolve()))
    return summary


def write_eval(out: Path, metrics: dict, classes: list[dict], head: str, run_dir: Path, data_dir: Path) -> dict:
    """Write metrics.json, per_class.csv and confusion.npz; returns the metrics.json content."""
    out.mkdir(parents=True, exist_ok=True)
    summary = eval_summary(metrics, head, run_dir, data_dir)
    with atomic_open(out / "per_class.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(PER_CLASS_FIELDS)
        for i, c in enumerate(classes):
            iou, acc = metrics["iou"][i], metrics["acc"][i]
            writer.writerow([c["id"], c["name"], c.get("source", ""), c.get("frequency") or "",
                             "" if math.isnan(iou) else f"{iou:.10g}", "" if math.isnan(acc) else f"{acc:.10g}",
                             int(metrics["gt_pixels"][i]), int(metrics["gt_images"][i]), int(metrics["pred_pixels"][i])])
    with atomic_path(out / "confusion.npz", suffix=".npz") as tmp:
        np.savez_compressed(tmp, confusion=metrics["confusion"].astype(np.int64))
    write_json(out / "metrics.json", summary)
    return summary


def evaluate_run(run_dir: str | Path, data: str | Path, images_root: str | Path | None = None,
                 out: str | Path | None = None, save_predictions: bool = False, checkpoint: str = "best",
                 crop: int | None = None, device: str = "auto", progress: bool = True, workers: int = 0,
                 readout: str = "learned") -> dict:
    """`ess eval`: load a run, evaluate it on a build directory, write the outputs; returns metrics.json.

    readout "pixel-mean" evaluates the run's ESS network with each class embedding replaced by the mean
    embedding of its pixels in the run's training data (ess.readout), into RUN/eval-pixel-mean by default.
    Under torchrun the processes share the images; rank 0 writes the outputs.
    """
    with distributed.process_group(device) as dev:
        run = load_run(run_dir, checkpoint=checkpoint, device=dev)
        dataset = BuiltDataset(data, images_root)
        if dataset.class_names != [c["name"] for c in run.classes]:
            raise InputError(dataset.root / "classes.json",
                             f"{dataset.num_classes} classes that differ from the run's {len(run.classes)} "
                             f"in {run.dir / 'classes.json'}")
        out = Path(out) if out is not None else eval_dir(run.dir, readout)
        crop = crop if crop is not None else run.config.train.crop_val
        check_eval_memory(run.model.args, dataset.images, crop, dev, dataset.root / "images.jsonl")
        training = BuiltDataset(run.config.train.data, run.config.train.images_root) if readout == "pixel-mean" else None
        if training is not None:  # its whole images run through the network too
            check_eval_memory(run.model.args, training.images, None, dev, training.root / "images.jsonl")
        with claim_eval(out, dataset.root):  # the lock, and nothing half-written left by a failure
            model = run.model if training is None else pixel_mean_readout(
                run.model, training, dev, progress=progress and distributed.is_main())
            metrics = evaluate_model(model, dataset, dev, crop=crop, amp=run.config.train.amp,
                                     predictions_dir=out / "predictions" if save_predictions else None,
                                     progress=progress, workers=workers)
            metrics["readout"] = readout
            if not distributed.is_main():
                return eval_summary(metrics, run.model.args.head, run.dir, dataset.root)
            return write_eval(out, metrics, dataset.classes, run.model.args.head, run.dir, dataset.root)
