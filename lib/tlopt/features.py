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
import os
from pathlib import Path
from typing import TYPE_CHECKING

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from tlopt import data, store
from tlopt.backbones import get_backbone

if TYPE_CHECKING:
    from tlopt.training import TrainingSettings

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
    backbone: str, rows: pd.DataFrame, variants: tuple[int, ...], settings: TrainingSettings
) -> Path:
    """Where the pooled features of `rows` (in their order) for `variants` are cached."""
    key = data.files_key(
        list(rows["path"]),
        backbone,
        _weights_identity(settings.weights, settings.seed),
        settings.image_size,
        settings.pooling,
        keras.mixed_precision.global_policy().name,
        variants,
    )
    return Path(settings.cache_dir) / f"features-{backbone}-{key}.npy"


def pooled_features(
    model: keras.Model,
    backbone: str,
    rows: pd.DataFrame,
    class_names: list[str],
    variants: tuple[int, ...],
    settings: TrainingSettings,
    image_cache: data.ImageCache | None = None,
) -> np.ndarray:
    """The output of `model`'s pooling layer for each flip variant of each row: (variants, rows, features).

    Read from the cache folder, or computed by `model` (a transfer model of `backbone`
    built with `settings`) and cached. The images go through the training pipeline's
    steps: decoded (or read from `image_cache`), flipped, then preprocessed.
    """
    path = features_path(backbone, rows, variants, settings)
    if path.is_file():
        return np.load(path)
    extractor = keras.Model(model.inputs, model.get_layer("pool").output)
    preprocess = get_backbone(backbone).preprocess_input
    images = data.make_dataset(
        rows, class_names, settings.image_size, settings.batch_size, None, False, settings.seed, image_cache
    )

    def flipped(variant: int) -> tf.data.Dataset:
        return images.map(lambda batch, _: preprocess(data.flip_images(batch, variant)))

    # One predict call for all variants: each call of a new dataset traces the model again.
    every_variant = functools.reduce(tf.data.Dataset.concatenate, map(flipped, variants))
    vectors = extractor.predict(every_variant, verbose=0).astype(np.float32).reshape(len(variants), len(rows), -1)
    with store.atomic_path(path, suffix=".npy") as temporary:
        np.save(temporary, vectors)
    return vectors


def initial_head_path(backbone: str, num_classes: int, settings: TrainingSettings) -> Path:
    """Where the Dense layer's initial weights, as every new transfer model of `backbone` has them, are kept."""
    key = data.files_key(
        [], backbone, _weights_identity(settings.weights, settings.seed), num_classes, settings.pooling
    )
    return Path(settings.cache_dir) / f"head-{backbone}-{key}.npz"


def keep_initial_head(model: keras.Model, backbone: str, settings: TrainingSettings) -> None:
    """Keep the Dense layer's weights of `model`, a new transfer model, in the cache folder.

    Every run seeds Keras first, so every new transfer model of one backbone starts with
    the same Dense weights, which depend on everything built before that layer. Kept
    with the features, they let a run that reads cached features start from them
    without building the backbone (`initial_head_weights`).
    """
    dense = model.get_layer("predictions")
    path = initial_head_path(backbone, dense.units, settings)
    if not path.is_file():
        kernel, bias = dense.get_weights()
        with store.atomic_path(path, suffix=".npz") as temporary:
            np.savez(temporary, kernel=kernel, bias=bias)


def initial_head_weights(backbone: str, num_classes: int, settings: TrainingSettings) -> list[np.ndarray]:
    """The Dense layer's initial weights (kernel, bias) that `keep_initial_head` kept."""
    with np.load(initial_head_path(backbone, num_classes, settings)) as stored:
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


def feature_dataset(
    vectors: np.ndarray, labels: np.ndarray, batch_size: int, training: bool, seed: int = 0
) -> tf.data.Dataset:
    """Batches of (feature vectors, int32 labels) from `vectors` of shape (variants, rows, features).

    Training: rows and flip variants from `data.epoch_rows` (so `vectors` holds all four
    variants); otherwise rows in order, variant 0. In memory and with at most one `map`:
    the cost of starting each epoch's iterator is most of a cached epoch's.
    """
    if not training:
        return tf.data.Dataset.from_tensor_slices((vectors[0], labels)).batch(batch_size)
    vectors, labels = tf.constant(vectors), tf.constant(labels)

    def read(rows: tf.Tensor, draws: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        variants = tf.cast(data.flip_variants(draws), tf.int64)
        return tf.gather_nd(vectors, tf.stack([variants, rows], axis=1)), tf.gather(labels, rows)

    return data.epoch_rows(vectors.shape[1], training, seed).batch(batch_size).map(read)
