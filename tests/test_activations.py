"""The activation cache: the tensors that cross the cut, the upper model on them, and fine-tuning
from cached activations giving the on-the-fly run bit for bit (docs/method.md, "The activation cache").

Backbones with random weights at 32 px. Bit-equality holds where a CPU convolution gives an
image's values independently of the batch it is in and of its place in it (measured: VGG16,
ResNet50 and DenseNet121 at 32 px in whole batches of 16; ResNet50 differs in a ragged last
batch of 4); the tests use those configurations.
"""

import threading
import time

import keras
import numpy as np
import pandas as pd
import pytest

from conftest import experiment
from tlopt import activations, data, features, training
from tlopt.demo_data import generate_demo_dataset
from tlopt.backbones import BACKBONES, Backbone, build_transfer_model, default_delimiting_layer, set_delimiting_layer
from tlopt.params import validate
from tlopt.errors import ConfigError

SIZE = 32
SETTINGS = experiment({
    "data.image_size": SIZE, "data.batch_size": 16, "training.block_epochs": 1, "training.finetune_epochs": 2,
    "training.early_stopping_patience": 5, "training.nonconvergence.enabled": False, "weights": None,
})


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """48 training and 16 validation images: whole batches of 16 (a ragged batch's last bits may differ, see above)."""
    root = generate_demo_dataset(tmp_path_factory.mktemp("demo") / "data", images_per_class=16, image_size=64, seed=0)
    frame = data.split(data.discover(root), val_fraction=0.25, seed=0)
    assert (frame["split"] == "train").sum() == 48 and (frame["split"] == "val").sum() == 16
    return frame, data.class_names(frame)


def _model(backbone: str, index: int, size: int = SIZE) -> tuple[keras.Model, keras.Model, activations.Cut]:
    keras.utils.set_random_seed(0)
    model, base = build_transfer_model(backbone, 4, size, None)
    set_delimiting_layer(base, index)
    return model, base, activations.find_cut(base, index)


def _index(base: keras.Model, name: str) -> int:
    return [layer.name for layer in base.layers].index(name)


def _producers(cut: activations.Cut) -> list[str]:
    return [tensor._keras_history[0].name for tensor in cut.crossing]


def _upper_of_lower_is_the_model(model: keras.Model, base: keras.Model, cut: activations.Cut, size: int,
                                 modes: tuple[bool, ...] = (False, True)) -> None:
    """upper(pack(lower(x))) gives the transfer model's output bit for bit, in inference and in training mode."""
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3)).astype("uint8")
    crossing = keras.tree.flatten(activations.lower_model(model, base, cut)(images, training=False))
    packed = np.concatenate([np.asarray(tensor).reshape(len(images), -1) for tensor in crossing], axis=1)
    assert packed.shape[1] == cut.values_per_image
    upper = activations.upper_model(model, base, cut)
    assert [w.path for w in upper.trainable_weights] == [w.path for w in model.trainable_weights]
    for mode in modes:
        np.testing.assert_array_equal(np.asarray(upper(packed, training=mode)), np.asarray(model(images, training=mode)))


# The cut


@pytest.fixture(scope="module")
def resnet():
    model, base, _ = _model("ResNet50", 0)
    yield model, base
    keras.backend.clear_session()


@pytest.fixture(scope="module")
def densenet():
    model, base, _ = _model("DenseNet121", 0)
    yield model, base
    keras.backend.clear_session()


def _cut_at(model_and_base, layer: str) -> tuple[keras.Model, keras.Model, activations.Cut]:
    model, base = model_and_base
    index = _index(base, layer)
    set_delimiting_layer(base, index)
    return model, base, activations.find_cut(base, index)


@pytest.mark.parametrize(("layer", "crossing", "checked"), [
    ("conv4_block4_2_conv", ["conv4_block3_out", "conv4_block4_1_relu"], True),  # inside a block: the shortcut crosses
    ("conv4_block1_0_conv", ["conv3_block4_out", "conv4_block1_2_relu"], True),  # the projection: two spatial sizes
    ("conv3_block2_add", ["conv3_block1_out", "conv3_block2_3_bn"], False),  # a tensor frozen layers read too
])
def test_a_cut_in_a_residual_block_hands_over_the_shortcut(resnet, layer, crossing, checked):
    model, base, cut = _cut_at(resnet, layer)
    assert _producers(cut) == crossing
    if checked:
        _upper_of_lower_is_the_model(model, base, cut, SIZE)


@pytest.mark.slow  # DenseNet121's 427 layers, run eagerly
@pytest.mark.parametrize(("layer", "crossing", "checked"), [
    ("conv3_block4_1_conv", ["conv3_block3_concat", "conv3_block4_0_relu"], True),  # the concatenation so far
    ("conv3_block4_concat", ["conv3_block3_concat", "conv3_block4_2_conv"], False),
])
def test_a_cut_in_a_dense_block_hands_over_the_concatenation(densenet, layer, crossing, checked):
    model, base, cut = _cut_at(densenet, layer)
    assert _producers(cut) == crossing
    if checked:
        _upper_of_lower_is_the_model(model, base, cut, SIZE)


def test_a_chain_hands_over_one_tensor_and_everything_frozen_the_backbone_output():
    model, base, cut = _model("VGG16", 12)
    assert _producers(cut) == ["block4_conv1"] and cut.shapes == [(4, 4, 512)]
    last = len(base.layers)
    set_delimiting_layer(base, last)
    whole = activations.find_cut(base, last)
    assert len(whole.crossing) == 1 and whole.crossing[0] is base.output
    _upper_of_lower_is_the_model(model, base, whole, SIZE)
    keras.backend.clear_session()


# VGG16 and ResNet50 are checked above; MobileNetV3Small has raw operations (hard sigmoid) by the cut.
QUICK = {"VGG16", "MobileNetV3Small"}


@pytest.mark.parametrize("backbone", [
    name if name in QUICK else pytest.param(name, marks=pytest.mark.slow) for name in BACKBONES
])
def test_every_backbone_splits_into_lower_and_upper_models_at_its_default_cut(backbone):
    size = BACKBONES[backbone].min_input_size
    model, base, _ = _model(backbone, 0, size)
    index = default_delimiting_layer(len(base.layers))
    set_delimiting_layer(base, index)
    cut = activations.find_cut(base, index)
    noisy = [layer.name for layer in base.layers if isinstance(layer, activations.STOCHASTIC_LAYERS)]
    # In training mode Dropout draws new noise in every call: only inference mode can match.
    _upper_of_lower_is_the_model(model, base, cut, size, (False,) if noisy else (False, True))
    assert BACKBONES[backbone].noisy_when_frozen == bool(noisy)
    # Dropout below the cut makes it uncacheable (EfficientNet's first is its 45th layer).
    assert list(cut.stochastic_below) == [name for name in noisy if _index(base, name) < index]
    keras.backend.clear_session()


def test_frozen_noise_nothing_frozen_and_the_size_guard_each_say_why_the_cache_is_unusable():
    model, base, cut = _model("VGG16", 12)
    assert activations.unusable("VGG16", cut, 84, 36, SETTINGS) is None
    # (4 variants x 84 + 36) images x 8,192 float32 values
    assert activations.cache_gigabytes(cut, 84, 36) == pytest.approx(372 * 8192 * 4 / 1e9)
    small = SETTINGS.updated({"training.activation_cache_max_gb": 0.01})
    assert activations.unusable("VGG16", cut, 84, 36, small) == (
        "the cache of VGG16 at delimiting layer 12 would hold 0.0122 GB, above training.activation_cache_max_gb = 0.01"
    )
    set_delimiting_layer(base, 1)
    assert "nothing is frozen" in activations.unusable("VGG16", activations.find_cut(base, 1), 84, 36, SETTINGS)
    noisy = activations.Cut(50, cut.crossing, cut.upper_nodes, ("block2b_drop",))
    assert "block2b_drop, which draws new noise" in activations.unusable("EfficientNetB0", noisy, 84, 36, SETTINGS)
    keras.backend.clear_session()
    with pytest.raises(ConfigError, match="activation_cache_max_gb"):
        validate({"data": {"root": "x"}, "training": {"activation_cache_max_gb": -1}})


def test_the_feature_cache_is_not_used_for_a_backbone_whose_frozen_layers_draw_noise():
    with pytest.warns(RuntimeWarning, match="EfficientNetB0's frozen layers include Dropout"):
        assert not training._features_cacheable("EfficientNetB0")
    assert training._features_cacheable("VGG16")


# Fine-tuning on cached activations: the on-the-fly run, bit for bit


def _checkpoint(backbone: str, result: training.RunResult, names: list[str]) -> list[np.ndarray]:
    model, _ = training.load_trained_model(backbone, result.weights_path, len(names), SETTINGS)
    weights = [weight.copy() for weight in model.get_weights()]
    keras.backend.clear_session()
    return weights


def _fine_tune_both_ways(manifest, folder, backbone: str, index: int, **changes):
    """The block once, then fine-tuning on the fly and from the activation cache (the image cache in both)."""
    frame, names = manifest
    cache = folder / "cache"
    block = training.train_block(backbone, "Adam", 0.01, frame, names, folder / "block", SETTINGS, cache)
    runs = {}
    for cached in (False, True):
        config = SETTINGS.updated({"training.activation_cache": cached, **changes})
        runs[cached] = training.fine_tune(backbone, "Adam", 1e-3, index, block.weights_path, frame, names,
                                          folder / f"finetune-{cached}", config, cache)
    return block, runs[False], runs[True]


def _assert_same_run(on_the_fly, cached, backbone, names):
    assert cached.history == on_the_fly.history
    assert (cached.epochs, cached.best_epoch, cached.stopped_by) == (on_the_fly.epochs, on_the_fly.best_epoch,
                                                                     on_the_fly.stopped_by)
    for a, b in zip(_checkpoint(backbone, on_the_fly, names), _checkpoint(backbone, cached, names)):
        np.testing.assert_array_equal(a, b)
    history = [pd.read_csv(run.weights_path.replace("best.weights.h5", "history.csv")) for run in (on_the_fly, cached)]
    pd.testing.assert_frame_equal(*history)


@pytest.fixture(scope="module")
def vgg_runs(manifest, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vgg")
    counted = []
    original = activations.extract

    def counting(*args, **kwargs):
        counted.append(args[2] if len(args) > 2 else None)
        return original(*args, **kwargs)

    activations.extract = counting
    try:
        block, on_the_fly, cached = _fine_tune_both_ways(manifest, folder, "VGG16", 12)
    finally:
        activations.extract = original
    return {"block": block, "on_the_fly": on_the_fly, "cached": cached, "folder": folder, "extractions": len(counted)}


def test_fine_tuning_on_cached_activations_is_the_on_the_fly_run(vgg_runs, manifest):
    _assert_same_run(vgg_runs["on_the_fly"], vgg_runs["cached"], "VGG16", manifest[1])
    assert vgg_runs["extractions"] == 2  # the training rows' four flips, the validation rows


def _activation_files(folder) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in (folder / "cache").glob("activations-*.npy")}


def test_trials_of_one_delimiting_layer_share_the_cache(vgg_runs, manifest, monkeypatch, tmp_path):
    frame, names = manifest
    folder = vgg_runs["folder"]
    files = _activation_files(folder)
    assert len(files) == 2 and all(name.startswith("activations-VGG16-12-") for name in files)
    extractions = []
    original = activations.extract
    monkeypatch.setattr(activations, "extract", lambda *args, **kwargs: extractions.append(1) or original(*args, **kwargs))
    other = training.fine_tune("VGG16", "SGD", 0.01, 12, vgg_runs["block"].weights_path, frame, names,
                               tmp_path / "same-layer", SETTINGS.updated({"training.finetune_epochs": 1}),
                               folder / "cache")
    assert extractions == [] and _activation_files(folder) == files  # model optimization: the same cut, no extraction
    assert other.history[0] != vgg_runs["cached"].history[0]


def test_the_cache_key_separates_what_changes_the_activations(manifest, tmp_path):
    """Layer optimization's trials differ by the delimiting layer: each has its own cache."""
    rows = manifest[0][manifest[0]["split"] == "train"]

    def path_of(index=12, variants=features.ALL_FLIPS, backbone="VGG16", **changes):
        return activations.activations_path(backbone, rows, variants, index, SETTINGS.updated(changes), tmp_path)

    path = path_of()
    different = [path_of(15), path_of(variants=features.NO_FLIP), path_of(backbone="VGG19"),
                 path_of(**{"data.batch_size": 8}), path_of(**{"data.image_size": 64}), path_of(**{"seed": 1}),
                 activations.activations_path("VGG16", rows.iloc[::-1], features.ALL_FLIPS, 12, SETTINGS, tmp_path)]
    assert path not in different and len(set(different)) == len(different)
    same = path_of(**{"training.finetune_epochs": 9, "training.activation_cache_max_gb": 1.0, "pooling": "avg"})
    assert same == path


def test_above_the_size_limit_fine_tuning_runs_on_the_fly_with_one_line(vgg_runs, manifest, tmp_path):
    frame, names = manifest
    config = SETTINGS.updated({"training.activation_cache_max_gb": 0.001, "training.finetune_epochs": 1})
    with pytest.warns(RuntimeWarning) as warned:
        result = training.fine_tune("VGG16", "Adam", 1e-3, 12, vgg_runs["block"].weights_path, frame, names,
                                    tmp_path / "run", config, tmp_path / "cache")
    lines = [str(w.message) for w in warned if "activation cache" in str(w.message)]
    assert lines == [
        "fine-tuning runs on the fly, without the activation cache: the cache of VGG16 at delimiting layer 12 "
        "would hold 0.00682 GB, above training.activation_cache_max_gb = 0.001"
    ]
    assert not list((tmp_path / "cache").glob("activations-*"))
    assert result.history == vgg_runs["on_the_fly"].history[:1]


def _small_resnet(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3)):
    """Two residual units (convolution, BatchNorm, ReLU twice, added to their input), as in ResNet.

    ResNet50 takes minutes to trace twice on 2 cores; its cuts are checked above.
    """
    layers = keras.layers
    images = keras.Input(input_shape)
    x = layers.Conv2D(8, 3, strides=2, name="stem_conv")(images)
    for unit in range(2):
        y = x
        for conv in (1, 2):
            y = layers.Conv2D(8, 3, padding="same", name=f"unit{unit}_{conv}_conv")(y)
            y = layers.BatchNormalization(name=f"unit{unit}_{conv}_bn")(y)
            y = layers.ReLU(name=f"unit{unit}_{conv}_relu")(y)
        x = layers.Add(name=f"unit{unit}_add")([x, y])
    return keras.Model(images, x, name="small_resnet")


def _small_densenet(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3)):
    """Three dense-block units (BatchNorm, ReLU, convolution, concatenated to their input), as in DenseNet.

    DenseNet121 itself takes minutes to trace twice on 2 cores; its cut is checked above.
    """
    layers = keras.layers
    images = keras.Input(input_shape)
    x = layers.Conv2D(8, 3, strides=2, name="stem_conv")(images)
    for unit in range(3):
        y = layers.BatchNormalization(name=f"unit{unit}_bn")(x)
        y = layers.ReLU(name=f"unit{unit}_relu")(y)
        y = layers.Conv2D(4, 3, padding="same", name=f"unit{unit}_conv")(y)
        x = layers.Concatenate(name=f"unit{unit}_concat")([x, y])
    return keras.Model(images, x, name="small_densenet")


@pytest.mark.parametrize(("build", "preprocess", "layer", "crossing"), [
    (_small_resnet, keras.applications.resnet.preprocess_input, "unit1_2_conv", ["unit0_add", "unit1_1_relu"]),
    (_small_densenet, keras.applications.densenet.preprocess_input, "unit1_conv", ["unit0_concat", "unit1_relu"]),
], ids=["residual", "dense"])
def test_fine_tuning_from_a_cut_inside_a_block_is_the_on_the_fly_run(manifest, tmp_path, monkeypatch, build,
                                                                      preprocess, layer, crossing):
    """Inside a residual block the shortcut crosses the cut; inside a dense block, the concatenation so far."""
    monkeypatch.setitem(BACKBONES, "Small", Backbone("Small", build, preprocess, SIZE))
    model, base, _ = _model("Small", 0)
    index = _index(base, layer)
    set_delimiting_layer(base, index)
    assert _producers(activations.find_cut(base, index)) == crossing
    keras.backend.clear_session()
    _, on_the_fly, cached = _fine_tune_both_ways(manifest, tmp_path, "Small", index)
    _assert_same_run(on_the_fly, cached, "Small", manifest[1])


def test_trials_building_the_same_cache_at_once_extract_it_once(manifest, tmp_path, monkeypatch):
    """The second trial starts while the first extracts: it waits for the file and reads it."""
    frame, names = manifest
    rows = frame[frame["split"] == "val"]
    model, base, cut = _model("VGG16", 12)
    lower = activations.lower_model(model, base, cut)
    original, calls, results = activations.extract, [], {}

    def trial(name: str) -> None:
        results[name] = np.array(activations.cached_activations(
            lower, "VGG16", rows, names, features.NO_FLIP, 12, SETTINGS, tmp_path))

    second = threading.Thread(target=trial, args=("second",))

    def slow_extract(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            second.start()
            time.sleep(1.0)  # the second trial reaches the cache while this one extracts
        return original(*args, **kwargs)

    monkeypatch.setattr(activations, "extract", slow_extract)
    trial("first")
    second.join()
    assert len(calls) == 1
    np.testing.assert_array_equal(results["first"], results["second"])
    stored = np.load(activations.activations_path("VGG16", rows, features.NO_FLIP, 12, SETTINGS, tmp_path))
    assert stored.shape == (1, len(rows), cut.values_per_image)
    np.testing.assert_array_equal(stored, results["first"])
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".") and not path.name.endswith(".lock")] == []
    keras.backend.clear_session()
