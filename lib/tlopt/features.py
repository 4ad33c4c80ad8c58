"""The frozen-feature cache: train the classification block on pooled backbone features.

While the classification block trains, the backbone is frozen (its BatchNormalization
layers in inference mode) and the block is global pooling + Dense, so the pooled feature
vector of an image never changes. It depends on the image only through its flip, the
thesis's one augmentation, and a random flip pair has four outcomes. So the vectors of
the four flip variants of every training image (and of the unflipped validation images)
are computed once, stored in the cache folder and shared by every trial with the same
backbone; the Dense layer then trains on them, drawing one variant per image per epoch
from the same seeded stream as the image pipeline (`data.epoch_rows`). Per epoch that is
a few matrix products instead of a pass of the backbone over every image.

Cache files: `<cache_dir>/features-<backbone>-<key>.npy`, float32 of shape
(variants, rows, features); the key covers the backbone, its weights (the seed for random
weights), the image size, the pooling, the precision policy, the flip variants and the
rows' image files in order. Beside them `head-<backbone>-<key>.npz`, the Dense layer's
initial weights, so that later trials build the Dense layer alone.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from tlopt import data
from tlopt.files import build_once
from tlopt.params import Experiment

ALL_FLIPS: tuple[int, ...] = tuple(range(len(data.FLIP_VARIANTS)))
NO_FLIP: tuple[int, ...] = (0,)


def _weights_identity(weights: str | os.PathLike | None, seed: int) -> str:
    """What determines the backbone's weights: the seed (random), "imagenet", or the weights file."""
    if weights is None:
        return f"random-seed-{seed}"
    if weights == "imagenet":
        return "imagenet"
    return data.files_key([str(Path(weights).resolve())])


def features_path(
    backbone: str, rows: pd.DataFrame, variants: tuple[int, ...], config: Experiment, cache_dir: str | os.PathLike
) -> Path:
    """Where the pooled features of `rows` (in their order) for `variants` are cached."""
    key = data.files_key(
        list(rows["path"]),
        backbone,
        _weights_identity(config.weights, config.seed),
        config.data.image_size,
        config.pooling,
        keras.mixed_precision.global_policy().name,
        variants,
    )
    return Path(cache_dir) / f"features-{backbone}-{key}.npy"


def pooled_features(
    model: keras.Model,
    backbone: str,
    rows: pd.DataFrame,
    class_names: list[str],
    variants: tuple[int, ...],
    config: Experiment,
    cache_dir: str | os.PathLike,
    image_cache: data.ImageCache | None = None,
) -> np.ndarray:
    """The output of `model`'s pooling layer for each flip variant of each row: (variants, rows, features).

    Read from the cache folder, or computed by `model` (a transfer model of `backbone`
    built with `config`) and cached in `cache_dir`. The images go through the training pipeline's
    steps: decoded (or read from `image_cache`) and flipped; the model's first layer
    preprocesses them.
    """
    def extract(temporary: Path) -> None:
        extractor = keras.Model(model.inputs, model.get_layer("pool").output)
        images = data.make_dataset(
            rows, class_names, config.data.image_size, config.data.batch_size, False, config.seed, image_cache
        )

        def flipped(variant: int) -> tf.data.Dataset:
            return images.map(lambda batch, _: data.flip_images(batch, variant))

        # One predict call for all variants: each call of a new dataset traces the model again.
        every_variant = functools.reduce(tf.data.Dataset.concatenate, map(flipped, variants))
        vectors = extractor.predict(every_variant, verbose=0).astype(np.float32)
        np.save(temporary, vectors.reshape(len(variants), len(rows), -1))

    # Concurrent trials of one backbone extract once; the others wait and read the file.
    return np.load(build_once(features_path(backbone, rows, variants, config, cache_dir), extract, suffix=".npy"))


def initial_head_path(backbone: str, num_classes: int, config: Experiment, cache_dir: str | os.PathLike) -> Path:
    """Where the Dense layer's initial weights, as every new transfer model of `backbone` has them, are kept."""
    key = data.files_key([], backbone, _weights_identity(config.weights, config.seed), num_classes, config.pooling)
    return Path(cache_dir) / f"head-{backbone}-{key}.npz"


def keep_initial_head(model: keras.Model, backbone: str, config: Experiment, cache_dir: str | os.PathLike) -> None:
    """Keep the Dense layer's weights of `model`, a new transfer model, in the cache folder.

    Every run seeds Keras first, so every new transfer model of one backbone starts with
    the same Dense weights, which depend on everything built before that layer. Kept
    with the features, they let a run that reads cached features start from them
    without building the backbone (`initial_head_weights`).
    """
    dense = model.get_layer("predictions")

    def keep(temporary: Path) -> None:
        kernel, bias = dense.get_weights()
        np.savez(temporary, kernel=kernel, bias=bias)

    build_once(initial_head_path(backbone, dense.units, config, cache_dir), keep, suffix=".npz")


def initial_head_weights(
    backbone: str, num_classes: int, config: Experiment, cache_dir: str | os.PathLike
) -> list[np.ndarray]:
    """The Dense layer's initial weights (kernel, bias) that `keep_initial_head` kept."""
    with np.load(initial_head_path(backbone, num_classes, config, cache_dir)) as stored:
        return [stored["kernel"], stored["bias"]]


def head_model(dense: keras.layers.Dense, width: int) -> keras.Model:
    """A model of the classification block's Dense layer alone, on pooled feature vectors of `width`.

    Given the Dense layer of a transfer model, it shares the layer (and so its weights)
    with that model: whatever the head learns or loads is in the transfer model too. Its
    weights file is the classification block's checkpoint.
    """
    inputs = keras.Input(shape=(width,), name="features")
    return keras.Model(inputs, dense(inputs), name="classification_block")


def head_of(model: keras.Model) -> keras.Model:
    """`head_model` of a transfer model's own Dense layer."""
    return head_model(model.get_layer("predictions"), model.get_layer("pool").output.shape[-1])


def new_head(initial_weights: list[np.ndarray]) -> keras.Model:
    """A head of its own (no backbone built) with the given Dense weights (kernel, bias).

    Float32 like the transfer model's Dense layer, also under mixed precision.
    """
    kernel, bias = initial_weights
    dense = keras.layers.Dense(kernel.shape[1], activation="softmax", name="predictions", dtype="float32")
    head = head_model(dense, kernel.shape[0])
    dense.set_weights(initial_weights)
    return head


class FeatureBatches:
    """Batches of (feature vectors, int32 labels) from `vectors` of shape (variants, rows, features).

    Each iteration is one epoch, as with a tf.data dataset. Training (a `seed`): the rows
    and flip variants of `data.epoch_rows`, whose every new iterator gives an epoch's
    order and flips (so `vectors` holds all four variants); otherwise rows in order,
    variant 0. The batches are gathered in numpy: a cached epoch is a few small matrix
    products, and starting a tf.data pipeline per epoch would cost more than that.

    `Model.fit` starts two iterators of a dataset of known length per epoch (one as an
    epoch ends, unused, and one as the next begins), so its epoch k reads the dataset's
    iterator 2k; so does this, so that the cached path draws what the image path draws.
    """

    def __init__(self, vectors: np.ndarray, labels: np.ndarray, batch_size: int, seed: int | None = None) -> None:
        self.vectors, self.labels, self.batch_size = vectors, labels, batch_size
        count = vectors.shape[1]
        self._order = None if seed is None else data.epoch_rows(count, True, seed).batch(count)
        self._epochs = 0

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        count = self.vectors.shape[1]
        if self._order is None:
            rows, variants = np.arange(count), np.zeros(count, dtype=np.int32)
        else:
            if self._epochs > 0:
                iter(self._order)  # the iterator Model.fit starts as an epoch ends and never reads
            self._epochs += 1
            rows, draws = next(iter(self._order))
            rows, variants = rows.numpy(), data.flip_variants(draws).numpy()
        for start in range(0, count, self.batch_size):
            chosen = slice(start, start + self.batch_size)
            yield self.vectors[variants[chosen], rows[chosen]], self.labels[rows[chosen]]


def fit_head(
    head: keras.Model,
    train: FeatureBatches,
    val: FeatureBatches,
    epochs: int,
    callbacks: Sequence[keras.callbacks.Callback],
    metrics: Sequence[keras.metrics.Metric] = (),
    class_weight: dict[int, float] | None = None,
) -> keras.callbacks.History:
    """`head.fit(train, validation_data=val, class_weight=class_weight, ...)` at a fraction of its fixed cost.

    `head` is compiled as `training` compiles a run's model: its optimizer (wrapped for
    loss scaling under mixed precision), the sparse categorical cross-entropy, accuracy
    and `metrics` (the objective's, `objectives.metrics_for`). `Model.fit` traces Keras's
    general train and test steps for every new model: on 2 cores 0.3-0.5 s, most of a
    cached trial's time. These steps do what Keras's do for this model (forward pass, the
    sparse categorical cross-entropy averaged over the batch, scaled and unscaled by the
    optimizer, its update; the epoch's loss and metrics as sample-weighted means) and trace
    in a fraction of that. `class_weight` weights the training loss as Keras does: each
    image's weight is its class's, and the loss is the weighted sum divided by the batch
    size (not by the sum of the weights); compiled metrics stay unweighted (Keras weights
    only `weighted_metrics`), and so does validation. The callbacks see what `fit` shows
    them at the epoch level (train, epoch and test begin and end, the same logs); no
    batch-level hooks. A non-finite loss ends
    the run after its epoch, as `TerminateOnNaN` ends `fit`'s.
    """
    weights = head.trainable_variables
    optimizer = head.optimizer
    optimizer.build(weights)
    loss_of = keras.losses.SparseCategoricalCrossentropy()
    loss_mean = keras.metrics.Mean()
    measures = [keras.metrics.SparseCategoricalAccuracy(name="accuracy"), *metrics]
    batch = (tf.TensorSpec([None, head.input_shape[-1]], tf.float32), tf.TensorSpec([None], tf.int32))
    # Keras's class-weight table: the weight of class c at index c, 1.0 for a class the mapping omits.
    table = None if class_weight is None else tf.constant(
        [class_weight.get(c, 1.0) for c in range(max(class_weight) + 1)], tf.float32)

    def measured(features: tf.Tensor, labels: tf.Tensor, training: bool) -> tf.Tensor:
        probabilities = head(features, training=training)
        sample_weight = tf.gather(table, labels) if training and table is not None else None
        loss = loss_of(labels, probabilities, sample_weight=sample_weight)
        loss_mean.update_state(loss, sample_weight=tf.shape(features)[0])
        for measure in measures:
            measure.update_state(labels, probabilities)  # compiled `metrics` are unweighted in Keras
        return loss

    @tf.function(input_signature=batch, jit_compile=head.jit_compile)
    def train_step(features: tf.Tensor, labels: tf.Tensor) -> None:
        with tf.GradientTape() as tape:
            loss = optimizer.scale_loss(measured(features, labels, True))
        optimizer.apply(tape.gradient(loss, weights), weights)

    @tf.function(input_signature=batch, jit_compile=head.jit_compile)
    def test_step(features: tf.Tensor, labels: tf.Tensor) -> None:
        measured(features, labels, False)

    def run_epoch(step: Callable, batches: FeatureBatches) -> dict[str, float]:
        for measure in (loss_mean, *measures):
            measure.reset_state()
        for features, labels in batches:
            step(features, labels)
        return {"loss": float(loss_mean.result()), **{m.name: float(m.result()) for m in measures}}

    history = keras.callbacks.History()
    hooks = keras.callbacks.CallbackList([*callbacks, history], model=head)
    head.stop_training = False
    hooks.on_train_begin()
    logs: dict[str, float] = {}
    for epoch in range(epochs):
        hooks.on_epoch_begin(epoch)
        logs = run_epoch(train_step, train)
        hooks.on_test_begin()
        val_logs = run_epoch(test_step, val)
        hooks.on_test_end(val_logs)
        logs.update({f"val_{name}": value for name, value in val_logs.items()})
        hooks.on_epoch_end(epoch, logs)
        if head.stop_training or not math.isfinite(logs["loss"]):
            break
    optimizer.finalize_variable_values(weights)
    hooks.on_train_end(logs)
    return history
