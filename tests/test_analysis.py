"""The tables of notebooks 01-05, read from a run folder that a fake trainer filled."""

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fakes import FakeTrainer
from tlopt import analysis, optimize
from tlopt.data import write_manifest
from tlopt.params import validate


@dataclass
class FileWritingTrainer(FakeTrainer):
    """FakeTrainer that also leaves what a real run leaves: history.csv and TensorBoard events."""

    def _files(self, result, folder, phase):
        import tensorflow as tf

        history = pd.DataFrame({"epoch": [0, 1], "accuracy": [0.5, 0.6], "loss": [1.0, 0.9],
                                "val_accuracy": [result.val_accuracy - 0.1, result.val_accuracy],
                                "val_loss": [1.0, result.val_loss]})
        folder.phase_dir(phase).mkdir(parents=True, exist_ok=True)
        history.to_csv(folder.history(phase), index=False)
        writer = tf.summary.create_file_writer(str(folder.tensorboard(phase) / "validation"))
        with writer.as_default():
            for row in history.itertuples():
                tf.summary.scalar("epoch_accuracy", row.val_accuracy, step=row.epoch)
        writer.close()
        return result

    def train_block(self, *args, **kwargs):
        return self._files(super().train_block(*args, **kwargs), kwargs["folder"], "block")

    def fine_tune(self, *args, **kwargs):
        return self._files(super().fine_tune(*args, **kwargs), kwargs["folder"], "finetune")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Shared and separate optimizations, each with its layer optimization."""
    root = tmp_path_factory.mktemp("analysis")
    params = validate({
        "run_name": "fake", "results_dir": str(root), "data": {"root": str(root / "data"), "image_size": 96},
        "backbones": ["VGG16", "ResNet50"], "optimizers": ["Adam", "SGD"],
        "bo": {"initial_points": 2, "iterations": 2},
    })
    run_dir = root / "fake"
    write_manifest(pd.DataFrame({
        "path": [f"/x/{c}{i}.jpg" for c in "ab" for i in range(4)], "label": [c for c in "ab" for _ in range(4)],
        "group": [f"{c}{i}" for c in "ab" for i in range(4)], "split": ["train", "train", "val", "val"] * 2,
    }), run_dir / "split.csv")
    trainer = FileWritingTrainer()
    for strategy in ("shared", "separate_optimizations"):
        optimize.run_strategy(params, strategy, trainer=trainer, progress=False)
        optimize.run_layer_optimization(params, strategy, trainer=trainer, progress=False)
    return params, run_dir


def test_finished_strategies_and_their_trials(run):
    _, run_dir = run
    assert analysis.finished_strategies(run_dir) == ["shared", "separate_optimizations"]
    trials = analysis.strategy_trials(run_dir, "separate_optimizations", steps=("block", "finetune"))
    assert list(dict.fromkeys(trials["step"])) == ["block", "finetune"] and len(trials) == 8


def test_trials_table_shows_the_decoded_choice_and_the_result(run):
    _, run_dir = run
    table = analysis.trials_table(analysis.strategy_trials(run_dir, "shared"))
    assert table.index[0] == "shared-model-000"
    assert {"backbone", "optimizer", "learning_rate", "delimiting_layer", "val_accuracy", "stopped_by"} <= set(table)
    assert table.loc["shared-model-000", "backbone"] in ("VGG16", "ResNet50")
    layers = analysis.trials_table(analysis.strategy_trials(run_dir, "shared", steps=("layers",)))
    assert list(layers.columns).count("delimiting_layer") == 1 and layers["delimiting_layer"].notna().all()


def test_epoch_history_takes_the_wall_clock_from_tensorboard(run):
    _, run_dir = run
    trials = analysis.read_trials(run_dir)
    history = analysis.epoch_history(run_dir, trials)
    shared_model = history[(history["strategy"] == "shared") & (history["step"] == "model")]
    assert len(shared_model) == 4 * 2 * 2  # trials x phases x epochs
    assert history["minutes"].notna().all() and (history["minutes"] >= 0).all()
    first = history[history["trial"] == "shared-model-000"]
    assert first["minutes"].is_monotonic_increasing
    started = datetime.fromisoformat(trials.loc[0, "started_at"]).timestamp()
    assert history["wall_time"].min() >= started


def test_strategy_summary_has_the_final_model_of_each_strategy(run):
    _, run_dir = run
    summary = analysis.strategy_summary(run_dir)
    best = json.loads((run_dir / "shared" / "best.json").read_text())
    assert list(summary.index) == ["shared", "separate_optimizations"]
    assert summary.loc["shared", "final_trial"] == best["final"]["id"]
    assert summary.loc["shared", "delimiting_layer"] == best["final"]["setup"]["delimiting_layer"]
    assert summary.loc["shared", "model_val_accuracy"] == best["model"]["val_accuracy"]
    trials = analysis.read_trials(run_dir)
    assert summary.loc["shared", "trials"] == (trials["strategy"] == "shared").sum()
    assert summary.loc["shared", "minutes"] == pytest.approx(trials.loc[trials["strategy"] == "shared", "seconds"].sum() / 60)


def test_final_model_evaluation_predicts_the_split_with_the_final_weights(run):
    params, run_dir = run
    calls = []

    class Predictor:
        def predict(self, backbone, weights, frame, class_names, settings):
            calls.append((backbone, weights, list(frame["split"]), class_names))
            return np.array([0, 1, 1, 1])  # a, a, b, b predicted as a, b, b, b

    evaluation = analysis.evaluate_final_model(params, run_dir, "shared", "val", trainer=Predictor())
    final = analysis.final_trial(run_dir, "shared")
    assert calls == [(final.setup["backbone"], Path(final.weights), ["val"] * 4, ["a", "b"])]
    assert evaluation.confusion.loc["a"].tolist() == [1, 1] and evaluation.confusion.loc["b"].tolist() == [0, 2]
    assert evaluation.metrics.loc["a", "REC"] == 0.5 and evaluation.metrics.loc["Average", "ACC"] == 0.75

    comparison = analysis.baseline_comparison([evaluation, evaluation], "/data/kvasir-dataset-v2")
    assert comparison.index[-1] == "tlopt shared (val)" and comparison.index.is_unique
    assert "6 GF Logistic Model Tree" in comparison.index
    assert analysis.baseline_comparison([evaluation], "/data/demo") is None


def trial(strategy, step, method, accuracy, block=None, finetune=None, seconds=60.0):
    phases = {name: phase for name, phase in (("block", block), ("finetune", finetune)) if phase}
    return {"id": f"{strategy}-{step}-{method}-{accuracy}", "strategy": strategy, "step": step, "method": method,
            "val_accuracy": accuracy, "status": "ok" if accuracy is not None else "failed",
            "objective": "val_accuracy", "objective_value": accuracy, "seconds": seconds, "phases": phases}


def phase(epochs, stopped_by="completed", seconds=30.0):
    return {"epochs": epochs, "stopped_by": stopped_by, "seconds": seconds}


def test_bo_improvement_compares_the_optimizer_with_its_initial_points():
    trials = pd.json_normalize([
        trial("shared", "model", "initial", 0.5), trial("shared", "model", "initial", 0.6),
        trial("shared", "model", "bayesian", 0.8),
        trial("joint", "model", "initial", 0.7), trial("joint", "model", "bayesian", 0.4),
        trial("joint", "model", "bayesian", None),
    ])
    table = analysis.bo_improvement(trials).set_index("strategy")
    assert table.loc["shared", "improved"] and table.loc["shared", "best_after_initial"] == 0.8
    assert not table.loc["joint", "improved"] and table.loc["joint", "best"] == 0.7
    assert table.loc["joint", "trials"] == 3


def test_time_and_nonconvergence_savings():
    params = validate({"data": {"root": "/x"}, "training": {"block_epochs": 10, "finetune_epochs": 50}})
    trials = pd.json_normalize([
        trial("shared", "model", "initial", 0.3, phase(6, "nonconvergence", 60.0), phase(50), seconds=100),
        trial("shared", "model", "bayesian", 0.9, phase(10), phase(8, "early_stopping"), seconds=200),
        trial("shared", "layers", "initial", 0.2, None, phase(6, "nonconvergence", 12.0), seconds=20),
    ])
    time_table = analysis.time_per_strategy(trials).set_index("step")
    assert time_table.loc["model", "trials"] == 2 and time_table.loc["model", "epochs"] == 6 + 50 + 10 + 8
    assert time_table.loc["model", "minutes"] == 5.0 and time_table.loc["layers", "epochs"] == 6

    savings = analysis.nonconvergence_savings(trials, params).set_index("phase")
    assert savings.loc["block", "runs"] == 2 and savings.loc["block", "stopped"] == 1
    assert savings.loc["block", "epochs_saved"] == 4  # stopped at 6 of 10
    assert savings.loc["block", "minutes_saved"] == pytest.approx(4 * 60.0 / 6 / 60)
    assert savings.loc["finetune", "epochs_saved"] == 44 and savings.loc["finetune", "runs"] == 3
    assert savings.loc["finetune", "share_of_epochs_saved"] == pytest.approx(44 / (50 + 8 + 6 + 44))


def test_other_runs_join_the_comparison_under_their_name(run, tmp_path):
    _, run_dir = run
    compared = analysis.compared_trials(run_dir, [run_dir])
    labels = set(compared["label"])
    assert {"shared", "separate_optimizations", "shared [fake]", "separate_optimizations [fake]"} == labels
