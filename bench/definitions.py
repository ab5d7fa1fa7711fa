"""What the bench analyses compute, in words, and the study's variants: shared by `--help` and the summaries.

Plain Python only (no numpy, pandas or torch), so that `bench --help` stays instant.
"""
from __future__ import annotations

TOPN_DEFINITION = (
    "Classes are ordered most frequent first by their training pixels (or images) in the data's stats.csv, "
    "ties broken by the other count, then by class id. Each class's IoU is TP / (TP + FP + FN) from the full "
    "C x C confusion matrix of the evaluation (all classes compete in the prediction, not only the top n). "
    "mIoU@n is the mean of the IoUs of the classes among the top n that are present (in the ground truth or "
    "the prediction); classes absent from both are skipped, as in the run's overall mIoU, and mIoU@n is empty "
    "(NaN) when none of the top n is present. So mIoU@C equals metrics.json's miou."
)

# The heads `bench timing` measures unless told otherwise (names of ess.heads.VARIANTS).
TIMING_HEADS = ("softmax", "softmax-chunked", "ess", "ess-stride4-ivf")

# The study's variants: name -> the model options it changes from the study's configuration.
# Every variant shares the data, iterations, seed and schedule; only these options differ.
# A variant whose options this version of `ess` lacks is not offered (see bench.study.available_variants).
VARIANTS: dict[str, dict] = {
    "softmax": {"head": "softmax"},
    "ess": {"head": "ess"},
    "ess-random": {"head": "ess", "sampling": "random"},
    "ess-no-norm": {"head": "ess", "normalize": False},
    "ess-no-reg": {"head": "ess", "reg": False},
    "softmax-gn": {"head": "softmax", "norm": "gn"},
    "ess-gn": {"head": "ess", "norm": "gn"},
    "ess-stride4": {"head": "ess", "knn_stride": 4},
    "ess-stride8": {"head": "ess", "knn_stride": 8},
}

TOP = 50  # miou_top50 / miou_tail split

GROUP_DEFINITION = (
    f"Per-class IoU is TP / (TP + FP + FN) from the evaluation's C x C confusion matrix; a group's mIoU is the mean "
    f"over the group's classes present in the ground truth or the prediction (as `ess eval` counts them), empty "
    f"when none is. miou_top50: the {TOP} most frequent classes by training pixels (the training build's stats.csv, "
    f"ties by images, then id); miou_tail: all the other classes. miou_lvis_f / _c / _r: classes with that LVIS "
    f"frequency group; miou_stuff: the COCO-Stuff classes. A class that is both a stuff class and an LVIS category "
    f"(source 'both') counts in its LVIS group and in stuff, so the LVIS groups together cover every LVIS category "
    f"and stuff covers every COCO-Stuff class."
)
