"""The one home of bench's readers and shared tables: evaluations, class statistics, run logs, and the
per-group mIoU rows that `bench compare` and `bench study` both report (bench.definitions.GROUP_DEFINITION).
Every reader turns a missing or malformed file into one InputError line."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from bench.definitions import SOURCES, TOP
from cocolvis.dataset import STATS_COLUMNS, BuiltDataset, read_stats
from cocolvis.vocab import MAX_CLASSES
from ess.config import read_yaml
from ess.metrics import per_class_iou
from segkit.io import InputError, read_json
from segkit.memory import check_fits

GROUP_COLUMNS = ("miou", "miou_top50", "miou_tail", "miou_lvis_f", "miou_lvis_c", "miou_lvis_r", "miou_stuff")
ROW_COLUMNS = ("run", "head", *GROUP_COLUMNS, "pixel_acc", "classes_present", "iters", "train_seconds")


def _confusion_header(npz: np.lib.npyio.NpzFile, path: Path) -> None:
    """Refuse a confusion matrix by its .npy header, before its data is read: a square integer matrix of at
    most MAX_CLASSES classes whose int64 copy fits in memory."""
    if "confusion" not in npz.files:
        raise InputError(path, "no array named 'confusion'")
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with npz.zip.open("confusion.npy") as f:
        version = np.lib.format.read_magic(f)
        if version not in readers:
            raise InputError(path, f"confusion: .npy format version {version} is not supported")
        shape, _, dtype = readers[version](f)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise InputError(path, f"confusion must be a square matrix, got shape {shape}")
    if shape[0] > MAX_CLASSES:
        raise InputError(path, f"the header claims a {shape[0]} x {shape[1]} confusion matrix: at most {MAX_CLASSES} "
                               f"classes")
    if not np.issubdtype(dtype, np.integer):
        raise InputError(path, "confusion must hold non-negative integer pixel counts")
    check_fits(path, f"a {shape[0]} x {shape[1]} confusion matrix", shape[0] * shape[1] * (dtype.itemsize + 8))


def read_eval(eval_dir: str | Path) -> dict:
    """An `ess eval` output directory: metrics.json and the C x C confusion matrix (int64 counts)."""
    eval_dir = Path(eval_dir)
    metrics = read_json(eval_dir / "metrics.json")
    path = eval_dir / "confusion.npz"
    if not path.exists():
        raise InputError(path, "missing: not an `ess eval` output")
    try:
        with np.load(path) as npz:
            _confusion_header(npz, path)
            confusion = npz["confusion"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        if isinstance(e, InputError):
            raise
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise InputError(path, f"unreadable (not an .npz archive, or truncated): {reason}") from None
    if (confusion < 0).any():
        raise InputError(path, "confusion must hold non-negative integer pixel counts")
    if confusion.size and confusion.max() > np.iinfo(np.int64).max:  # uint64 counts that int64 cannot hold
        raise InputError(path, f"a count of {confusion.max()} is beyond the int64 range")
    if confusion.sum(dtype=np.float64) >= 2.0 ** 63:
        raise InputError(path, "the counts add up past the int64 range")
    return {"dir": eval_dir, "metrics": metrics, "confusion": confusion.astype(np.int64)}


def training_data(ev: dict) -> Path:
    """The build a run was trained on: metrics.json `run` -> RUN/config.yaml `data`."""
    metrics_path = ev["dir"] / "metrics.json"
    run = ev["metrics"].get("run")
    if not run:
        raise InputError(metrics_path, "no `run` recorded: pass --data")
    config_path = Path(run) / "config.yaml"
    if not config_path.is_file():
        raise InputError(config_path, "missing (the run recorded in metrics.json): pass --data")
    data = read_yaml(config_path).get("data")
    if not data or not isinstance(data, str):
        raise InputError(config_path, "no `data` entry: pass --data")
    return Path(data)


def run_labels(evals: list[dict]) -> list[str]:
    """Each run's head ("ess", "softmax"), with the run's directory name added where heads repeat."""
    heads = [str(ev["metrics"].get("head") or ev["dir"].parent.name) for ev in evals]
    labels = []
    for head, ev in zip(heads, evals):
        run_name = Path(ev["metrics"]["run"]).name if ev["metrics"].get("run") else ev["dir"].parent.name
        labels.append(head if heads.count(head) == 1 else f"{head} ({run_name})")
    if len(set(labels)) < len(labels):
        labels = [f"{label} #{i + 1}" for i, label in enumerate(labels)]
    return labels


def read_class_stats(data: str | Path) -> pd.DataFrame:
    """One row per class (indexed by id 1..C): classes.json joined with stats.csv, checked.

    Adds `group` (the LVIS frequency r/c/f, or "none" for stuff-only classes).
    """
    ds = BuiltDataset(data)
    path = ds.root / "stats.csv"
    stats = pd.DataFrame(read_stats(path)).set_index("id")
    if list(stats.index) != list(range(1, ds.num_classes + 1)):
        raise InputError(path, f"class ids must be 1..{ds.num_classes} in order, as in classes.json")
    classes = pd.DataFrame(ds.classes).set_index("id")
    renamed = stats.index[stats["name"] != classes["name"]]
    if len(renamed):
        i = int(renamed[0])
        raise InputError(path, f"class {i} is named {stats.at[i, 'name']!r} but {classes.at[i, 'name']!r} in classes.json")
    bad_source = classes.index[~classes["source"].isin(SOURCES)] if "source" in classes.columns else classes.index
    if len(bad_source):
        i = int(bad_source[0])
        raise InputError(ds.root / "classes.json", f"class {i}: source must be one of {', '.join(SOURCES)}")
    df = stats[list(STATS_COLUMNS[2:])].copy()  # the counts, int64
    df.insert(0, "name", classes["name"])
    df.insert(1, "source", classes["source"])
    freq = classes["frequency"] if "frequency" in classes.columns else pd.Series(np.nan, index=classes.index)
    df.insert(2, "group", freq.where(freq.isin(["r", "c", "f"]), "none"))
    return df


def frequency_order(df: pd.DataFrame, by: str) -> pd.DataFrame:
    """Classes most frequent first by `by` ("pixels" or "images"), ties by the other count, then by id."""
    other = "images" if by == "pixels" else "pixels"
    tmp = df.assign(_id=df.index)
    return tmp.sort_values([by, other, "_id"], ascending=[False, False, True], kind="stable").drop(columns="_id")


def class_groups(stats: pd.DataFrame) -> dict[str, np.ndarray]:
    """column -> boolean mask over class indices 0..C-1 (see GROUP_DEFINITION)."""
    ranked = frequency_order(stats, "pixels").index.to_numpy() - 1
    top = np.zeros(len(stats), dtype=bool)
    top[ranked[:TOP]] = True
    group, source = stats["group"].to_numpy(), stats["source"].to_numpy()
    return {
        "miou": np.ones(len(stats), dtype=bool),
        "miou_top50": top,
        "miou_tail": ~top,
        "miou_lvis_f": group == "f",
        "miou_lvis_c": group == "c",
        "miou_lvis_r": group == "r",
        "miou_stuff": np.isin(source, ("coco", "both")),
    }


def group_miou(iou: np.ndarray, members: np.ndarray) -> float:
    """Mean IoU over the member classes present (IoU not NaN); NaN when none is."""
    values = iou[members]
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def read_csv_log(path: Path) -> pd.DataFrame:
    """A run's log.csv or val.csv."""
    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise InputError(path, "missing: not a finished `ess train` run") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InputError(path, f"unreadable CSV: {' '.join(str(e).split())[:200]}") from None


def training_record(run: Path) -> tuple[int, float]:
    """(iterations done, training seconds) from the last row of RUN/log.csv; (0, NaN) without a log."""
    if not (run / "log.csv").exists():
        return 0, float("nan")
    log = read_csv_log(run / "log.csv")
    if log.empty or not {"iteration", "seconds"} <= set(log.columns):
        raise InputError(run / "log.csv", "no training rows")
    last = log.iloc[-1]
    return int(last["iteration"]), float(last["seconds"])


def evaluation_rows(evals: dict[str, dict], stats: pd.DataFrame, stats_path: Path) -> tuple[pd.DataFrame, dict]:
    """One row per labelled evaluation (`read_eval` of an `ess eval` directory; ROW_COLUMNS), and label -> per-class IoU."""
    groups = class_groups(stats)
    rows, ious = [], {}
    for label, ev in evals.items():
        if ev["confusion"].shape[0] != len(stats):
            raise InputError(ev["dir"] / "confusion.npz", f"{ev['confusion'].shape[0]} classes, but {stats_path} "
                                                          f"has {len(stats)}")
        iou = per_class_iou(ev["confusion"])
        ious[label] = iou
        run = Path(ev["metrics"]["run"]) if ev["metrics"].get("run") else ev["dir"].parent
        iters, seconds = training_record(run)
        rows.append({"run": label, "head": ev["metrics"].get("head"),
                     **{col: group_miou(iou, members) for col, members in groups.items()},
                     "pixel_acc": ev["metrics"].get("pixel_acc"), "classes_present": int((~np.isnan(iou)).sum()),
                     "iters": iters, "train_seconds": round(seconds, 1)})
    return pd.DataFrame(rows, columns=list(ROW_COLUMNS)), ious
