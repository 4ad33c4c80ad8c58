"""Honest evaluation: test predictions made once, failures and stops reported, Nerthus warned."""

import json

import numpy as np
import pandas as pd

from fakes import FakeTrainer
from tlopt import analysis, optimize
from tlopt.store import RunFolder
from tlopt.data import write_manifest
from tlopt.params import validate


class CountingPredictor:
    """Predicts class 0 for everything and counts how often it is asked."""

    def __init__(self):
        self.calls = []

    def predict(self, backbone, weights_path, frame, class_names, settings):
        self.calls.append(len(frame))
        return np.zeros(len(frame), dtype=int)


def make_run(tmp_path, trainer):
    params = validate({
        "run_name": "honest", "results_dir": str(tmp_path), "data": {"root": str(tmp_path / "d"), "image_size": 96},
        "backbones": ["VGG16", "ResNet50"], "optimizers": ["Adam", "SGD"],
        "bo": {"initial_points": 2, "iterations": 1, "max_consecutive_failures": 5},
    })
    run_dir = tmp_path / "honest"
    write_manifest(pd.DataFrame({
        "path": [f"/x/{c}{i}.jpg" for c in "ab" for i in range(6)], "label": [c for c in "ab" for _ in range(6)],
        "group": [f"{c}{i}" for c in "ab" for i in range(6)], "split": ["train", "train", "val", "val", "test", "test"] * 2,
    }), run_dir / "split.csv")
    optimize.run_strategy(params, "shared", trainer=trainer, progress=False)
    optimize.run_layer_optimization(params, "shared", trainer=trainer, progress=False)
    return params, run_dir


def test_the_test_split_is_predicted_once_and_shown_beside_validation(tmp_path):
    params, run_dir = make_run(tmp_path, FakeTrainer())
    predictor = CountingPredictor()
    evaluations = [analysis.evaluate_final_model(params, run_dir, "shared", split, trainer=predictor)
                   for split in ("val", "test")]
    again = analysis.evaluate_final_model(params, run_dir, "shared", "test", trainer=predictor)
    assert predictor.calls == [4, 4], "the test split must be predicted exactly once"
    pd.testing.assert_frame_equal(again.metrics, evaluations[1].metrics)
    run = RunFolder(run_dir)
    stored = json.loads(run.predictions_file("shared", "test").read_text())
    assert stored["trial"] == run.read_best("shared")["final"]["id"]
    table = analysis.validation_and_test(evaluations)
    assert list(table.index) == ["shared"]
    assert table[("val", "ACC")].iloc[0] == evaluations[0].metrics.loc["Average", "ACC"]
    assert table[("test", "REC")].iloc[0] == 0.5


def test_failed_trials_and_stops_are_counted_per_strategy(tmp_path):
    trainer = FakeTrainer(fail_when=lambda call: call["run_dir"].name in ("shared-model-000", "shared-layers-001"))
    _, run_dir = make_run(tmp_path, trainer)
    trials = analysis.read_trials(run_dir)
    failed = analysis.failed_trials(trials)
    assert list(failed["id"]) == ["shared-model-000", "shared-layers-001"]
    assert set(failed["error"]) == {"FloatingPointError: loss became NaN"}
    stops = analysis.stops_per_strategy(trials)
    finetune = stops[stops["phase"] == "finetune"].set_index("strategy")
    assert finetune.loc["shared", "completed"] == ((trials["strategy"] == "shared") & (trials["status"] == "ok")).sum()
    assert finetune.loc["shared", "failed_trials"] == len(failed[failed["strategy"] == "shared"])
    assert set(stops.columns) == {"strategy", "phase", "completed", "early_stopping", "nonconvergence", "failed_trials"}


def test_an_ungrouped_nerthus_split_is_said_in_words():
    def params(root, pattern):
        return validate({"data": {"root": root, "group_pattern": pattern}})

    assert "not grouped by video" in analysis.split_note(params("/data/nerthus-dataset-frames", None))
    assert analysis.split_note(params("/data/nerthus-dataset-frames", r"bowel_(\d+)_")) is None
    assert analysis.split_note(params("/data/kvasir-dataset-v2", None)) is None
