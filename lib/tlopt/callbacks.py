"""The callbacks of every training run, and the thesis's nonconvergence filter.

The checkpoint, EarlyStopping and the filter watch the run's objective (`tlopt.objectives`):
validation accuracy unless the parameter file names another.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras

from tlopt import checkpoints, objectives
from tlopt.errors import ConfigError
from tlopt.params import Experiment
from tlopt.store import TrialFolder


class NonconvergenceFiltering(keras.callbacks.Callback):
    """Stop a run whose monitored value stays on the wrong side of a threshold.

    The thesis's filter: at the end of each epoch, a value below `threshold` (above it for
    a loss-like monitor) stops training if the counter has already reached `patience`,
    and otherwise adds one to the counter; a value at or above the threshold resets the
    counter. With patience 5 and every value below, training stops at the end of epoch
    index 5. Unlike `EarlyStopping(baseline=...)` it never stops a run that has passed the
    threshold. `mode`: "max" (higher is better), "min", or "auto" (min if the monitor's
    name contains "loss"). A NaN value counts as below the threshold.
    """

    def __init__(
        self, monitor: str = "val_accuracy", threshold: float = 0.5, patience: int = 5, mode: str = "auto"
    ) -> None:
        super().__init__()
        if mode not in ("auto", "min", "max"):
            raise ConfigError(f"nonconvergence mode must be auto, min or max, got {mode!r}")
        if patience < 0:
            raise ConfigError(f"nonconvergence patience must be at least 0, got {patience}")
        self.monitor = monitor
        self.threshold = threshold
        self.patience = patience
        self.mode = ("min" if "loss" in monitor else "max") if mode == "auto" else mode
        self.wait = 0
        self.stopped = False
        self.stopped_epoch: int | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.wait = 0
        self.stopped = False
        self.stopped_epoch = None

    def _not_converging(self, value: float) -> bool:
        if math.isnan(value):
            return True
        return value < self.threshold if self.mode == "max" else value > self.threshold

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        if self.monitor not in logs:
            raise ConfigError(
                f"nonconvergence filtering monitors {self.monitor!r}, which the epoch logs lack "
                f"(they hold: {', '.join(sorted(logs))})"
            )
        if not self._not_converging(float(logs[self.monitor])):
            self.wait = 0
        elif self.wait >= self.patience:
            self.model.stop_training = True
            self.stopped = True
            self.stopped_epoch = epoch
        else:
            self.wait += 1


class BestWeights(keras.callbacks.Callback):
    """At each new best value of `monitor` (the objective), write the checkpoint of the layers the run trains.

    `layers` are the trained layers by key (`checkpoints.trained_layers` of the transfer
    model, or of the Dense layer alone on cached features); `reference` names the rest.
    No optimizer state: nothing reads it once the run has ended. A NaN never improves.
    `mode`: "max" or "min", the objective's direction.
    """

    def __init__(self, filepath: str, layers: dict[str, keras.layers.Layer], reference: checkpoints.Reference,
                 monitor: str = "val_accuracy", mode: str = "max") -> None:
        super().__init__()
        self.filepath = filepath
        self.layers = layers
        self.reference = reference
        self.monitor = monitor
        self.mode = mode
        self.best = self._worst()

    def _worst(self) -> float:
        return -math.inf if self.mode == "max" else math.inf

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.best = self._worst()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = float((logs or {}).get(self.monitor, math.nan))
        if value > self.best if self.mode == "max" else value < self.best:
            self.best = value
            checkpoints.write(self.filepath, self.layers, self.reference)


def nonconvergence_threshold(config: Experiment, class_counts: Sequence[int]) -> float:
    """The filter's threshold as a number, for the validation images per class (chance depends on them)."""
    return objectives.resolve_threshold(config.nonconvergence_threshold, config.nonconvergence_monitor, class_counts)


def run_callbacks(
    folder: TrialFolder, phase: str, config: Experiment, class_counts: Sequence[int],
    layers: dict[str, keras.layers.Layer], reference: checkpoints.Reference,
) -> list[keras.callbacks.Callback]:
    """The callbacks of one run (classification block or fine-tuning) of a trial.

    The phase's folder receives `history.csv` (per-epoch scalars) and `best.weights.h5`
    (the weights of the trained `layers` at the objective's best value, with the `reference`
    to the rest, `tlopt.checkpoints`); its TensorBoard folder the event files (scalars only: no
    graph, no profiling, which cost seconds per run). EarlyStopping watches the objective;
    nonconvergence filtering is added when `training.nonconvergence.enabled` is on.
    `class_counts` (validation images per class) set a threshold relative to chance.
    """
    objective, training = objectives.get(config.objective), config.training
    folder.phase_dir(phase).mkdir(parents=True, exist_ok=True)
    callbacks = [
        keras.callbacks.CSVLogger(str(folder.history(phase))),
        BestWeights(str(folder.weights(phase)), layers, reference, objective.key, objective.mode),
        keras.callbacks.TensorBoard(log_dir=str(folder.tensorboard(phase)), write_graph=False, profile_batch=0),
        keras.callbacks.EarlyStopping(monitor=objective.key, mode=objective.mode,
                                      patience=training.early_stopping_patience),
    ]
    filtering = training.nonconvergence
    if filtering.enabled:
        callbacks.append(
            NonconvergenceFiltering(
                monitor=config.nonconvergence_monitor, threshold=nonconvergence_threshold(config, class_counts),
                patience=filtering.patience, mode=filtering.mode,
            )
        )
    return callbacks
