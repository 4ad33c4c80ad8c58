"""Driving GPyOpt: one BO step at a time, trial by trial, resumable from the trial store.

We do not call GPyOpt's `run_optimization`: it writes its report and
evaluation files only when a run ends, catches `np.linalg.linalg.LinAlgError`
(an AttributeError under numpy 2), and keeps its state in memory. Instead each
step is an ask-and-tell loop that reproduces GPyOpt's loop exactly (random
initial design, a GP/EI suggestion from all evaluations so far, the `eps`
stop when two consecutive points coincide) with GPyOpt doing the modelling.
Every suggestion is a pure function of the finished trials and a seed derived
from the run's seed, the strategy, the step and the trial index; so a resumed
step replays `trials.jsonl` into X and Y and makes the same suggestions an
uninterrupted run would have made.
"""

from __future__ import annotations

import os
import shutil
import time
import traceback
import warnings
import zlib
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from tlopt import backbones, data, plots, store
from tlopt.errors import TloptError
from tlopt.live import LiveAccuracy, in_notebook
from tlopt.space import LAYER_STEP, STEPS, SearchSpace, build_space
from tlopt.strategies import Context, Objective, objective_for

BEST_FILE = "best.json"
STATUS_FILE = "status.json"


class StepFailed(TloptError):
    """Too many consecutive trials of a step failed: something is wrong beyond one trial."""


def _gpyopt():
    """GPyOpt imports pkg_resources; the pin setuptools<82 keeps that import alive."""
    import GPyOpt
    from GPyOpt.core.task.space import Design_space
    from GPyOpt.experiment_design import initial_design

    return GPyOpt, Design_space, initial_design


def step_seed(seed: int, strategy: str, step: str, index: int = 0) -> int:
    """A seed for one draw of one step, stable across processes (unlike hash())."""
    return (zlib.crc32(f"{strategy}/{step}".encode()) + 7919 * seed + 104729 * index) % 2**32


def initial_points(space: SearchSpace, count: int, seed: int) -> np.ndarray:
    """GPyOpt's random initial design, seeded."""
    _, Design_space, initial_design = _gpyopt()
    np.random.seed(seed)
    return initial_design("random", Design_space(space.domain), count)


@contextmanager
def _gp_context():
    """One BLAS thread for GP algebra on tiny matrices, and no GPy overflow chatter.

    With two threads (and TensorFlow's pools busy in the same process) each
    15x15 Cholesky took milliseconds of thread hand-off: a suggestion took
    4 s instead of 0.3 s here. The overflow warnings come from GPy's kernel
    hyperparameter search trying extreme values, which it handles itself.
    """
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _bayesian_optimization(space: SearchSpace, X: np.ndarray, Y: np.ndarray, bo: dict):
    """A GPyOpt BayesianOptimization over the evaluations so far (library defaults)."""
    GPyOpt, _, _ = _gpyopt()
    return GPyOpt.methods.BayesianOptimization(
        f=None,
        domain=space.domain,
        X=X,
        Y=Y,
        acquisition_type=bo["acquisition"],
        normalize_Y=True,
        initial_design_numdata=bo["initial_points"],
        model_update_interval=1,
    )


def suggest(space: SearchSpace, X: np.ndarray, Y: np.ndarray, bo: dict, seed: int) -> np.ndarray:
    """The next point: GP + acquisition (method `bayesian`) or uniform random (`random`).

    Raises `np.linalg.LinAlgError` when the GP cannot be fitted.
    """
    if bo["method"] == "random":
        return initial_points(space, 1, seed)
    np.random.seed(seed)
    with _gp_context():
        return _bayesian_optimization(space, X, Y, bo).suggest_next_locations()


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


def run_trial(objective: Objective, hyperparameters: dict, trial_dir: Path) -> dict:
    """Run one trial; any exception becomes a `failed` record instead of ending the search."""
    started = time.time()
    record: dict[str, Any] = {
        "hyperparameters": hyperparameters,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        outcome = objective(hyperparameters, trial_dir)
    except Exception as error:  # noqa: BLE001 - a trial may fail in any way (NaN, OOM, ...)
        record.update(
            status="failed",
            error=f"{type(error).__name__}: {error}",
            traceback=traceback.format_exc(limit=8),
            val_accuracy=None, val_loss=None, epochs=None, stopped_by="failed", weights=None,
            setup={}, phases={},
        )
    else:
        scored = outcome.scored
        record.update(
            status="ok",
            error=None,
            val_accuracy=float(scored.val_accuracy),
            val_loss=float(scored.val_loss),
            epochs=int(scored.epochs),
            stopped_by=scored.stopped_by,
            weights=str(scored.weights_path),
            setup=outcome.setup,
            phases={name: _phase_summary(result) for name, result in outcome.phases.items()},
        )
    record["seconds"] = time.time() - started
    return record


def score(record: dict) -> float:
    """The value BO maximizes; a failed trial scores the worst possible accuracy."""
    return record["val_accuracy"] if record["status"] == "ok" else 0.0


def best_record(records: list[dict]) -> dict | None:
    """Highest validation accuracy; ties (at 1.0, say) broken by lower validation loss."""
    finished = [r for r in records if r["status"] == "ok"]
    if not finished:
        return None
    return max(finished, key=lambda r: (r["val_accuracy"], -r["val_loss"]))


def _write_gpyopt_files(step_dir: Path, space: SearchSpace, X: np.ndarray, Y: np.ndarray,
                        bo: dict, seconds: float) -> None:
    """GPyOpt's own report and evaluation files, rewritten after every trial."""
    optimizer = _bayesian_optimization(space, X, Y, bo)
    optimizer.num_acquisitions = max(0, len(X) - bo["initial_points"])
    optimizer.max_iter = bo["iterations"]
    optimizer.eps = bo["eps"]
    optimizer.cum_time = seconds
    for name, write in (("evaluations.txt", optimizer.save_evaluations), ("report.txt", optimizer.save_report)):
        temporary = step_dir / f".{name}.tmp"
        write(str(temporary))
        os.replace(temporary, step_dir / name)


def _save_figure(figure, path: Path) -> None:
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    figure.savefig(temporary, dpi=100)
    os.replace(temporary, path)


def surrogate_surface(space: SearchSpace, X: np.ndarray, Y: np.ndarray, bo: dict) -> dict | None:
    """The GP's prediction and the acquisition on a grid, for domains of 1 or 2 variables.

    Values are turned back into validation accuracy (GPyOpt models the
    normalized, negated accuracy). None for larger domains.
    """
    variables = space.variables
    numeric = [v for v in variables if not hasattr(v, "options")]
    choices = [v for v in variables if hasattr(v, "options")]
    if len(variables) > 2 or not numeric or len(choices) > 1:
        return None
    optimizer = _bayesian_optimization(space, X, Y, bo)
    with _gp_context():
        optimizer._update_model(optimizer.normalization_type)
    Y = np.asarray(Y, dtype=float)
    y_mean, y_std = Y.mean(), (Y.std() if Y.std() > 0 else 1.0)

    def predict(zipped: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        unzipped = optimizer.space.unzip_inputs(zipped)
        mean, std = optimizer.model.predict(unzipped)
        acquisition = -optimizer.acquisition.acquisition_function(unzipped)
        return -(mean.ravel() * y_std + y_mean), std.ravel() * y_std, acquisition.ravel()

    def grid(variable) -> np.ndarray:
        low, high = variable.domain()["domain"][0], variable.domain()["domain"][-1]
        if variable.domain()["type"] == "discrete":
            return np.array(variable.domain()["domain"], dtype=float)
        return np.linspace(low, high, 200)

    def label(variable) -> str:
        return f"log10 {variable.name}" if getattr(variable, "scale", None) == "log" else variable.name

    if len(numeric) == 2:
        gx, gy = grid(numeric[0])[:60], grid(numeric[1])[:60]
        mesh_x, mesh_y = np.meshgrid(np.linspace(gx[0], gx[-1], 60), np.linspace(gy[0], gy[-1], 60))
        zipped = np.column_stack([mesh_x.ravel(), mesh_y.ravel()])
        mean, std, acquisition = predict(zipped)
        return {
            "kind": "grid2d", "mean": mean.reshape(mesh_x.shape), "std": std.reshape(mesh_x.shape),
            "acquisition": acquisition.reshape(mesh_x.shape), "points": np.asarray(X, dtype=float),
            "x_range": (gx[0], gx[-1]), "y_range": (gy[0], gy[-1]),
            "x_label": label(numeric[0]), "y_label": label(numeric[1]),
        }

    variable = numeric[0]
    column = variables.index(variable)
    categories = [(None, "")] if not choices else [
        (index, name) for index, name in enumerate(choices[0].options)
    ]
    curves = []
    for category, name in categories:
        values = grid(variable)
        zipped = np.zeros((len(values), len(variables)))
        zipped[:, column] = values
        observed = np.ones(len(X), dtype=bool)
        if category is not None:
            choice_column = variables.index(choices[0])
            zipped[:, choice_column] = category
            observed = np.asarray(X)[:, choice_column] == category
        mean, std, acquisition = predict(zipped)
        curves.append({
            "label": name, "grid": values, "mean": mean, "std": std, "acquisition": acquisition,
            "points_x": np.asarray(X)[observed, column], "points_y": -np.asarray(Y)[observed, 0],
        })
    return {"kind": "curves", "curves": curves, "x_label": label(variable)}


def _progress(total: int, done: int, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=description, unit="trial", leave=True)


def run_step(ctx: Context, run_dir: Path, strategy: str, step: str, space: SearchSpace,
             objective: Objective, progress: bool = True) -> dict:
    """Run (or resume, or skip when finished) one BO step; return its best trial record.

    `strategy` is the label the step is stored under: the strategy's name, or
    `strategy@Backbone` in per-backbone mode.
    """
    bo = ctx.params["bo"]
    trial_store = store.TrialStore(run_dir)
    step_dir = run_dir / strategy / step
    step_dir.mkdir(parents=True, exist_ok=True)
    done = trial_store.of_step(strategy, step)
    if (step_dir / STATUS_FILE).is_file():
        return _best_or_fail(done, strategy, step)

    budget = bo["initial_points"] + bo["iterations"]
    seed = ctx.params["seed"]
    design = initial_points(space, bo["initial_points"], step_seed(seed, strategy, step))
    X = np.array([r["x"] for r in done], dtype=float).reshape(len(done), len(space.variables))
    Y = np.array([[-score(r)] for r in done], dtype=float).reshape(len(done), 1)
    failures = 0
    for record in reversed(done):
        if record["status"] != "failed":
            break
        failures += 1

    stop_reason = "budget"
    bar = _progress(budget, len(done), f"{strategy}/{step}") if progress else None
    try:
        while len(done) < budget:
            index = len(done)
            if index < bo["initial_points"]:
                x, how = design[index : index + 1], "initial"
            else:
                if len(X) > 1 and np.sqrt(np.sum((X[-1] - X[-2]) ** 2)) <= bo["eps"]:
                    stop_reason = "eps: two consecutive points coincide"
                    break
                try:
                    x = suggest(space, X, Y, bo, step_seed(seed, strategy, step, index))
                except np.linalg.LinAlgError as error:
                    stop_reason = f"singular GP fit: {error}"
                    break
                how = bo["method"]
            trial_id = f"{strategy}-{step}-{index:03d}"
            trial_dir = run_dir / "runs" / trial_id
            for observer in ctx.observers:
                observer.start_trial(trial_id)
            shutil.rmtree(trial_dir, ignore_errors=True)  # what a killed attempt left behind
            record = {
                "id": trial_id, "strategy": strategy, "step": step, "index": index,
                "method": how, "x": x.reshape(-1).tolist(),
                **run_trial(objective, space.decode(x), trial_dir),
            }
            trial_store.append(record)
            done.append(record)
            X = np.vstack([X, x.reshape(1, -1)])
            Y = np.vstack([Y, [[-score(record)]]])
            _write_gpyopt_files(step_dir, space, X, Y, bo, sum(r["seconds"] for r in done))
            _save_figure(plots.convergence_figure(X, -Y), step_dir / "convergence.png")
            failures = failures + 1 if record["status"] == "failed" else 0
            if bar is not None:
                best = best_record(done)
                bar.set_postfix(best=f"{best['val_accuracy']:.3f}" if best else "n/a")
                bar.update(1)
            if failures >= bo["max_consecutive_failures"]:
                raise StepFailed(
                    f"{strategy}/{step}: {failures} consecutive trials failed; last error: {record['error']}"
                )
    finally:
        if bar is not None:
            bar.close()

    surface = surrogate_surface(space, X, Y, bo) if bo["method"] == "bayesian" and len(X) > 1 else None
    if surface is not None:
        _save_figure(plots.acquisition_figure(surface), step_dir / "acquisition.png")
    store.atomic_write_json(step_dir / STATUS_FILE, {"trials": len(done), "stop_reason": stop_reason})
    return _best_or_fail(done, strategy, step)


def _best_or_fail(records: list[dict], strategy: str, step: str) -> dict:
    best = best_record(records)
    if best is None:
        raise StepFailed(f"{strategy}/{step}: no trial finished successfully")
    return best


def make_context(params: dict, run_dir: Path, trainer: ModuleType | Any | None = None,
                 live: bool = False, title: str = "") -> Context:
    """Read the run's split manifest and settings once for every objective of a run.

    `live` adds the notebook's live figure of validation accuracy per epoch.
    """
    from tlopt import training

    frame = data.read_manifest(Path(run_dir) / store.SPLIT_FILE)
    return Context(
        params=params,
        frame=frame,
        class_names=data.class_names(frame),
        settings=training.TrainingSettings.from_params(params, cache_dir=Path(run_dir) / "cache"),
        trainer=trainer or training,
        observers=[LiveAccuracy(f"{title}: validation accuracy per epoch")] if live else [],
    )


def _update_best(run_dir: Path, label: str, **entries: Any) -> dict:
    path = run_dir / label / BEST_FILE
    current = store.read_json(path) if path.is_file() else {"strategy": label}
    updated = {**current, **entries}
    store.atomic_write_json(path, updated)
    return updated


def strategy_runs(params: dict, strategy: str) -> list[tuple[str, dict]]:
    """(label, parameters) of each run of a strategy: itself, or one run per backbone.

    Per-backbone mode (`bo.per_backbone`, the thesis's own recommendation)
    runs the strategy and its layer optimization separately for every
    backbone, labelled `strategy@Backbone`, so that no backbone loses only
    because the default delimiting layer suits it badly.
    """
    if not params["bo"]["per_backbone"] or len(params["backbones"]) == 1:
        return [(strategy, params)]
    return [(f"{strategy}@{name}", {**params, "backbones": [name]}) for name in params["backbones"]]


def run_strategy(params: dict, strategy: str, run_dir: Path | None = None,
                 trainer: ModuleType | Any | None = None, progress: bool = True) -> dict:
    """Run every model-optimization step of `strategy`; return its best trial record."""
    if strategy not in STEPS:
        raise TloptError(f"unknown strategy '{strategy}' (known: {', '.join(STEPS)})")
    run_dir = store.open_run(params, run_dir)
    ctx = make_context(params, run_dir, trainer, live=progress and in_notebook(), title=strategy)
    winners = {}
    for label, run_params in strategy_runs(params, strategy):
        best: dict | None = None
        steps: dict[str, dict] = {}
        for step in STEPS[strategy]:
            space = build_space(run_params, strategy, step)
            objective = objective_for(ctx, strategy, step, best["setup"] if best else None)
            best = run_step(ctx, run_dir, label, step, space, objective, progress)
            steps[step] = best
        _update_best(run_dir, label, steps=steps, model=best)
        winners[label] = best
    overall = best_record(list(winners.values()))
    if len(winners) > 1:
        _update_best(run_dir, strategy, per_backbone={k: v["id"] for k, v in winners.items()}, model=overall)
    return overall


def run_layer_optimization(params: dict, strategy: str, run_dir: Path | None = None,
                           trainer: ModuleType | Any | None = None, progress: bool = True) -> dict:
    """BO over the delimiting layer alone, from the best trial of `strategy`; its final model."""
    run_dir = store.open_run(params, run_dir)
    ctx = make_context(params, run_dir, trainer, live=progress and in_notebook(),
                       title=f"{strategy}: layer optimization")
    finals = {}
    for label, run_params in strategy_runs(params, strategy):
        best_file = run_dir / label / BEST_FILE
        if not best_file.is_file():
            raise TloptError(f"{best_file} is missing: run strategy '{strategy}' before its layer optimization")
        best = store.read_json(best_file)["model"]
        space = build_space(run_params, strategy, LAYER_STEP, backbones.layer_count(best["setup"]["backbone"]))
        objective = objective_for(ctx, strategy, LAYER_STEP, best["setup"])
        finals[label] = run_step(ctx, run_dir, label, LAYER_STEP, space, objective, progress)
        _update_best(run_dir, label, final=finals[label])
    overall = best_record(list(finals.values()))
    if len(finals) > 1:
        _update_best(run_dir, strategy, final=overall)
    return overall


def read_trials(run_dir: str | Path):
    """Every finished trial of a run as a DataFrame."""
    return store.read_trials(run_dir)
