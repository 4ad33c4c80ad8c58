"""Per-class metrics of the final model and the dataset papers' baselines (docs/method.md section 7).

scikit-learn gives the one-vs-rest counts and the confusion matrix; specificity (SPEC) and a
per-class one-vs-rest MCC are not in scikit-learn, so every ratio is computed
here from the counts, with a zero denominator giving 0 instead of NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

import numpy as np
import pandas as pd
from sklearn import metrics as skm

COUNT_COLUMNS = ["FN", "FP", "TN", "TP"]
RATIO_COLUMNS = ["F1", "ACC", "MCC", "PREC", "REC", "SPEC"]
METRIC_COLUMNS = COUNT_COLUMNS + RATIO_COLUMNS
AVERAGE_ROW = "Average"
DEFAULT_MODEL_NAME = "tlopt (this run)"


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise ratio where a zero denominator gives 0, not NaN (docs/method.md section 7)."""
    out = np.zeros_like(numerator, dtype=float)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _labels(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
) -> list[int]:
    """The class indices `range(len(class_names))`, refusing labels outside them.

    scikit-learn silently drops (or miscounts) labels not in `labels`, which would
    hide a mismatch between the predictions and the class names.
    """
    labels = list(range(len(class_names)))
    seen = np.union1d(np.asarray(y_true), np.asarray(y_pred))
    outside = np.setdiff1d(seen, labels)
    if outside.size:
        raise ValueError(
            f"labels {outside.tolist()} are not indices into the {len(labels)} class names"
        )
    return labels


def per_class_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
) -> pd.DataFrame:
    """One-vs-rest metrics per class plus the unweighted `Average` row of the thesis.

    Labels are `range(len(class_names))`, so a class missing from `y_true` or
    `y_pred` still gets its row.
    """
    labels = _labels(y_true, y_pred, class_names)
    # Shape (n_classes, 2, 2): [[TN, FP], [FN, TP]] per class.
    counts = skm.multilabel_confusion_matrix(y_true, y_pred, labels=labels).astype(float)
    tn, fp, fn, tp = counts[:, 0, 0], counts[:, 0, 1], counts[:, 1, 0], counts[:, 1, 1]
    frame = pd.DataFrame(
        {"FN": fn, "FP": fp, "TN": tn, "TP": tp, **class_ratios(tp, fp, fn, tn)},
        index=pd.Index(list(class_names), name="class"),
    )
    frame.loc[AVERAGE_ROW] = frame.mean(axis=0)
    return frame


def class_ratios(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray) -> dict[str, np.ndarray]:
    """The one-vs-rest ratios (RATIO_COLUMNS) of counts of any shape, element-wise.

    The per-class table and the bootstrap (`tlopt.bootstrap`, thousands of resampled
    count arrays at once) share these formulas.
    """
    tp, fp, fn, tn = (np.asarray(count, dtype=float) for count in (tp, fp, fn, tn))
    return {
        "F1": _safe_divide(2 * tp, 2 * tp + fp + fn),
        "ACC": _safe_divide(tp + tn, tp + tn + fp + fn),
        "MCC": _safe_divide(tp * tn - fp * fn, np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))),
        "PREC": _safe_divide(tp, tp + fp),
        "REC": _safe_divide(tp, tp + fn),
        "SPEC": _safe_divide(tn, tn + fp),
    }


def confusion_matrix(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
) -> pd.DataFrame:
    """Counts with true classes as rows and predicted classes as columns, labelled by name."""
    labels = _labels(y_true, y_pred, class_names)
    matrix = skm.confusion_matrix(y_true, y_pred, labels=labels)
    return pd.DataFrame(
        matrix,
        index=pd.Index(list(class_names), name="true"),
        columns=pd.Index(list(class_names), name="predicted"),
    )


def _baseline_table(rows: dict[str, list[float]]) -> pd.DataFrame:
    """The papers' averages over classes, one row per method, in RATIO_COLUMNS order."""
    return pd.DataFrame.from_dict(rows, orient="index", columns=RATIO_COLUMNS).rename_axis(
        "method"
    )


# Pogorelov et al., MMSys 2017 (Kvasir); docs/method.md section 7.1.
KVASIR_BASELINES = _baseline_table(
    {
        "3 Layer CNN": [0.453, 0.959, 0.430, 0.589, 0.408, 0.890],
        "6 Layer CNN": [0.651, 0.914, 0.602, 0.661, 0.640, 0.953],
        "Inception v3 TFL": [0.693, 0.924, 0.649, 0.698, 0.689, 0.957],
        "JCD Random Forest": [0.706, 0.927, 0.666, 0.708, 0.710, 0.958],
        "2 GF Random Forest": [0.711, 0.928, 0.672, 0.713, 0.715, 0.959],
        "2 GF Logistic Model Tree": [0.705, 0.926, 0.664, 0.706, 0.707, 0.958],
        "6 GF Random Forest": [0.727, 0.933, 0.692, 0.732, 0.732, 0.962],
        "6 GF Logistic Model Tree": [0.747, 0.937, 0.711, 0.748, 0.748, 0.964],
        "Random/Majority": [0.000, 0.016, 0.666, 0.016, 0.125, 0.000],
    }
)

# Pogorelov et al., MMSys 2017 (Nerthus); docs/method.md section 7.1.
NERTHUS_BASELINES = _baseline_table(
    {
        "3 Layer CNN": [0.742, 0.772, 0.621, 0.811, 0.694, 0.937],
        "6 Layer CNN": [0.854, 0.854, 0.805, 0.856, 0.852, 0.952],
        "Inception v3 TFL": [0.748, 0.748, 0.665, 0.751, 0.745, 0.918],
        "JCD Random Forest": [0.790, 0.861, 0.679, 0.805, 0.794, 0.870],
        "2 GF Random Forest": [0.769, 0.847, 0.647, 0.792, 0.774, 0.849],
        "2 GF Logistic Model Tree": [0.737, 0.825, 0.594, 0.744, 0.737, 0.862],
        "6 GF Random Forest": [0.860, 0.913, 0.801, 0.885, 0.866, 0.895],
        "6 GF Logistic Model Tree": [0.899, 0.949, 0.863, 0.901, 0.901, 0.960],
        "Random/Majority": [0.322, 0.652, 0.000, 0.240, 0.489, 0.512],
    }
)


def baselines_for(dataset_name: str | PathLike[str]) -> pd.DataFrame | None:
    """The baseline table whose dataset name appears in `dataset_name` (a name or a path).

    Matching is a case-insensitive substring test so that data roots such as
    `/data/kvasir-dataset-v2` find their table; anything else gets None. A copy
    is returned so callers cannot alter the module's tables.
    """
    name = str(dataset_name).lower()
    if "kvasir" in name:
        return KVASIR_BASELINES.copy()
    if "nerthus" in name:
        return NERTHUS_BASELINES.copy()
    return None


def compare_with_baselines(
    metrics_frame: pd.DataFrame,
    dataset: str | PathLike[str],
    model_name: str = DEFAULT_MODEL_NAME,
) -> pd.DataFrame | None:
    """The dataset's baselines plus our `Average` row under `model_name`, for the report.

    None when the dataset has no known baselines.
    """
    baselines = baselines_for(dataset)
    if baselines is None:
        return None
    ours = metrics_frame.loc[[AVERAGE_ROW], RATIO_COLUMNS].rename(index={AVERAGE_ROW: model_name})
    return pd.concat([baselines, ours]).rename_axis("method")
