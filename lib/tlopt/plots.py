"""Every figure of the project; each function returns a matplotlib Figure.

Figures are built with the object-oriented API (no pyplot state), so that
they can be saved headless and shown in a notebook alike. Figures of results plot the
run's objective (`tlopt.objectives`) and name it on their axes: validation accuracy
unless the parameter file chose another.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from PIL import Image

from tlopt import objectives
from tlopt.strategies import REGISTRY


def _best_so_far(values: np.ndarray, objective: objectives.Objective) -> np.ndarray:
    return np.maximum.accumulate(values) if objective.maximized else np.minimum.accumulate(values)


def trial_values(trials: pd.DataFrame) -> tuple[objectives.Objective, np.ndarray]:
    """The objective of a table of trials (`analysis.read_trials`) and each trial's value of it; a
    failed trial at the worst value drawn (0, or the largest loss of the table)."""
    objective = objectives.get(trials["objective"].iloc[0] if len(trials) else None)
    values = trials["objective_value"].astype(float).to_numpy()
    finished = values[np.isfinite(values)]
    worst = 0.0 if objective.maximized else (finished.max() if finished.size else 0.0)
    return objective, np.where(np.isfinite(values), values, worst)


def _value_axis(axis, objective: objectives.Objective, **settings) -> None:
    """Label a value axis with the objective; measures in [0, 1] get the whole range."""
    axis.set(**settings)
    if objective.maximized:
        axis.set_ylim(-0.03, 1.03)


def convergence_figure(X: np.ndarray, scores: np.ndarray, objective: str = objectives.DEFAULT) -> Figure:
    """GPyOpt's convergence plot: distance between consecutive points, the objective's best value so far.

    `scores` are BO's (`Objective.score`): the objective's values, or exp(-loss) for the loss.
    """
    X = np.asarray(X, dtype=float)
    measure = objectives.get(objective)
    values = np.array([measure.value(score) for score in np.asarray(scores, dtype=float).reshape(-1)])
    figure = Figure(figsize=(10, 3.5))
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.15, wspace=0.25)
    left, right = figure.subplots(1, 2)
    iterations = np.arange(1, len(values) + 1)
    distances = np.sqrt(np.sum(np.diff(X, axis=0) ** 2, axis=1)) if len(X) > 1 else np.array([])
    left.plot(iterations[1:], distances, "-o", color="tab:red")
    left.set(title="Distance between consecutive x's", xlabel="Iteration", ylabel="d(x[n], x[n-1])")
    right.plot(iterations, _best_so_far(values, measure), "-o", color="tab:blue")
    right.set(title=f"Best {measure.label} so far", xlabel="Iteration", ylabel=f"best {measure.key}")
    for axis in (left, right):
        axis.grid(True, alpha=0.3)
    return figure


def acquisition_figure(surface: dict, objective: str = objectives.DEFAULT) -> Figure:
    """The surrogate's mean and uncertainty with the acquisition, for 1-D and 2-D domains.

    `surface` comes from `bo.surrogate_surface`: for each curve (one per
    category of a categorical variable, or a single one) the grid, the mean and
    standard deviation of the predicted score (the objective's value, or exp(-loss)),
    and the acquisition. A 2-D numeric domain is drawn as heat maps.
    """
    predicted = objectives.get(objective).score_label
    if surface["kind"] == "grid2d":
        figure = Figure(figsize=(13, 3.8), layout="constrained")
        axes = figure.subplots(1, 3)
        extent = [*surface["x_range"], *surface["y_range"]]
        for axis, key, title in zip(
            axes, ("mean", "std", "acquisition"), (f"Predicted {predicted}", "Uncertainty (std)", "Acquisition")
        ):
            image = axis.imshow(surface[key], origin="lower", extent=extent, aspect="auto")
            figure.colorbar(image, ax=axis)
            axis.scatter(surface["points"][:, 0], surface["points"][:, 1], c="red", s=15)
            axis.set(title=title, xlabel=surface["x_label"], ylabel=surface["y_label"])
        return figure

    figure = Figure(figsize=(9, 6), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True)
    for curve in surface["curves"]:
        line = top.plot(curve["grid"], curve["mean"], label=curve["label"])[0]
        top.fill_between(
            curve["grid"], curve["mean"] - 2 * curve["std"], curve["mean"] + 2 * curve["std"],
            color=line.get_color(), alpha=0.15,
        )
        bottom.plot(curve["grid"], curve["acquisition"], color=line.get_color(), label=curve["label"])
        top.scatter(curve["points_x"], curve["points_y"], color=line.get_color(), s=20, zorder=3)
    top.set(title=f"Surrogate: predicted {predicted} (mean +- 2 std) and observations", ylabel=predicted)
    bottom.set(title="Acquisition function", xlabel=surface["x_label"], ylabel="acquisition")
    if len(surface["curves"]) > 1:
        top.legend(fontsize="small")
    for axis in (top, bottom):
        axis.grid(True, alpha=0.3)
    return figure


METHOD_COLOURS = {"initial": "tab:gray", "bayesian": "tab:blue", "random": "tab:orange"}
PHASE_TITLES = {"block": "Classification block", "finetune": "Fine-tuning"}


def _colour(name: str, index: int) -> str:
    """A registered strategy's own colour; other labels (compared runs, steps) get colours of the cycle."""
    entry = REGISTRY.get(name)
    return entry.colour if entry is not None and entry.colour else f"C{(index + len(REGISTRY)) % 10}"


def class_counts_figure(split: pd.DataFrame) -> Figure:
    """Images per class in each split (train/val/test), as grouped horizontal bars."""
    counts = pd.crosstab(split["label"], split["split"])
    counts = counts[[name for name in ("train", "val", "test") if name in counts.columns]]
    figure = Figure(figsize=(8, 0.5 * len(counts) + 1.5), layout="constrained")
    axis = figure.subplots()
    counts.plot.barh(ax=axis)
    axis.invert_yaxis()
    axis.set(title="Images per class and split", xlabel="images", ylabel="")
    axis.grid(True, axis="x", alpha=0.3)
    return figure


def sample_grid_figure(split: pd.DataFrame, per_class: int = 5, seed: int = 0) -> Figure:
    """A row of randomly chosen (seeded) images for every class."""
    labels = sorted(split["label"].unique())
    figure = Figure(figsize=(1.6 * per_class, 1.7 * len(labels)), layout="constrained")
    axes = figure.subplots(len(labels), per_class, squeeze=False)
    for row, label in zip(axes, labels):
        rows = split[split["label"] == label]
        paths = rows["path"].sample(min(per_class, len(rows)), random_state=seed)
        for column, axis in enumerate(row):
            axis.set_xticks([])
            axis.set_yticks([])
            if column < len(paths):
                with Image.open(paths.iloc[column]) as image:
                    axis.imshow(image.convert("RGB"))
            else:
                axis.set_axis_off()
        row[0].set_ylabel(label, rotation=0, ha="right", va="center")
    figure.suptitle("Sample images per class")
    return figure


def bo_progress_figure(trials: pd.DataFrame) -> Figure:
    """Each trial's value of the objective in order, coloured by how it was chosen, with the best so far.

    One panel per BO step, three to a row. Where the best-so-far line improves after the
    dashed line (the end of the random initial design), Bayesian optimization improved on
    random points. Failed trials are drawn as crosses at the worst value (0, or the largest loss).
    """
    objective, values = trial_values(trials)
    trials = trials.assign(plotted=values)
    steps = list(dict.fromkeys(zip(trials["strategy"], trials["step"])))
    columns = min(len(steps), 3)
    grid_rows = -(-len(steps) // columns)
    figure = Figure(figsize=(5.5 * columns, 3.8 * grid_rows), layout="constrained")
    axes = figure.subplots(grid_rows, columns, squeeze=False).ravel()
    for axis in axes[len(steps):]:
        axis.set_axis_off()
    for axis, (strategy, step) in zip(axes, steps):
        rows = trials[(trials["strategy"] == strategy) & (trials["step"] == step)].sort_values("index")
        values = rows["plotted"].to_numpy()
        numbers = rows["index"].to_numpy() + 1
        for method, colour in METHOD_COLOURS.items():
            chosen = (rows["method"] == method).to_numpy()
            if not chosen.any():
                continue
            ok = (rows["status"] == "ok").to_numpy()
            axis.scatter(numbers[chosen & ok], values[chosen & ok], color=colour, label=method, zorder=3)
            axis.scatter(numbers[chosen & ~ok], values[chosen & ~ok], color=colour, marker="x", zorder=3)
        axis.step(numbers, _best_so_far(values, objective), where="post", color="black", label="best so far")
        initial = int((rows["method"] == "initial").sum())
        if 0 < initial < len(rows):
            axis.axvline(initial + 0.5, color="gray", linestyle="--", linewidth=1)
        _value_axis(axis, objective, title=f"{strategy} / {step}", xlabel="trial", ylabel=objective.key)
        axis.set_xticks(numbers)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small", loc="best")
    return figure


def accuracy_by_epoch_figure(history: pd.DataFrame, colour_by: str = "strategy",
                             objective: str = objectives.DEFAULT) -> Figure:
    """The objective (validation accuracy by default) of every run against epoch, one panel per phase
    (the thesis's overview)."""
    measure = objectives.get(objective)
    phases = [phase for phase in PHASE_TITLES if phase in set(history["phase"])]
    figure = Figure(figsize=(6 * max(len(phases), 1), 4), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, max(len(phases), 1), squeeze=False)[0])
    groups = list(dict.fromkeys(history[colour_by]))
    for axis, phase in zip(axes, phases):
        for (group, _), run in history[history["phase"] == phase].groupby([colour_by, "trial"], sort=False):
            axis.plot(run["epoch"] + 1, run[measure.key], "-o", markersize=3, alpha=0.7,
                      color=_colour(group, groups.index(group)))
        _value_axis(axis, measure, title=PHASE_TITLES[phase], xlabel="epoch", ylabel=measure.key)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(True, alpha=0.3)
    _legend(figure, axes[0], groups)
    return figure


def accuracy_by_time_figure(history: pd.DataFrame, colour_by: str = "strategy",
                            objective: str = objectives.DEFAULT) -> Figure:
    """The objective (validation accuracy by default) of every run against wall-clock minutes since the
    run started."""
    measure = objectives.get(objective)
    figure = Figure(figsize=(12, 4), layout="constrained")
    axis = figure.subplots()
    groups = list(dict.fromkeys(history[colour_by]))
    for (group, _, _), run in history.groupby([colour_by, "trial", "phase"], sort=False):
        axis.plot(run["minutes"], run[measure.key], "-o", markersize=3, alpha=0.7,
                  color=_colour(group, groups.index(group)))
    title = f"{measure.label[0].upper()}{measure.label[1:]} of every run against wall-clock time"
    _value_axis(axis, measure, title=title, xlabel="minutes since the run started", ylabel=measure.key)
    axis.grid(True, alpha=0.3)
    _legend(figure, axis, groups)
    return figure


def _legend(figure: Figure, axis, groups: list[str]) -> None:
    handles = [Line2D([], [], color=_colour(group, index), label=group) for index, group in enumerate(groups)]
    axis.legend(handles=handles, fontsize="small", loc="lower right")


def strategy_comparison_figure(trials: pd.DataFrame, label_column: str = "strategy") -> Figure:
    """Left: the objective's best value so far over each strategy's trials (every step in order).
    Right: the best value of each step of each strategy.
    """
    figure = Figure(figsize=(13, 4.2), layout="constrained")
    left, right = figure.subplots(1, 2)
    objective, values = trial_values(trials)
    trials = trials.assign(plotted=values)
    labels = list(dict.fromkeys(trials[label_column]))
    best_per_step = {}
    for index, label in enumerate(labels):
        rows = trials[trials[label_column] == label]
        left.plot(np.arange(1, len(rows) + 1), _best_so_far(rows["plotted"].to_numpy(), objective), "-o", markersize=3,
                  color=_colour(label, index), label=label)
        steps = rows.groupby("step", sort=False)["plotted"]
        best_per_step[label] = steps.max() if objective.maximized else steps.min()
    _value_axis(left, objective, title=f"Best {objective.label} so far", xlabel="trial (all steps in order)",
                ylabel=f"best {objective.key}")
    left.grid(True, alpha=0.3)
    left.legend(fontsize="small", loc="best")
    table = pd.DataFrame(best_per_step).T[list(dict.fromkeys(trials["step"]))]
    table.plot.bar(ax=right, rot=15)
    right.set(title=f"Best {objective.label} per step", ylabel=objective.key, xlabel="")
    if objective.maximized:
        right.set_ylim(0, 1.05)
    right.grid(True, axis="y", alpha=0.3)
    right.legend(title="step", fontsize="small")
    return figure


def confusion_matrix_figure(confusion: pd.DataFrame, title: str) -> Figure:
    """The confusion matrix as an annotated heat map (true classes as rows)."""
    size = 1.0 + 0.9 * len(confusion)
    figure = Figure(figsize=(size + 2, size), layout="constrained")
    axis = figure.subplots()
    seaborn.heatmap(confusion, annot=True, fmt="d", cmap="Blues", cbar=False, ax=axis, square=True)
    axis.set(title=title, xlabel="predicted", ylabel="true")
    axis.set_xticklabels(axis.get_xticklabels(), rotation=30, ha="right")
    return figure


def time_figure(time_table: pd.DataFrame) -> Figure:
    """Minutes spent per strategy, stacked by step (from `analysis.time_per_strategy`)."""
    minutes = time_table.pivot_table(
        index="strategy", columns="step", values="minutes", aggfunc="sum", sort=False
    )
    figure = Figure(figsize=(8, 0.6 * len(minutes) + 1.8), layout="constrained")
    axis = figure.subplots()
    minutes.plot.barh(stacked=True, ax=axis)
    axis.invert_yaxis()
    axis.set(title="Training time per strategy", xlabel="minutes", ylabel="")
    axis.grid(True, axis="x", alpha=0.3)
    return figure


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], title: str) -> Figure:
    """One-vs-rest ROC curves of each class and their macro average (from `analysis.roc_curves`), AUC in the legend."""
    figure = Figure(figsize=(5.5, 5), layout="constrained")
    axis = figure.subplots()
    for name, (fpr, tpr, auc) in curves.items():
        style = {"color": "black", "linestyle": "--", "linewidth": 2} if name == "macro average" else {}
        axis.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})", **style)
    axis.plot([0, 1], [0, 1], color="tab:gray", linewidth=0.8, linestyle=":")
    axis.set(title=title, xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02))
    axis.legend(fontsize="small", loc="lower right")
    axis.grid(True, alpha=0.3)
    return figure


def reliability_figure(table: pd.DataFrame, title: str, error: float) -> Figure:
    """The reliability diagram (from `analysis.reliability`): accuracy against confidence per bin, images per bin below."""
    figure = Figure(figsize=(5.5, 6), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    widths = table["high"] - table["low"]
    top.bar(table["low"], table["accuracy"], width=widths, align="edge", edgecolor="black", alpha=0.7,
            label="accuracy")
    top.plot(table["confidence"], table["accuracy"], "o", color="tab:red", label="mean confidence of the bin")
    top.plot([0, 1], [0, 1], color="tab:gray", linestyle="--", label="calibrated")
    top.set(title=f"{title}: expected calibration error {error:.3f}", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02))
    top.legend(fontsize="small", loc="upper left")
    bottom.bar(table["low"], table["images"], width=widths, align="edge", color="tab:gray")
    bottom.set(xlabel="confidence (probability of the predicted class)", ylabel="images")
    for axis in (top, bottom):
        axis.grid(True, alpha=0.3)
    return figure


def explanation_figure(explained, title: str) -> Figure:
    """Each image beside its Grad-CAM overlay (an `explain.Explanations`), titled with the true and predicted class."""
    from tlopt.explain import overlay

    count = len(explained.paths)
    columns = min(count, 4)
    rows = -(-count // columns)
    figure = Figure(figsize=(3.2 * columns, 1.9 * rows + 0.6), layout="constrained")
    axes = figure.subplots(rows, 2 * columns, squeeze=False).reshape(rows, columns, 2)
    for index, (image, cam, probabilities) in enumerate(zip(explained.images, explained.maps,
                                                            explained.probabilities)):
        plain, mapped = axes[index // columns, index % columns]
        predicted = int(np.argmax(probabilities))
        plain.imshow(image)
        mapped.imshow(overlay(image, cam))
        truth = f"true {explained.true[index]}\n" if explained.true is not None else ""
        plain.set_title(f"{truth}", fontsize="small")
        mapped.set_title(f"predicted {explained.class_names[predicted]} {probabilities[predicted]:.2f}",
                         fontsize="small")
    for axis in axes.reshape(-1):
        axis.set_xticks([])
        axis.set_yticks([])
    for index in range(count, rows * columns):
        for axis in axes[index // columns, index % columns]:
            axis.set_axis_off()
    figure.suptitle(title)
    return figure


def repeats_figure(table: pd.DataFrame, finals: dict[str, float]) -> Figure:
    """The winner's validation accuracy over its repeats (points) against each strategy's final model (lines)."""
    figure = Figure(figsize=(8, 3.2), layout="constrained")
    axis = figure.subplots()
    accuracy = table["val_accuracy"].astype(float)
    axis.plot(accuracy.to_numpy(), np.zeros(len(accuracy)), "o", color="black", alpha=0.6,
              label="the winner's setup, other seeds")
    for index, (strategy, value) in enumerate(finals.items()):
        axis.axvline(value, color=_colour(strategy, index), linewidth=2, label=f"{strategy}'s final model")
    axis.set(title="Training noise: the winner retrained with other seeds", xlabel="validation accuracy",
             yticks=[])
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    axis.grid(True, axis="x", alpha=0.3)
    return figure
