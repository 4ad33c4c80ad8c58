"""The activation cache: fine-tune the trainable part of the model on cached outputs of its frozen part.

Fine-tuning from delimiting layer L freezes the backbone's layers below L, their
BatchNormalization in inference mode. What the frozen part computes for an image then
depends only on the image and its flip (the thesis's one augmentation, four outcomes), so
it is the same in every epoch and every trial with the same backbone and L. The
frozen-feature cache (`tlopt.features`) is the case L = number of layers; this is the
general one (docs/method.md section 2.3).

The frozen part hands the trainable part every frozen tensor that a trainable layer
consumes: one tensor in a chain of layers (VGG), more where a residual shortcut, a dense
block's concatenation or an Inception module's frozen branches cross the cut (`find_cut`).
They are computed once for the four flip variants of every training image and for the
validation images, flattened and concatenated per image ("packed"), and stored as float32
in one memory-mapped file per split. The trainable part is then a model on one packed
input (`upper_model`) that shares its layers, so its weights, with the transfer model:
training it trains the transfer model, whose checkpoint is written as on the fly.

Why one packed input and float32 (measured): with several inputs of unknown batch size
TensorFlow's graph optimizer orders the sums of a residual network differently from the
whole model's graph (different last bits, then different runs); float16 moves the first
epoch's loss by 0.2-3 %.

Cache files: `<cache_dir>/activations-<backbone>-<L>-<key>.npy`, float32 of shape
(variants, rows, values per image); the key covers what the values depend on: the
backbone, its weights (the seed for random weights), the image size, the precision policy,
the delimiting layer, the batch size (a CPU convolution's last bits depend on its batch),
the flip variants and the rows' image files in order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from tlopt import data, features
from tlopt.files import build_once, lock_file
from tlopt.params import Experiment

# Layers that draw noise whenever the model trains, frozen or not (Keras ignores `trainable`
# for them): their output in `Model.fit` is not the output that a cache computes once.
STOCHASTIC_LAYERS: tuple[type, ...] = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianDropout,
    keras.layers.GaussianNoise,
    keras.layers.AlphaDropout,
)


@dataclass(frozen=True)
class Cut:
    """The cut of a backbone at delimiting layer `index`.

    `crossing`: the frozen tensors (KerasTensors of the backbone's graph) that the
    trainable part reads, in the graph's topological order; `upper_nodes`: the ids of the
    backbone's nodes computed above the cut; `stochastic_below`: the names of the frozen
    layers that draw noise in training (see `STOCHASTIC_LAYERS`).
    """

    index: int
    crossing: tuple
    upper_nodes: frozenset[int]
    stochastic_below: tuple[str, ...]

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(int(size) for size in tensor.shape[1:]) for tensor in self.crossing]

    @property
    def values_per_image(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)


def _own_nodes(base: keras.Model) -> list:
    """The backbone's own nodes, inputs first (the order Keras runs them in).

    Only these: a layer's `_inbound_nodes` also holds its calls in every other model that
    used it (the transfer model, an upper model built earlier).
    """
    return [node for depth in sorted(base._nodes_by_depth, reverse=True) for node in base._nodes_by_depth[depth]]


def _producer(tensor) -> object:
    operation, node_index, _ = tensor._keras_history
    return operation._inbound_nodes[node_index]


def find_cut(base: keras.Model, index: int) -> Cut:
    """The tensors that cross from the frozen layers (index < `index`) to the trainable ones.

    A node is frozen ("lower") when its layer is below `index` and every node it reads is
    lower; the InputLayer is lower. A raw `keras.ops` call on tensors (MobileNetV3's
    `x + 3.0`), which is no layer and has neither weights nor a training mode, goes below
    when its inputs are lower and a lower node needs it, above otherwise. A crossing tensor
    is the output of a lower node that an upper node reads, or the backbone's output when
    that is lower (everything frozen).
    """
    position = {id(layer): i for i, layer in enumerate(base.layers)}
    nodes = _own_nodes(base)
    consumers: dict[int, list] = {id(node): [] for node in nodes}
    for node in nodes:
        for tensor in node.input_tensors:
            consumers.setdefault(id(_producer(tensor)), []).append(node)

    may_be_lower: dict[int, bool] = {}
    for node in nodes:
        parents_lower = all(may_be_lower.get(id(_producer(t)), False) for t in node.input_tensors)
        if isinstance(node.operation, keras.layers.InputLayer):
            may_be_lower[id(node)] = True
        elif id(node.operation) in position:
            may_be_lower[id(node)] = position[id(node.operation)] < index and parents_lower
        else:
            may_be_lower[id(node)] = parents_lower
    outputs = {id(tensor) for tensor in base.outputs}
    lower: dict[int, bool] = {}
    for node in reversed(nodes):
        if not may_be_lower[id(node)]:
            lower[id(node)] = False
        elif id(node.operation) in position or isinstance(node.operation, keras.layers.InputLayer):
            lower[id(node)] = True
        else:
            lower[id(node)] = any(lower[id(c)] for c in consumers[id(node)]) or any(
                id(t) in outputs for t in node.outputs
            )

    crossing, seen = [], set()
    for node in nodes:
        if not lower[id(node)]:
            continue
        for tensor in node.outputs:
            read_above = any(
                not lower[id(c)] and any(t is tensor for t in c.input_tensors) for c in consumers[id(node)]
            )
            if (read_above or id(tensor) in outputs) and id(tensor) not in seen:
                seen.add(id(tensor))
                crossing.append(tensor)
    stochastic = tuple(n.operation.name for n in nodes if lower[id(n)] and isinstance(n.operation, STOCHASTIC_LAYERS))
    upper = frozenset(id(n) for n in nodes if not lower[id(n)])
    return Cut(index, tuple(crossing), upper, stochastic)


class Unpack(keras.layers.Layer):
    """One packed (batch, values) input -> the crossing tensors, each (batch, *shape).

    Every crossing tensor derives from one input, so TensorFlow's graph optimizer sees one
    batch dimension, as in the whole model's graph, and sums in the same order.
    """

    def __init__(self, shapes: list[tuple[int, ...]], **kwargs) -> None:
        super().__init__(**kwargs)
        self.shapes = [tuple(int(size) for size in shape) for shape in shapes]

    def call(self, packed):
        sizes = [math.prod(shape) for shape in self.shapes]
        parts = keras.ops.split(packed, list(np.cumsum(sizes)[:-1]), axis=1) if len(sizes) > 1 else [packed]
        return [keras.ops.reshape(part, (-1, *shape)) for part, shape in zip(parts, self.shapes)]

    def compute_output_shape(self, input_shape):
        return [(input_shape[0], *shape) for shape in self.shapes]

    def get_config(self) -> dict:
        return {**super().get_config(), "shapes": self.shapes}


def lower_model(model: keras.Model, base: keras.Model, cut: Cut) -> keras.Model:
    """uint8 images -> the crossing tensors (a list), through the transfer model's preprocessing."""
    inner = keras.Model(base.inputs, list(cut.crossing), name=f"{base.name}_lower_{cut.index}")
    images = keras.Input(shape=model.input_shape[1:], dtype=model.inputs[0].dtype, name="images")
    crossing = inner(model.get_layer("preprocess")(images))
    return keras.Model(images, crossing if isinstance(crossing, list) else [crossing], name=f"lower_{cut.index}")


def upper_model(model: keras.Model, base: keras.Model, cut: Cut) -> keras.Model:
    """Packed crossing tensors -> class probabilities, on the transfer model's own layers.

    Every upper node of the backbone is called again, in the backbone's order, on the
    unpacked tensors (`node.arguments.fill_in` maps the node's inputs, lists of a
    Concatenate or Add too), then the transfer model's pooling and Dense layers. The same
    layer objects: no new weights, and what this model learns the transfer model has.
    """
    packed = keras.Input(shape=(cut.values_per_image,), name="activations")
    parts = keras.tree.flatten(Unpack(cut.shapes, name="unpack")(packed))
    values = {id(tensor): part for tensor, part in zip(cut.crossing, parts, strict=True)}
    for node in _own_nodes(base):
        if id(node) not in cut.upper_nodes:
            continue
        args, kwargs = node.arguments.fill_in(values)
        for old, new in zip(node.outputs, keras.tree.flatten(node.operation(*args, **kwargs))):
            values[id(old)] = new
    (top,) = [values[id(tensor)] for tensor in base.outputs]
    probabilities = model.get_layer("predictions")(model.get_layer("pool")(top))
    return keras.Model(packed, probabilities, name=f"upper_{cut.index}")


def cache_gigabytes(cut: Cut, train_rows: int, val_rows: int) -> float:
    """The cache's size in GB (10^9 bytes): float32 values of every flip variant of the training rows and of the validation rows."""
    images = len(features.ALL_FLIPS) * train_rows + len(features.NO_FLIP) * val_rows
    return images * cut.values_per_image * 4 / 1e9


def unusable(backbone: str, cut: Cut, train_rows: int, val_rows: int, config: Experiment) -> str | None:
    """Why fine-tuning from `cut` cannot or should not read cached activations; None when it can."""
    if cut.index <= 1:
        return f"nothing is frozen below delimiting layer {cut.index}: every layer trains"
    if cut.stochastic_below:
        return (f"{backbone}'s frozen layers below delimiting layer {cut.index} include "
                f"{cut.stochastic_below[0]}, which draws new noise at every training step")
    size = cache_gigabytes(cut, train_rows, val_rows)
    limit = config.training.activation_cache_max_gb
    if size > limit:
        return (f"the cache of {backbone} at delimiting layer {cut.index} would hold {size:.3g} GB, above "
                f"training.activation_cache_max_gb = {limit:g}")
    return None


def activations_path(
    backbone: str, rows: pd.DataFrame, variants: tuple[int, ...], index: int, config: Experiment,
    cache_dir: str | os.PathLike,
) -> Path:
    """Where the packed crossing tensors of `rows` (in their order) for `variants` at delimiting layer `index` are cached."""
    key = data.files_key(
        list(rows["path"]),
        backbone,
        features.weights_identity(config.weights, config.seed),
        config.data.image_size,
        keras.mixed_precision.global_policy().name,
        index,
        config.data.batch_size,
        variants,
    )
    return Path(cache_dir) / f"activations-{backbone}-{index}-{key}.npy"


def remove_caches(cache_dir: str | os.PathLike, backbone: str, layers: Iterable[int]) -> None:
    """Delete `backbone`'s activation caches at the delimiting `layers` (every key, their locks too).

    Layer optimization builds one cache per layer it tries and no later step reads them
    (docs/method.md section 8.1).
    """
    for index in layers:
        for path in Path(cache_dir).glob(f"activations-{backbone}-{index}-*.npy"):
            path.unlink(missing_ok=True)
            lock_file(path).unlink(missing_ok=True)


def extract(
    lower: keras.Model,
    rows: pd.DataFrame,
    class_names: list[str],
    variants: tuple[int, ...],
    config: Experiment,
    target: Path,
    image_cache: data.ImageCache | None = None,
) -> None:
    """Write the packed crossing tensors of every row for every variant into the new .npy file `target`.

    The images go through the pipeline's steps (decoded or read from `image_cache`,
    flipped), in the rows' order and in batches of the run's batch size (a convolution's
    last bits on a CPU can depend on the batch), one batch at a time into a memory-mapped
    file: memory holds one batch whatever the cache's size.
    """
    cut_values = sum(math.prod(tensor.shape[1:]) for tensor in lower.outputs)
    packed = np.lib.format.open_memmap(target, mode="w+", dtype=np.float32,
                                       shape=(len(variants), len(rows), cut_values))
    images = data.make_dataset(rows, class_names, config.data.image_size, config.data.batch_size, False, config.seed,
                               image_cache)
    size = config.data.image_size

    @tf.function(input_signature=[tf.TensorSpec((None, size, size, 3), tf.uint8)])
    def forward(batch: tf.Tensor) -> tf.Tensor:
        crossing = keras.tree.flatten(lower(batch, training=False))  # one tensor, or a list of them
        return tf.concat([tf.reshape(tf.cast(t, tf.float32), (tf.shape(t)[0], -1)) for t in crossing], axis=1)

    for position, variant in enumerate(variants):
        start = 0
        for batch, _ in images:
            values = forward(data.flip_images(batch, variant)).numpy()
            packed[position, start : start + len(values)] = values
            start += len(values)
    packed.flush()
    del packed


def cached_activations(
    lower: keras.Model,
    backbone: str,
    rows: pd.DataFrame,
    class_names: list[str],
    variants: tuple[int, ...],
    index: int,
    config: Experiment,
    cache_dir: str | os.PathLike,
    image_cache: data.ImageCache | None = None,
) -> np.ndarray:
    """The packed crossing tensors (variants, rows, values), memory-mapped from the cache; extracted on first use.

    Concurrent trials that need the same file extract it once (`files.build_once`); the
    others wait and read it.
    """
    path = activations_path(backbone, rows, variants, index, config, cache_dir)
    build_once(path, lambda target: extract(lower, rows, class_names, variants, config, target, image_cache),
               suffix=".npy")
    return np.load(path, mmap_mode="r")


def activation_dataset(
    packed: np.ndarray, labels: np.ndarray, batch_size: int, training: bool, seed: int = 0
) -> tf.data.Dataset:
    """Batches of (packed activations, int32 labels), drawn as `data.make_dataset` draws images.

    The image-cache pipeline's structure (`data.epoch_rows`, batches, one read per batch),
    so `Model.fit` starts the same iterators of the same seeded stream and its epoch k sees
    the rows and flips of the image pipeline's epoch k. Training: the variant of each row
    is its flip draw; otherwise variant 0 (no flip).
    """
    rows = data.epoch_rows(packed.shape[1], training, seed).batch(batch_size)
    labels = tf.constant(labels)
    width = packed.shape[2]

    def gather(positions: np.ndarray, variants: np.ndarray) -> np.ndarray:
        return np.asarray(packed[variants, positions], dtype=np.float32)

    def read(positions: tf.Tensor, draws: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        variants = data.flip_variants(draws) if training else tf.zeros_like(positions)
        values = tf.numpy_function(gather, [positions, variants], tf.float32, stateful=False)
        return tf.ensure_shape(values, (None, width)), tf.gather(labels, positions)

    return rows.map(read, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def fine_tuning_datasets(
    model: keras.Model,
    base: keras.Model,
    cut: Cut,
    backbone: str,
    train_rows: pd.DataFrame,
    val_rows: pd.DataFrame,
    class_names: list[str],
    config: Experiment,
    cache_dir: str | os.PathLike,
    image_cache: data.ImageCache | None = None,
) -> tuple[keras.Model, tuple[tf.data.Dataset, tf.data.Dataset]]:
    """The upper model of `cut` and its training and validation batches of cached activations.

    `model`, `base`: the transfer model and its backbone, the delimiting layer set.
    """
    lower = lower_model(model, base, cut)
    train, val = (
        cached_activations(lower, backbone, rows, class_names, variants, cut.index, config, cache_dir, image_cache)
        for rows, variants in ((train_rows, features.ALL_FLIPS), (val_rows, features.NO_FLIP))
    )
    batch_size = config.data.batch_size
    return upper_model(model, base, cut), (
        activation_dataset(train, data.label_indices(train_rows, class_names), batch_size, True, config.seed),
        activation_dataset(val, data.label_indices(val_rows, class_names), batch_size, False),
    )
