"""Lean checkpoints: the trained layers alone, no optimizer state, and the same model as a full checkpoint.

A real fine-tuning run (VGG16, random weights, 32 px) writes its lean checkpoint while a
watching callback writes, at the same epochs, the checkpoint tlopt wrote before: Keras's
`save_weights` of the compiled model (every layer and the optimizer's state). Both must
load into the same model.
"""

import h5py
import keras
import numpy as np
import pytest

from conftest import experiment
from tlopt import checkpoints, data, features, training
from tlopt.backbones import build_transfer_model, layer_count
from tlopt.errors import TrainingError, WeightsError

BACKBONE = "VGG16"
DELIMITING = 15  # VGG16's block5 and the Dense layer train
SETTINGS = experiment({
    "data.image_size": 32, "data.batch_size": 16, "training.block_epochs": 1, "training.finetune_epochs": 2,
    "training.early_stopping_patience": 5, "training.nonconvergence.enabled": False, "weights": None, "seed": 0,
})


class FullCheckpoint(keras.callbacks.ModelCheckpoint):
    """The checkpoint of tlopt before lean checkpoints: the whole compiled model at the best validation accuracy."""

    def __init__(self, path):
        super().__init__(str(path), monitor="val_accuracy", mode="max", save_best_only=True, save_weights_only=True)


@pytest.fixture(scope="module")
def tuned(manifest, tmp_path_factory):
    """A block run and a fine-tuning run from it, seeded with 3 (as a repeat of the winner is), with both checkpoints."""
    frame, names = manifest
    folder = tmp_path_factory.mktemp("trial")
    settings = SETTINGS.updated({"seed": 3})
    block = training.train_block(BACKBONE, "Adam", 0.01, frame, names, folder, settings)
    full = folder / "full.weights.h5"
    result = training.fine_tune(BACKBONE, "Adam", 1e-4, DELIMITING, block.weights_path, frame, names, folder,
                                settings, observers=[FullCheckpoint(full)])
    return block, result, full


@pytest.mark.slow
def test_a_fine_tuning_checkpoint_holds_the_trained_layers_and_no_optimizer_state(tuned):
    block, result, full = tuned
    with h5py.File(full, "r") as file:
        assert "optimizer" in file  # what the checkpoint held before
    with h5py.File(result.weights_path, "r") as file:
        assert set(file) == {"layers"}
    model, base = build_transfer_model(BACKBONE, 4, 32, None)
    trained = sorted(layer.name for layer in base.layers[DELIMITING:] if layer.weights)
    assert trained == ["block5_conv1", "block5_conv2", "block5_conv3"]
    assert checkpoints.stored_keys(result.weights_path) == [*(f"base/{name}" for name in trained), "model/predictions"]
    assert checkpoints.read_reference(result.weights_path) == checkpoints.Reference(BACKBONE, None, 3, 32, "max", 4)
    # The classification block's checkpoint: the Dense layer alone.
    assert checkpoints.stored_keys(block.weights_path) == ["model/predictions"]


@pytest.mark.slow
def test_loading_the_lean_checkpoint_gives_the_model_of_the_full_one(tuned, manifest):
    """Under another seed than the run's (the analysis runs with the run's, a repeat trained with its own)."""
    _, result, full = tuned
    frame, names = manifest
    old, _ = training.load_trained_model(BACKBONE, full, len(names), SETTINGS)  # the full checkpoint still loads
    lean, _ = training.load_trained_model(BACKBONE, result.weights_path, len(names), SETTINGS)
    assert len(lean.weights) == len(old.weights)
    for mine, theirs in zip(lean.weights, old.weights):
        assert mine.path == theirs.path
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    images = np.stack([data.decode_image(path, 32) for path in frame["path"][:8]])
    np.testing.assert_array_equal(lean.predict(images, verbose=0), old.predict(images, verbose=0))


@pytest.mark.slow
def test_predict_reads_a_lean_and_a_full_checkpoint_alike(tuned, manifest):
    _, result, full = tuned
    frame, names = manifest
    val = frame[frame["split"] == "val"]
    np.testing.assert_array_equal(training.predict(BACKBONE, result.weights_path, val, names, SETTINGS),
                                  training.predict(BACKBONE, full, val, names, SETTINGS))


@pytest.mark.slow
def test_fine_tuning_starts_from_the_dense_layer_of_an_old_block_checkpoint(tuned, manifest, tmp_path):
    """The block's checkpoint as a Keras weights file (tlopt before lean checkpoints): with a learning rate of 0
    and the whole backbone frozen, fine-tuning's first epoch is the block's best."""
    block, _, _ = tuned
    frame, names = manifest
    settings = SETTINGS.updated({"seed": 3, "training.finetune_epochs": 1})
    model, _ = build_transfer_model(BACKBONE, len(names), 32, None)
    checkpoints.load_into(model, block.weights_path)
    old_block = tmp_path / "old.weights.h5"
    features.head_of(model).save_weights(str(old_block))
    result = training.fine_tune(BACKBONE, "SGD", 0.0, layer_count(BACKBONE), old_block, frame, names, tmp_path,
                                settings)
    assert result.val_accuracy == block.val_accuracy
    assert result.val_loss == pytest.approx(block.val_loss, rel=1e-4)


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_refused(tuned, tmp_path):
    _, result, _ = tuned
    with pytest.raises(TrainingError, match="holds a VGG16 with 4 classes, not a VGG19 with 4"):
        training.load_trained_model("VGG19", result.weights_path, 4, SETTINGS)
    dense_alone = keras.Sequential([keras.Input((512,)), keras.layers.Dense(4, name="predictions")])
    with pytest.raises(WeightsError, match="has no layer base/block5_conv1"):
        checkpoints.load_into(dense_alone, result.weights_path)
    two_classes, _ = build_transfer_model(BACKBONE, 2, 32, None)
    with pytest.raises(WeightsError, match=r"layer model/predictions stores shapes \[\(512, 4\), \(4,\)\]"):
        checkpoints.load_into(two_classes, result.weights_path)
    keras_file = tmp_path / "keras.weights.h5"
    dense_alone.save_weights(str(keras_file))
    assert not checkpoints.is_lean(keras_file)
    with pytest.raises(WeightsError, match="not a tlopt checkpoint"):
        checkpoints.read_reference(keras_file)
    (tmp_path / "empty.weights.h5").touch()
    with pytest.raises(WeightsError, match="empty.weights.h5 is not a weights file"):
        training.load_trained_model(BACKBONE, tmp_path / "empty.weights.h5", 4, SETTINGS)
