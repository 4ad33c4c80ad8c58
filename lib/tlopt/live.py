"""Live feedback while a BO step runs in a notebook: one figure, redrawn every epoch.

The figure is displayed once and then updated in place through its IPython
display handle, so a search of hundreds of epochs leaves one output, not
hundreds. Headless runs (papermill, `tlopt run`) do not create it: their
notebooks draw the final figures from the trial store instead.
"""

from __future__ import annotations

import csv
from pathlib import Path

import keras
from matplotlib.figure import Figure

from tlopt.observers import StepObserver, StepProgress
from tlopt import objectives
from tlopt.store import TrialFolder
from tlopt.trials import Trial


def in_notebook() -> bool:
    """Whether a Jupyter kernel (not a plain interpreter or IPython terminal) runs this code."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in shell.config


def _history_values(history: Path, key: str) -> list[float]:
    """The value logged under `key` in every epoch a history file holds (a line being written is skipped)."""
    try:
        text = history.read_text()
    except FileNotFoundError:
        return []
    rows = list(csv.DictReader(text.splitlines(keepends=True)[:None if text.endswith("\n") else -1]))
    values = []
    for row in rows:
        try:
            values.append(float(row[key]))
        except (KeyError, TypeError, ValueError):
            break
    return values


def _runs(trial_id: str, folder: TrialFolder, key: str) -> list[tuple[str, list[float]]]:
    return [(f"{trial_id} run {number}", _history_values(path, key))
            for number, path in enumerate(folder.histories(), start=1)]


class LiveAccuracy(keras.callbacks.Callback, StepObserver):
    """The objective (validation accuracy by default) per epoch of the running trials (bold) over the
    finished ones (grey).

    A Keras callback of every training run in this process, and an observer of the BO
    step that names the running trial. Trials that run in other processes (a parallel
    step) are followed through their history files instead, every few seconds.
    """

    def __init__(self, title: str, display=None, objective: str = objectives.DEFAULT):
        super().__init__()
        self.title = title
        self.objective = objectives.get(objective)
        self.curves: list[tuple[str, list[float]]] = []
        self.followed: dict[str, list[tuple[str, list[float]]]] = {}
        self.folders: dict[str, TrialFolder] = {}
        self.trial = "trial"
        self._display = display
        self._handle = None

    def trial_begin(self, progress: StepProgress, trial_id: str) -> None:
        self.trial = trial_id

    def trials_running(self, progress: StepProgress) -> None:
        self.folders.update(progress.running)
        followed = {trial_id: _runs(trial_id, folder, self.objective.key) for trial_id, folder in progress.running.items()}
        if followed != self.followed:
            self.followed = followed
            self.redraw()

    def trial_end(self, progress: StepProgress, trial: Trial) -> None:
        if trial.id in self.followed:
            del self.followed[trial.id]
            self.curves += _runs(trial.id, self.folders.pop(trial.id), self.objective.key)

    def on_train_begin(self, logs=None) -> None:
        runs_of_trial = sum(1 for label, _ in self.curves if label.startswith(f"{self.trial} "))
        self.curves.append((f"{self.trial} run {runs_of_trial + 1}", []))

    def on_epoch_end(self, epoch, logs=None) -> None:
        if logs and self.objective.key in logs:
            self.curves[-1][1].append(float(logs[self.objective.key]))
            self.redraw()

    def figure(self) -> Figure:
        figure = Figure(figsize=(8, 3.5))
        axis = figure.subplots()
        running = [curve for curves in self.followed.values() for curve in curves] or self.curves[-1:]
        for label, values in self.curves[:len(self.curves) - (0 if self.followed else 1)]:
            axis.plot(range(1, len(values) + 1), values, color="0.7", linewidth=1)
        for number, (label, values) in enumerate(running):
            axis.plot(range(1, len(values) + 1), values, "-o", color=f"C{number}", linewidth=2, label=label)
        if running:
            axis.legend(loc="lower right", fontsize="small")
        axis.set(title=self.title, xlabel="epoch", ylabel=self.objective.key)
        if self.objective.maximized:
            axis.set_ylim(0, 1.02)
        axis.grid(True, alpha=0.3)
        return figure

    def redraw(self) -> None:
        if self._display is None:
            from IPython.display import display

            self._display = display
        figure = self.figure()
        if self._handle is None:
            self._handle = self._display(figure, display_id=True)
        else:
            self._handle.update(figure)
