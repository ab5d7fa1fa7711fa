"""`bench study` end to end on a tiny budget: two variants, a few iterations, an interruption and --resume."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from bench.cli import main
from ess.variants import VARIANTS, default
from bench.study import STUDY_COLUMNS, claims
from test_bench_tables import assert_png

ITERS = 4
TINY = {"crop": 64, "batch": 2, "ckpt_every": 2, "val_every": 2, "device": "cpu"}


def study_args(built_train: Path, built_val: Path, out: Path, config: Path, *extra) -> list[str]:
    return ["study", "--data", str(built_train), "--val-data", str(built_val), "--out", str(out),
            "--variants", "softmax,ess", "--iters", str(ITERS), "--config", str(config), "--quiet", *extra]


def test_study_interrupted_then_resumed(built_train, built_val, tmp_path, monkeypatch):
    import ess.train

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "study"
    real_train = ess.train.train
    calls = []

    def interrupted(cfg, run, resume=False, stop_after=None, progress=True):
        """Ctrl-C in the ess variant, right after its checkpoint at iteration 2."""
        calls.append((Path(run).name, resume))
        if Path(run).name == "ess":
            real_train(cfg, run, resume=resume, stop_after=2, progress=progress)
            raise KeyboardInterrupt
        return real_train(cfg, run, resume=resume, stop_after=stop_after, progress=progress)

    monkeypatch.setattr(ess.train, "train", interrupted)
    first = CliRunner().invoke(main, study_args(built_train, built_val, out, config))
    assert first.exit_code == 130, first.output
    runs = out / "runs" / f"iters{ITERS}" / "seed0"
    assert (runs / "softmax" / "eval" / "metrics.json").exists()
    assert (runs / "ess" / "last.pt").exists() and not (runs / "ess" / "eval").exists()
    assert not (out / "budget.csv").exists()
    finished = {p: p.stat().st_mtime_ns for p in (runs / "softmax").rglob("*") if p.is_file()}

    # Without --resume the study refuses to overwrite; with other settings it refuses to mix them.
    again = CliRunner().invoke(main, study_args(built_train, built_val, out, config))
    assert again.exit_code == 1 and "pass --resume" in again.output and len(again.output.strip().splitlines()) == 1
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**TINY, "lr": 0.5}))
    mixed = CliRunner().invoke(main, study_args(built_train, built_val, out, other, "--resume"))
    assert mixed.exit_code == 1 and "study.yaml: this study was started with other settings (lr: 0.02 -> 0.5" in mixed.output

    calls.clear()
    monkeypatch.setattr(ess.train, "train", lambda cfg, run, **kw: calls.append((Path(run).name, kw["resume"]))
                        or real_train(cfg, run, **kw))
    resumed = CliRunner().invoke(main, study_args(built_train, built_val, out, config, "--resume"))
    assert resumed.exit_code == 0, resumed.output + repr(resumed.exception)
    assert calls == [("ess", True)]  # the finished variant is not trained again
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    log = pd.read_csv(runs / "ess" / "log.csv")
    assert log["iteration"].tolist() == list(range(1, ITERS + 1))
    assert (runs / "ess" / "eval-pixel-mean" / "metrics.json").exists()
    assert not (runs / "softmax" / "eval-pixel-mean").exists()

    study = pd.read_csv(out / f"iters{ITERS}" / "study.csv")
    assert list(study.columns) == list(STUDY_COLUMNS)
    assert study["variant"].tolist() == ["softmax", "ess"] and study["head"].tolist() == ["softmax", "ess"]
    assert (study["iters"] == ITERS).all() and (study["train_seconds"] > 0).all() and (study["seed"] == 0).all()
    proto = json.loads((runs / "ess" / "eval-pixel-mean" / "metrics.json").read_text())
    assert study["miou_proto_readout"].iloc[1] == pytest.approx(proto["miou"])
    assert np.isnan(study["miou_proto_readout"].iloc[0])
    stats = pd.read_csv(built_train / "stats.csv").set_index("id")
    top = stats.sort_values(["pixels", "images"], ascending=False, kind="stable").index[:50]
    for row in study.itertuples():
        metrics = json.loads((runs / row.variant / "eval" / "metrics.json").read_text())
        per_class = pd.read_csv(runs / row.variant / "eval" / "per_class.csv").set_index("id")
        assert row.miou == pytest.approx(metrics["miou"]) and row.pixel_acc == pytest.approx(metrics["pixel_acc"])
        assert row.classes_present == metrics["classes_present"]
        iou = per_class["iou"]  # empty (NaN) where the class is absent from both
        expected = {
            "miou_top50": iou[iou.index.isin(top)].mean(),
            "miou_tail": iou[~iou.index.isin(top)].mean(),
            "miou_lvis_r": iou[per_class["frequency"] == "r"].mean(),
            "miou_stuff": iou[per_class["source"].isin(["coco", "both"])].mean(),
        }
        for column, value in expected.items():
            assert getattr(row, column) == pytest.approx(value, nan_ok=True), column
        config_saved = yaml.safe_load((runs / row.variant / "config.yaml").read_text())
        assert config_saved["iters"] == ITERS and config_saved["crop"] == TINY["crop"]

    curve = pd.read_csv(out / f"iters{ITERS}" / "learning_curve.csv")
    assert sorted(zip(curve["variant"], curve["iteration"])) == sorted(
        (v, i) for v in ("softmax", "ess") for i in range(TINY["val_every"], ITERS + 1, TINY["val_every"]))
    topn = pd.read_csv(out / f"iters{ITERS}" / "topn_miou.csv")
    for row in study.itertuples():
        assert topn[f"miou_{row.variant}"].iloc[-1] == pytest.approx(row.miou)
    budget = pd.read_csv(out / "budget.csv")
    assert budget["ratio_miou"].tolist() == pytest.approx([1.0, study["miou"].iloc[1] / study["miou"].iloc[0]])
    summary = (out / "study.md").read_text()
    assert "| variant | iters | seeds |" in summary and summary.count("reproduced**") + summary.count("not measure") == 5
    assert summary.strip() in resumed.output and "softmax's mIoU" in summary
    per_budget = (out / f"iters{ITERS}" / "study.md").read_text()
    assert "| variant | seed |" in per_budget
    for name in ("budget.png", f"iters{ITERS}/topn_miou.png", f"iters{ITERS}/learning_curve.png"):
        assert_png(out / name)


def test_a_second_budget_and_seed_extend_the_study(built_train, built_val, tmp_path):
    """A study extended with --resume: the report covers every evaluated cell in OUT."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "val_every": 0}))
    out = tmp_path / "study"
    args = ["study", "--data", str(built_train), "--val-data", str(built_val), "--out", str(out), "--variants",
            "softmax", "--config", str(config), "--quiet"]
    assert CliRunner().invoke(main, [*args, "--iters", "1"]).exit_code == 0
    extended = CliRunner().invoke(main, [*args, "--iters", "2", "--seeds", "0,1", "--resume"])
    assert extended.exit_code == 0, extended.output
    budget = pd.read_csv(out / "budget.csv")
    assert list(zip(budget["iters"], budget["seed"], budget["variant"])) == [
        (1, 0, "softmax"), (2, 0, "softmax"), (2, 1, "softmax")]
    summary = (out / "study.md").read_text()
    assert "## Seeds at 2 iterations" in summary and "seed 1" in summary
    assert pd.read_csv(out / "iters2" / "study.csv")["seed"].tolist() == [0, 1]


def test_variants_change_only_model_options_and_the_class_side():
    from ess import config as cfg
    from ess.config import ModelArgs
    from ess.variants import CLASS_SIDE

    for name, variant in VARIANTS.items():
        assert variant.name == name and variant.options["head"] in ("softmax", "ess")
        assert set(variant.options) <= set(ModelArgs.__dataclass_fields__) | set(CLASS_SIDE), name  # never data or budget
        cfg.Config().updated(variant.options, name)  # valid values
    assert default("study")[:4] == ["softmax", "ess", "ess-published", "ess-proto"]


def test_bad_variant_is_one_line(built_train, built_val, tmp_path):
    result = CliRunner().invoke(main, ["study", "--data", str(built_train), "--val-data", str(built_val),
                                       "--out", str(tmp_path / "s"), "--variants", "ess,ess-fast"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: --variants: unknown variant 'ess-fast'; known: softmax, ")
    assert not (tmp_path / "s").exists()


def test_claims_with_seeds_that_disagree_are_within_noise():
    table = pd.DataFrame({"variant": ["softmax", "ess"] * 2, "seed": [0, 0, 1, 1], "miou": [0.10, 0.12, 0.10, 0.08],
                          "miou_tail": [0.01, 0.02, 0.01, 0.02]})
    first, second = claims(table)[:2]
    assert first["verdict"] == "within noise" and "seed 0: ess 0.12 vs softmax 0.1" in first["numbers"]
    assert second["verdict"] == "reproduced"


def test_claims_leave_out_a_seed_without_the_variants():
    # seed 1 ran softmax and ess only: the random-negatives claim rests on seed 0 alone
    table = pd.DataFrame({"variant": ["softmax", "ess", "ess-random", "softmax", "ess"], "seed": [0, 0, 0, 1, 1],
                          "miou": [0.10, 0.04, 0.02, 0.10, 0.05], "miou_tail": 0.0})
    random = claims(table)[2]
    assert random["verdict"] == "not reproduced" and random["numbers"] == "ess 0.04 vs ess-random 0.02, ratio 2.00"
    assert claims(table)[3]["verdict"] == "not measured"  # no seed has ess-no-norm


def test_catch_up_lines():
    from bench.study import budget_table, catch_up

    rows = pd.DataFrame({"variant": ["softmax", "ess", "ess-proto"] * 2, "iters": [300] * 3 + [3000] * 3,
                         "seed": 0, "miou": [0.1, 0.05, 0.08, 0.2, 0.1, 0.25], "miou_top50": 0.1, "miou_tail": 0.0,
                         "miou_proto_readout": np.nan, "pixel_acc": 0.5})
    lines, headline = catch_up(budget_table(rows))
    assert lines == ["- `ess` does not reach softmax's mIoU by 3000 iterations (0.50x at 300 -> 0.50x at 3000)",
                     "- `ess-proto` reaches softmax's mIoU at 3000 iterations (0.80x at 300 -> 1.25x at 3000)"]
    assert headline == "Reaching softmax: `ess-proto` reaches softmax's mIoU at 3000 iterations."

    # a second seed below softmax: the mean still reaches it, and both the line and the headline say "within noise"
    seed1 = rows[rows["iters"] == 3000].assign(seed=1, miou=[0.2, 0.1, 0.18])
    lines, headline = catch_up(budget_table(pd.concat([rows, seed1], ignore_index=True)))
    assert lines[1] == ("- `ess-proto` reaches softmax's mIoU at 3000 iterations (within noise: a seed is below) "
                        "(0.80x at 300 -> 1.07x at 3000)")
    assert headline == ("Reaching softmax: `ess-proto` reaches softmax's mIoU at 3000 iterations "
                        "(within noise: a seed is below).")


def test_claims_verdicts():
    table = pd.DataFrame({"variant": ["softmax", "ess", "ess-random", "ess-no-norm"],
                          "miou": [0.10, 0.12, 0.05, 0.12], "miou_tail": [0.02, 0.03, 0.0, 0.01]})
    verdicts = {c["claim"]: c["verdict"] for c in claims(table)}
    assert list(verdicts.values()) == ["reproduced", "reproduced", "not reproduced", "not reproduced", "not measured"]
    assert "ess 0.12 vs softmax 0.1, ratio 1.20" in claims(table)[0]["numbers"]
    nan = claims(table.assign(miou=[np.nan, 0.1, 0.1, 0.1]))[0]
    assert nan["verdict"] == "not measured"
    zero = claims(table.assign(miou_tail=[0.0, 0.0, 0.0, 0.0]))[1]  # 0 >= 1.5 x 0 says nothing
    assert zero["verdict"] == "not measurable" and zero["numbers"] == "ess and softmax are both 0"
