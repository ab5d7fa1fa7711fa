"""Training, resuming, evaluating and predicting on the synthetic build; bad input as one line."""
import dataclasses
import json
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from cocolvis.dataset import BuiltDataset, read_label_png
from ess import config as cfg
from ess.checkpoint import load_checkpoint
from ess.cli import main
from ess.evaluate import evaluate_model
from ess.metrics import compute_metrics
from ess.run import load_run
from ess.model import Segmenter
from ess.train import TrainingError, train

from conftest import TINY_RUN_OPTIONS


def small_config(data, head="ess", **overrides):
    options = {"crop": 32, "batch": 2, "iters": 4, "ckpt_every": 2, "device": "cpu", "encoder": "resnet18",
               "head": head, "data": str(data), **overrides}
    return cfg.resolve(None, None, options)


def one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    text = result.output.strip()
    assert text.startswith("Error: ") and "\n" not in text, text
    for needle in needles:
        assert str(needle) in text, text


# --- resume -------------------------------------------------------------------------------

def test_resume_n_plus_n_equals_2n(built_train, tmp_path):
    # Random negatives and ASPP dropout draw from torch's RNG, so this covers its reseeding too.
    config = small_config(built_train, "ess", sampling="random", iters=4, ckpt_every=4)
    train(config, tmp_path / "straight", progress=False)
    # The same run interrupted after 2 iterations, resumed for the other 2, with a different worker count.
    train(cfg.replace_train(config, workers=1), tmp_path / "split", stop_after=2, progress=False)
    assert load_checkpoint(tmp_path / "split" / "last.pt")["iteration"] == 2
    train(config, tmp_path / "split", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["iteration"] == b["iteration"] == 4
    for name, tensor in a["model"].items():  # bit for bit
        assert torch.equal(tensor, b["model"][name]), name
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
    log_a = pd.read_csv(tmp_path / "straight" / "log.csv")
    log_b = pd.read_csv(tmp_path / "split" / "log.csv")
    assert log_b["iteration"].tolist() == list(range(1, 5))
    assert log_a["loss"].tolist() == log_b["loss"].tolist()
    assert log_a["lr"].tolist() == log_b["lr"].tolist()


def test_train_command_stops_and_resumes(built_train, built_val, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--data", str(built_train), "--head", "softmax", "--preset", "tiny", "--crop", "32",
            "--batch", "2", "--iters", "2", "--device", "cpu", "--quiet", "--out", str(run)]
    runner = CliRunner()
    result = runner.invoke(main, args + ["--stop-after", "1"])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(run / "last.pt")["iteration"] == 1
    saved = cfg.load(run / "config.yaml")
    assert saved.model.head == "softmax" and saved.train.crop == 32 and saved.model.encoder == "resnet18"
    assert saved.train.data == str(built_train.resolve())
    assert saved.train.images_root == json.loads((built_train / "dataset.json").read_text())["images_root"]
    # Resuming takes the saved config; a flag given again overrides it (here: validate at the end).
    result = runner.invoke(main, ["train", "--out", str(run), "--resume", "--quiet", "--val-data", str(built_val),
                                  "--val-every", "2"])
    assert result.exit_code == 0, result.output
    assert "2 iterations" in result.output and "best val mIoU" in result.output
    assert load_checkpoint(run / "best.pt")["iteration"] == 2
    assert load_run(run).checkpoint.name == "best.pt"
    assert pd.read_csv(run / "log.csv")["iteration"].tolist() == [1, 2]
    val = pd.read_csv(run / "val.csv")  # the learning curve
    assert val["iteration"].tolist() == [2] and 0 <= val["miou"][0] <= 1


def test_resume_removes_the_temporary_of_a_killed_save(built_train, tmp_path):
    config = small_config(built_train, iters=4, ckpt_every=2)
    train(config, tmp_path / "run", stop_after=2, progress=False)
    stale = tmp_path / "run" / ".last.pt.abcd1234.pt.tmp"  # what atomic_path leaves when killed mid-save
    stale.write_bytes(b"partial")
    train(config, tmp_path / "run", resume=True, progress=False)
    assert not stale.exists() and load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 4


def test_a_run_is_not_overwritten_without_resume(built_train, tmp_path):
    config = small_config(built_train, iters=2)
    train(config, tmp_path / "run", progress=False)
    with pytest.raises(Exception, match="already holds a run"):
        train(config, tmp_path / "run", progress=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(built_train, tmp_path, monkeypatch):
    from ess.model import Segmenter

    calls = {"n": 0}
    real_loss = Segmenter.loss

    def loss(self, output, mask, normalizer=None):
        calls["n"] += 1
        value = real_loss(self, output, mask, normalizer)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(Segmenter, "loss", loss)
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as e:
        train(small_config(built_train, iters=6, ckpt_every=2), run, progress=False)
    message = str(e.value)
    assert "iteration 3: loss is nan" in message and "last.pt (iteration 2) kept" in message
    assert "\n" not in message
    assert load_checkpoint(run / "last.pt")["iteration"] == 2


def test_a_signal_during_the_last_iteration_still_stops_the_command(built_train, tmp_path, monkeypatch):
    """The run completes (its last checkpoint is written), and the command then stops as on any stop signal, so
    a study does not start its next run after a scheduler's SIGTERM."""
    import os
    import signal

    from segkit.signals import Interrupted

    calls = {"n": 0}
    real_loss = Segmenter.loss

    def loss(self, output, mask, normalizer=None):
        calls["n"] += 1
        if calls["n"] == 4:  # the last of 4 iterations
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(self, output, mask, normalizer)

    monkeypatch.setattr(Segmenter, "loss", loss)
    run = tmp_path / "run"
    with pytest.raises(Interrupted) as e:
        train(small_config(built_train, iters=4, ckpt_every=2), run, progress=False)
    assert e.value.signum == signal.SIGTERM and "stopped at iteration 4" in e.value.detail
    assert load_checkpoint(run / "last.pt")["iteration"] == 4


def test_the_faiss_search_without_faiss_is_one_line(monkeypatch):
    from ess import knn
    from segkit.errors import InputError

    monkeypatch.setattr(knn, "faiss_module", lambda: None)
    with pytest.raises(InputError, match="--knn faiss needs the faiss package"):
        knn.knn_faiss(torch.zeros(3, 4), torch.zeros(5, 4), 2)


# --- training quality ---------------------------------------------------------------------

@pytest.mark.parametrize("head", ["softmax", "ess"])
def test_tiny_training_beats_the_untrained_network(tiny_runs, built_train, built_val, head):
    run = tiny_runs[head]
    trained = json.loads((run / "eval" / "metrics.json").read_text())
    config = cfg.resolve("tiny", None, {**TINY_RUN_OPTIONS, "head": head, "data": str(built_train)})
    torch.manual_seed(config.train.seed)  # the initial weights of that run
    untrained_model = Segmenter.from_args(dataclasses.replace(config.model, num_classes=1284))
    untrained = evaluate_model(untrained_model, BuiltDataset(built_val), torch.device("cpu"),
                               progress=False)
    assert trained["miou"] > untrained["miou"]
    assert trained["pixel_acc"] > untrained["pixel_acc"] + 0.05
    log = pd.read_csv(run / "log.csv")
    assert list(log.columns) == ["iteration", "loss", "lr", "seconds"]
    assert log["loss"].tail(10).mean() < log["loss"].head(10).mean()


def test_eval_outputs_agree_with_the_masks(tiny_runs, built_val):
    run = tiny_runs["ess"]
    ev = run / "eval"
    metrics = json.loads((ev / "metrics.json").read_text())
    assert {"miou", "pixel_acc", "mean_acc", "fw_iou", "num_classes", "classes_present", "head", "run",
            "data"} <= set(metrics)
    assert metrics["head"] == "ess" and metrics["num_classes"] == 1284
    assert metrics["run"] == str(run.resolve()) and metrics["data"] == str(built_val.resolve())
    confusion = np.load(ev / "confusion.npz")["confusion"]
    assert confusion.dtype == np.int64 and confusion.shape == (1284, 1284)
    # The ground-truth side of the matrix is exactly the masks' pixel and image counts.
    val = BuiltDataset(built_val)
    pixels, images = np.zeros(1285, dtype=np.int64), np.zeros(1285, dtype=np.int64)
    for record in val.images:
        mask = val.read_mask(record["id"])
        pixels += np.bincount(mask.ravel(), minlength=1285)
        images[np.unique(mask)] += 1
    assert np.array_equal(confusion.sum(1), pixels[1:])
    per_class = pd.read_csv(ev / "per_class.csv")
    assert list(per_class.columns) == ["id", "name", "source", "frequency", "iou", "acc", "gt_pixels", "gt_images",
                                       "pred_pixels"]
    assert per_class["id"].tolist() == list(range(1, 1285))
    assert np.array_equal(per_class["gt_pixels"], pixels[1:])
    assert np.array_equal(per_class["gt_images"], images[1:])
    assert np.array_equal(per_class["pred_pixels"], confusion.sum(0))
    m = compute_metrics(confusion)
    assert metrics["miou"] == pytest.approx(m["miou"])
    assert metrics["miou"] == pytest.approx(per_class["iou"].mean())  # NaN (absent) rows are skipped
    absent = (per_class["gt_pixels"] == 0) & (per_class["pred_pixels"] == 0)
    assert per_class.loc[absent, "iou"].isna().all() and per_class.loc[~absent, "iou"].notna().all()
    assert metrics["classes_present"] == int((~absent).sum())


def test_saved_predictions_and_predict_command(tiny_runs, built_val, tmp_path):
    run = tiny_runs["softmax"]
    runner = CliRunner()
    out = tmp_path / "eval"
    result = runner.invoke(main, ["eval", "--run", str(run), "--data", str(built_val), "--out", str(out),
                                  "--save-predictions", "--quiet", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "mIoU" in result.output
    val = BuiltDataset(built_val)
    confusion = np.zeros((1284, 1284), dtype=np.int64)
    for record in val.images:
        pred = read_label_png(out / "predictions" / f"{record['id']:012d}.png")
        assert pred.min() >= 1 and pred.max() <= 1284
        assert cv2.imread(str(out / "predictions" / f"{record['id']:012d}_color.png")).shape == (*pred.shape, 3)
        gt = val.read_mask(record["id"]).astype(np.int64)
        keep = gt > 0
        np.add.at(confusion, (gt[keep] - 1, pred[keep].astype(np.int64) - 1), 1)
    assert np.array_equal(confusion, np.load(out / "confusion.npz")["confusion"])

    record = val.images[0]
    image = val.image_path(record)
    result = runner.invoke(main, ["predict", "--run", str(run), str(image), "--out", str(tmp_path / "pred"),
                                  "--quiet", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    pred = read_label_png(tmp_path / "pred" / f"{image.stem}.png")
    assert np.array_equal(pred, read_label_png(out / "predictions" / f"{record['id']:012d}.png"))
    overlay = cv2.imread(str(tmp_path / "pred" / f"{image.stem}_overlay.png"))
    assert overlay.shape[0] >= pred.shape[0] and overlay.shape[1] > pred.shape[1]


def test_compare_prints_both_heads(tiny_runs):
    result = CliRunner().invoke(main, ["compare", str(tiny_runs["softmax"] / "eval"), str(tiny_runs["ess"] / "eval")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["metric", "softmax", "ess"]
    miou = {h: json.loads((tiny_runs[h] / "eval" / "metrics.json").read_text())["miou"] for h in tiny_runs}
    assert lines[1].split() == ["miou", f"{miou['softmax']:.4f}", f"{miou['ess']:.4f}"]


def test_load_run(tiny_runs, built_train):
    run = load_run(tiny_runs["ess"])
    assert run.checkpoint.name == "last.pt"  # no validation, so no best.pt: falls back to last
    assert not run.model.training
    assert run.config.model.head == "ess" and run.config.train.data == str(built_train.resolve())
    assert run.model.args == dataclasses.replace(run.config.model, num_classes=1284)
    assert len(run.classes) == 1284 and run.classes[0]["id"] == 1
    assert run.model.head.class_embeddings().shape == (1284, 12)


# --- bad input: one line, exit status 1 -----------------------------------------------------

@pytest.fixture()
def train_args(tmp_path):
    return ["train", "--head", "ess", "--preset", "tiny", "--crop", "32", "--batch", "2", "--iters", "1",
            "--device", "cpu", "--quiet", "--out", str(tmp_path / "run")]


def test_missing_classes_json(built_train, tmp_path, train_args):
    data = tmp_path / "data"
    shutil.copytree(built_train, data)
    (data / "classes.json").unlink()
    one_line_error(CliRunner().invoke(main, train_args + ["--data", str(data)]), data / "classes.json")


def test_mask_ids_above_the_class_count(built_train, tmp_path, train_args):
    data = tmp_path / "data"
    shutil.copytree(built_train, data)
    for mask in (data / "masks").glob("*.png"):
        cv2.imwrite(str(mask), np.full((96, 128), 1300, dtype=np.uint16))
    one_line_error(CliRunner().invoke(main, train_args + ["--data", str(data)]), "class id 1300 exceeds", "masks")
    # The same error comes out of a DataLoader worker process as one line.
    one_line_error(CliRunner().invoke(main, train_args + ["--data", str(data), "--workers", "1"]),
                   "class id 1300 exceeds")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_failed_run_leaves_no_directory(built_train, tmp_path, train_args):
    data = tmp_path / "data"
    shutil.copytree(built_train, data)
    for mask in (data / "masks").glob("*.png"):
        mask.write_bytes(b"not a png")
    one_line_error(CliRunner().invoke(main, train_args + ["--data", str(data)]), "masks")
    assert not (tmp_path / "run").exists()


def test_pretrained_offline_names_the_way_out(built_train, tmp_path, train_args, monkeypatch):
    from ess import model

    def offline(args):
        raise model.PretrainedWeightsError("could not load ImageNet weights for resnet18: no network")

    monkeypatch.setattr(model.Segmenter, "from_args", staticmethod(offline))
    result = CliRunner().invoke(main, train_args + ["--data", str(built_train), "--pretrained"])
    one_line_error(result, "resnet18", "--no-pretrained")


def test_missing_image(built_train, tmp_path, train_args):
    empty = tmp_path / "no-images"
    empty.mkdir()
    result = CliRunner().invoke(main, train_args + ["--data", str(built_train), "--images-root", str(empty)])
    one_line_error(result, empty, "missing or unreadable under the images root")


def test_eval_rejects_a_foreign_checkpoint(tiny_runs, built_val, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["ess"], run)
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:1000])
    result = CliRunner().invoke(main, ["eval", "--run", str(run), "--data", str(built_val), "--quiet"])
    one_line_error(result, run / "last.pt", "not a readable checkpoint")


def test_eval_rejects_other_classes(tiny_runs, built_val, tmp_path):
    data = tmp_path / "val"
    shutil.copytree(built_val, data)
    classes = json.loads((data / "classes.json").read_text())[:100]
    (data / "classes.json").write_text(json.dumps(classes))
    result = CliRunner().invoke(main, ["eval", "--run", str(tiny_runs["ess"]), "--data", str(data), "--quiet"])
    one_line_error(result, data / "classes.json", "differ")
