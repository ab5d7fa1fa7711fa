"""ess: train and evaluate semantic segmentation with thousands of classes.

Two heads on the same DeepLabV3+ network: `softmax` (a C-way classifier, memory
growing with C) and `ess` (d-dimensional pixel embeddings matched to a learned
embedding per class, memory flat in C). Modules:
    model / heads / losses / knn   the network, the two heads, their losses, exact kNN search
    data                           samples over a `cocolvis build` directory, augmentation
    train / evaluate / predict     the commands' work; run.load_run reads a run directory
    outputs / memory / stopping    each command's claim on its --out; memory checked before allocation;
                                   training's stop on SIGTERM, SIGHUP and Ctrl-C
    metrics / visualize            confusion-matrix metrics; class colours and overlays
    config / checkpoint            options and presets; checkpoint files
"""
