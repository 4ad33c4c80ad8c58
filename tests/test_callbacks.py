"""Nonconvergence filtering (docs/method.md section 2.1) and the per-run callback list, which follows the objective."""

import keras
import numpy as np
import pandas as pd
import pytest

from conftest import experiment
from tlopt import checkpoints
from tlopt.callbacks import BestWeights, NonconvergenceFiltering, run_callbacks
from tlopt.errors import ConfigError
from tlopt.store import TrialFolder

BALANCED = [10, 10, 10, 10]  # validation images per class: chance is 1/4


@pytest.fixture(autouse=True)
def _free_keras():
    yield
    keras.backend.clear_session()


def _tiny_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _tiny_data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(16, 4)).astype("float32"), rng.integers(0, 2, 16)


def _fit(callbacks, epochs=20, scores=None, name="score", model=None):
    """A real fit of a tiny model; `scores[epoch]` is logged as `name` before the other callbacks run."""
    x, y = _tiny_data()
    model = model or _tiny_model()
    if scores is not None:
        inject = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: logs.update({name: scores[epoch]}))
        callbacks = [inject, *callbacks]
    history = model.fit(x, y, validation_data=(x, y), epochs=epochs, batch_size=8, callbacks=callbacks, verbose=0)
    return history


def test_always_below_threshold_stops_at_the_end_of_epoch_index_patience():
    # val_accuracy is at most 1, so a threshold above 1 is never reached.
    callback = NonconvergenceFiltering(threshold=1.01, patience=5)
    history = _fit([callback])
    assert history.epoch == [0, 1, 2, 3, 4, 5]
    assert callback.stopped and callback.stopped_epoch == 5


@pytest.mark.parametrize("patience", [0, 1, 3])
def test_stopping_epoch_follows_patience(patience):
    callback = NonconvergenceFiltering(threshold=1.01, patience=patience)
    assert len(_fit([callback]).epoch) == patience + 1
    assert callback.stopped_epoch == patience


def test_always_above_threshold_never_stops():
    callback = NonconvergenceFiltering(threshold=0.0, patience=0)
    assert len(_fit([callback], epochs=8).epoch) == 8
    assert not callback.stopped and callback.stopped_epoch is None


def test_value_at_or_above_threshold_resets_the_counter():
    # Below, below, at the threshold (reset), then below from epoch 3: the counter reaches 2 at
    # epoch 4, so epoch 5 stops.
    scores = [0.1, 0.1, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1]
    callback = NonconvergenceFiltering(monitor="score", threshold=0.5, patience=2)
    history = _fit([callback], epochs=len(scores), scores=scores)
    assert history.epoch == [0, 1, 2, 3, 4, 5]
    assert callback.stopped_epoch == 5


def test_loss_like_monitor_flips_the_comparison():
    # mode auto + "loss" in the name: above the threshold is bad; 0.2 resets the counter.
    scores = [0.9, 0.2, 0.9, 0.9, 0.9, 0.9]
    callback = NonconvergenceFiltering(monitor="score_loss", threshold=0.5, patience=1)
    assert callback.mode == "min"
    _fit([callback], epochs=len(scores), scores=scores, name="score_loss")
    assert callback.stopped_epoch == 3


def test_explicit_mode_overrides_the_monitor_name():
    assert NonconvergenceFiltering(monitor="val_loss", mode="max").mode == "max"
    assert NonconvergenceFiltering(monitor="val_accuracy").mode == "max"
    assert NonconvergenceFiltering(monitor="val_loss").mode == "min"
    with pytest.raises(ConfigError, match="mode"):
        NonconvergenceFiltering(mode="lower")


def test_counter_sequence_fed_directly():
    callback = NonconvergenceFiltering(threshold=0.5, patience=2)
    callback.set_model(_tiny_model())
    callback.on_train_begin()
    counters = []
    for epoch, value in enumerate([0.4, 0.4, 0.6, 0.4, 0.49, 0.7, 0.4, float("nan"), 0.1]):
        callback.on_epoch_end(epoch, {"val_accuracy": value})
        counters.append(callback.wait)
        if callback.stopped:
            break
    assert counters == [1, 2, 0, 1, 2, 0, 1, 2, 2]
    assert callback.stopped_epoch == 8 and callback.model.stop_training


def test_a_new_fit_starts_from_a_fresh_counter():
    callback = NonconvergenceFiltering(threshold=1.01, patience=1)
    _fit([callback])
    assert _fit([callback]).epoch == [0, 1]


def test_missing_monitor_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="val_acc'"):
        _fit([NonconvergenceFiltering(monitor="val_acc")], epochs=2)


def _by_type(callbacks):
    return {type(callback).__name__: callback for callback in callbacks}


REFERENCE = checkpoints.Reference("VGG16", None, 0, 32, "max", 2)


def test_run_callbacks_are_the_thesis_list(tmp_path):
    settings = experiment({"training.early_stopping_patience": 4,
                           "training.nonconvergence": {"threshold": 0.3, "patience": 2}})
    callbacks = _by_type(run_callbacks(TrialFolder(tmp_path), "block", settings, BALANCED, {}, REFERENCE))
    assert set(callbacks) == {"CSVLogger", "BestWeights", "TensorBoard", "EarlyStopping", "NonconvergenceFiltering"}
    checkpoint = callbacks["BestWeights"]
    assert checkpoint.filepath == str(tmp_path / "block" / "best.weights.h5")
    assert checkpoint.reference == REFERENCE
    stopping = callbacks["EarlyStopping"]
    assert (stopping.monitor, stopping.mode, stopping.patience) == ("val_accuracy", "max", 4)
    filtering = callbacks["NonconvergenceFiltering"]
    assert (filtering.monitor, filtering.threshold, filtering.patience) == ("val_accuracy", 0.3, 2)


def test_nonconvergence_filtering_can_be_switched_off(tmp_path):
    callbacks = run_callbacks(TrialFolder(tmp_path), "block", experiment({"training.nonconvergence.enabled": False}),
                              BALANCED, {}, REFERENCE)
    assert "NonconvergenceFiltering" not in _by_type(callbacks)


def test_run_callbacks_write_history_best_weights_and_tensorboard(tmp_path):
    phase_dir, tensorboard_dir = tmp_path / "block", tmp_path / "tensorboard" / "block"
    model = _tiny_model()
    callbacks = run_callbacks(TrialFolder(tmp_path), "block", experiment({"training.early_stopping_patience": 50}),
                              BALANCED, checkpoints.trained_layers(model), REFERENCE)
    _fit(callbacks, epochs=3, model=model)
    history = pd.read_csv(phase_dir / "history.csv")
    assert list(history["epoch"]) == [0, 1, 2]
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(history.columns)
    assert (phase_dir / "best.weights.h5").is_file()
    assert list(tensorboard_dir.glob("validation/events.out.tfevents.*"))


def test_best_weights_keeps_the_layers_at_the_best_validation_accuracy_and_no_optimizer_state(tmp_path):
    """Written at each new best (NaN never is one); the file holds the named layers' weights and the reference."""
    model = _tiny_model()
    path = tmp_path / "best.weights.h5"
    seen = []
    remember = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(model.get_weights()))
    checkpoint = BestWeights(str(path), {"model/dense": model.layers[0]}, REFERENCE)
    _fit([checkpoint, remember], epochs=5, scores=[0.2, 0.6, 0.4, float("nan"), 0.5], name="val_accuracy",
         model=model)
    assert checkpoints.stored_keys(path) == ["model/dense"]
    assert checkpoints.read_reference(path) == REFERENCE
    fresh = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="dense")])
    checkpoints.load_into(fresh, path)
    for stored, best in zip(fresh.get_weights(), seen[1]):
        np.testing.assert_array_equal(stored, best)
    assert not np.array_equal(seen[1][0], seen[4][0])  # training went on after the best epoch


@pytest.mark.parametrize(("objective", "key", "mode"), [
    ("val_accuracy", "val_accuracy", "max"), ("balanced_accuracy", "val_balanced_accuracy", "max"),
    ("macro_f1", "val_macro_f1", "max"), ("val_loss", "val_loss", "min"),
])
def test_the_checkpoint_early_stopping_and_the_filter_watch_the_objective(tmp_path, objective, key, mode):
    callbacks = _by_type(run_callbacks(TrialFolder(tmp_path), "finetune", experiment({"objective": objective}),
                                       BALANCED, {}, REFERENCE))
    assert (callbacks["BestWeights"].monitor, callbacks["BestWeights"].mode) == (key, mode)
    assert (callbacks["EarlyStopping"].monitor, callbacks["EarlyStopping"].mode) == (key, mode)
    filtering = callbacks["NonconvergenceFiltering"]
    assert (filtering.monitor, filtering.mode) == (key, mode)
    # The thesis's 0.5 on accuracy; 0.1 above chance (1/4) otherwise; chance (ln 4) for the loss.
    expected = {"val_accuracy": 0.5, "val_loss": np.log(4)}.get(objective, 0.25 + 0.1)
    assert filtering.threshold == pytest.approx(expected)


def test_a_monitor_set_in_the_file_does_not_follow_the_objective(tmp_path):
    settings = experiment({"objective": "macro_f1", "training.nonconvergence.monitor": "val_accuracy",
                           "training.nonconvergence.threshold": "2x chance"})
    filtering = _by_type(run_callbacks(TrialFolder(tmp_path), "block", settings, [30, 10], {}, REFERENCE))[
        "NonconvergenceFiltering"]
    assert (filtering.monitor, filtering.threshold) == ("val_accuracy", 1.0)  # 2 x 1/2


def test_a_fixed_threshold_below_chance_is_warned_about(tmp_path):
    settings = experiment({"training.nonconvergence.threshold": 0.3})
    with pytest.warns(UserWarning, match=r"threshold 0.3 is below chance \(0.5 for val_accuracy with 2 classes\)"):
        run_callbacks(TrialFolder(tmp_path), "block", settings, [5, 5], {}, REFERENCE)
