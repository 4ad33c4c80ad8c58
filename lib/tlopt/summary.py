"""The run's summary, what a reader wants first: the winner, its setup and scores, the strategies side by side, the time.

Built from the run folder alone (`best.json`, the stored predictions, `repeats.jsonl`,
`trials.jsonl`, the executed notebooks), so the report opens with it and notebook 05
shows it; nothing is predicted or trained here. The scores carry their bootstrap 95 %
intervals (docs/method.md section 14).
"""

from __future__ import annotations

import os
from datetime import datetime

import nbformat
import pandas as pd

from tlopt import analysis, bootstrap, final, objectives
from tlopt.store import RunFolder

SETUP_KEYS = ("backbone", "block_optimizer", "block_learning_rate", "finetune_optimizer", "finetune_learning_rate",
              "delimiting_layer")
SPLITS = ("val", "test")


def stored_evaluations(run: RunFolder | str | os.PathLike) -> list[analysis.Evaluation]:
    """The final models' evaluations whose predictions are stored, never predicting anything."""
    run = RunFolder(run)
    config = run.read_config()
    return [analysis.evaluate_final_model(config, run, strategy, split)
            for strategy in analysis.finished_strategies(run) for split in SPLITS
            if run.predictions_file(strategy, split).is_file()]


def _html(frame: pd.DataFrame) -> str:
    return frame.to_html(border=0, float_format=lambda value: f"{value:.4g}")


def _run_time(run: RunFolder) -> str:
    """From the first notebook's start to the last one's end, and the trials' own training time."""
    times = []
    for path in run.notebooks_dir.glob("*.ipynb"):
        papermill = nbformat.read(path, as_version=4).metadata.get("papermill", {})
        times += [datetime.fromisoformat(papermill[key]) for key in ("start_time", "end_time") if papermill.get(key)]
    trials = run.trials.records()
    training = sum(trial.seconds for trial in [*trials, *run.repeats.records()]) / 60
    line = f"{len(trials)} trials trained for {training:.1f} minutes"
    if times:
        line += f"; the notebooks ran {(max(times) - min(times)).total_seconds() / 60:.1f} minutes from start to end"
    return line + "."


def comparison(run: RunFolder, evaluations: list[analysis.Evaluation], winner: str | None) -> pd.DataFrame:
    """The strategies in one table: backbone, validation accuracy in the search, scores with intervals, trials, minutes."""
    table = analysis.strategy_summary(run)
    if table.empty:
        return table
    scored = analysis.strategy_comparison(evaluations, winner)
    columns = table[["backbone", "final_val_accuracy", "trials", "minutes"]].rename(
        columns={"final_val_accuracy": "search val_accuracy"})
    return columns.join(scored, how="left").fillna("")


def summary_markdown(run: RunFolder | str | os.PathLike) -> str:
    """The summary as Markdown (its tables in HTML): a section for the report and for notebook 05."""
    run = RunFolder(run)
    found = final.winner(run)
    if found is None:
        return f"## Summary\n\nNo strategy has finished: there is no final model yet. {_run_time(run)}"
    strategy, trial = found
    objective = objectives.get(trial.objective)
    evaluations = stored_evaluations(run)
    parts = [
        "## Summary",
        f"**The winner: {strategy}**, the best final model across strategies by the search's objective, "
        f"{objective.label} (ties by the lower loss): trial `{trial.id}`, {objective.label} "
        f"{trial.objective_value:.4f} (validation accuracy {trial.val_accuracy:.4f}, loss {trial.val_loss:.4f}) "
        f"in the search. Export it with `tlopt export {run}`.",
        _html(pd.Series({key: trial.setup.get(key) for key in SETUP_KEYS}).to_frame("setup")),
    ]
    own = [e for e in evaluations if e.strategy == strategy]
    if own:
        scores = pd.DataFrame({e.split: {score: bootstrap.formatted(e.intervals.loc[score])
                                         for score in bootstrap.SUMMARY_SCORES} for e in own})
        parts += ["Its scores with bootstrap 95 % intervals:", _html(scores)]
    else:
        parts.append("Its scores: none yet (notebook 05 evaluates the final models).")
    parts += ["**The strategies side by side** (the winner marked):",
              _html(comparison(run, evaluations, strategy))]
    repeats = [record.val_accuracy for record in run.repeats.records() if record.ok]
    if repeats:
        accuracy = pd.Series([trial.val_accuracy, *repeats])
        parts.append(f"**Training noise**: the winner's setup trained {len(repeats)} more times with other seeds: "
                     f"validation accuracy {accuracy.mean():.4f} +- {accuracy.std():.4f} (standard deviation; "
                     f"min {accuracy.min():.4f}, max {accuracy.max():.4f}) over these {len(accuracy)} runs.")
    parts.append(f"**Time**: {_run_time(run)}")
    return "\n\n".join(parts)
