"""The notebooks' figures draw what their tables hold."""

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from tlopt import plots
from tlopt.strategies import REGISTRY


def test_class_counts_has_a_bar_per_class_and_split():
    split = pd.DataFrame({"label": ["a"] * 5 + ["b"] * 3, "split": ["train"] * 3 + ["val"] * 2 + ["train", "val", "test"]})
    axis = plots.class_counts_figure(split).axes[0]
    heights = sorted(round(patch.get_width()) for patch in axis.patches)
    assert heights == sorted([3, 1, 2, 1, 0, 1])  # a: train 3, val 2, test 0; b: 1 each
    assert [text.get_text() for text in axis.get_legend().get_texts()] == ["train", "val", "test"]


def test_sample_grid_shows_images_of_every_class(tmp_path):
    rows = []
    for label, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        for index in range(3):
            path = tmp_path / f"{label}{index}.png"
            Image.new("RGB", (8, 8), colour).save(path)
            rows.append({"path": str(path), "label": label, "split": "train"})
    figure = plots.sample_grid_figure(pd.DataFrame(rows), per_class=4, seed=0)
    shown = [axis for axis in figure.axes if axis.images]
    assert len(figure.axes) == 8 and len(shown) == 6  # the fourth column of each row stays empty
    assert shown[0].images[0].get_array()[0, 0].tolist() == [0, 0, 255]  # "blue" sorts first
    assert [figure.axes[0].get_ylabel(), figure.axes[4].get_ylabel()] == ["blue", "red"]


def trials_frame(objective="val_accuracy", values=(0.4, 0.6, 0.8, 0.85, 0.5, None, 0.7)):
    return pd.DataFrame({
        "strategy": ["shared"] * 4 + ["joint"] * 3,
        "step": ["model"] * 3 + ["layers"] + ["model"] * 3,
        "index": [0, 1, 2, 0, 0, 1, 2],
        "method": ["initial", "initial", "bayesian", "initial", "initial", "initial", "bayesian"],
        "status": ["ok", "ok", "ok", "ok", "ok", "failed", "ok"],
        "objective": objective,
        "objective_value": list(values),
    })


def test_bo_progress_has_a_panel_per_step_and_the_best_so_far():
    figure = plots.bo_progress_figure(trials_frame())
    titles = [axis.get_title() for axis in figure.axes if axis.axison]
    assert titles == ["shared / model", "shared / layers", "joint / model"]
    best_line = figure.axes[0].lines[0]
    assert best_line.get_ydata().tolist() == [0.4, 0.6, 0.8]
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert legend == ["initial", "bayesian", "best so far"], "no entry for a method that did not run"


def test_strategy_comparison_tracks_each_strategy_over_all_its_steps():
    figure = plots.strategy_comparison_figure(trials_frame())
    left = figure.axes[0]
    assert [line.get_label() for line in left.lines] == ["shared", "joint"]
    assert left.lines[0].get_ydata().tolist() == [0.4, 0.6, 0.8, 0.85]
    assert left.lines[1].get_ydata().tolist() == [0.5, 0.5, 0.7]
    right = figure.axes[1]
    assert [text.get_text() for text in right.get_legend().get_texts()] == ["model", "layers"]


def test_figures_name_the_objective_and_follow_its_direction():
    losses = trials_frame("val_loss", (0.9, 0.7, 0.8, 0.5, 1.2, None, 1.0))
    progress = plots.bo_progress_figure(losses).axes[0]
    assert progress.get_ylabel() == "val_loss"
    assert progress.lines[0].get_ydata().tolist() == [0.9, 0.7, 0.7]  # the best so far of a loss falls
    joint = plots.bo_progress_figure(losses).axes[2]
    assert joint.collections[1].get_offsets()[0].tolist() == [2, 1.2]  # a failed trial at the largest loss
    comparison = plots.strategy_comparison_figure(trials_frame("balanced_accuracy"))
    assert comparison.axes[0].get_title() == "Best validation balanced accuracy so far"
    history = history_frame().rename(columns={"val_accuracy": "val_macro_f1"})
    epochs = plots.accuracy_by_epoch_figure(history, objective="macro_f1")
    assert {axis.get_ylabel() for axis in epochs.axes} == {"val_macro_f1"}
    clock = plots.accuracy_by_time_figure(history, objective="macro_f1").axes[0]
    assert clock.get_title() == "Validation macro F1 of every run against wall-clock time"
    convergence = plots.convergence_figure(np.zeros((3, 1)), np.exp(-np.array([0.9, 0.5, 0.7])), "val_loss")
    assert convergence.axes[1].get_ylabel() == "best val_loss"
    np.testing.assert_allclose(convergence.axes[1].lines[0].get_ydata(), [0.9, 0.5, 0.5])
    texts = [text for figure in (progress.figure, comparison, epochs, clock.figure, convergence)
             for axis in figure.axes for text in (axis.get_title(), axis.get_ylabel())]
    assert not [text for text in texts if "accuracy" in text and "balanced" not in text], texts


def history_frame():
    rows = []
    for trial, strategy in (("s-0", "shared"), ("j-0", "joint")):
        for phase in ("block", "finetune"):
            for epoch in range(3):
                rows.append({"trial": trial, "strategy": strategy, "step": "model", "phase": phase, "epoch": epoch,
                             "val_accuracy": 0.3 + 0.1 * epoch, "minutes": epoch + (3 if phase == "finetune" else 0)})
    return pd.DataFrame(rows)


def test_accuracy_by_epoch_has_one_line_per_run_and_phase_panel():
    figure = plots.accuracy_by_epoch_figure(history_frame())
    assert [axis.get_title() for axis in figure.axes] == ["Classification block", "Fine-tuning"]
    assert all(len(axis.lines) == 2 for axis in figure.axes)
    assert figure.axes[0].lines[0].get_xdata().tolist() == [1, 2, 3]
    colours = {line.get_color() for line in figure.axes[0].lines}
    assert colours == {REGISTRY["shared"].colour, REGISTRY["joint"].colour}


def test_accuracy_by_time_puts_every_run_on_the_run_clock():
    axis = plots.accuracy_by_time_figure(history_frame()).axes[0]
    assert len(axis.lines) == 4
    assert max(np.max(line.get_xdata()) for line in axis.lines) == 5


def test_confusion_matrix_and_time_figures():
    confusion = pd.DataFrame([[3, 1], [0, 4]], index=["a", "b"], columns=["a", "b"])
    axis = plots.confusion_matrix_figure(confusion, "shared").axes[0]
    assert [text.get_text() for text in axis.texts] == ["3", "1", "0", "4"] and axis.get_title() == "shared"
    table = pd.DataFrame({"strategy": ["shared", "shared", "joint"], "step": ["model", "layers", "model"],
                          "minutes": [10.0, 5.0, 7.0]})
    figure = plots.time_figure(table)
    assert isinstance(figure, Figure)
    assert sorted(round(patch.get_width()) for patch in figure.axes[0].patches) == [0, 5, 7, 10]
