"""What the bench analyses compute, in words: shared by `--help` and the summaries.

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

TOP = 50  # miou_top50 / miou_tail split

# LVIS frequency groups (by the number of LVIS *train* images a category is annotated in), plus the
# group of COCO-Stuff classes that have no LVIS counterpart, as the figures name and colour them;
# and where a class comes from.
GROUPS = {"f": "frequent (>100 images)", "c": "common (11-100)", "r": "rare (1-10)", "none": "stuff only (no LVIS group)"}
GROUP_COLORS = {"f": "#1f77b4", "c": "#ff7f0e", "r": "#d62728", "none": "#7f7f7f"}
SOURCES = ["lvis", "coco", "both"]

GROUP_DEFINITION = (
    f"Per-class IoU is TP / (TP + FP + FN) from the evaluation's C x C confusion matrix; a group's mIoU is the mean "
    f"over the group's classes present in the ground truth or the prediction (as `ess eval` counts them), empty "
    f"when none is. miou_top50: the {TOP} most frequent classes by training pixels (the training build's stats.csv, "
    f"ties by images, then id); miou_tail: all the other classes. miou_lvis_f / _c / _r: classes with that LVIS "
    f"frequency group; miou_stuff: the COCO-Stuff classes. A class that is both a stuff class and an LVIS category "
    f"(source 'both') counts in its LVIS group and in stuff, so the LVIS groups together cover every LVIS category "
    f"and stuff covers every COCO-Stuff class."
)
