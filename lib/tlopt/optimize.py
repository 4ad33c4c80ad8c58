"""Bayesian optimization of a strategy: the ask -> run -> tell loop of a step, and the driver of its steps.

Each step is an ask-and-tell loop that reproduces GPyOpt's own (random initial design, a
GP/EI suggestion from all evaluations so far, the `eps` stop when two consecutive points
coincide) with GPyOpt doing the modelling (`tlopt.bo`). Every suggestion is a pure
function of the finished trials and a seed derived from the run's seed, the strategy,
the step and the trial index; so a resumed step replays `trials.jsonl` into X and Y and
makes the suggestions an uninterrupted run would have made. GPyOpt's files, the figures,
the progress bar and the live figure observe the loop (`tlopt.observers`); trials run
through an executor: one at a time in this process (`InProcess`), or, with
`execution.parallel_trials` = k > 1, k at once on Ray (`tlopt.parallel`), each point then
chosen with the trials still running as pending (`Scheduler`, docs/method.md section 4.1).
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from tlopt import activations, bo, data, objectives
from tlopt.backbones import check_weights
from tlopt.errors import TloptError
from tlopt.files import atomic_write_json
from tlopt.live import LiveAccuracy, in_notebook
from tlopt.observers import ProgressBar, StepObserver, StepProgress, step_files
from tlopt.parallel import RayExecutor
from tlopt.params import Experiment
from tlopt.space import SearchSpace
from tlopt.store import RunFolder, TrialFolder
from tlopt.strategies import LAYER_STEP, Basis, Context, Objective, Step, default_layer, get_strategy, strategy_runs
from tlopt.trials import Trial, TrialState, best_trial


class StepFailed(TloptError):
    """Too many consecutive trials of a step failed, or none succeeded: something is wrong beyond one trial."""


class StepStopped(Exception):
    """The search of a step ends before its budget (two coinciding points, a singular GP fit)."""


@dataclass(frozen=True)
class TrialRequest:
    """A trial to run: where BO put it, its decoded hyperparameters and its folder.

    In a parallel step also what its point was based on (the `Trial` fields of the same
    names); None otherwise.
    """

    id: str
    label: str
    step: str
    index: int
    method: str
    x: list[float]
    hyperparameters: dict[str, Any]
    folder: TrialFolder
    based_on: list[int] | None = None
    pending: list[int] | None = None
    parallel_trials: int | None = None
    schedule: str | None = None

    def placed(self) -> dict[str, Any]:
        """The `Trial` fields the request decides, the start time included."""
        return dict(id=self.id, strategy=self.label, step=self.step, index=self.index, method=self.method,
                    x=self.x, hyperparameters=self.hyperparameters,
                    started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    based_on=self.based_on, pending=self.pending, parallel_trials=self.parallel_trials,
                    schedule=self.schedule)


def issued_trial(request: TrialRequest) -> Trial:
    """The record of a trial about to start in a parallel step (written before it is submitted)."""
    return Trial(**request.placed(), status=TrialState.ISSUED)


def failed_trial(request: TrialRequest, error: str, seconds: float, trace: str | None = None) -> Trial:
    """The record of a trial that raised, or whose worker died."""
    return Trial(**request.placed(), status=TrialState.FAILED, error=error, stopped_by="failed", seconds=seconds,
                 traceback=trace)


def _phase_summary(result: Any) -> dict:
    return {
        "val_accuracy": result.val_accuracy,
        "val_loss": result.val_loss,
        "objective_value": result.objective_value,
        "best_epoch": result.best_epoch,
        "epochs": result.epochs,
        "stopped_by": result.stopped_by,
        "seconds": result.seconds,
        "weights": str(result.weights_path),
    }


def run_trial(objective: Objective, request: TrialRequest) -> Trial:
    """Train one trial; any exception becomes a failed trial instead of ending the search."""
    started = time.time()
    placed = request.placed()
    shutil.rmtree(request.folder.path, ignore_errors=True)  # what a killed attempt left behind
    try:
        outcome = objective(request.hyperparameters, request.folder)
    except Exception as error:  # noqa: BLE001 - a trial may fail in any way (NaN, OOM, ...)
        return failed_trial(request, f"{type(error).__name__}: {error}", time.time() - started,
                            traceback.format_exc(limit=8))
    scored = outcome.scored
    return Trial(
        **placed,
        status=TrialState.OK,
        val_accuracy=float(scored.val_accuracy),
        val_loss=float(scored.val_loss),
        objective=scored.objective,
        objective_value=float(scored.objective_value),
        epochs=int(scored.epochs),
        stopped_by=scored.stopped_by,
        weights=str(scored.weights_path),
        setup=outcome.setup,
        phases={name: _phase_summary(result) for name, result in outcome.phases.items()},
        seconds=time.time() - started,
    )


@dataclass(frozen=True)
class TrialRecipe:
    """What a worker process needs to rebuild a step's objective: no part of the notebook's `Context`
    (its live figure, its trainer module), only what pickles.

    `trainer` None means `tlopt.training`; tests inject a picklable fake.
    """

    config: Experiment
    run: str
    strategy: str
    step: str
    basis: Basis
    trainer: Any = None


def run_recipe(recipe: TrialRecipe, request: TrialRequest) -> Trial:
    """Run one trial of a step in this process from its recipe (what a Ray worker does)."""

    def objective(hyperparameters: dict, folder: TrialFolder):
        if not Path(recipe.run).is_dir():
            raise TloptError(f"this worker does not see the run folder {recipe.run}: it must be on a shared "
                             f"filesystem at the same path on every node")
        ctx = make_context(recipe.config, RunFolder(recipe.run), recipe.trainer)
        return get_strategy(recipe.strategy).step(recipe.step).objective(ctx, recipe.basis)(hyperparameters, folder)

    return run_trial(objective, request)


class InProcess:
    """Runs the trials it is given one at a time, in this process, as their results are asked for.

    The loop's seam for running trials elsewhere: `slots` trials may be submitted before
    the loop waits for `next_result`, which returns whichever submitted trial ends first
    (`tlopt.parallel.RayExecutor` runs several at once).
    """

    slots = 1

    def __init__(self, objective: Objective) -> None:
        self.objective = objective
        self.queue: list[TrialRequest] = []

    def submit(self, request: TrialRequest) -> None:
        self.queue.append(request)

    def next_result(self, waiting=None) -> Trial:
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


class Scheduler:
    """Which trial a step issues next, and at which point.

    One slot: trial after trial, each point from every finished trial (`Search.ask`, the
    `eps` stop included). k slots (docs/method.md section 4.1): the random design as slots
    free up; then, in the `ordered` schedule, trial i once trials 0..i-k have finished, its
    point a pure function of those trials, of trials i-k+1..i-1 as pending points and of
    its seed, whatever order the workers finish in; in the `asap` schedule, trial i as
    soon as a slot frees, from the trials finished and running then (recorded in
    `based_on` and `pending`). `unfinished` are trials issued before a stop, which run
    again first at their recorded point (`ordered` recomputes it and checks that it matches).
    """

    def __init__(self, progress: StepProgress, run: RunFolder, seed: int, slots: int, schedule: str,
                 unfinished: list[Trial] = ()) -> None:
        self.progress, self.run, self.seed = progress, run, seed
        self.slots, self.schedule = slots, schedule
        self.search = Search(progress, seed)
        self.finished = {trial.index: trial for trial in progress.done}
        self.points = {trial.index: trial.x for trial in [*progress.done, *unfinished]}
        self.unfinished = list(unfinished)
        self.next_index = len(progress.done) if slots == 1 else max(self.points, default=-1) + 1

    def tell(self, trial: Trial) -> None:
        self.finished[trial.index] = trial

    def next_request(self) -> TrialRequest | None:
        """The next trial to submit; None when none may start now (or the budget is spent).

        Raises StepStopped when the search ends before its budget.
        """
        if self.unfinished:
            return self._again(self.unfinished.pop(0))
        index, settings = self.next_index, self.progress.settings
        if index >= settings.budget:
            return None
        if self.slots == 1:
            point, method = self.search.ask(index)
            request = self._request(index, method, point)
        else:
            basis = self._basis(index)
            if basis is None:
                return None
            point, method = self._point(index, *basis)
            request = self._request(index, method, point, *basis)
        self.points[index] = request.x
        self.next_index += 1
        return request

    def _basis(self, index: int) -> tuple[list[int], list[int]] | None:
        """(finished trials, pending trials) a point is computed from; None when trial `index` must wait."""
        if index < self.progress.settings.initial_points:
            return [], []
        if self.schedule == "ordered":
            last = max(index - self.slots, 0)
            based_on = list(range(last + 1))
            if any(earlier not in self.finished for earlier in based_on):
                return None
            return based_on, list(range(last + 1, index))
        if not self.finished:
            return None
        return sorted(self.finished), sorted(set(self.points) - set(self.finished))

    def _point(self, index: int, based_on: list[int], pending: list[int]) -> tuple[np.ndarray, str]:
        settings, space = self.progress.settings, self.progress.space
        if index < settings.initial_points:
            return self.search.design[index : index + 1], "initial"
        width = len(space.variables)
        X = np.array([self.finished[i].x for i in based_on], dtype=float).reshape(-1, width)
        Y = np.array([[-self.finished[i].score] for i in based_on], dtype=float).reshape(-1, 1)
        running = np.array([self.points[i] for i in pending], dtype=float).reshape(-1, width)
        seed = bo.step_seed(self.seed, self.progress.label, self.progress.step, index)
        try:
            return bo.suggest(space, X, Y, settings, seed, pending=running), settings.method
        except np.linalg.LinAlgError as error:
            raise StepStopped(f"singular GP fit: {error}") from None
        except bo.DomainExhausted:
            raise StepStopped("every point of the domain has been evaluated or is running") from None

    def _request(self, index: int, method: str, point: np.ndarray, based_on: list[int] | None = None,
                 pending: list[int] | None = None) -> TrialRequest:
        label, step, space = self.progress.label, self.progress.step, self.progress.space
        trial_id = f"{label}-{step}-{index:03d}"
        parallel = {} if self.slots == 1 else dict(based_on=based_on, pending=pending, parallel_trials=self.slots,
                                                    schedule=self.schedule)
        return TrialRequest(trial_id, label, step, index, method, point.reshape(-1).tolist(), space.decode(point),
                            self.run.trial(trial_id), **parallel)

    def _again(self, issued: Trial) -> TrialRequest:
        """An issued trial that did not finish before the run stopped, at the point it was issued with."""
        basis = (issued.based_on, issued.pending)
        if self.schedule == "ordered":
            basis = self._basis(issued.index)
            point, _ = self._point(issued.index, *basis)
            if not np.allclose(point.reshape(-1), issued.x, rtol=1e-9, atol=1e-12):
                raise TloptError(f"{issued.id} was issued at {issued.x}, but the trials it is based on now give "
                                 f"{point.reshape(-1).tolist()}: trials.jsonl was changed since")
        return self._request(issued.index, issued.method, np.array([issued.x]), *basis)


def _consecutive_failures(trials: list[Trial]) -> int:
    count = 0
    for trial in reversed(trials):
        if trial.ok:
            break
        count += 1
    return count


def run_step(ctx: Context, label: str, step: str, space: SearchSpace, objective: Objective,
             observers: list[StepObserver] = (), executor: Any = None) -> Trial:
    """Run (or resume, or skip when finished) one BO step; return its best trial.

    `label` is what the step is stored under: the strategy's name, or `strategy@Backbone`
    in per-backbone mode. The step's own files and figures are always written; `observers`
    add more (the progress bar, the live figure). `executor` runs the trials (default:
    `InProcess(objective)`); with more than one slot, each trial is written to the store
    as issued before it is submitted.
    """
    run, settings = ctx.run, ctx.config.bo
    done = run.trials.of_step(label, step)
    if run.step_status_file(label, step).is_file():
        return _best_or_fail(done, label, step)

    executor = executor or InProcess(objective)
    parallel = executor.slots > 1
    step_dir = run.step_dir(label, step)
    step_dir.mkdir(parents=True, exist_ok=True)
    X = np.array([trial.x for trial in done], dtype=float).reshape(len(done), len(space.variables))
    Y = np.array([[-trial.score] for trial in done], dtype=float).reshape(len(done), 1)
    progress = StepProgress(label, step, step_dir, space, settings, X, Y, list(done), ctx.config.objective)
    scheduler = Scheduler(progress, run, ctx.config.seed, executor.slots, ctx.config.execution.schedule,
                          run.trials.unfinished(label, step) if parallel else [])
    watchers = [*step_files(), *observers]
    stop_reason, finished = None, False

    def waiting() -> None:
        for watcher in watchers:
            watcher.trials_running(progress)

    for watcher in watchers:
        watcher.step_begin(progress)
    try:
        while True:
            while len(progress.running) < executor.slots and stop_reason is None:
                try:
                    request = scheduler.next_request()
                except StepStopped as stop:
                    stop_reason = str(stop)
                    break
                if request is None:
                    break
                if parallel:
                    run.trials.append(issued_trial(request))
                progress.running[request.id] = request.folder
                for watcher in watchers:
                    watcher.trial_begin(progress, request.id)
                executor.submit(request)
            if not progress.running:
                break
            trial = executor.next_result(waiting)
            del progress.running[trial.id]
            scheduler.tell(trial)
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
    """Read the run's split once for every objective of a run; `trainer` defaults to `tlopt.training`,
    which first checks (or downloads) the pretrained weights of every backbone the run may choose.

    `live` adds the notebook's live figure of the objective per epoch.
    """
    if trainer is None:
        from tlopt import training as trainer

        check_weights(config)
    frame = data.read_split(run)
    objective = objectives.get(config.objective)
    return Context(
        config=config,
        run=run,
        frame=frame,
        class_names=data.class_names(frame),
        trainer=trainer,
        observers=[LiveAccuracy(f"{title}: {objective.label} per epoch", objective=objective.name)] if live else [],
    )


@contextlib.contextmanager
def _executor(ctx: Context, strategy: str, step: str, basis: Basis, objective: Objective) -> Iterator[Any]:
    """What runs a step's trials: this process, or Ray with `execution.parallel_trials` slots (shut down after)."""
    execution = ctx.config.execution
    if execution.parallel_trials == 1:
        yield InProcess(objective)
        return
    trainer = None if getattr(ctx.trainer, "__name__", None) == "tlopt.training" else ctx.trainer
    recipe = TrialRecipe(ctx.config, str(ctx.run.path), strategy, step, basis, trainer)
    with RayExecutor(execution, functools.partial(run_recipe, recipe), failed_trial,
                     shared_paths=[ctx.run.path, ctx.config.data.root]) as executor:
        yield executor


def _drive(config: Experiment, strategy: str, run: RunFolder | None, layers: bool, trainer: Any,
           progress: bool) -> Trial:
    """Run a strategy's model-optimization steps (or its layer step) for each of its runs; the best trial.

    Each step builds on the setup of the previous step's best trial (the layer step on the
    best trial of model optimization). `best.json` keeps, per label, the best trial of each
    step, of model optimization ("model") and of layer optimization ("final"). With
    `training.keep_weights: best`, the checkpoints nothing will read go as soon as that is
    known (docs/method.md section 8); so do the activation caches of a layer step's layers.
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
            objective = step.objective(ctx, basis)
            with _executor(ctx, strategy, step.name, basis, objective) as executor:
                best = run_step(ctx, label, step.name, step.space(label_config, basis), objective, observers,
                                executor)
            bests[step.name] = best
            basis = best.setup
        if layers:
            run.update_best(label, final=best.to_record())
            # The activation caches of the layers this step tried: no later step reads them, except
            # model optimization's default layer (later strategies' model steps share its cache).
            backbone = best.setup["backbone"]
            tried = {trial.setup.get("delimiting_layer") for trial in run.trials.of_step(label, LAYER_STEP.name)}
            activations.remove_caches(run.cache_dir, backbone, tried - {None, default_layer(config, backbone)})
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
