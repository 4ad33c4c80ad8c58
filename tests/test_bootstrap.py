"""Bootstrap intervals of the final model's scores: the same estimates as the tables, seeded, honest about groups."""

import numpy as np
import pytest
from sklearn import metrics as skm

from tlopt import bootstrap
from tlopt.metrics import AVERAGE_ROW, per_class_metrics

NAMES = ["a", "b", "c"]


def predictions(count, seed=0, right=0.7):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, 3, size=count)
    return true, np.where(rng.random(count) < right, true, rng.integers(0, 3, size=count))


def test_the_estimates_are_the_tables_and_lie_in_their_intervals():
    true, predicted = predictions(300)
    table = bootstrap.intervals(true, predicted, NAMES, samples=500, seed=1)
    average = per_class_metrics(true, predicted, NAMES).loc[AVERAGE_ROW]

    assert list(table.index) == ["accuracy", "macro F1", "MCC", "recall a", "recall b", "recall c"]
    assert table.loc["accuracy", "estimate"] == pytest.approx(skm.accuracy_score(true, predicted))
    assert table.loc["macro F1", "estimate"] == pytest.approx(skm.f1_score(true, predicted, average="macro"))
    assert table.loc["MCC", "estimate"] == pytest.approx(average["MCC"])
    np.testing.assert_allclose(table.loc[["recall a", "recall b", "recall c"], "estimate"],
                               skm.recall_score(true, predicted, average=None))
    assert ((table["low"] <= table["estimate"]) & (table["estimate"] <= table["high"])).all()
    assert (table["high"] - table["low"] > 0.02).all()


def test_intervals_are_seeded_and_shrink_with_more_images():
    true, predicted = predictions(100)
    first = bootstrap.intervals(true, predicted, NAMES, samples=400, seed=3)
    again = bootstrap.intervals(true, predicted, NAMES, samples=400, seed=3)
    other = bootstrap.intervals(true, predicted, NAMES, samples=400, seed=4)
    assert first.equals(again) and not first.equals(other)

    # The same images sixteen times: the same scores, known four times as well.
    many = bootstrap.intervals(np.tile(true, 16), np.tile(predicted, 16), NAMES, samples=400, seed=3)
    np.testing.assert_allclose(many["estimate"], first["estimate"])
    ratio = (many["high"] - many["low"]) / (first["high"] - first["low"])
    assert ratio.between(0.15, 0.4).all(), ratio


def test_whole_groups_are_drawn_when_the_split_keeps_groups_together():
    true, predicted = predictions(60)
    copies = 5  # five near-identical frames of each "video" are one observation, not five
    grouped = bootstrap.intervals(np.repeat(true, copies), np.repeat(predicted, copies), NAMES, samples=600, seed=0,
                                  groups=np.repeat(np.arange(60), copies))
    alone = bootstrap.intervals(true, predicted, NAMES, samples=600, seed=0)
    as_images = bootstrap.intervals(np.repeat(true, copies), np.repeat(predicted, copies), NAMES, samples=600, seed=0)
    width = {name: (t["high"] - t["low"])["accuracy"] for name, t in
             (("grouped", grouped), ("alone", alone), ("as_images", as_images))}
    assert width["grouped"] == pytest.approx(width["alone"], rel=0.25)
    assert width["as_images"] < 0.6 * width["grouped"]


def test_a_resample_without_a_class_says_nothing_of_its_recall():
    true = np.array([0] * 30 + [1])  # class b has one image: most resamples lack it
    table = bootstrap.intervals(true, true, ["a", "b"], samples=300, seed=0)
    assert table.loc["recall b", ["estimate", "low", "high"]].tolist() == [1.0, 1.0, 1.0]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="not indices"):
        bootstrap.intervals([0, 3], [0, 1], NAMES)
    with pytest.raises(ValueError, match="no predictions"):
        bootstrap.intervals([], [], NAMES)


def test_formatted_cell():
    row = {"estimate": 0.8123, "low": 0.74, "high": 0.8731}
    assert bootstrap.formatted(row) == "0.812 [0.740, 0.873]"
    assert bootstrap.formatted({"estimate": 0.5, "low": np.nan, "high": np.nan}) == "0.500"
