"""Bootstrap confidence intervals of a final model's scores (docs/method.md section 14).

A validation or test split of a few hundred images leaves every score uncertain by several
points (100 images of a class: about +-6 points of accuracy). The percentile bootstrap
gives each score an interval: the split's images are drawn again with replacement, as many
as it has, the scores are computed on each such resample, and the 95 % interval runs from
the 2.5th to the 97.5th percentile of them. When the split keeps groups together (Nerthus:
the frames of one video), whole groups are drawn, because the frames of a video are not
independent observations. A resample is a confusion matrix, the weighted sum of the
groups' confusion matrices, so a thousand resamples take milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from tlopt import metrics

LEVEL = 0.95
SUMMARY_SCORES = ("accuracy", "macro F1", "MCC")
_CHUNK = 250  # resamples drawn at a time, so that the (resamples x groups) weights stay small


def recall_name(class_name: str) -> str:
    """The row of a class's recall in an intervals table."""
    return f"recall {class_name}"


def scores(confusion: np.ndarray, class_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Accuracy, macro F1, MCC and every class's recall of confusion matrices `(..., C, C)` (true classes as rows).

    Accuracy is the share of images classified correctly (the validation accuracy the
    search maximizes); macro F1 and MCC are the per-class table's `Average` row, the mean
    of the classes' one-vs-rest values, as in the thesis and the dataset papers.
    """
    confusion = np.asarray(confusion, dtype=float)
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    actual, predicted = confusion.sum(axis=-1), confusion.sum(axis=-2)
    total = actual.sum(axis=-1, keepdims=True)
    fn, fp = actual - tp, predicted - tp
    ratios = metrics.class_ratios(tp, fp, fn, total - tp - fn - fp)
    found = {"accuracy": tp.sum(axis=-1) / total[..., 0], "macro F1": ratios["F1"].mean(axis=-1),
             "MCC": ratios["MCC"].mean(axis=-1)}
    found |= {recall_name(name): ratios["REC"][..., index] for index, name in enumerate(class_names)}
    return found


def intervals(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    samples: int = 1000,
    seed: int = 0,
    groups: Sequence | None = None,
    level: float = LEVEL,
) -> pd.DataFrame:
    """Each score's estimate and percentile bootstrap interval: columns `estimate`, `low`, `high`.

    Rows: `accuracy`, `macro F1`, `MCC`, then `recall <class>` per class. `groups` (one
    label per image) makes whole groups the unit that is drawn; None draws images. A
    resample without an image of a class says nothing of its recall, so it is left out of
    that class's interval. Seeded: the same inputs give the same intervals.
    """
    if samples < 1:
        raise ValueError(f"the bootstrap needs at least one resample, got {samples}")
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    if y_true.size == 0:
        raise ValueError("no predictions to resample")
    n_classes = len(class_names)
    confusion = metrics.confusion_matrix(y_true, y_pred, class_names).to_numpy()  # checks the labels
    _, group_index = np.unique(np.arange(y_true.size) if groups is None else np.asarray(groups),
                               return_inverse=True)
    per_group = np.zeros((group_index.max() + 1, n_classes * n_classes))
    np.add.at(per_group, (group_index, y_true * n_classes + y_pred), 1)
    rng = np.random.default_rng(seed)
    count = len(per_group)
    drawn = []
    for start in range(0, samples, _CHUNK):
        weights = rng.multinomial(count, np.full(count, 1 / count), size=min(_CHUNK, samples - start))
        drawn.append(weights @ per_group)
    resampled = np.concatenate(drawn).reshape(samples, n_classes, n_classes)
    resampled_scores = scores(resampled, class_names)
    absent = resampled.sum(axis=-1) == 0
    for index, name in enumerate(class_names):
        resampled_scores[recall_name(name)] = np.where(absent[:, index], np.nan, resampled_scores[recall_name(name)])
    tail = (1 - level) / 2
    rows = {}
    for name, estimate in scores(confusion, class_names).items():
        values = resampled_scores[name][~np.isnan(resampled_scores[name])]
        low, high = np.quantile(values, [tail, 1 - tail]) if values.size else (np.nan, np.nan)
        rows[name] = (float(estimate), float(low), float(high))
    return pd.DataFrame.from_dict(rows, orient="index", columns=["estimate", "low", "high"]).rename_axis("score")


def formatted(row: pd.Series, digits: int = 3) -> str:
    """`0.812 [0.741, 0.873]`: an estimate with its interval, as a table cell of a paper."""
    if np.isnan(row["low"]):
        return f"{row['estimate']:.{digits}f}"
    return f"{row['estimate']:.{digits}f} [{row['low']:.{digits}f}, {row['high']:.{digits}f}]"
