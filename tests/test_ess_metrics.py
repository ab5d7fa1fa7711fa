"""Metrics against a hand computation; the streaming confusion matrix against scikit-learn."""
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix

from ess.metrics import ConfusionMatrix, compute_metrics


def test_metrics_by_hand():
    # rows ground truth, columns prediction; class 4 is absent from both.
    cm = np.array([[3, 1, 0, 0],
                   [0, 2, 2, 0],
                   [1, 0, 0, 0],
                   [0, 0, 0, 0]])
    m = compute_metrics(cm)
    # IoU: class 1: 3 / (4 + 4 - 3) = 3/5; class 2: 2 / (4 + 3 - 2) = 2/5; class 3: 0 / (1 + 2 - 0) = 0
    assert m["iou"][:3] == pytest.approx([0.6, 0.4, 0.0])
    assert math.isnan(m["iou"][3])
    assert m["miou"] == pytest.approx((0.6 + 0.4 + 0.0) / 3)
    assert m["pixel_acc"] == pytest.approx(5 / 9)
    assert m["acc"][:3] == pytest.approx([0.75, 0.5, 0.0])
    assert m["mean_acc"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert m["fw_iou"] == pytest.approx(4 / 9 * 0.6 + 4 / 9 * 0.4 + 1 / 9 * 0.0)
    assert m["classes_present"] == 3 and m["num_classes"] == 4
    assert m["gt_pixels"].tolist() == [4, 4, 1, 0]
    assert m["pred_pixels"].tolist() == [4, 3, 2, 0]


def test_class_only_predicted_counts_in_miou_not_in_mean_acc():
    cm = np.array([[2, 2], [0, 0]])
    m = compute_metrics(cm)
    assert m["iou"].tolist() == [0.5, 0.0]
    assert m["miou"] == 0.25
    assert m["mean_acc"] == 0.5
    assert math.isnan(m["acc"][1])


def test_streaming_matrix_equals_sklearn_and_skips_unlabeled():
    rng = np.random.default_rng(0)
    c = 7
    cm = ConfusionMatrix(c)
    all_gt, all_pred = [], []
    gt_images = np.zeros(c, dtype=int)
    for _ in range(5):
        gt = rng.integers(0, c + 1, size=(2, 13, 17))
        gt[0, :, :5] = 0
        gt[1][gt[1] == 3] = 0  # class 3 absent from the second image
        pred = rng.integers(1, c + 1, size=(2, 13, 17))
        cm.update(torch.from_numpy(pred), torch.from_numpy(gt))
        all_gt.append(gt.ravel())
        all_pred.append(pred.ravel())
        for image in gt:
            gt_images[np.unique(image[image > 0]) - 1] += 1
    gt, pred = np.concatenate(all_gt), np.concatenate(all_pred)
    keep = gt > 0
    expected = confusion_matrix(gt[keep], pred[keep], labels=np.arange(1, c + 1))
    assert cm.confusion.dtype == np.int64
    assert np.array_equal(cm.confusion, expected)
    assert np.array_equal(cm.gt_images, gt_images)


def test_empty_matrix_gives_nan_not_an_error():
    m = compute_metrics(np.zeros((3, 3), dtype=np.int64))
    assert math.isnan(m["miou"]) and m["classes_present"] == 0
