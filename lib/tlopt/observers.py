"""What watches a BO step: GPyOpt's files, the figures, the progress bar.

The loop in `tlopt.optimize` asks, runs and tells; everything else observes it through
five hooks, each a no-op unless a subclass overrides it (after KerasTuner's
`on_trial_begin/end`). The notebooks' live figure (`tlopt.live`) is one more observer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlopt import bo, objectives, plots
from tlopt.files import save_figure
from tlopt.params import BayesianOptimization
from tlopt.space import SearchSpace
from tlopt.store import TrialFolder
from tlopt.trials import Trial, best_trial


@dataclass
class StepProgress:
    """What observers see of a running step: its domain, the evaluations and finished trials so far.

    `X` holds the GPyOpt rows of the finished trials in finishing order, `Y` their negated
    scores (GPyOpt minimizes); `objective` names what the scores measure (`tlopt.objectives`).
    `running` maps the id of each trial that runs now to its folder (several at once in a
    parallel step).
    """

    label: str
    step: str
    step_dir: Path
    space: SearchSpace
    settings: BayesianOptimization
    X: np.ndarray
    Y: np.ndarray
    done: list[Trial] = field(default_factory=list)
    objective: str = objectives.DEFAULT
    running: dict[str, TrialFolder] = field(default_factory=dict)

    @property
    def budget(self) -> int:
        return self.settings.budget

    def tell(self, trial: Trial) -> None:
        """Record a finished trial: its row and score join the evaluations."""
        self.done.append(trial)
        self.X = np.vstack([self.X, np.asarray(trial.x, dtype=float).reshape(1, -1)])
        self.Y = np.vstack([self.Y, [[-trial.score]]])


class StepObserver:
    """Hooks of a BO step; `step_end` is also called when the step stops with an error (reason None).

    `trials_running` is called every few seconds while trials run in other processes
    (a parallel step), so that an observer can follow them through their files.
    """

    def step_begin(self, progress: StepProgress) -> None:
        pass

    def trial_begin(self, progress: StepProgress, trial_id: str) -> None:
        pass

    def trials_running(self, progress: StepProgress) -> None:
        pass

    def trial_end(self, progress: StepProgress, trial: Trial) -> None:
        pass

    def step_end(self, progress: StepProgress, stop_reason: str | None) -> None:
        pass


class GPyOptFiles(StepObserver):
    """GPyOpt's evaluations.txt and report.txt, rewritten after every trial (GPyOpt writes them at the end only)."""

    def trial_end(self, progress: StepProgress, trial: Trial) -> None:
        seconds = sum(done.seconds for done in progress.done)
        bo.write_files(progress.step_dir, progress.space, progress.X, progress.Y, progress.settings, seconds)


class ConvergencePlot(StepObserver):
    """GPyOpt's convergence plot (distance between consecutive points, best so far), after every trial."""

    def trial_end(self, progress: StepProgress, trial: Trial) -> None:
        figure = plots.convergence_figure(progress.X, -progress.Y, progress.objective)
        save_figure(figure, progress.step_dir / "convergence.png")


class SurrogatePlot(StepObserver):
    """The surrogate's mean and uncertainty with the acquisition, when a BO step of 1 or 2 variables ends."""

    def step_end(self, progress: StepProgress, stop_reason: str | None) -> None:
        if stop_reason is None or progress.settings.method != "bayesian" or len(progress.X) < 2:
            return
        surface = bo.surrogate_surface(progress.space, progress.X, progress.Y, progress.settings)
        if surface is not None:
            save_figure(plots.acquisition_figure(surface, progress.objective), progress.step_dir / "acquisition.png")


class ProgressBar(StepObserver):
    """A tqdm bar over the step's finished trials, with the running ones and the objective's best value so far."""

    def __init__(self) -> None:
        self.bar = None

    def step_begin(self, progress: StepProgress) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=progress.budget, initial=len(progress.done), desc=f"{progress.label}/{progress.step}",
                        unit="trial", leave=True)

    def _postfix(self, progress: StepProgress) -> None:
        best = best_trial(progress.done)
        key = objectives.get(progress.objective).key
        self.bar.set_postfix({"running": len(progress.running),
                              f"best {key}": f"{best.objective_value:.3f}" if best else "n/a"})

    def trial_begin(self, progress: StepProgress, trial_id: str) -> None:
        self._postfix(progress)

    def trial_end(self, progress: StepProgress, trial: Trial) -> None:
        self._postfix(progress)
        self.bar.update(1)

    def step_end(self, progress: StepProgress, stop_reason: str | None) -> None:
        self.bar.close()


def step_files() -> list[StepObserver]:
    """The observers that write a step's files and figures (every step has them)."""
    return [GPyOptFiles(), ConvergencePlot(), SurrogatePlot()]
