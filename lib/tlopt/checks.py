"""The checks the strategy notebooks end with: a finished search is what its files say it is.

Each raises AssertionError with a message naming what is wrong; a notebook's last cell
calls one, so `tlopt run` and the notebook tests fail on a search that broke its promises.
"""

from __future__ import annotations

from itertools import pairwise

from tlopt import backbones, objectives
from tlopt.analysis import strategy_trials
from tlopt.params import Experiment
from tlopt.store import RunFolder
from tlopt.strategies import LAYER_STEP, get_strategy, strategy_runs
from tlopt.trials import Trial, TrialState, best_trial


def _check_search(config: Experiment, run: RunFolder, strategy: str, steps: tuple[str, ...], best: Trial) -> None:
    """Budgets kept, the best trial the best of the last step, the checkpoints kept, convergence plots on disk."""
    trials = strategy_trials(run, strategy, steps)
    finished = trials[trials["status"] == TrialState.OK]
    assert (trials.groupby(["strategy", "step"]).size() <= config.bo.budget).all(), \
        "a step ran more trials than its budget"
    last = finished[finished["step"] == steps[-1]]["objective_value"]
    assert best.score == last.map(objectives.get(config.objective).score).max(), \
        "the best trial is not the best of the last step"
    _check_checkpoints(config, run, strategy, steps)
    for label, _ in strategy_runs(config, strategy):
        for step in steps:
            assert (run.step_dir(label, step) / "convergence.png").is_file(), f"{label}/{step}: no convergence plot"


def _check_checkpoints(config: Experiment, run: RunFolder, strategy: str, steps: tuple[str, ...]) -> None:
    """The checkpoints later steps and the final evaluation read are on disk; with `training.keep_weights: best`
    no other (each step's best keeps its own, but model optimization's gives way to the final model's)."""
    keep_all = config.training.keep_weights == "all"
    for label, _ in strategy_runs(config, strategy):
        best_file = run.read_best(label)
        superseded = best_file["model"]["id"] if "final" in best_file and not keep_all else None
        for step in steps:
            finished = [trial for trial in run.trials.of_step(label, step) if trial.ok]
            best = best_trial(finished)
            for trial in finished:
                if keep_all or trial is best:
                    assert trial.id == superseded or run.local(trial.weights).is_file(), f"{trial.id} lost its weights"
                else:
                    folder = run.trial(trial.id)
                    assert not any(folder.weights(phase).is_file() for phase in ("block", "finetune")), \
                        f"{trial.id} was beaten in its step and still has its checkpoints"
            if best is not None and "block_weights" in best.setup:
                assert run.local(best.setup["block_weights"]).is_file(), f"{best.id}: its block weights are gone"


def _check_builds_on(trial: Trial, basis: dict) -> None:
    """`trial` kept the setup of the trial it built on, but for what its own step searched."""
    searched = set(trial.hyperparameters) | {key for key in trial.setup if key.startswith("delimiting")}
    changed = sorted(key for key, value in basis.items() if key not in searched and trial.setup.get(key) != value)
    assert not changed, f"{trial.id} does not build on the best setup of the step before it: {changed} differ"


def check_strategy(config: Experiment, run: RunFolder, strategy: str, best: Trial) -> None:
    """After model optimization of `strategy` (notebooks 01-03); each step built on the one before."""
    steps = get_strategy(strategy).step_names
    _check_search(config, run, strategy, steps, best)
    assert run.read_best(strategy)["model"]["id"] == best.id, "best.json does not hold the best trial"
    stored = run.read_best(best.strategy)["steps"]
    for earlier, later in pairwise(steps):
        _check_builds_on(Trial.from_record(stored[later]), stored[earlier]["setup"])
    if strategy == "joint":
        assert "delimiting_fraction" in best.setup, "joint searches the delimiting fraction"


def check_layer_optimization(config: Experiment, run: RunFolder, strategy: str, final: Trial) -> None:
    """After layer optimization of `strategy` (notebook 04): only the delimiting layer changed."""
    _check_search(config, run, strategy, (LAYER_STEP.name,), final)
    assert run.read_best(strategy)["final"]["id"] == final.id, "best.json does not hold the final model"
    _check_builds_on(final, run.read_best(final.strategy)["model"]["setup"])
    assert 0 <= final.setup["delimiting_layer"] <= backbones.layer_count(final.setup["backbone"])
    if config.bo.method == "bayesian" and config.bo.budget > 1:
        for label, _ in strategy_runs(config, strategy):
            assert (run.step_dir(label, LAYER_STEP.name) / "acquisition.png").is_file(), \
                f"{label}: the 1-D surrogate plot is missing"
