"""The caches give what the faithful path computes: the decoded-image cache and the frozen-feature cache.

Training runs use VGG16 with random weights at 32 px, as in test_training.py: the
batch-normalised backbones give near-zero features with random weights in inference mode.
"""

import os

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from tlopt import checkpoints, data, features, objectives, training
from tlopt.backbones import build_transfer_model, get_backbone, layer_count
from tlopt.errors import DataError
from conftest import experiment
from tlopt.params import THESIS_OPTIMIZERS
from tlopt.training import fine_tune, train_block

BACKBONE = "VGG16"
SIZE = 32
SETTINGS = experiment({
    "data.image_size": SIZE, "data.batch_size": 16, "training.block_epochs": 5,
    "training.early_stopping_patience": 5, "training.nonconvergence.enabled": False, "weights": None,
    "data.image_cache": False, "training.feature_cache": False,
})
CACHED = SETTINGS.updated({"data.image_cache": True, "training.feature_cache": True})


def _epoch(dataset: tf.data.Dataset | features.FeatureBatches) -> tuple[np.ndarray, np.ndarray]:
    images, labels = zip(*[(np.asarray(x), np.asarray(y)) for x, y in dataset])
    return np.concatenate(images), np.concatenate(labels)


def _cache_files(folder) -> dict[str, tuple[int, int]]:
    """Name -> (inode, modification time) of every file in `folder`, temporary ones included (not the
    empty lock files that let one process build a cache while others wait)."""
    return {entry.name: (entry.stat().st_ino, entry.stat().st_mtime_ns) for entry in os.scandir(folder)
            if not entry.name.endswith(".lock")}


# The decoded-image cache


@pytest.mark.parametrize("training", [False, True])
def test_image_cache_gives_the_pixels_of_decoding(manifest, tmp_path, training):
    """Same images, labels, order and flips with and without the cache, for a seed."""
    frame, names = manifest
    cache = data.cache_images(frame, SIZE, tmp_path)
    rows = frame.sample(frac=1, random_state=1)  # any subset and order of the cached images

    decoded = data.make_dataset(rows, names, SIZE, 16, training, seed=3)
    cached = data.make_dataset(rows, names, SIZE, 16, training, seed=3, cache=cache)

    for _ in range(2):  # a second epoch: new order and flips, the same on both sides
        decoded_images, decoded_labels = _epoch(decoded)
        cached_images, cached_labels = _epoch(cached)
        np.testing.assert_array_equal(cached_images, decoded_images)
        np.testing.assert_array_equal(cached_labels, decoded_labels)
    assert cache.pixels.dtype == np.uint8 and cache.pixels.shape == (len(frame), SIZE, SIZE, 3)


def test_image_cache_rows_are_the_resized_images_of_their_paths(manifest, tmp_path):
    frame, _ = manifest
    cache = data.cache_images(frame, SIZE, tmp_path)
    paths = frame["path"].iloc[[40, 3, 77]]
    for path, pixels in zip(paths, cache.pixels[cache.positions(paths)]):
        decoded = tf.io.decode_image(tf.io.read_file(path), channels=3)  # TensorFlow's decoder: PIL's differs a little
        expected = tf.image.resize(decoded, (SIZE, SIZE)).numpy()
        np.testing.assert_allclose(pixels, expected, atol=0.5 + 1e-4)  # rounded to uint8


def test_image_cache_is_reused_until_the_manifest_or_size_changes(manifest, tmp_path):
    frame, _ = manifest
    first = data.cache_images(frame, SIZE, tmp_path)
    built = _cache_files(tmp_path)
    assert list(built) == [first.path.name] and first.path.name.startswith(f"images-{SIZE}-")

    again = data.cache_images(frame.sample(frac=1, random_state=0), SIZE, tmp_path)  # same images, other order
    assert again.path == first.path and _cache_files(tmp_path) == built  # not rebuilt

    fewer = data.cache_images(frame.iloc[1:], SIZE, tmp_path)
    other_size = data.cache_images(frame, 40, tmp_path)
    assert len({first.path, fewer.path, other_size.path}) == 3
    assert len(fewer.pixels) == len(frame) - 1 and other_size.pixels.shape[1:] == (40, 40, 3)


def test_a_replaced_image_file_rebuilds_the_cache(tmp_path):
    root = tmp_path / "data"
    paths = []
    for label, colour in (("a", (250, 0, 0)), ("b", (0, 0, 250))):
        paths.append(root / label / "x.png")
        paths[-1].parent.mkdir(parents=True)
        Image.new("RGB", (8, 8), colour).save(paths[-1])
    frame = data.discover(root)
    before = data.cache_images(frame, 8, tmp_path / "cache")

    Image.new("RGB", (8, 8), (0, 250, 0)).save(paths[0])
    os.utime(paths[0], ns=(1, 1))  # a different modification time even on a coarse clock
    after = data.cache_images(frame, 8, tmp_path / "cache")

    assert after.path != before.path
    assert after.pixels[0, 0, 0].tolist() == [0, 250, 0] and before.pixels[0, 0, 0].tolist() == [250, 0, 0]


def test_a_failed_build_leaves_no_cache_behind(manifest, tmp_path):
    frame, _ = manifest
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    frame = pd.concat([frame, pd.DataFrame({"path": [str(broken)], "label": [frame["label"].iloc[0]]})])

    with pytest.raises(DataError, match="does not decode while building the image cache"):
        data.cache_images(frame, SIZE, tmp_path / "cache")

    assert _cache_files(tmp_path / "cache") == {}


def test_image_cache_errors(manifest, tmp_path):
    frame, names = manifest
    cache = data.cache_images(frame.iloc[:10], SIZE, tmp_path)
    with pytest.raises(DataError, match="is not in the image cache"):
        data.make_dataset(frame.iloc[5:15], names, SIZE, 4, False, cache=cache)
    with pytest.raises(DataError, match="holds 32 px images, not 40 px"):
        data.make_dataset(frame.iloc[:10], names, 40, 4, False, cache=cache)
    with pytest.raises(DataError, match="image not found: /nowhere.jpg"):
        data.cache_images(pd.DataFrame({"path": ["/nowhere.jpg"], "label": ["a"]}), SIZE, tmp_path)


# The frozen-feature cache


def test_cached_features_are_the_backbone_output_on_flipped_preprocessed_images(manifest, tmp_path):
    frame, names = manifest
    rows = frame.iloc[::7]
    keras.utils.set_random_seed(0)
    model, base = build_transfer_model(BACKBONE, len(names), SIZE, None)

    vectors = features.pooled_features(model, BACKBONE, rows, names, features.ALL_FLIPS, SETTINGS, tmp_path)

    pixels, _ = _epoch(data.make_dataset(rows, names, SIZE, 16, False))
    flips = {
        "none": pixels,
        "horizontal": pixels[:, :, ::-1],
        "vertical": pixels[:, ::-1],
        "both": pixels[:, ::-1, ::-1],
    }
    assert vectors.shape == (4, len(rows), 512) and vectors.dtype == np.float32
    for variant, name in enumerate(data.FLIP_VARIANTS):
        preprocessed = get_backbone(BACKBONE).preprocess_input(flips[name].astype(np.float32))
        expected = base.predict(preprocessed, verbose=0).max(axis=(1, 2))  # global max pooling
        np.testing.assert_allclose(vectors[variant], expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    assert not np.allclose(vectors[0], vectors[1])  # the flips matter

    files = _cache_files(tmp_path)
    again = features.pooled_features(model, BACKBONE, rows, names, features.ALL_FLIPS, SETTINGS, tmp_path)
    np.testing.assert_array_equal(again, vectors)
    assert _cache_files(tmp_path) == files and len(files) == 1  # read back, not extracted again
    keras.backend.clear_session()


def test_the_feature_cache_key_separates_what_changes_the_features(manifest, tmp_path):
    frame, _ = manifest
    rows = frame.iloc[:10]

    def path_of(backbone=BACKBONE, rows=rows, variants=features.ALL_FLIPS, **changes):
        return features.features_path(backbone, rows, variants, SETTINGS.updated(changes), tmp_path)

    path = path_of()
    variations = [
        path_of("VGG19"),
        path_of(rows=frame.iloc[:11]),
        path_of(rows=rows.iloc[::-1]),
        path_of(variants=features.NO_FLIP),
        *(path_of(**change) for change in (
            {"data.image_size": 40}, {"pooling": "avg"}, {"seed": 1}, {"weights": "imagenet"})),
    ]
    assert path not in variations and len(set(variations)) == len(variations)
    # The seed only matters for random weights; training settings never matter.
    assert path_of(**{"training.block_epochs": 1, "data.batch_size": 4, "training.feature_cache": True}) == path
    assert path_of(weights="imagenet") == path_of(weights="imagenet", seed=1)


def test_feature_batches_draw_each_flip_variant_per_image_per_epoch():
    vectors = np.arange(4 * 6, dtype=np.float32).reshape(4, 6, 1)  # value = 6 x variant + row
    labels = np.arange(6, dtype=np.int32)
    batches = features.FeatureBatches(vectors, labels, 4, seed=0)
    orders, variants = [], set()
    for _ in range(4):
        values, rows = _epoch(batches)
        assert sorted(rows) == list(range(6))  # every image once per epoch
        np.testing.assert_array_equal(values[:, 0] % 6, rows)  # its own vector
        orders.append(rows.tolist())
        variants |= set((values[:, 0] // 6).astype(int))
    assert variants == {0, 1, 2, 3} and len({tuple(order) for order in orders}) > 1

    values, rows = _epoch(features.FeatureBatches(vectors[:1], labels, 4))
    assert rows.tolist() == list(range(6)) and values[:, 0].tolist() == list(range(6))


def _feature_pipeline(vectors: np.ndarray, labels: np.ndarray, batch_size: int, seed: int | None) -> tf.data.Dataset:
    """What `FeatureBatches` gives, as a tf.data pipeline for `Model.fit` (the reference)."""
    if seed is None:
        return tf.data.Dataset.from_tensor_slices((vectors[0], labels)).batch(batch_size)

    def read(rows: tf.Tensor, draws: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        variants = tf.cast(data.flip_variants(draws), tf.int64)
        return tf.gather_nd(vectors, tf.stack([variants, rows], axis=1)), tf.gather(labels, rows)

    return data.epoch_rows(vectors.shape[1], True, seed).batch(batch_size).map(read)


class _Logs(keras.callbacks.Callback):
    """The epoch-level hooks a run's callbacks see, with their logs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def on_train_begin(self, logs=None):
        self.calls.append(("train_begin",))

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append(("epoch_end", epoch, dict(logs)))

    def on_test_end(self, logs=None):
        self.calls.append(("test_end", dict(logs)))

    def on_train_end(self, logs=None):
        self.calls.append(("train_end", dict(logs)))


# Class weights of a skewed training set: class 0 is common, class 2 rare.
WEIGHTS = {0: 0.5, 1: 1.2, 2: 3.0}


@pytest.mark.parametrize(
    ("optimizer", "policy", "weighted"),
    [(name, "float32", False) for name in THESIS_OPTIMIZERS]
    + [("Adam", "mixed_float16", False), ("SGD", "mixed_float16", False)]
    + [("Adam", "float32", True), ("SGD", "mixed_float16", True)],
)
def test_fit_head_trains_the_head_as_model_fit_does(optimizer, policy, weighted):
    """Also with Keras's `class_weight` and the objectives' metrics (balanced accuracy, macro F1)."""
    rng = np.random.default_rng(0)
    vectors, labels = rng.normal(size=(4, 40, 8)).astype(np.float32), rng.integers(0, 3, 40).astype(np.int32)
    val_vectors, val_labels = rng.normal(size=(1, 20, 8)).astype(np.float32), rng.integers(0, 3, 20).astype(np.int32)
    initial = [rng.normal(size=(8, 3)).astype(np.float32), np.zeros(3, np.float32)]
    class_weight = WEIGHTS if weighted else None
    runs = {}
    for way in ("fit", "fit_head"):
        keras.mixed_precision.set_global_policy(policy)  # clear_session resets it to float32
        head, watcher = features.new_head(initial), _Logs()
        metrics = objectives.metrics_for(3, ["val_balanced_accuracy", "val_macro_f1"] if weighted else [])
        head.compile(optimizer=training.make_optimizer(optimizer, 0.05), loss=training.LOSS,
                     metrics=["accuracy", *metrics])
        # Under mixed precision Keras scales the loss; fit_head must unscale what it scales.
        assert isinstance(head.optimizer, keras.optimizers.LossScaleOptimizer) == (policy == "mixed_float16")
        if way == "fit":
            history = head.fit(
                _feature_pipeline(vectors, labels, 16, seed=3), validation_data=_feature_pipeline(
                    val_vectors, val_labels, 16, seed=None), epochs=4, callbacks=[watcher], shuffle=False, verbose=0,
                class_weight=class_weight,
            )
        else:
            history = features.fit_head(head, features.FeatureBatches(vectors, labels, 16, seed=3),
                                        features.FeatureBatches(val_vectors, val_labels, 16), 4, [watcher],
                                        metrics, class_weight)
        runs[way] = (history.history, watcher.calls, head.get_weights())
        keras.backend.clear_session()
    (fit_history, fit_calls, fit_weights), (history, calls, weights) = runs["fit"], runs["fit_head"]
    # The same draws, the same computation: the same numbers (measured: bit for bit).
    logged = {"loss", "accuracy"} | ({"balanced_accuracy", "macro_f1"} if weighted else set())
    assert history.keys() == fit_history.keys() == logged | {f"val_{name}" for name in logged}
    for name in history:
        np.testing.assert_allclose(history[name], fit_history[name], rtol=1e-6)
    for got, expected in zip(weights, fit_weights):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert [call[:2] for call in calls] == [call[:2] for call in fit_calls]  # the same hooks, in order
    assert calls[-1][1].keys() == fit_calls[-1][1].keys()


def test_class_weights_weigh_the_training_loss_as_keras_does():
    """With a learning rate of 0 the epoch's loss is the class-weighted cross-entropy summed over the
    images and divided by their number (not by the sum of the weights); validation stays unweighted."""
    rng = np.random.default_rng(1)
    vectors, labels = rng.normal(size=(4, 40, 8)).astype(np.float32), rng.choice(3, 40, p=[0.6, 0.3, 0.1])
    labels = labels.astype(np.int32)
    initial = [rng.normal(size=(8, 3)).astype(np.float32), np.zeros(3, np.float32)]
    losses = {}
    for class_weight in (None, WEIGHTS):
        head = features.new_head(initial)
        head.compile(optimizer=training.make_optimizer("SGD", 0.0), loss=training.LOSS, metrics=["accuracy"])
        batches = features.FeatureBatches(vectors, labels, 16, seed=3)
        seen = next(iter(features.FeatureBatches(vectors, labels, 40, seed=3)))  # the epoch's draws, at once
        logs = features.fit_head(head, batches, features.FeatureBatches(vectors[:1], labels, 16), 1, [],
                                 class_weight=class_weight).history
        probabilities = head.predict(seen[0], verbose=0)
        cross_entropy = -np.log(probabilities[np.arange(40), seen[1]])
        weights = np.ones(40) if class_weight is None else np.vectorize(class_weight.get)(seen[1])
        assert logs["loss"][0] == pytest.approx(np.sum(weights * cross_entropy) / 40, rel=1e-5)
        losses[str(class_weight)] = logs
        keras.backend.clear_session()
    unweighted, weighted = losses["None"], losses[str(WEIGHTS)]
    assert weighted["loss"][0] != pytest.approx(unweighted["loss"][0], rel=1e-3)
    assert weighted["val_loss"] == unweighted["val_loss"]


def test_balanced_class_weights_are_scikit_learns_from_the_training_split():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    assert training.class_weights("none", labels, 3) is None
    weights = training.class_weights("balanced", labels, 3)
    assert weights == pytest.approx({0: 10 / 18, 1: 10 / 9, 2: 10 / 3})
    with pytest.raises(DataError, match=r"class index\(es\) \[3\] have no training images"):
        training.class_weights("balanced", labels, 4)


@pytest.fixture(scope="module")
def runs(manifest, tmp_path_factory):
    """The same classification-block run on the fly and from the caches."""
    frame, names = manifest
    folder = tmp_path_factory.mktemp("runs")
    return {
        "on_the_fly": train_block(BACKBONE, "Adam", 0.01, frame, names, folder / "on_the_fly", SETTINGS),
        "cached": train_block(BACKBONE, "Adam", 0.01, frame, names, folder / "cached", CACHED, folder / "cache"),
        "cache_dir": folder / "cache",
    }


@pytest.mark.slow
def test_head_trained_from_the_cache_matches_the_on_the_fly_run(runs, manifest):
    on_the_fly, cached = runs["on_the_fly"], runs["cached"]
    val_images = len(manifest[0].query("split == 'val'"))
    # The same draws of order and flips: equal up to float rounding (measured: equal to 4 decimals).
    assert cached.epochs == on_the_fly.epochs == SETTINGS.training.block_epochs
    for row, reference in zip(cached.history, on_the_fly.history):
        assert abs(row["val_accuracy"] - reference["val_accuracy"]) <= 1 / val_images + 1e-6
        assert row["loss"] == pytest.approx(reference["loss"], rel=1e-3)
    assert abs(cached.val_accuracy - on_the_fly.val_accuracy) <= 1 / val_images + 1e-6
    assert cached.val_accuracy > 0.25  # chance for 4 balanced classes


@pytest.fixture(scope="module")
def weighted_runs(manifest, tmp_path_factory):
    """The classification block on a skewed split (one class keeps a third of its training images), with
    balanced class weights and balanced accuracy as the objective, on the fly and from the caches."""
    frame, names = manifest
    rare = frame.index[(frame["label"] == names[-1]) & (frame["split"] == "train")][7:]
    skewed = frame.drop(index=rare)
    folder = tmp_path_factory.mktemp("weighted")
    settings = SETTINGS.updated({"objective": "balanced_accuracy", "training.class_weight": "balanced",
                                 "training.block_epochs": 2})
    cached = settings.updated({"data.image_cache": True, "training.feature_cache": True})
    return {
        "on_the_fly": train_block(BACKBONE, "Adam", 0.01, skewed, names, folder / "on_the_fly", settings),
        "cached": train_block(BACKBONE, "Adam", 0.01, skewed, names, folder / "cached", cached, folder / "cache"),
        "frame": skewed,
    }


@pytest.mark.slow
def test_the_cached_path_equals_the_on_the_fly_path_with_class_weights_and_another_objective(weighted_runs):
    on_the_fly, cached = weighted_runs["on_the_fly"], weighted_runs["cached"]
    frame = weighted_runs["frame"]
    assert frame[frame["split"] == "train"]["label"].value_counts().min() == 7  # skewed: the weights are not 1
    val_images = (frame["split"] == "val").sum()
    assert cached.epochs == on_the_fly.epochs == 2
    for row, reference in zip(cached.history, on_the_fly.history):
        assert set(row) == set(reference) >= {"val_balanced_accuracy", "balanced_accuracy"}
        assert row["loss"] == pytest.approx(reference["loss"], rel=1e-3)
        assert abs(row["val_balanced_accuracy"] - reference["val_balanced_accuracy"]) <= 4 / val_images + 1e-6
    for result in (on_the_fly, cached):
        assert result.objective == "balanced_accuracy"
        best = int(np.argmax([row["val_balanced_accuracy"] for row in result.history]))
        assert (result.best_epoch, result.objective_value) == (best, result.history[best]["val_balanced_accuracy"])


@pytest.mark.slow
def test_head_run_writes_the_files_of_an_on_the_fly_run(runs):
    cached = runs["cached"]
    block = os.path.dirname(cached.weights_path)
    history = pd.read_csv(os.path.join(block, "history.csv"))
    assert list(history["epoch"]) == list(range(cached.epochs))
    assert set(history.columns) == {"epoch", "accuracy", "loss", "val_accuracy", "val_loss"}
    assert os.listdir(os.path.join(block, "..", "tensorboard", "block"))


@pytest.mark.slow
@pytest.mark.parametrize("path", ["on_the_fly", "cached"])
def test_block_checkpoint_is_the_dense_layer_at_its_best_epoch(runs, manifest, path):
    """The transfer model as a run builds it (seeded), with the checkpoint's Dense layer, scores the best epoch."""
    frame, names = manifest
    result = runs[path]
    keras.utils.set_random_seed(SETTINGS.seed)
    model, _ = build_transfer_model(BACKBONE, len(names), SIZE, None)
    assert [key.rsplit("/", 1)[-1] for key in checkpoints.stored_keys(result.weights_path)] == ["predictions"]
    checkpoints.load_into(model, result.weights_path)

    val = frame[frame["split"] == "val"]
    images = data.make_dataset(val, names, SIZE, 16, False)
    predicted = np.argmax(model.predict(images, verbose=0), axis=1)
    assert np.mean(predicted == data.label_indices(val, names)) == pytest.approx(result.val_accuracy, abs=1e-6)
    keras.backend.clear_session()


@pytest.mark.slow
def test_fine_tuning_starts_from_the_cached_run_and_reads_the_image_cache(runs, manifest, tmp_path):
    """With a learning rate of 0 and the whole backbone frozen, fine-tuning's first epoch is the block's best."""
    frame, names = manifest
    cached = runs["cached"]
    files = _cache_files(runs["cache_dir"])
    result = fine_tune(
        BACKBONE, "SGD", 0.0, layer_count(BACKBONE), cached.weights_path, frame, names, tmp_path,
        CACHED.updated({"training.finetune_epochs": 1, "training.activation_cache": False}), runs["cache_dir"],
    )
    assert result.val_accuracy == cached.val_accuracy
    assert result.val_loss == pytest.approx(cached.val_loss, rel=1e-4)
    assert _cache_files(runs["cache_dir"]) == files


@pytest.mark.slow
def test_feature_and_image_caches_are_shared_by_later_trials(runs, manifest, tmp_path):
    frame, names = manifest
    files = _cache_files(runs["cache_dir"])
    # train and val features, the Dense layer's initial weights, the images
    assert sorted(name.split("-")[0] for name in files) == ["features", "features", "head", "images"]

    other = train_block(BACKBONE, "SGD", 0.05, frame, names, tmp_path, CACHED, runs["cache_dir"])

    assert _cache_files(runs["cache_dir"]) == files  # nothing extracted or decoded again
    assert other.history != runs["cached"].history


# GPU switches


@pytest.mark.slow
def test_gpu_switches_on_a_cpu_warn_and_change_nothing(runs, manifest, tmp_path):
    frame, names = manifest
    settings = CACHED.updated({"training.mixed_precision": True, "training.jit_compile": True})
    with pytest.warns(RuntimeWarning) as warned:
        result = train_block(BACKBONE, "Adam", 0.01, frame, names, tmp_path, settings, runs["cache_dir"])
    messages = {str(w.message).split(" is for GPUs")[0] for w in warned if w.category is RuntimeWarning}
    assert messages == {"training.mixed_precision", "training.jit_compile"}
    assert result.history == runs["cached"].history  # float32, no XLA: the same run
    assert keras.mixed_precision.global_policy().name == "float32"


@pytest.mark.slow
@pytest.mark.parametrize("cached", [False, True], ids=["on_the_fly", "cached"])
def test_mixed_precision_on_a_gpu_sets_the_policy_for_the_run_only(manifest, tmp_path, monkeypatch, cached):
    """A pretend GPU: float16 runs on a CPU too (slowly), which is enough to check the switch."""
    frame, names = manifest
    monkeypatch.setattr(training, "_on_gpu", lambda switch, instead: True)
    policies = []
    set_policy = keras.mixed_precision.set_global_policy
    monkeypatch.setattr(
        keras.mixed_precision, "set_global_policy", lambda policy: (policies.append(str(policy)), set_policy(policy))
    )
    settings = (CACHED if cached else SETTINGS).updated({"training.block_epochs": 1, "training.mixed_precision": True})

    result = train_block(BACKBONE, "Adam", 0.01, frame, names, tmp_path, settings, tmp_path / "cache")

    assert policies[0] == "mixed_float16" and keras.mixed_precision.global_policy().name == "float32"
    assert np.isfinite(result.history[0]["loss"]) and result.val_accuracy > 0
    model, _ = build_transfer_model(BACKBONE, len(names), SIZE, None)
    checkpoints.load_into(model, result.weights_path)  # float32 weights, as under the float32 policy
    assert {weight.dtype for weight in features.head_of(model).weights} == {"float32"}
    keras.backend.clear_session()
