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
rows' image files in order.
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


def head_model(model: keras.Model) -> keras.Model:
    """A model of the transfer model's Dense layer alone, on pooled feature vectors.

    It shares the layer (and so its weights) with `model`: whatever the head learns is in
    `model` too.
    """
    dense = model.get_layer("predictions")
    inputs = keras.Input(shape=(model.get_layer("pool").output.shape[-1],), name="features")
    return keras.Model(inputs, dense(inputs), name=f"{model.name}_head")


def feature_dataset(
    vectors: np.ndarray, labels: np.ndarray, batch_size: int, training: bool, seed: int = 0
) -> tf.data.Dataset:
    """Batches of (feature vectors, int32 labels) from `vectors` of shape (variants, rows, features).

    Training: rows and flip variants from `data.epoch_rows` (so `vectors` holds all four
    variants); otherwise rows in order, variant 0.
    """
    labels = tf.constant(labels)
    width = vectors.shape[-1]

    def read(rows: tf.Tensor, variants: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        batch = tf.numpy_function(lambda r, v: vectors[v, r], [rows, variants], tf.float32, stateful=False)
        return tf.ensure_shape(batch, (None, width)), tf.gather(labels, rows)

    rows = data.epoch_rows(vectors.shape[1], training, seed).batch(batch_size)
    return rows.map(read, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
