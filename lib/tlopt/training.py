"""One training run: the classification block on a frozen backbone, or fine-tuning from it.

Each run seeds Keras and makes TensorFlow's ops deterministic first, so that two runs
with the same settings give the same history on a CPU (and every new model of a backbone
the same initial weights), and frees the Keras session afterwards (also when it fails),
because a search trains many models in one process and Keras keeps every graph otherwise.

Every run reads its settings from the experiment's configuration (`tlopt.params.Experiment`).
With a cache folder (`cache_dir`, a run folder's `cache/`) a run reads decoded images from
the image cache (`data.cache_images`, when `data.image_cache` is on), trains the
classification block on cached pooled features (`tlopt.features`, when
`training.feature_cache` is on) and fine-tunes the trainable layers on cached outputs of
the frozen ones (`tlopt.activations`, when `training.activation_cache` is on); the results
are those of the on-the-fly path (docs/method.md section 2.3 says where to the last bit),
only sooner.

Files of a run, in its trial's folder (`store.TrialFolder`):
    block/history.csv, block/best.weights.h5          classification block (its Dense layer's weights)
    finetune/history.csv, finetune/best.weights.h5    fine-tuning (the weights of the layers it trained)
The checkpoints (`tlopt.checkpoints`) hold no optimizer state, and no frozen layer: those are
the backbone's starting weights, which the checkpoint names and loading builds again.
    tensorboard/block/, tensorboard/finetune/         TensorBoard event files
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from tlopt import activations, checkpoints, data, features, objectives
from tlopt.backbones import build_transfer_model, get_backbone, set_delimiting_layer
from tlopt.callbacks import NonconvergenceFiltering, run_callbacks
from tlopt.errors import ConfigError, DataError, TrainingError
from tlopt.params import THESIS_OPTIMIZERS, Experiment
from tlopt.store import TrialFolder

# Each trial builds new models, so tf.function retraces by design; its warnings are noise here.
tf.get_logger().setLevel("ERROR")

# TensorFlow and Keras make about 400,000 objects at import that live as long as the
# process. The full garbage collection that frees a run's models (in clear_session) walked
# them all after every run: 0.25 s a run on 2 cores, as much as a cached classification
# block's training. Frozen, they are out of the collector's sight (measured: 0.01 s).
gc.freeze()

LOSS = "sparse_categorical_crossentropy"


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    """A fresh Keras optimizer with an explicit learning rate and Keras's defaults for the rest.

    The rate is always passed because Keras 3 changed several default rates since the
    thesis's Keras 2.1 (Adadelta 1.0 -> 0.001, for example).
    """
    if name not in THESIS_OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; known optimizers: {', '.join(THESIS_OPTIMIZERS)}")
    learning_rate = float(learning_rate)
    if not (math.isfinite(learning_rate) and learning_rate >= 0):
        raise ConfigError(f"learning rate must be a finite number >= 0, got {learning_rate}")
    return getattr(keras.optimizers, name)(learning_rate=learning_rate)


@dataclass
class RunResult:
    """The outcome of one run, as the trial store records it: the values at the objective's best epoch."""

    phase: str
    val_accuracy: float
    val_loss: float
    best_epoch: int
    epochs: int
    stopped_by: str
    seconds: float
    weights_path: str
    history: list[dict] = field(default_factory=list)
    objective: str = objectives.DEFAULT
    objective_value: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _rows(frame: pd.DataFrame, split: str) -> pd.DataFrame:
    rows = frame[frame["split"] == split]
    if rows.empty:
        raise DataError(f"the split manifest has no {split!r} rows")
    return rows


def _labels(frame: pd.DataFrame, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The class indices of the training and of the validation rows."""
    return tuple(data.label_indices(_rows(frame, split), class_names) for split in ("train", "val"))


def class_weights(setting: str, train_labels: np.ndarray, num_classes: int) -> dict[int, float] | None:
    """Keras's `class_weight` for `training.class_weight`: None, or "balanced" (n / (K x n_k), scikit-learn's
    rule: every class weighs as much in the loss as the others, docs/method.md section 11)."""
    if setting == "none":
        return None
    classes = np.arange(num_classes)
    missing = np.setdiff1d(classes, train_labels)
    if missing.size:
        raise DataError(f"class index(es) {missing.tolist()} have no training images: no balanced class weight")
    weights = compute_class_weight("balanced", classes=classes, y=train_labels)
    return {int(index): float(weight) for index, weight in zip(classes, weights)}


def _on_gpu(switch: str, instead: str) -> bool:
    """Whether a GPU switch can take effect; on a machine without a GPU, warn that it does not.

    On a CPU, float16 has no fast kernels and XLA compiles slower code (measured: 5x
    slower epochs), so the switches would only cost time; a parameter file written for a
    GPU machine still runs here.
    """
    if tf.config.list_physical_devices("GPU"):
        return True
    warnings.warn(f"{switch} is for GPUs and is ignored on this machine without one: {instead}", RuntimeWarning)
    return False


@contextmanager
def _run_scope(config: Experiment) -> Iterator[None]:
    """Seed and make ops deterministic; mixed precision if asked for; afterwards free Keras.

    The precision policy is global in Keras, so the previous one is restored after the
    run. Op determinism is process-wide and stays on (TensorFlow cannot switch it off).
    """
    policy = keras.mixed_precision.global_policy()
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    if config.training.mixed_precision and _on_gpu("training.mixed_precision", "the run computes in float32"):
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(policy)
        keras.backend.clear_session()  # and a full garbage collection


def _build(
    backbone: str, num_classes: int, config: Experiment, weights: str | os.PathLike | None, frozen: bool = False
) -> tuple[keras.Model, keras.Model]:
    """The transfer model (its backbone frozen if asked), with its softmax output in float32 also under mixed precision.

    Keras's advice for mixed precision: float16 probabilities lose the small values the
    loss needs. Under the float32 policy this changes nothing.
    """
    model, base = build_transfer_model(backbone, num_classes, config.data.image_size, weights, config.pooling)
    model.get_layer("predictions").dtype_policy = keras.DTypePolicy("float32")
    if frozen:
        base.trainable = False
    return model, base


def _image_cache(frame: pd.DataFrame, config: Experiment, cache_dir: str | os.PathLike | None) -> data.ImageCache | None:
    """The decoded-image cache of the whole manifest (every split shares it), if the run uses one."""
    if config.data.image_cache and cache_dir is not None:
        return data.cache_images(frame, config.data.image_size, cache_dir)
    return None


def _datasets(
    frame: pd.DataFrame, class_names: list[str], config: Experiment, cache_dir: str | os.PathLike | None
) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """The training (shuffled, flipped) and validation pipelines of the manifest's train and val rows."""
    size, batch, seed = config.data.image_size, config.data.batch_size, config.seed
    train_rows, val_rows = _rows(frame, "train"), _rows(frame, "val")
    cache = _image_cache(frame, config, cache_dir)
    train = data.make_dataset(train_rows, class_names, size, batch, True, seed, cache)
    val = data.make_dataset(val_rows, class_names, size, batch, False, seed, cache)
    return train, val


def _fit(
    phase: str,
    model: keras.Model,
    optimizer: str,
    learning_rate: float,
    epochs: int,
    datasets: tuple[tf.data.Dataset, tf.data.Dataset] | tuple[features.FeatureBatches, features.FeatureBatches],
    labels: tuple[np.ndarray, np.ndarray],
    folder: TrialFolder,
    config: Experiment,
    started: float,
    reference: checkpoints.Reference,
    observers: Sequence[keras.callbacks.Callback] = (),
    checkpointed: keras.Model | None = None,
) -> RunResult:
    """Compile and fit `model` with the run's callbacks; summarize the history at the objective's best epoch.

    Batches of cached features train the head with `features.fit_head`, Keras's fit loop
    without its fixed cost per run; tf.data pipelines go to `Model.fit`. Either way the
    run logs the objective's metric (and the nonconvergence monitor's), and weights the
    training loss by `training.class_weight`. `labels`: the class indices of the training
    and validation images (for the class weights and the chance level).
    `observers` are extra callbacks that only watch (the notebooks' live figure).
    The checkpoint keeps the layers `model` trains, with `reference` to the rest;
    `checkpointed` (default `model`) is the model whose layers it keys them by: the whole
    transfer model, whose layers the upper model of the activation cache shares.
    """
    if epochs < 1:
        raise ConfigError(f"{phase} epochs must be at least 1, got {epochs}")
    objective, num_classes = objectives.get(config.objective), model.output_shape[-1]
    train_labels, val_labels = labels
    class_weight = class_weights(config.training.class_weight, train_labels, num_classes)
    metrics = objectives.metrics_for(num_classes, [objective.key, config.nonconvergence_monitor])
    model.compile(
        optimizer=make_optimizer(optimizer, learning_rate),
        loss=LOSS,
        metrics=["accuracy", *metrics],
        jit_compile=config.training.jit_compile and _on_gpu("training.jit_compile", "Keras compiles without XLA"),
    )
    callbacks = run_callbacks(folder, phase, config, np.bincount(val_labels, minlength=num_classes),
                              checkpoints.trained_layers(checkpointed or model), reference)
    train, val = datasets
    if isinstance(train, features.FeatureBatches):
        fitted = features.fit_head(model, train, val, epochs, [*callbacks, *observers], metrics, class_weight)
    else:
        fitted = model.fit(
            train,
            validation_data=val,
            epochs=epochs,
            callbacks=[*callbacks, keras.callbacks.TerminateOnNaN(), *observers],
            class_weight=class_weight,
            shuffle=False,  # the training dataset shuffles itself (seeded); Keras cannot shuffle a tf.data pipeline
            verbose=0,
        )
    history = [
        {"epoch": epoch, **{name: float(values[epoch]) for name, values in fitted.history.items()}}
        for epoch in fitted.epoch
    ]
    for row in history:
        if not math.isfinite(row["loss"]):
            kind = "NaN" if math.isnan(row["loss"]) else "infinite"
            raise TrainingError(
                f"loss became {kind} at epoch {row['epoch']} ({phase}, {optimizer}, learning rate {learning_rate})"
            )
    best = objective.best_index([row[objective.key] for row in history])
    filters = [callback for callback in callbacks if isinstance(callback, NonconvergenceFiltering)]
    if filters and filters[0].stopped:
        stopped_by = "nonconvergence"
    elif len(history) < epochs:
        stopped_by = "early_stopping"
    else:
        stopped_by = "completed"
    return RunResult(
        phase=phase,
        val_accuracy=history[best]["val_accuracy"],
        val_loss=history[best]["val_loss"],
        best_epoch=best,
        epochs=len(history),
        stopped_by=stopped_by,
        seconds=time.perf_counter() - started,
        weights_path=str(folder.weights(phase)),
        history=history,
        objective=objective.name,
        objective_value=history[best][objective.key],
    )


def _reference(backbone: str, num_classes: int, config: Experiment) -> checkpoints.Reference:
    """How a run of `config` builds its transfer model: what its checkpoints leave out."""
    return checkpoints.Reference(backbone, config.weights, config.seed, config.data.image_size, config.pooling,
                                 num_classes)


def train_block(
    backbone: str,
    optimizer: str,
    learning_rate: float,
    frame: pd.DataFrame,
    class_names: list[str],
    folder: TrialFolder | str | os.PathLike,
    config: Experiment,
    cache_dir: str | os.PathLike | None = None,
    observers: Sequence[keras.callbacks.Callback] = (),
) -> RunResult:
    """Train the classification block on the frozen backbone for at most `training.block_epochs`.

    `frame` is the split manifest (its train rows fit, its val rows validate); `folder`
    the trial's folder (`store.TrialFolder`, or its path). The checkpoint keeps the Dense
    layer's weights at the objective's best value; the backbone's are those it starts with
    (`config.weights`), which fine-tuning builds again. With `training.feature_cache` (and a
    `cache_dir`) the Dense layer trains on cached pooled features instead of running the
    frozen backbone in every epoch.
    """
    folder = TrialFolder(folder)
    with _run_scope(config):
        started = time.perf_counter()
        if config.training.feature_cache and cache_dir is not None and _features_cacheable(backbone):
            model, datasets = _head_on_cached_features(backbone, frame, class_names, config, cache_dir)
        else:
            model, _ = _build(backbone, len(class_names), config, config.weights, frozen=True)
            datasets = _datasets(frame, class_names, config, cache_dir)
        return _fit(
            "block", model, optimizer, learning_rate, config.training.block_epochs, datasets,
            _labels(frame, class_names), folder, config, started, _reference(backbone, len(class_names), config),
            observers,
        )


def _features_cacheable(backbone: str) -> bool:
    """False, with one line that says why, for a backbone whose frozen layers draw noise in training.

    `Model.fit` runs such a layer (EfficientNet's Dropout) in training mode, frozen or not,
    so no cache of what the frozen layers compute gives the on-the-fly run's values.
    """
    if not get_backbone(backbone).noisy_when_frozen:
        return True
    warnings.warn(
        f"the classification block trains on the fly, without the feature cache: {backbone}'s frozen layers "
        f"include Dropout, which draws new noise at every training step", RuntimeWarning,
    )
    return False


def _head_on_cached_features(
    backbone: str, frame: pd.DataFrame, class_names: list[str], config: Experiment, cache_dir: str | os.PathLike
) -> tuple[keras.Model, tuple[features.FeatureBatches, features.FeatureBatches]]:
    """The Dense layer alone and its training and validation batches of cached features.

    The transfer model is built (first in the run, so with the weights an on-the-fly run
    starts from) only when the cache folder lacks the features or the Dense layer's
    initial weights; later trials of the backbone build the Dense layer alone.
    """
    train_rows, val_rows = _rows(frame, "train"), _rows(frame, "val")
    wanted = [
        features.features_path(backbone, train_rows, features.ALL_FLIPS, config, cache_dir),
        features.features_path(backbone, val_rows, features.NO_FLIP, config, cache_dir),
        features.initial_head_path(backbone, len(class_names), config, cache_dir),
    ]
    if all(path.is_file() for path in wanted):
        train, val = np.load(wanted[0]), np.load(wanted[1])
        head = features.new_head(features.initial_head_weights(backbone, len(class_names), config, cache_dir))
    else:
        model, _ = _build(backbone, len(class_names), config, config.weights, frozen=True)
        cache = _image_cache(frame, config, cache_dir)
        train, val = (
            features.pooled_features(model, backbone, rows, class_names, variants, config, cache_dir, cache)
            for rows, variants in ((train_rows, features.ALL_FLIPS), (val_rows, features.NO_FLIP))
        )
        features.keep_initial_head(model, backbone, config, cache_dir)
        head = features.head_of(model)
    train_labels, val_labels = data.label_indices(train_rows, class_names), data.label_indices(val_rows, class_names)
    batch_size = config.data.batch_size
    return head, (
        features.FeatureBatches(train, train_labels, batch_size, config.seed),
        features.FeatureBatches(val, val_labels, batch_size),
    )


def load_trained_model(
    backbone: str, weights_path: str | os.PathLike, num_classes: int, config: Experiment
) -> tuple[keras.Model, keras.Model]:
    """(model, base): the transfer model with a fine-tuned run's saved weights.

    A checkpoint (`tlopt.checkpoints`) is loaded into the transfer model built as its run
    built it: the backbone's weights source it names (ImageNet, a file, or random weights
    drawn after seeding Keras with its seed, as the run did), its image size, pooling and
    classes. A Keras weights file of the whole model (written before lean checkpoints)
    replaces every weight of a randomly initialised model.
    """
    if not Path(weights_path).is_file():
        raise TrainingError(f"weights file not found: {weights_path}")
    if not checkpoints.is_lean(weights_path):
        model, base = _build(backbone, num_classes, config, None)
        model.load_weights(weights_path)
        return model, base
    reference = checkpoints.read_reference(weights_path)
    if (reference.backbone, reference.num_classes) != (backbone, num_classes):
        raise TrainingError(f"{weights_path} holds a {reference.backbone} with {reference.num_classes} classes, "
                            f"not a {backbone} with {num_classes}")
    keras.utils.set_random_seed(reference.seed)
    built = config.updated({"data.image_size": reference.image_size, "pooling": reference.pooling})
    model, base = _build(backbone, num_classes, built, reference.weights)
    checkpoints.load_into(model, weights_path)
    return model, base


def fine_tune(
    backbone: str,
    optimizer: str,
    learning_rate: float,
    delimiting_layer: int,
    block_weights: str | os.PathLike,
    frame: pd.DataFrame,
    class_names: list[str],
    folder: TrialFolder | str | os.PathLike,
    config: Experiment,
    cache_dir: str | os.PathLike | None = None,
    observers: Sequence[keras.callbacks.Callback] = (),
) -> RunResult:
    """Fine-tune from the classification block's best weights for at most `training.finetune_epochs`.

    The transfer model is built as the block's run built it (the backbone's starting
    weights) and takes the block's Dense layer from `block_weights`. Backbone layers
    before `delimiting_layer` stay frozen; that layer and every later one train, with the
    fine-tuning optimizer and learning rate. With `training.activation_cache` (and a
    `cache_dir`) the model that trains is the trainable part on cached activations, which
    shares its layers with the transfer model; the checkpoint is the transfer model's either way.
    """
    if not Path(block_weights).is_file():
        raise TrainingError(f"weights file not found: {block_weights}")
    folder = TrialFolder(folder)
    with _run_scope(config):
        started = time.perf_counter()
        model, base = _build(backbone, len(class_names), config, config.weights)
        if checkpoints.is_lean(block_weights):
            checkpoints.load_into(model, block_weights)
        else:  # the Dense layer's Keras weights file, as tlopt wrote it before lean checkpoints
            features.head_of(model).load_weights(block_weights)
        if config.training.activation_cache and cache_dir is not None:
            trained, datasets = _upper_on_cached_activations(
                model, base, backbone, delimiting_layer, frame, class_names, config, cache_dir
            )
        else:
            trained, datasets = model, _datasets(frame, class_names, config, cache_dir)
            set_delimiting_layer(base, delimiting_layer)
        return _fit(
            "finetune", trained, optimizer, learning_rate, config.training.finetune_epochs, datasets,
            _labels(frame, class_names), folder, config, started, _reference(backbone, len(class_names), config),
            observers, checkpointed=model,
        )


def _upper_on_cached_activations(
    model: keras.Model,
    base: keras.Model,
    backbone: str,
    delimiting_layer: int,
    frame: pd.DataFrame,
    class_names: list[str],
    config: Experiment,
    cache_dir: str | os.PathLike,
) -> tuple[keras.Model, tuple[tf.data.Dataset, tf.data.Dataset]]:
    """The model to fit and its pipelines: the trainable part on cached activations, or the whole model on the fly.

    On the fly, with one line that says why, when the cut cannot be cached
    (`activations.unusable`: nothing frozen, frozen layers that draw noise, a cache above
    `training.activation_cache_max_gb`).
    """
    set_delimiting_layer(base, delimiting_layer)
    cut = activations.find_cut(base, delimiting_layer)
    train_rows, val_rows = _rows(frame, "train"), _rows(frame, "val")
    reason = activations.unusable(backbone, cut, len(train_rows), len(val_rows), config)
    if reason is not None:
        warnings.warn(f"fine-tuning runs on the fly, without the activation cache: {reason}", RuntimeWarning)
        return model, _datasets(frame, class_names, config, cache_dir)
    return activations.fine_tuning_datasets(
        model, base, cut, backbone, train_rows, val_rows, class_names, config, cache_dir,
        _image_cache(frame, config, cache_dir),
    )


def predict(
    backbone: str,
    weights_path: str | os.PathLike,
    frame: pd.DataFrame,
    class_names: list[str],
    config: Experiment,
) -> np.ndarray:
    """Every class's probability for every row of `frame`, in its order: (rows, classes) float32 (no augmentation).

    The images are decoded on the fly: one pass, and `frame` is often one split only,
    whose images the manifest's image cache holds among others.
    """
    with _run_scope(config):
        model, _ = load_trained_model(backbone, weights_path, len(class_names), config)
        images = data.make_dataset(frame, class_names, config.data.image_size, config.data.batch_size, False,
                                   config.seed)
        return model.predict(images, verbose=0)
