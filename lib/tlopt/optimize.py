"""Bayesian optimization of a strategy: the ask -> run -> tell loop of a step, and the driver of its steps.

Each step is an ask-and-tell loop that reproduces GPyOpt's own (random initial design, a
GP/EI suggestion from all evaluations so far, the `eps` stop when two consecutive points
coincide) with GPyOpt doing the modelling (`tlopt.bo`). Every suggestion is a pure
function of the finished trials and a seed derived from the run's seed, the strategy,
the step and the trial index; so a resumed step replays `trials.jsonl` into X and Y and
makes the suggestions an uninterrupted run would have made. GPyOpt's files, the figures,
the progress bar and the live figure observe the loop (`tlopt.observers`); trials run
through an executor, which runs them one at a time in this process.
"""

from __future__ import annotations

import shutil
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from tlopt import bo, data
from tlopt.errors import TloptError
from tlopt.files import atomic_write_json
from tlopt.live import LiveAccuracy, in_notebook
from tlopt.observers import ProgressBar, StepObserver, StepProgress, step_files
from tlopt.params import Experiment
from tlopt.space import SearchSpace
from tlopt.store import RunFolder, TrialFolder
from tlopt.strategies import LAYER_STEP, Context, Objective, Step, get_strategy, strategy_runs
from tlopt.trials import Trial, TrialState, best_trial


class StepFailed(TloptError):
    """Too many consecutive trials of a step failed, or none succeeded: something is wrong beyond one trial."""


class StepStopped(Exception):
    """The search of a step ends before its budget (two coinciding points, a singular GP fit)."""


@dataclass(frozen=True)
class TrialRequest:
    """A trial to run: where BO put it, its decoded hyperparameters and its folder."""

    id: str
    label: str
    step: str
    index: int
    method: str
    x: list[float]
    hyperparameters: dict[str, Any]
    folder: TrialFolder


def _phase_summary(result: Any) -> dict:
    return {
        "val_accuracy": result.val_accuracy,
        "val_loss": result.val_loss,
        "best_epoch": result.best_epoch,
        "epochs": result.epochs,
        "stopped_by": result.stopped_by,
        "seconds": result.seconds,
        "weights": str(result.weights_path),
    }


def run_trial(objective: Objective, request: TrialRequest) -> Trial:
    """Train one trial; any exception becomes a failed trial instead of ending the search."""
    started = time.time()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    shutil.rmtree(request.folder.path, ignore_errors=True)  # what a killed attempt left behind
    placed = dict(id=request.id, strategy=request.label, step=request.step, index=request.index,
                  method=request.method, x=request.x, hyperparameters=request.hyperparameters, started_at=started_at)
    try:
        outcome = objective(request.hyperparameters, request.folder)
    except Exception as error:  # noqa: BLE001 - a trial may fail in any way (NaN, OOM, ...)
        return Trial(**placed, status=TrialState.FAILED, error=f"{type(error).__name__}: {error}",
                     stopped_by="failed", seconds=time.time() - started,
                     traceback=traceback.format_exc(limit=8))
    scored = outcome.scored
    return Trial(
        **placed,
        status=TrialState.OK,
        val_accuracy=float(scored.val_accuracy),
        val_loss=float(scored.val_loss),
        epochs=int(scored.epochs),
        stopped_by=scored.stopped_by,
        weights=str(scored.weights_path),
        setup=outcome.setup,
        phases={name: _phase_summary(result) for name, result in outcome.phases.items()},
        seconds=time.time() - started,
    )


class InProcess:
    """Runs the trials it is given one at a time, in this process, as their results are asked for.

    The loop's seam for running trials elsewhere: `slots` trials may be submitted before
    the loop waits for `next_result`, which returns whichever submitted trial ends first.
    """

    slots = 1

    def __init__(self, objective: Objective) -> None:
        self.objective = objective
        self.queue: list[TrialRequest] = []

    def submit(self, request: TrialRequest) -> None:
        self.queue.append(request)

    def next_result(self) -> Trial:
        return run_trial(self.objective, self.queue.pop(0))


class Search:
    """The asking side of a step: the seeded random design, then GPyOpt's suggestion from the evaluations."""

    def __init__(self, progress: StepProgress, seed: int) -> None:
        self.progress = progress
        self.seed = seed
        settings = progress.settings
        self.design = bo.initial_points(progress.space, settings.initial_points,
                                        bo.step_seed(seed, progress.label, progress.step))

    def ask(self, index: int) -> tuple[np.ndarray, str]:
        """The point of trial `index` and how it was chosen; StepStopped when the search ends early."""
        settings, X, Y = self.progress.settings, self.progress.X, self.progress.Y
        if index < settings.initial_points:
            return self.design[index : index + 1], "initial"
        if len(X) > 1 and np.sqrt(np.sum((X[-1] - X[-2]) ** 2)) <= settings.eps:
            raise StepStopped("eps: two consecutive points coincide")
        try:
            point = bo.suggest(self.progress.space, X, Y, settings,
                               bo.step_seed(self.seed, self.progress.label, self.progress.step, index))
        except np.linalg.LinAlgError as error:
            raise StepStopped(f"singular GP fit: {error}") from None
        return point, settings.method


def _consecutive_failures(trials: list[Trial]) -> int:
    count = 0
    for trial in reversed(trials):
        if trial.ok:
            break
        count += 1
    return count


def run_step(ctx: Context, label: str, step: str, space: SearchSpace, objective: Objective,
             observers: list[StepObserver] = ()) -> Trial:
    """Run (or resume, or skip when finished) one BO step; return its best trial.

    `label` is what the step is stored under: the strategy's name, or `strategy@Backbone`
    in per-backbone mode. The step's own files and figures are always written; `observers`
    add more (the progress bar, the live figure).
    """
    run, settings = ctx.run, ctx.config.bo
    done = run.trials.of_step(label, step)
    if run.step_status_file(label, step).is_file():
        return _best_or_fail(done, label, step)

    step_dir = run.step_dir(label, step)
    step_dir.mkdir(parents=True, exist_ok=True)
    X = np.array([trial.x for trial in done], dtype=float).reshape(len(done), len(space.variables))
    Y = np.array([[-trial.score] for trial in done], dtype=float).reshape(len(done), 1)
    progress = StepProgress(label, step, step_dir, space, settings, X, Y, list(done))
    search = Search(progress, ctx.config.seed)
    executor = InProcess(objective)
    watchers = [*step_files(), *observers]
    running: list[TrialRequest] = []
    issued = len(done)
    stop_reason, finished = None, False
    for watcher in watchers:
        watcher.step_begin(progress)
    try:
        while True:
            while len(running) < executor.slots and issued < settings.budget and stop_reason is None:
                try:
                    point, method = search.ask(issued)
                except StepStopped as stop:
                    stop_reason = str(stop)
                    break
                trial_id = f"{label}-{step}-{issued:03d}"
                request = TrialRequest(trial_id, label, step, issued, method, point.reshape(-1).tolist(),
                                       space.decode(point), run.trial(trial_id))
                for watcher in watchers:
                    watcher.trial_begin(progress, trial_id)
                executor.submit(request)
                running.append(request)
                issued += 1
            if not running:
                break
            trial = executor.next_result()
            running = [request for request in running if request.id != trial.id]
            run.trials.append(trial)
            progress.tell(trial)
            for watcher in watchers:
                watcher.trial_end(progress, trial)
            if ctx.config.training.keep_weights == "best":
                _remove_beaten_weights(run, progress.done)
            failures = _consecutive_failures(progress.done)
            if failures >= settings.max_consecutive_failures:
                raise StepFailed(f"{label}/{step}: {failures} consecutive trials failed; last error: {trial.error}")
        stop_reason, finished = stop_reason or "budget", True
    finally:
        for watcher in watchers:
            watcher.step_end(progress, stop_reason if finished else None)
    atomic_write_json(run.step_status_file(label, step), {"trials": len(progress.done), "stop_reason": stop_reason})
    return _best_or_fail(progress.done, label, step)


def _remove_beaten_weights(run: RunFolder, trials: list[Trial]) -> None:
    """Delete the checkpoints of a step's trials but its best so far: no later step or evaluation reads them.

    A trial once beaten never becomes a step's best again (a later trial replaces the best
    only with a strictly better score), so its files can go as soon as it is beaten.
    """
    best = best_trial(trials)
    for trial in trials:
        if trial is not best:
            run.trial(trial.id).remove_weights()


def _best_or_fail(trials: list[Trial], label: str, step: str) -> Trial:
    best = best_trial(trials)
    if best is None:
        raise StepFailed(f"{label}/{step}: no trial finished successfully")
    return best


def make_context(config: Experiment, run: RunFolder, trainer: Any = None, live: bool = False,
                 title: str = "") -> Context:
    """Read the run's split once for every objective of a run; `trainer` defaults to `tlopt.training`.

    `live` adds the notebook's live figure of validation accuracy per epoch.
    """
    if trainer is None:
        from tlopt import training as trainer
    frame = data.read_manifest(run.split_file)
    return Context(
        config=config,
        run=run,
        frame=frame,
        class_names=data.class_names(frame),
        trainer=trainer,
        observers=[LiveAccuracy(f"{title}: validation accuracy per epoch")] if live else [],
    )


def _drive(config: Experiment, strategy: str, run: RunFolder | None, layers: bool, trainer: Any,
           progress: bool) -> Trial:
    """Run a strategy's model-optimization steps (or its layer step) for each of its runs; the best trial.

    Each step builds on the setup of the previous step's best trial (the layer step on the
    best trial of model optimization). `best.json` keeps, per label, the best trial of each
    step, of model optimization ("model") and of layer optimization ("final"). With
    `training.keep_weights: best`, the checkpoints nothing will read go as soon as that is
    known (docs/method.md section 8).
    """
    entry = get_strategy(strategy)
    run = RunFolder.open(config, run)
    title = f"{strategy}: layer optimization" if layers else strategy
    ctx = make_context(config, run, trainer, live=progress and in_notebook(), title=title)
    observers: list[StepObserver] = [*([ProgressBar()] if progress else []), *ctx.observers]
    steps: tuple[Step, ...] = (LAYER_STEP,) if layers else entry.steps
    winners = {}
    for label, label_config in strategy_runs(config, strategy):
        basis = None
        if layers:
            if not run.best_file(label).is_file():
                raise TloptError(f"{run.best_file(label)} is missing: run strategy '{strategy}' before its "
                                 f"layer optimization")
            basis = run.read_best(label)["model"]["setup"]
        bests: dict[str, Trial] = {}
        for step in steps:
            best = run_step(ctx, label, step.name, step.space(label_config, basis), step.objective(ctx, basis),
                            observers)
            bests[step.name] = best
            basis = best.setup
        if layers:
            run.update_best(label, final=best.to_record())
            if config.training.keep_weights == "best":
                # The final model replaces model optimization's; the block checkpoint stays (the layer step's basis).
                run.trial(run.read_best(label)["model"]["id"]).remove_weights(("finetune",))
        else:
            run.update_best(label, steps={name: trial.to_record() for name, trial in bests.items()},
                            model=best.to_record())
        winners[label] = best
    overall = best_trial(winners.values())
    if len(winners) > 1:
        if layers:
            run.update_best(strategy, final=overall.to_record())
        else:
            run.update_best(strategy, per_backbone={label: trial.id for label, trial in winners.items()},
                            model=overall.to_record())
    return overall


def run_strategy(config: Experiment, strategy: str, run: RunFolder | str | None = None, trainer: Any = None,
                 progress: bool = True) -> Trial:
    """Run every model-optimization step of `strategy` (resuming what a stopped run left); its best trial."""
    return _drive(config, strategy, run, layers=False, trainer=trainer, progress=progress)


def run_layer_optimization(config: Experiment, strategy: str, run: RunFolder | str | None = None,
                           trainer: Any = None, progress: bool = True) -> Trial:
    """BO over the delimiting layer alone, from the best trial of `strategy`: its final model."""
    return _drive(config, strategy, run, layers=True, trainer=trainer, progress=progress)
