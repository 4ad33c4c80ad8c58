"""Metrics of SPEC.md section 7: per-class one-vs-rest values, confusion matrix, baselines."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from tlopt.metrics import (
    KVASIR_BASELINES,
    METRIC_COLUMNS,
    NERTHUS_BASELINES,
    RATIO_COLUMNS,
    baselines_for,
    compare_with_baselines,
    confusion_matrix,
    per_class_metrics,
)


def test_columns_and_rows() -> None:
    frame = per_class_metrics([0, 1, 2], [0, 1, 1], ["a", "b", "c"])
    assert list(frame.columns) == METRIC_COLUMNS
    assert METRIC_COLUMNS == ["FN", "FP", "TN", "TP", "F1", "ACC", "MCC", "PREC", "REC", "SPEC"]
    assert list(frame.index) == ["a", "b", "c", "Average"]


def test_matches_sklearn_on_random_labels() -> None:
    rng = np.random.default_rng(0)
    names = [f"c{i}" for i in range(5)]
    y_true = rng.integers(0, 5, size=300)
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 4, size=300))
    frame = per_class_metrics(y_true, y_pred, names).loc[names]
    labels = list(range(5))
    kwargs = {"labels": labels, "average": None, "zero_division": 0}
    np.testing.assert_allclose(frame["PREC"], skm.precision_score(y_true, y_pred, **kwargs))
    np.testing.assert_allclose(frame["REC"], skm.recall_score(y_true, y_pred, **kwargs))
    np.testing.assert_allclose(frame["F1"], skm.f1_score(y_true, y_pred, **kwargs))
    # Binary one-vs-rest MCC per class, as scikit-learn computes it for one class.
    for i, name in enumerate(names):
        expected = skm.matthews_corrcoef(y_true == i, y_pred == i)
        assert frame.loc[name, "MCC"] == pytest.approx(expected)


def test_two_classes_by_hand() -> None:
    frame = per_class_metrics([0, 0, 0, 1, 1], [0, 0, 1, 1, 0], ["neg", "pos"])
    assert frame.loc["neg", ["TP", "TN", "FP", "FN"]].tolist() == [2, 1, 1, 1]
    assert frame.loc["pos", ["TP", "TN", "FP", "FN"]].tolist() == [1, 2, 1, 1]
    assert frame.loc["neg", "SPEC"] == pytest.approx(1 / 2)
    assert frame.loc["pos", "SPEC"] == pytest.approx(2 / 3)
    # (2*1 - 1*1) / sqrt(3*3*2*2) and (1*2 - 1*1) / sqrt(2*2*3*3)
    assert frame.loc["neg", "MCC"] == pytest.approx(1 / 6)
    assert frame.loc["pos", "MCC"] == pytest.approx(1 / 6)
    assert frame.loc["neg", "F1"] == pytest.approx(2 / 3)
    assert frame.loc["pos", "F1"] == pytest.approx(1 / 2)
    assert frame.loc["neg", "ACC"] == pytest.approx(3 / 5)


def test_three_classes_by_hand() -> None:
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0]
    names = ["a", "b", "c"]
    frame = per_class_metrics(y_true, y_pred, names)
    assert frame.loc["a", ["TP", "TN", "FP", "FN"]].tolist() == [1, 3, 1, 1]
    assert frame.loc["b", ["TP", "TN", "FP", "FN"]].tolist() == [2, 3, 1, 0]
    assert frame.loc["c", ["TP", "TN", "FP", "FN"]].tolist() == [1, 4, 0, 1]
    assert frame.loc[names, "SPEC"].tolist() == pytest.approx([3 / 4, 3 / 4, 1.0])
    assert frame.loc[names, "MCC"].tolist() == pytest.approx(
        [2 / 8, 6 / math.sqrt(72), 4 / math.sqrt(40)]
    )
    matrix = confusion_matrix(y_true, y_pred, names)
    assert matrix.values.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert list(matrix.index) == names and list(matrix.columns) == names


def test_never_predicted_class_gives_zero_not_nan() -> None:
    # Class "d" appears nowhere and "c" is never predicted: still rows, no NaN.
    frame = per_class_metrics([0, 1, 2], [0, 1, 1], ["a", "b", "c", "d"])
    assert not frame.isna().any().any()
    assert frame.loc["c", ["PREC", "REC", "F1", "MCC"]].tolist() == [0, 0, 0, 0]
    assert frame.loc["d", ["TP", "FP", "FN", "TN"]].tolist() == [0, 0, 0, 3]
    assert frame.loc["d", "SPEC"] == 1


def test_perfect_prediction_gives_mcc_one() -> None:
    y = [0, 1, 2, 2, 1, 0, 2]
    frame = per_class_metrics(y, y, ["a", "b", "c"])
    assert frame["MCC"].tolist() == pytest.approx([1.0] * 4)
    assert frame.loc["Average", RATIO_COLUMNS].tolist() == pytest.approx([1.0] * 6)


def test_average_is_unweighted_column_mean() -> None:
    rng = np.random.default_rng(1)
    names = ["a", "b", "c"]
    frame = per_class_metrics(rng.integers(0, 3, 50), rng.integers(0, 3, 50), names)
    pd.testing.assert_series_equal(
        frame.loc["Average"], frame.loc[names].mean(axis=0), check_names=False
    )


def test_labels_outside_class_names_are_refused() -> None:
    with pytest.raises(ValueError, match="5"):
        per_class_metrics([0, 1, 5], [0, 1, 1], ["a", "b", "c"])
    with pytest.raises(ValueError, match="3"):
        confusion_matrix([0, 1], [0, 3], ["a", "b", "c"])


def test_baseline_values_from_spec() -> None:
    assert list(KVASIR_BASELINES.columns) == RATIO_COLUMNS
    assert list(NERTHUS_BASELINES.columns) == RATIO_COLUMNS
    assert len(KVASIR_BASELINES) == len(NERTHUS_BASELINES) == 9
    assert KVASIR_BASELINES.loc["6 GF Logistic Model Tree", "F1"] == 0.747
    assert KVASIR_BASELINES.loc["3 Layer CNN", "SPEC"] == 0.890
    assert KVASIR_BASELINES.loc["Random/Majority", "MCC"] == 0.666
    assert NERTHUS_BASELINES.loc["Random/Majority", "ACC"] == 0.652
    assert NERTHUS_BASELINES.loc["6 Layer CNN"].tolist() == [
        0.854, 0.854, 0.805, 0.856, 0.852, 0.952,
    ]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("kvasir", "kvasir"),
        ("/data/kvasir-dataset-v2", "kvasir"),
        ("Kvasir", "kvasir"),
        ("NERTHUS_v1", "nerthus"),
        ("/data/demo", None),
    ],
)
def test_baselines_for(name: str, expected: str | None) -> None:
    tables = {"kvasir": KVASIR_BASELINES, "nerthus": NERTHUS_BASELINES, None: None}
    result = baselines_for(name)
    if expected is None:
        assert result is None
    else:
        pd.testing.assert_frame_equal(result, tables[expected])


def test_compare_with_baselines_appends_our_average() -> None:
    frame = per_class_metrics([0, 1, 1, 0], [0, 1, 0, 0], ["a", "b"])
    table = compare_with_baselines(frame, "/data/nerthus", "ours")
    assert list(table.columns) == RATIO_COLUMNS
    assert list(table.index) == [*NERTHUS_BASELINES.index, "ours"]
    assert table.loc["ours"].tolist() == frame.loc["Average", RATIO_COLUMNS].tolist()
    assert compare_with_baselines(frame, "kvasir").index[-1] == "tlopt (this run)"
    assert compare_with_baselines(frame, "demo") is None
