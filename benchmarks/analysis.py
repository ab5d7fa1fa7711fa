"""Speed of the bench hot paths against the naive way, in the same run: `python -m benchmarks.analysis`.

    top-n curve      cumulative sums over the ordered IoUs  vs  a mean per n (O(C^2))
    per-class IoU    diagonal and margins of the confusion  vs  a loop over classes
    classes in mask  np.bincount                            vs  np.unique (sorts the pixels)

Each figure is the median of several runs; the ratio is naive / ours.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from bench.topn import per_class_iou, topn_miou


def median_time(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def naive_topn(iou: np.ndarray, order: np.ndarray) -> np.ndarray:
    out = np.full(len(order), np.nan)
    for n in range(1, len(order) + 1):
        top = [iou[i] for i in order[:n] if not np.isnan(iou[i])]
        if top:
            out[n - 1] = sum(top) / len(top)
    return out


def naive_iou(confusion: np.ndarray) -> np.ndarray:
    out = np.full(len(confusion), np.nan)
    for i in range(len(confusion)):
        tp = confusion[i, i]
        union = confusion[i, :].sum() + confusion[:, i].sum() - tp
        if union:
            out[i] = tp / union
    return out


def random_confusion(c: int, rng: np.random.Generator) -> np.ndarray:
    conf = rng.poisson(0.05, size=(c, c)).astype(np.int64)
    conf[np.diag_indices(c)] += rng.poisson(50, size=c)
    conf[:, rng.random(c) < 0.2] = 0  # some classes never predicted ...
    conf[rng.random(c) < 0.2] = 0     # ... or never in the ground truth
    return conf


def main() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for c in (1284, 4000):
        conf = random_confusion(c, rng)
        iou = per_class_iou(conf)
        order = rng.permutation(c)
        np.testing.assert_allclose(iou, naive_iou(conf))
        reps = 3 if c > 2000 else 5
        if c <= 2000:
            np.testing.assert_allclose(topn_miou(iou, order), naive_topn(iou, order))
            rows.append((f"top-n curve, C={c}", median_time(lambda: topn_miou(iou, order)),
                         median_time(lambda: naive_topn(iou, order), 1)))
        rows.append((f"per-class IoU, C={c}", median_time(lambda: per_class_iou(conf), reps),
                     median_time(lambda: naive_iou(conf), reps)))
    mask = np.zeros((480, 640), np.uint16)
    for cid in rng.choice(np.arange(1, 1285), size=25, replace=False):
        y, x = rng.integers(0, 400), rng.integers(0, 560)
        mask[y:y + 80, x:x + 80] = cid

    def ours():
        return int(np.count_nonzero(np.bincount(mask.ravel(), minlength=1285)[1:]))

    def naive():
        u = np.unique(mask)
        return int((u > 0).sum())

    assert ours() == naive()
    rows.append(("classes in a 640x480 mask", median_time(ours, 20), median_time(naive, 20)))

    print(f"{'operation':<30} {'ours (ms)':>10} {'naive (ms)':>11} {'ratio':>8}")
    for name, ours_s, naive_s in rows:
        print(f"{name:<30} {ours_s * 1e3:>10.3f} {naive_s * 1e3:>11.3f} {naive_s / ours_s:>7.1f}x")


if __name__ == "__main__":
    main()
