"""The objective (docs/method.md section 10) and its chance level (section 12): one place that every
consumer reads, Keras metrics that are scikit-learn's measures per epoch, old runs still scored."""

import math
import re

import keras
import numpy as np
import pytest
from sklearn import metrics as skm

from conftest import experiment
from fakes import FakeTrainer
from tlopt import objectives, optimize
from tlopt.errors import ConfigError
from tlopt.params import validate
from tlopt.store import RunFolder
from tlopt.trials import Trial, TrialState, best_trial


def _batches(seed: int, size: int = 90):
    """Four classes skewed towards class 0, predictions right two times in three."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(4, size, p=[0.55, 0.25, 0.15, 0.05])
    predicted = np.where(rng.random(size) < 2 / 3, labels, rng.integers(0, 4, size))
    probabilities = np.full((size, 4), 0.1, np.float32)
    probabilities[np.arange(size), predicted] = 0.7
    weights = rng.uniform(0.5, 2.0, size).astype(np.float32)
    return labels, predicted, probabilities, weights


@pytest.mark.parametrize(("metric", "reference"), [
    (objectives.BalancedAccuracy, skm.balanced_accuracy_score),
    (objectives.MacroF1, lambda y, p, sample_weight=None: skm.f1_score(
        y, p, labels=range(4), average="macro", zero_division=0, sample_weight=sample_weight)),
])
@pytest.mark.parametrize("weighted", [False, True])
def test_the_epoch_metrics_are_scikit_learns_measures_of_the_whole_epoch(metric, reference, weighted):
    labels, predicted, probabilities, weights = _batches(seed=1)
    measure = metric(4)
    measure.update_state(np.zeros(3, np.int32), np.eye(4, dtype=np.float32)[[1, 2, 3]])  # a previous epoch
    measure.reset_state()
    for part in np.array_split(np.arange(len(labels)), 3):
        measure.update_state(labels[part], probabilities[part], weights[part] if weighted else None)
    expected = reference(labels, predicted, sample_weight=weights if weighted else None)
    assert float(measure.result()) == pytest.approx(expected, abs=1e-6)
    assert measure.get_config()["num_classes"] == 4


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_a_class_absent_from_the_labels_counts_as_scikit_learn_counts_it():
    labels, predicted = np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1])  # class 2 predicted, never true
    probabilities = np.eye(3, dtype=np.float32)[predicted]
    balanced, f1 = objectives.BalancedAccuracy(3), objectives.MacroF1(3)
    for measure in (balanced, f1):
        measure.update_state(labels, probabilities)
    assert float(balanced.result()) == pytest.approx(skm.balanced_accuracy_score(labels, predicted))
    assert float(f1.result()) == pytest.approx(skm.f1_score(labels, predicted, labels=range(3), average="macro",
                                                            zero_division=0))


def test_scores_rank_trials_as_the_objective_does_and_a_failure_scores_worst():
    loss = objectives.get("val_loss")
    assert loss.score(0.2) > loss.score(0.9) > 0 and loss.value(loss.score(0.7)) == pytest.approx(0.7)
    assert loss.value(0.0) == math.inf and loss.score_label == "exp(-val_loss)"
    assert loss.best_index([0.9, 0.4, 0.4, 0.6]) == 1
    balanced = objectives.get("balanced_accuracy")
    assert balanced.score(0.7) == 0.7 and balanced.best_index([0.5, 0.8, 0.8]) == 1
    assert objectives.get(None).name == "val_accuracy"
    with pytest.raises(ConfigError, match="unknown objective 'f1'"):
        objectives.get("f1")


def test_chance_is_uniform_guessing():
    counts = np.array([90, 10])
    assert objectives.get("val_accuracy").chance(counts) == 0.5
    assert objectives.get("balanced_accuracy").chance(counts) == 0.5
    assert objectives.get("val_loss").chance(counts) == pytest.approx(math.log(2))
    # Guessing uniformly: class 0 gets precision 0.9 and recall 0.5, class 1 precision 0.1 and recall 0.5.
    expected = np.mean([2 * 0.9 * 0.5 / 1.4, 2 * 0.1 * 0.5 / 0.6])
    assert objectives.get("macro_f1").chance(counts) == pytest.approx(expected)
    assert objectives.get("macro_f1").chance(np.array([5, 5, 5])) == pytest.approx(1 / 3)


@pytest.mark.parametrize(("threshold", "monitor", "expected"), [
    ("chance", "val_accuracy", 0.25), ("chance+0.1", "val_balanced_accuracy", 0.35),
    ("chance - 0.05", "val_accuracy", 0.2), ("2x chance", "val_accuracy", 0.5), ("1.5*chance", "val_macro_f1", 0.375),
    ("chance", "val_loss", math.log(4)), (0.4, "val_accuracy", 0.4),
])
def test_a_threshold_relative_to_chance_adapts_to_the_classes(threshold, monitor, expected):
    assert objectives.resolve_threshold(threshold, monitor, [10, 10, 10, 10]) == pytest.approx(expected)


def test_a_relative_threshold_needs_a_monitor_with_a_chance_level():
    with pytest.raises(ConfigError, match="not for the monitor 'val_top3'"):
        objectives.resolve_threshold("chance", "val_top3", [5, 5])
    with pytest.raises(ConfigError, match="training.nonconvergence: monitor 'val_top3' has no chance level"):
        validate({"data": {"root": "x"}, "training": {"nonconvergence": {"monitor": "val_top3"}}})
    assert validate({"data": {"root": "x"}, "training": {"nonconvergence": {"monitor": "val_top3", "threshold": 0.4}}})


def test_a_fixed_threshold_on_the_wrong_side_of_chance_is_warned_about():
    with pytest.warns(UserWarning, match=r"threshold 1.2 is above chance \(0.693 for val_loss with 2 classes\)"):
        objectives.resolve_threshold(1.2, "val_loss", [5, 5])


@pytest.mark.parametrize("threshold", ["chanse", "chance+", "3 chance", "chance+0.1+0.2"])
def test_a_threshold_that_is_neither_is_one_line_naming_key_and_value(threshold):
    with pytest.raises(ConfigError, match=re.escape(f"training.nonconvergence.threshold: threshold '{threshold}' is")):
        validate({"data": {"root": "x"}, "training": {"nonconvergence": {"threshold": threshold}}})


def test_the_monitor_follows_the_objective_unless_set():
    assert experiment({"objective": "val_loss"}).nonconvergence_monitor == "val_loss"
    assert experiment().updated({"objective": "macro_f1"}).nonconvergence_monitor == "val_macro_f1"
    assert experiment({"objective": "macro_f1"}).nonconvergence_threshold == "chance+0.1"
    chosen = experiment({"objective": "macro_f1", "training.nonconvergence.monitor": "val_loss"})
    assert (chosen.nonconvergence_monitor, chosen.nonconvergence_threshold) == ("val_loss", "chance")


def test_a_run_that_stored_the_old_defaults_resumes_with_a_file_that_leaves_them_out(tmp_path):
    """The first version wrote `monitor: val_accuracy, threshold: 0.5`: the same experiment today."""
    old = {"results_dir": str(tmp_path), "data": {"root": "x"},
           "training": {"nonconvergence": {"enabled": True, "monitor": "val_accuracy", "threshold": 0.5,
                                           "patience": 5, "mode": "auto"}}}
    RunFolder.open(validate(old))
    RunFolder.open(validate({"results_dir": str(tmp_path), "data": {"root": "x"}}))  # no "parameters differ"
    assert validate(old).nonconvergence_threshold == 0.5


def test_a_trial_of_the_first_version_is_scored_on_validation_accuracy():
    record = {"id": "t", "strategy": "shared", "step": "model", "index": 0, "method": "initial", "x": [0.0],
              "hyperparameters": {}, "started_at": "2024-01-01T00:00:00+00:00", "status": "ok",
              "val_accuracy": 0.75, "val_loss": 0.4}
    trial = Trial.from_record(record)
    assert (trial.objective, trial.objective_value, trial.score) == ("val_accuracy", 0.75, 0.75)
    assert Trial.from_record(trial.to_record()) == trial


def _trial(index, objective, value, val_loss=0.5):
    return Trial(id=f"t{index}", strategy="s", step="model", index=index, method="initial", x=[0.0],
                 hyperparameters={}, started_at="", status=TrialState.OK, val_accuracy=0.5, val_loss=val_loss,
                 objective=objective, objective_value=value)


def test_the_best_trial_follows_the_objective():
    losses = [_trial(0, "val_loss", 0.9, 0.9), _trial(1, "val_loss", 0.3, 0.3), _trial(2, "val_loss", 0.6, 0.6)]
    assert best_trial(losses).id == "t1"
    balanced = [_trial(0, "balanced_accuracy", 0.6, 0.2), _trial(1, "balanced_accuracy", 0.8, 0.9),
                _trial(2, "balanced_accuracy", 0.8, 0.5)]
    assert best_trial(balanced).id == "t2"  # a tie broken by the lower loss


def _manifest():
    import pandas as pd

    return pd.DataFrame({"path": [f"/x/{c}{i}.jpg" for c in "ab" for i in range(3)],
                         "label": [c for c in "ab" for _ in range(3)],
                         "group": [f"{c}{i}" for c in "ab" for i in range(3)], "split": ["train", "train", "val"] * 2})


def _balanced_favours_sgd(accuracy, call):
    """Balanced accuracy ranks trials the other way round from accuracy for SGD and Adam."""
    flipped = 1.0 - accuracy if call["optimizer"] == "SGD" else accuracy / 2
    return {"val_accuracy": accuracy, "val_balanced_accuracy": flipped, "val_macro_f1": flipped,
            "val_loss": 1.5 - accuracy}


@pytest.mark.parametrize("objective", ["balanced_accuracy", "val_loss"])  # accuracy: tests/test_optimize.py
def test_the_objective_reaches_the_bo_score_the_best_trial_and_the_best_file(tmp_path, objective):
    from tlopt.data import write_manifest

    params = validate({
        "run_name": "r", "results_dir": str(tmp_path), "data": {"root": str(tmp_path / "data"), "image_size": 32},
        "backbones": ["VGG16"], "optimizers": ["Adam", "SGD"], "objective": objective,
        "bo": {"initial_points": 3, "iterations": 0}, "layer_optimization": {"enabled": False},
    })
    run = RunFolder.open(params)
    write_manifest(_manifest(), run.split_file)
    trainer = FakeTrainer(measures=_balanced_favours_sgd)
    best = optimize.run_strategy(params, "shared", run, trainer=trainer, progress=False)

    key = objectives.get(objective).key
    trials = run.trials.records()
    values = [_balanced_favours_sgd(trial.val_accuracy, {"optimizer": trial.hyperparameters["optimizer"]})[key]
              for trial in trials]
    assert [trial.objective_value for trial in trials] == pytest.approx(values)
    assert {trial.objective for trial in trials} == {objective}
    expected = (min if objective == "val_loss" else max)(trials, key=lambda trial: trial.objective_value)
    assert best.id == expected.id == run.read_best("shared")["model"]["id"]
    evaluations = np.loadtxt(run.step_dir("shared", "model") / "evaluations.txt", skiprows=1)
    assert evaluations[:, 1] == pytest.approx([-trial.score for trial in trials])  # GPyOpt's Y: the negated scores
    if objective == "val_loss":
        assert [trial.score for trial in trials] == pytest.approx([math.exp(-value) for value in values])


def test_a_keras_metric_for_each_objective_key_and_none_for_what_keras_logs():
    made = objectives.metrics_for(3, ["val_balanced_accuracy", "val_accuracy", "val_macro_f1", "val_loss",
                                      "val_balanced_accuracy"])
    assert [type(metric) for metric in made] == [objectives.BalancedAccuracy, objectives.MacroF1]
    assert all(isinstance(metric, keras.metrics.Metric) for metric in made)
    assert objectives.metrics_for(3, ["val_accuracy", "val_loss"]) == []
