"""Explanation maps: where in an image a transfer model finds the evidence for a class (Grad-CAM).

Grad-CAM (Selvaraju et al., ICCV 2017; docs/method.md section 14) weights each channel of
a convolutional feature map by the mean gradient of the class's score (the logit, before
the softmax) over the map, sums the weighted channels and keeps the positive part. The
feature map is the backbone's last one, its output, or the layer before it when that is a
pooling layer (VGG's `block5_pool` halves the map): the backbone is one nested model of
the transfer model, so its layer is reached in the same way for every registered
backbone, in a model being analysed and in one loaded from an exported file. Maps are
scaled to 0-1 per image and resized to the input size; a map of zeros says that no region
raises the class's score.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import matplotlib
import numpy as np
import tensorflow as tf

from tlopt import data

_POOLING = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)


def transfer_parts(model: keras.Model) -> tuple[keras.layers.Layer, keras.Model, keras.layers.Layer, keras.layers.Layer]:
    """(preprocessing, backbone, pooling, Dense) of a transfer model, found by their stable names."""
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model) and layer.name != "preprocess"]
    if len(nested) != 1:
        raise ValueError(f"{model.name} is not a tlopt transfer model: expected one nested backbone, "
                         f"found {[layer.name for layer in nested]}")
    return model.get_layer("preprocess"), nested[0], model.get_layer("pool"), model.get_layer("predictions")


def target_layer(base: keras.Model) -> str:
    """The backbone's last feature map: its output layer, or the one before when that only pools."""
    layers = [layer for layer in base.layers if not isinstance(layer, keras.layers.InputLayer)]
    while len(layers) > 1 and isinstance(layers[-1], _POOLING):
        layers.pop()
    return layers[-1].name


def grad_cam(model: keras.Model, images: np.ndarray, classes: Sequence[int] | None = None,
             layer: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(maps, probabilities): a Grad-CAM map per image (images x height x width, 0-1) and every class's probability.

    `images`: uint8 pixels at the model's input size. `classes`: the class each map
    explains, one per image; None explains each image's predicted class. `layer`: a layer
    of the backbone (by name) instead of `target_layer`'s.
    """
    preprocess, base, pool, dense = transfer_parts(model)
    images = np.asarray(images)
    target = base.get_layer(layer or target_layer(base))
    features = keras.Model(base.inputs, [target.output, base.output])
    with tf.GradientTape() as tape:
        pixels = tf.cast(preprocess(images), "float32")
        tape.watch(pixels)  # records every op after it: the gradient reaches the inner feature map
        maps, out = features(pixels, training=False)
        logits = tf.matmul(tf.cast(pool(out), "float32"), tf.cast(dense.kernel, "float32")) + tf.cast(dense.bias,
                                                                                                        "float32")
        chosen = tf.argmax(logits, axis=1) if classes is None else tf.constant(np.asarray(classes), tf.int64)
        scores = tf.gather(logits, chosen, axis=1, batch_dims=1)
    gradients = tape.gradient(scores, maps)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cams = tf.nn.relu(tf.reduce_sum(weights * tf.cast(maps, "float32"), axis=-1))
    cams = tf.math.divide_no_nan(cams, tf.reduce_max(cams, axis=(1, 2), keepdims=True))
    cams = tf.image.resize(cams[..., None], images.shape[1:3], method="bilinear")[..., 0]
    return np.clip(cams.numpy(), 0, 1), tf.nn.softmax(logits).numpy()


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """The image (uint8 RGB) with the map in matplotlib's "jet" colours blended over it; the map is resized to the image."""
    image = np.asarray(image)
    if cam.shape != image.shape[:2]:
        cam = tf.image.resize(np.asarray(cam, dtype=np.float32)[..., None], image.shape[:2], method="bilinear")
        cam = np.clip(cam.numpy()[..., 0], 0, 1)
    heat = matplotlib.colormaps["jet"](cam)[..., :3] * 255
    return np.clip((1 - alpha) * image.astype(np.float32) + alpha * heat, 0, 255).astype(np.uint8)


@dataclass
class Explanations:
    """Images explained by one model: the pixels it saw, the maps of its predicted classes, every probability."""

    paths: list[str]
    images: np.ndarray
    maps: np.ndarray
    probabilities: np.ndarray
    class_names: list[str]
    true: list[str] | None = None


def explain_files(model: keras.Model, paths: Sequence[str | os.PathLike], class_names: Sequence[str],
                  true: Sequence[str] | None = None) -> Explanations:
    """Decode image files as training decodes them and explain each one's predicted class."""
    size = int(model.input.shape[1])
    images = np.stack([data.decode_image(path, size) for path in paths])
    maps, probabilities = grad_cam(model, images)
    return Explanations([str(path) for path in paths], images, maps, probabilities, list(class_names),
                        None if true is None else list(true))
