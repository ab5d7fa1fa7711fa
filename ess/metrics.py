"""Streaming confusion matrix and the segmentation metrics derived from it.

Class id i (1..C) lives at row/column i-1; rows are ground truth, columns prediction.
Unlabeled pixels (0) are never counted. The metrics are numpy only; torch is imported
by the streaming ConfusionMatrix alone, so analyses of saved confusion matrices
(`bench`) do not load it.
"""
from __future__ import annotations

import numpy as np


class ConfusionMatrix:
    """Accumulates a C x C int64 confusion matrix and per-class image counts, batch by batch."""

    def __init__(self, num_classes: int):
        import torch

        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes * num_classes, dtype=torch.int64)
        self.gt_images = np.zeros(num_classes, dtype=np.int64)

    def update(self, pred, gt) -> None:
        """Add one batch: `pred` and `gt` (tensors) of equal shape, ids 1..C (gt 0 = unlabeled, skipped)."""
        import torch

        c = self.num_classes
        gt = torch.as_tensor(gt).long()
        pred = torch.as_tensor(pred).long().to(gt.device)
        labelled = gt > 0
        index = (gt[labelled] - 1) * c + (pred[labelled] - 1)
        # Count the distinct (gt, pred) pairs only: the cost follows the pixels, not C x C.
        pairs, counts = torch.unique(index, return_counts=True)
        self.matrix.index_add_(0, pairs.cpu(), counts.cpu())
        # An image counts once for each class in its ground truth.
        per_image = gt.reshape(-1, gt.shape[-2] * gt.shape[-1]) if gt.dim() == 3 else gt.reshape(1, -1)
        for labels in per_image:
            present = torch.unique(labels)
            present = present[present > 0].cpu().numpy() - 1
            self.gt_images[present] += 1

    @property
    def confusion(self) -> np.ndarray:
        return self.matrix.view(self.num_classes, self.num_classes).numpy()


def per_class_iou(confusion: np.ndarray) -> np.ndarray:
    """IoU of every class from a confusion matrix (rows gt, columns prediction); NaN where absent from both."""
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def compute_metrics(confusion: np.ndarray) -> dict:
    """mIoU, pixel and mean accuracy, frequency-weighted IoU, and per-class arrays.

    mIoU averages over classes present in the ground truth or the prediction; a class
    absent from both has IoU NaN. Accuracy (recall) is NaN for a class absent from the
    ground truth.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    tp = np.diag(confusion).astype(np.float64)
    gt = confusion.sum(1).astype(np.float64)
    pred = confusion.sum(0).astype(np.float64)
    total = gt.sum()
    iou = per_class_iou(confusion)
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = np.where(gt > 0, tp / gt, np.nan)
    present = gt + pred > 0
    in_gt = gt > 0
    return {
        "miou": float(np.mean(iou[present])) if present.any() else float("nan"),
        "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
        "mean_acc": float(np.mean(acc[in_gt])) if in_gt.any() else float("nan"),
        "fw_iou": float(np.sum(gt[in_gt] / total * iou[in_gt])) if total > 0 else float("nan"),
        "num_classes": int(confusion.shape[0]),
        "classes_present": int(present.sum()),
        "iou": iou,
        "acc": acc,
        "gt_pixels": gt.astype(np.int64),
        "pred_pixels": pred.astype(np.int64),
    }
