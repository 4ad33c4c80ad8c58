"""The end of a run: the one final model it names (the winner), and that setup trained again with other seeds.

Every strategy ends with a final model; the winner is the best of them by the search's own
objective on validation (`trials.best_trial`, ties by the lower validation loss), recorded
in `best.json` at the run's root. `final.repeats` trains the winner's setup again, both
phases, with other seeds (docs/method.md section 14): the spread of those results is the
training noise, against which a difference between strategies can be judged. The repeats
go through the run's trainer like any trial and are kept in `repeats.jsonl`, so a stopped
run resumes them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import pandas as pd

from tlopt import analysis
from tlopt.errors import TloptError
from tlopt.files import atomic_write_json, to_json
from tlopt.optimize import TrialRequest, make_context, run_trial
from tlopt.params import Experiment
from tlopt.store import RunFolder
from tlopt.strategies import train_setup
from tlopt.trials import Trial, TrialState, best_trial

REPEAT_STEP = "repeat"


def _finals(run: RunFolder | str | os.PathLike) -> dict[str, Trial]:
    return {strategy: analysis.final_trial(run, strategy) for strategy in analysis.finished_strategies(run)}


def winner(run: RunFolder | str | os.PathLike) -> tuple[str, Trial] | None:
    """(strategy, final trial) of the best final model across the finished strategies; None when none finished."""
    finals = _finals(run)
    best = best_trial(finals.values())
    if best is None:
        return None
    return next((strategy, trial) for strategy, trial in finals.items() if trial is best)


def name_winner(run: RunFolder | str | os.PathLike) -> dict[str, Any]:
    """Write `best.json` at the run's root (the winner, its trial, every candidate's score); return its content."""
    run = RunFolder(run)
    found = winner(run)
    if found is None:
        raise TloptError(f"{run} has no final model yet: no strategy has finished")
    strategy, trial = found
    record = {
        "strategy": strategy,
        "trial": trial.to_record(),
        "candidates": {name: {"trial": final.id, "score": final.score, "val_accuracy": final.val_accuracy,
                              "val_loss": final.val_loss} for name, final in _finals(run).items()},
    }
    if not run.winner_file.is_file() or run.read_winner() != json.loads(to_json(record)):
        atomic_write_json(run.winner_file, record)  # only when it changes: a resumed run rewrites nothing
    return record


def repeat_seed(config: Experiment, repeat: int) -> int:
    """The seed of repeat 1, 2, ...: the run's seed plus the repeat's number (repeat 0 is the winner itself)."""
    return config.seed + repeat


def repeat_winner(config: Experiment, run: RunFolder | str | os.PathLike, trainer: Any = None) -> list[Trial]:
    """Train the winner's setup `final.repeats` times with other seeds; every repeat's `Trial`, in order.

    Both phases train again (the classification block depends on the seed too); the
    delimiting layer, optimizers and rates are the winner's. Finished repeats are read from
    `repeats.jsonl`, not trained again. A repeat that fails is recorded as failed. Its
    checkpoints are deleted unless `training.keep_weights` is `all`.
    """
    run = RunFolder(run)
    strategy = name_winner(run)["strategy"]
    setup = {key: value for key, value in analysis.final_trial(run, strategy).setup.items() if key != "block_weights"}
    done = {trial.index: trial for trial in run.repeats.records()}
    for repeat in range(1, config.final.repeats + 1):
        if repeat in done:
            continue
        seeded = config.updated({"seed": repeat_seed(config, repeat)})
        ctx = make_context(seeded, run, trainer)
        trial_id = f"{REPEAT_STEP}-{repeat:03d}"
        request = TrialRequest(trial_id, strategy, REPEAT_STEP, repeat, REPEAT_STEP, [],
                               {"seed": seeded.seed}, run.trial(trial_id))
        done[repeat] = run_trial(lambda hp, folder, ctx=ctx: train_setup(ctx, folder, setup), request)
        run.repeats.append(done[repeat])
        if config.training.keep_weights == "best":
            request.folder.remove_weights()  # a repeat's result is its score; nothing reads its model
    return [done[repeat] for repeat in sorted(done) if repeat <= config.final.repeats]


def repeats_table(config: Experiment, run: RunFolder | str | os.PathLike) -> pd.DataFrame:
    """The winner (repeat 0, the run's seed) and each repeat: seed, validation accuracy and loss, epochs, status."""
    run = RunFolder(run)
    strategy = name_winner(run)["strategy"]
    original = dataclasses.replace(analysis.final_trial(run, strategy), index=0, hyperparameters={"seed": config.seed})
    rows = [original, *run.repeats.records()]
    return pd.DataFrame([{
        "repeat": row.index, "trial": row.id, "seed": row.hyperparameters.get("seed"),
        "val_accuracy": row.val_accuracy, "val_loss": row.val_loss, "epochs": row.epochs, "status": str(row.status),
    } for row in rows]).set_index("repeat")


def repeats_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation, minimum and maximum of the finished runs' validation accuracy and loss."""
    finished = table[table["status"] == TrialState.OK]
    return finished[["val_accuracy", "val_loss"]].agg(["count", "mean", "std", "min", "max"]).T
