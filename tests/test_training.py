"""Optimizers, settings, and real classification-block and fine-tuning runs on the demo data.

The runs use VGG16 with random weights at 32 px: without ImageNet weights the
batch-normalised backbones (MobileNet, EfficientNet, ...) give near-zero features in
inference mode, so their frozen-base block cannot learn, while VGG16's random
convolutions still separate the demo classes; at 32 px it is also the quickest to train.
"""

import json
import math
import os
import subprocess
import sys
import weakref

import keras
import numpy as np
import pandas as pd
import pytest

from conftest import experiment
from tlopt import training
from tlopt.backbones import layer_count
from tlopt.errors import ConfigError, DataError, TrainingError
from tlopt.params import THESIS_OPTIMIZERS as OPTIMIZERS
from tlopt.training import RunResult, fine_tune, make_optimizer, predict, train_block

BACKBONE = "VGG16"
SETTINGS = experiment({
    "data.image_size": 32, "data.batch_size": 16, "training.block_epochs": 5, "training.finetune_epochs": 5,
    "training.early_stopping_patience": 5, "training.nonconvergence.enabled": False, "weights": None, "seed": 0,
})


def test_optimizers_in_thesis_order():
    assert OPTIMIZERS == ("Nadam", "SGD", "RMSprop", "Adagrad", "Adam", "Adamax", "Adadelta")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_make_optimizer_sets_the_rate_and_keeps_every_other_keras_default(name):
    optimizer = make_optimizer(name, 0.8417)
    assert type(optimizer) is getattr(keras.optimizers, name)
    assert math.isclose(float(optimizer.learning_rate), 0.8417, rel_tol=1e-6)
    config, default = optimizer.get_config(), getattr(keras.optimizers, name)().get_config()
    for key in ("learning_rate", "name"):
        config.pop(key), default.pop(key)
    assert config == default


def test_make_optimizer_returns_a_fresh_optimizer_each_time():
    assert make_optimizer("Adam", 0.001) is not make_optimizer("Adam", 0.001)


def test_make_optimizer_rejects_unknown_names_and_bad_rates():
    with pytest.raises(ConfigError, match="'adam'.*Nadam, SGD"):
        make_optimizer("adam", 0.001)
    for rate in (-0.1, float("nan")):
        with pytest.raises(ConfigError, match="learning rate"):
            make_optimizer("SGD", rate)


@pytest.fixture(scope="module")
def block(manifest, tmp_path_factory):
    frame, names = manifest
    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, train_block(BACKBONE, "Adam", 0.01, frame, names, run_dir, SETTINGS)


@pytest.mark.slow
def test_block_run_writes_its_files_and_summarizes_its_history(block):
    run_dir, result = block
    assert result.phase == "block"
    assert result.weights_path == str(run_dir / "block" / "best.weights.h5")
    assert (run_dir / "block" / "best.weights.h5").is_file()
    history = pd.read_csv(run_dir / "block" / "history.csv")
    assert list(history["epoch"]) == list(range(result.epochs))
    assert list(run_dir.glob("tensorboard/block/validation/events.out.tfevents.*"))
    best = int(history["val_accuracy"].idxmax())
    assert result.best_epoch == best
    assert result.val_accuracy == pytest.approx(history["val_accuracy"][best])
    assert result.val_loss == pytest.approx(history["val_loss"][best])
    assert result.epochs == len(result.history) == SETTINGS.training.block_epochs
    assert result.stopped_by == "completed"
    assert result.seconds > 0
    assert result.val_accuracy > 0.25  # 4 balanced classes: chance is 0.25
    assert json.loads(json.dumps(result.to_dict()))["history"][0]["epoch"] == 0


@pytest.mark.slow
def test_a_run_repeated_gives_the_same_history(block, manifest, tmp_path):
    """Seeded Keras and deterministic TensorFlow ops: identical runs give identical numbers on a CPU."""
    frame, names = manifest
    _, first = block
    again = train_block(BACKBONE, "Adam", 0.01, frame, names, tmp_path, SETTINGS)
    assert again.history == first.history


@pytest.mark.slow
def test_fine_tuning_learns_well_above_chance(block, manifest):
    frame, names = manifest
    run_dir, block_result = block
    delimiting = 4  # block1 stays frozen; block2 to block5 train
    result = fine_tune(BACKBONE, "Adam", 1e-4, delimiting, block_result.weights_path, frame, names, run_dir, SETTINGS)
    assert result.phase == "finetune"
    assert (run_dir / "finetune" / "best.weights.h5").is_file()
    assert (run_dir / "finetune" / "history.csv").is_file()
    assert list(run_dir.glob("tensorboard/finetune/validation/events.out.tfevents.*"))
    # Deterministic for the seed (0.83 on the demo data of this writing); chance is 0.25.
    assert result.val_accuracy >= 0.5
    assert result.val_accuracy > block_result.val_accuracy


@pytest.mark.slow
def test_fine_tuning_starts_from_the_block_weights_and_predict_reads_its_own(block, manifest, tmp_path):
    """With a learning rate of 0 and the whole backbone frozen, fine-tuning's first epoch is the block's best.

    The block's checkpoint is its Dense layer alone: fine-tuning builds the backbone as the
    block's run did (seeded) and loads the layer. Its own checkpoint is the whole model.
    """
    frame, names = manifest
    _, block_result = block
    settings = SETTINGS.updated({"training.finetune_epochs": 1})
    result = fine_tune(
        BACKBONE, "SGD", 0.0, layer_count(BACKBONE), block_result.weights_path, frame, names, tmp_path, settings
    )
    assert result.val_accuracy == block_result.val_accuracy
    assert result.val_loss == pytest.approx(block_result.val_loss, rel=1e-4)

    val = frame[frame["split"] == "val"]
    probabilities = predict(BACKBONE, result.weights_path, val, names, SETTINGS)
    truth = val["label"].map(names.index).to_numpy()
    assert probabilities.shape == (len(val), len(names))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-6)
    assert np.mean(probabilities.argmax(axis=1) == truth) == pytest.approx(result.val_accuracy)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "epochs", "stopped_by"),
    [
        # A rate of 0 never improves val_accuracy after epoch 0: EarlyStopping(patience=1) stops after epoch 1.
        ({"training.early_stopping_patience": 1}, 2, "early_stopping"),
        # val_accuracy never reaches 1.01: the filter with patience 0 stops after epoch 0.
        ({"training.nonconvergence": {"enabled": True, "threshold": 1.01, "patience": 0}}, 1, "nonconvergence"),
    ],
)
@pytest.mark.parametrize("cached", [False, True], ids=["on_the_fly", "feature_cache"])
def test_stopped_by_names_the_callback_that_stopped(manifest, tmp_path, overrides, epochs, stopped_by, cached):
    frame, names = manifest
    settings = SETTINGS.updated({"training.block_epochs": 4, **overrides, **_caches(cached)})
    result = train_block(BACKBONE, "SGD", 0.0, frame, names, tmp_path, settings, tmp_path / "cache")
    assert (result.epochs, result.stopped_by) == (epochs, stopped_by)


@pytest.mark.slow
@pytest.mark.parametrize("cached", [False, True], ids=["on_the_fly", "feature_cache"])
def test_diverging_loss_is_a_training_error(manifest, tmp_path, cached):
    frame, names = manifest
    with pytest.raises(TrainingError, match="loss became (NaN|infinite) at epoch 0"):
        train_block(BACKBONE, "SGD", 1e38, frame, names, tmp_path, SETTINGS.updated(_caches(cached)), tmp_path / "cache")


def _caches(cached: bool) -> dict:
    """Settings that train the classification block on cached features (given a cache folder), or on the fly."""
    return {"data.image_cache": cached, "training.feature_cache": cached}


def test_a_manifest_without_validation_rows_is_a_data_error(manifest, tmp_path):
    frame, names = manifest
    with pytest.raises(DataError, match="'val'"):
        train_block(BACKBONE, "SGD", 0.01, frame[frame["split"] == "train"], names, tmp_path, SETTINGS)


def test_missing_block_weights_is_a_training_error(manifest, tmp_path):
    frame, names = manifest
    with pytest.raises(TrainingError, match="not found"):
        fine_tune(BACKBONE, "SGD", 0.01, 10, tmp_path / "none.weights.h5", frame, names, tmp_path, SETTINGS)


def test_a_run_frees_its_models_when_it_ends_also_when_it_fails():
    """Keras models are reference cycles: the scope's clear_session (with its full collection) frees them."""
    models = []
    with pytest.raises(RuntimeError):
        with training._run_scope(SETTINGS):
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
            models.append(weakref.ref(model))
            del model
            raise RuntimeError("a failing run")
    assert models[0]() is None


def test_run_result_to_dict_is_plain_data():
    result = RunResult("block", 0.5, 1.2, 3, 4, "completed", 1.5, "w.weights.h5", [{"epoch": 0, "loss": 1.0}])
    assert result.to_dict() == {
        "phase": "block",
        "val_accuracy": 0.5,
        "val_loss": 1.2,
        "best_epoch": 3,
        "epochs": 4,
        "stopped_by": "completed",
        "seconds": 1.5,
        "weights_path": "w.weights.h5",
        "history": [{"epoch": 0, "loss": 1.0}],
        "objective": "val_accuracy",
        "objective_value": None,
    }


@pytest.mark.parametrize(("given", "expected"), [(None, "1"), ("0", "0")])
def test_importing_tlopt_turns_on_onednn_unless_the_user_chose(given, expected):
    """TensorFlow's oneDNN kernels are on by default only on AVX-512 CPUs; tlopt asks for them before TensorFlow starts."""
    environment = {key: value for key, value in os.environ.items() if key != "TF_ENABLE_ONEDNN_OPTS"}
    if given is not None:
        environment["TF_ENABLE_ONEDNN_OPTS"] = given
    shown = subprocess.run(
        [sys.executable, "-c", "import os, tlopt; print(os.environ['TF_ENABLE_ONEDNN_OPTS'])"],
        env=environment, capture_output=True, text=True, check=True,
    )
    assert shown.stdout.strip() == expected
