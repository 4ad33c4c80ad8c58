"""What a search optimizes: the objective's name, direction, Keras metric and chance (docs/method.md section 10).

Every consumer of the objective reads it here: the BO score (`Objective.score`), the
checkpoint kept, EarlyStopping, the nonconvergence monitor, the best trial and the labels
of tables and figures. Validation accuracy is the thesis's objective; on imbalanced data it
rewards a model that predicts the largest class, so balanced accuracy (the mean recall of
the classes), macro F1 and the validation loss can replace it.

Balanced accuracy and macro F1 are stateful Keras metrics that accumulate a confusion
matrix over an epoch, so that the epoch's value is that of the whole validation set (a
mean of per-batch values would not be), and they appear as `val_balanced_accuracy` and
`val_macro_f1` in the epoch logs of `Model.fit` and `features.fit_head` alike.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import keras
import numpy as np
from keras import ops

from tlopt.errors import ConfigError


class ConfusionMatrixMetric(keras.metrics.Metric):
    """A (true, predicted) count matrix over an epoch (sample-weighted when given weights).

    Built from one-hot products (a matrix multiplication), which TensorFlow computes
    deterministically on a GPU too, unlike a scatter or bincount.
    """

    def __init__(self, num_classes: int, name: str, dtype: str | None = None) -> None:
        super().__init__(name=name, dtype=dtype or "float32")
        self.num_classes = num_classes
        self.matrix = self.add_variable(shape=(num_classes, num_classes), initializer="zeros", name="matrix",
                                        dtype=self.dtype)

    def update_state(self, y_true, y_pred, sample_weight=None) -> None:
        true = ops.one_hot(ops.reshape(ops.cast(y_true, "int32"), (-1,)), self.num_classes, dtype=self.dtype)
        predicted = ops.one_hot(ops.argmax(ops.reshape(y_pred, (-1, self.num_classes)), axis=-1),
                                self.num_classes, dtype=self.dtype)
        if sample_weight is not None:
            true = true * ops.reshape(ops.cast(sample_weight, self.dtype), (-1, 1))
        self.matrix.assign_add(ops.matmul(ops.transpose(true), predicted))

    def reset_state(self) -> None:
        self.matrix.assign(ops.zeros((self.num_classes, self.num_classes), dtype=self.dtype))

    def get_config(self) -> dict:
        return {"num_classes": self.num_classes, "name": self.name, "dtype": self.dtype}


class BalancedAccuracy(ConfusionMatrixMetric):
    """The mean recall over the classes that occur (scikit-learn's `balanced_accuracy_score`)."""

    def __init__(self, num_classes: int, name: str = "balanced_accuracy", dtype: str | None = None) -> None:
        super().__init__(num_classes, name, dtype)

    def result(self):
        support = ops.sum(self.matrix, axis=1)
        present = ops.cast(support > 0, self.dtype)
        recall = ops.divide_no_nan(ops.diagonal(self.matrix), support)
        return ops.divide_no_nan(ops.sum(recall * present), ops.sum(present))


class MacroF1(ConfusionMatrixMetric):
    """The unweighted mean over all classes of 2TP / (2TP + FP + FN), 0 where that is 0/0
    (scikit-learn's `f1_score(average="macro", labels=range(K), zero_division=0)`)."""

    def __init__(self, num_classes: int, name: str = "macro_f1", dtype: str | None = None) -> None:
        super().__init__(num_classes, name, dtype)

    def result(self):
        true_positives = ops.diagonal(self.matrix)
        errors = ops.sum(self.matrix, axis=0) + ops.sum(self.matrix, axis=1) - 2 * true_positives
        return ops.mean(ops.divide_no_nan(2 * true_positives, 2 * true_positives + errors))


def _uniform_guessing_f1(counts: np.ndarray) -> float:
    """Expected macro F1 of guessing each class with probability 1/K: class k has precision
    p_k (its share) and recall 1/K, so F1_k = 2 p_k / (K p_k + 1)."""
    shares = counts / counts.sum()
    return float(np.mean(2 * shares / (len(counts) * shares + 1)))


@dataclass(frozen=True)
class Objective:
    """One objective: its parameter name, its key in the epoch logs, its words, its direction.

    `metric(num_classes)` makes the Keras metric that logs it (None: Keras logs it anyway);
    `chance(counts)` is its value for a model that guesses uniformly, given the
    validation images per class.
    """

    name: str
    key: str
    label: str
    mode: str
    chance: Callable[[np.ndarray], float]
    metric: Callable[[int], keras.metrics.Metric] | None = None

    @property
    def maximized(self) -> bool:
        return self.mode == "max"

    def score(self, value: float) -> float:
        """What BO maximizes, in [0, 1]: the value itself, or exp(-loss) for the loss (the geometric
        mean of the probability given to the true class), so that a failed trial's 0 is the worst score."""
        return float(value) if self.maximized else math.exp(-float(value))

    def value(self, score: float) -> float:
        """The objective's value of a score (`score`'s inverse; inf for a loss scored 0)."""
        if self.maximized:
            return float(score)
        return -math.log(score) if score > 0 else math.inf

    @property
    def score_label(self) -> str:
        """What a figure of scores shows on its axis."""
        return self.key if self.maximized else f"exp(-{self.key})"

    def best_index(self, values: Sequence[float]) -> int:
        """The first best of a run's epoch values, as Keras's checkpoint keeps it (a strict improvement)."""
        values = np.asarray(values, dtype=float)
        return int(np.nanargmax(values) if self.maximized else np.nanargmin(values))


OBJECTIVES: dict[str, Objective] = {
    objective.name: objective
    for objective in (
        Objective("val_accuracy", "val_accuracy", "validation accuracy", "max",
                  chance=lambda counts: 1 / len(counts)),
        Objective("balanced_accuracy", "val_balanced_accuracy", "validation balanced accuracy", "max",
                  chance=lambda counts: 1 / len(counts), metric=BalancedAccuracy),
        Objective("macro_f1", "val_macro_f1", "validation macro F1", "max",
                  chance=_uniform_guessing_f1, metric=MacroF1),
        Objective("val_loss", "val_loss", "validation loss", "min",
                  chance=lambda counts: math.log(len(counts))),
    )
}
DEFAULT = "val_accuracy"


def get(name: str | None) -> Objective:
    """The objective called `name` (None: the thesis's validation accuracy)."""
    try:
        return OBJECTIVES[name or DEFAULT]
    except KeyError:
        raise ConfigError(f"unknown objective {name!r} (known: {', '.join(OBJECTIVES)})") from None


def of_key(key: str) -> Objective | None:
    """The objective logged under `key` (`val_macro_f1`), or None for another log entry."""
    return next((objective for objective in OBJECTIVES.values() if objective.key == key), None)


def metrics_for(num_classes: int, keys: Sequence[str]) -> list[keras.metrics.Metric]:
    """New Keras metrics that log the objective keys in `keys` beyond what a run logs anyway (loss, accuracy)."""
    extra = {objective.name: objective.metric(num_classes) for key in keys
             if (objective := of_key(key)) is not None and objective.metric is not None}
    return list(extra.values())


# The nonconvergence threshold: a number, or relative to chance ("chance", "chance+0.1", "2x chance").
_RELATIVE = re.compile(
    r"^(?:(?P<factor>\d+(?:\.\d*)?|\.\d+)\s*[x*]\s*)?chance(?:\s*(?P<sign>[+-])\s*(?P<offset>\d+(?:\.\d*)?|\.\d+))?$"
)
THESIS_THRESHOLD = 0.5  # on validation accuracy


def check_threshold(threshold: float | str) -> None:
    """ValueError (for the parameter file's message) when `threshold` is neither a number nor relative to chance."""
    if isinstance(threshold, str) and not _RELATIVE.match(threshold.strip().lower()):
        raise ValueError(
            f"threshold {threshold!r} is neither a number nor relative to chance "
            f"(for example 'chance', 'chance+0.1', 'chance-0.2', '2x chance')"
        )


def default_threshold(monitor: str) -> float | str:
    """The threshold when the parameter file sets none: the thesis's 0.5 on validation accuracy;
    0.1 above chance for the other accuracy-like measures; chance itself (ln K) for a loss."""
    if monitor == "val_accuracy":
        return THESIS_THRESHOLD
    return "chance" if "loss" in monitor else "chance+0.1"


def resolve_threshold(threshold: float | str, monitor: str, counts: Sequence[int]) -> float:
    """The threshold as a number, for a monitored log key and the validation images per class
    (docs/method.md section 12).

    A fixed threshold on the wrong side of chance (below it for a measure to maximize, above it
    for a loss) lets runs that learned nothing go on: that is warned about.
    """
    counts = np.asarray(counts, dtype=float)
    objective = of_key(monitor)
    if not isinstance(threshold, str):
        if objective is not None:
            chance = objective.chance(counts)
            wrong_side = threshold < chance if objective.maximized else threshold > chance
            if wrong_side:
                warnings.warn(
                    f"training.nonconvergence.threshold {threshold} is {'below' if objective.maximized else 'above'} "
                    f"chance ({chance:.3g} for {monitor} with {len(counts)} classes): runs no better than guessing "
                    f"pass the filter; a threshold relative to chance ('chance+0.1') adapts to the classes",
                    stacklevel=2,
                )
        return float(threshold)
    match = _RELATIVE.match(threshold.strip().lower())
    if match is None:
        raise ConfigError(f"training.nonconvergence.threshold {threshold!r} is neither a number nor relative to chance")
    if objective is None:
        raise ConfigError(
            f"training.nonconvergence.threshold {threshold!r}: chance is defined for "
            f"{', '.join(o.key for o in OBJECTIVES.values())}, not for the monitor {monitor!r}"
        )
    value = objective.chance(counts) * float(match["factor"] or 1)
    if match["offset"]:
        value += float(match["offset"]) * (1 if match["sign"] == "+" else -1)
    return value
