"""What a run folder says: the tables that notebooks 01-05 and the report show.

Every function reads the run folder (`tlopt.store.RunFolder`: `trials.jsonl`,
`runs/<trial>/`, `<strategy>/best.json`, `split.csv`), so notebooks stay a sequence of
calls and a test can check each table on a small run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tlopt import bootstrap, data, metrics, objectives
from tlopt.errors import TloptError
from tlopt.files import atomic_write_json, read_json
from tlopt.params import Experiment
from tlopt.plots import trial_values
from tlopt.store import RunFolder
from tlopt.strategies import strategy_names
from tlopt.trials import Trial, TrialState

PHASES = ("block", "finetune")
RESULT_COLUMNS = ["val_accuracy", "val_loss", "epochs", "stopped_by", "status", "seconds"]
EXTERNAL = "external"  # the split name of the external test set (`data.external_test`)
Run = RunFolder | str | os.PathLike


def finished_strategies(run: Run) -> list[str]:
    """Strategies whose model optimization finished (they have a best.json), in registry order."""
    run = RunFolder(run)
    return [name for name in strategy_names() if run.best_file(name).is_file()]


def of_strategy(labels: pd.Series, strategy: str) -> pd.Series:
    """Which trial labels belong to `strategy`: itself, or `strategy@Backbone` in per-backbone mode."""
    return (labels == strategy) | labels.str.startswith(f"{strategy}@")


def read_trials(run: Run) -> pd.DataFrame:
    """Every finished trial of a run as a table, nested fields flattened (`setup.backbone`, ...)."""
    return RunFolder(run).trials.frame()


def strategy_trials(run: Run, strategy: str, steps: tuple[str, ...] | None = None) -> pd.DataFrame:
    """The finished trials of one strategy (optionally of some of its steps), in finishing order."""
    trials = read_trials(run)
    if trials.empty:
        return trials
    rows = trials[of_strategy(trials["strategy"], strategy)]
    if steps is not None:
        rows = rows[rows["step"].isin(steps)]
    return rows.reset_index(drop=True)


def compared_trials(run: Run, other_runs: Sequence[Run] = ()) -> pd.DataFrame:
    """The trials of this run and of other runs (random search on the same data, say), labelled.

    `label` is the strategy for this run's trials and `strategy [run name]` for the others'.
    """
    frames = [read_trials(run).assign(label=lambda t: t["strategy"])]
    for other in other_runs:
        name = RunFolder(other).name
        frames.append(read_trials(other).assign(label=lambda t: t["strategy"] + f" [{name}]"))
    compared = pd.concat(frames, ignore_index=True)
    if compared["objective"].nunique() > 1:
        raise TloptError(f"runs optimizing different objectives cannot be compared: "
                         f"{', '.join(compared['objective'].unique())}")
    return compared


def _objective_column(trials: pd.DataFrame) -> dict[str, str]:
    """The objective's value under its own log key (`val_balanced_accuracy`), unless a result column holds it."""
    objective = objectives.get(trials["objective"].iloc[0] if len(trials) else None)
    return {} if objective.key in RESULT_COLUMNS else {"objective_value": objective.key}


def trials_table(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per trial: what BO chose (decoded), the delimiting layer trained, and the result
    (the objective's value first, when it is not validation accuracy or loss)."""
    chosen = [c for c in trials.columns if c.startswith("hyperparameters.") and trials[c].notna().any()]
    searched = "hyperparameters.delimiting_layer" in chosen  # layer optimization chose it
    layer = ["setup.delimiting_layer"] if "setup.delimiting_layer" in trials.columns and not searched else []
    objective = _objective_column(trials)
    table = trials[["id", "step", "method", *chosen, *layer, *objective, *RESULT_COLUMNS]]
    names = {c: c.removeprefix("hyperparameters.").removeprefix("setup.") for c in chosen + layer}
    return table.rename(columns={**names, **objective}).set_index("id")


def bo_improvement(trials: pd.DataFrame) -> pd.DataFrame:
    """Per BO step: the objective's best value among the random initial points against the best of all trials.

    `improved` says whether a point chosen by the optimizer beat every initial point.
    """
    objective, values = trial_values(trials)
    best = np.max if objective.maximized else np.min
    rows = []
    for (strategy, step), group in trials.assign(value=values).groupby(["strategy", "step"], sort=False):
        value = group["value"]
        initial = group["method"] == "initial"
        best_initial = best(value[initial]) if initial.any() else np.nan
        best_later = best(value[~initial]) if (~initial).any() else np.nan
        improved = best_later > best_initial if objective.maximized else best_later < best_initial
        rows.append({
            "strategy": strategy, "step": step, "trials": len(group),
            "best_initial": best_initial, "best_after_initial": best_later,
            "best": best(value), "improved": bool(improved),
        })
    return pd.DataFrame(rows)


def _validation_wall_times(events_dir: Path) -> dict[int, float]:
    """Epoch -> wall-clock time of its validation, from the TensorBoard event files of a phase."""
    from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator

    if not events_dir.is_dir():
        return {}
    accumulator = EventAccumulator(str(events_dir), size_guidance={TENSORS: 0})
    accumulator.Reload()
    if "epoch_accuracy" not in accumulator.Tags()["tensors"]:
        return {}
    return {event.step: event.wall_time for event in accumulator.Tensors("epoch_accuracy")}


def epoch_history(run: Run, trials: pd.DataFrame) -> pd.DataFrame:
    """Every epoch of every run of `trials`: its scalars (history.csv) and when it ended.

    `minutes` counts from the start of the run's first trial; the epoch's end comes from
    the TensorBoard event files, which record the wall-clock time of each validation.
    """
    run = RunFolder(run)
    frames = []
    for trial in trials.itertuples():
        folder = run.trial(trial.id)
        for phase in PHASES:
            csv = folder.history(phase)
            if not csv.is_file():
                continue
            epochs = pd.read_csv(csv)
            times = _validation_wall_times(folder.tensorboard(phase) / "validation")
            frames.append(epochs.assign(
                trial=trial.id, strategy=trial.strategy, step=trial.step, phase=phase,
                wall_time=epochs["epoch"].map(times).astype(float),
            ))
    if not frames:
        return pd.DataFrame(columns=["trial", "strategy", "step", "phase", "epoch", "val_accuracy", "minutes"])
    history = pd.concat(frames, ignore_index=True)
    started = min(datetime.fromisoformat(value).timestamp() for value in trials["started_at"])
    return history.assign(minutes=(history["wall_time"] - started) / 60)


def final_trial(run: Run, strategy: str) -> Trial:
    """The strategy's final model: the best trial of layer optimization, else of model optimization."""
    best = RunFolder(run).read_best(strategy)
    return Trial.from_record(best.get("final") or best["model"])


def trial_summary(trial: Trial) -> pd.DataFrame:
    """A trial's id, result (the objective's value under its log key) and complete setup, as one column
    (what `best.json` keeps)."""
    result = {"val_accuracy": trial.val_accuracy, "val_loss": trial.val_loss,
              objectives.get(trial.objective).key: trial.objective_value}
    return pd.Series({"trial": trial.id, **result, **trial.setup}).to_frame(trial.step)


def strategy_summary(run: Run) -> pd.DataFrame:
    """One row per finished strategy: its final hyperparameters, accuracies (and the objective's values,
    when it is another measure), trials and time."""
    run = RunFolder(run)
    trials = read_trials(run)
    rows = []
    for strategy in finished_strategies(run):
        best = run.read_best(strategy)
        final = final_trial(run, strategy)
        setup = final.setup
        own = trials[of_strategy(trials["strategy"], strategy)]
        rows.append({
            "strategy": strategy,
            "backbone": setup["backbone"],
            "block_optimizer": setup["block_optimizer"],
            "block_learning_rate": setup["block_learning_rate"],
            "finetune_optimizer": setup["finetune_optimizer"],
            "finetune_learning_rate": setup["finetune_learning_rate"],
            "delimiting_layer": setup["delimiting_layer"],
            "model_val_accuracy": best["model"]["val_accuracy"],
            "final_val_accuracy": best["final"]["val_accuracy"] if "final" in best else np.nan,
            **_objective_values(best),
            "final_trial": final.id,
            "trials": len(own),
            "minutes": own["seconds"].sum() / 60,
        })
    return pd.DataFrame(rows).set_index("strategy") if rows else pd.DataFrame()


def _objective_values(best: dict) -> dict[str, float]:
    """`model_<key>` and `final_<key>` of a best.json's trials, for an objective other than validation accuracy."""
    model = Trial.from_record(best["model"])
    key = objectives.get(model.objective).key
    if key == "val_accuracy":
        return {}
    final = Trial.from_record(best["final"]).objective_value if "final" in best else np.nan
    return {f"model_{key}": model.objective_value, f"final_{key}": final}


@dataclass
class Evaluation:
    """A final model's predictions on one split, scored.

    `intervals`: the bootstrap estimate and 95 % interval of each score (`tlopt.bootstrap`).
    `probabilities`: every class's probability per image, None for predictions that a
    first version of tlopt stored (classes only); `true` and `paths` in the same order.
    """

    strategy: str
    split: str
    metrics: pd.DataFrame
    confusion: pd.DataFrame
    intervals: pd.DataFrame | None = None
    true: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    paths: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """`<strategy> (<split>)`, how tables and figures name it."""
        return f"{self.strategy} ({self.split})"


def _predict_split(config: Experiment, run: RunFolder, strategy: str, rows: pd.DataFrame, names: list[str],
                   trainer: Any) -> dict:
    """The stored form of a split's predictions: the images, true and predicted classes, every probability.

    A trainer's `predict` gives probabilities (images x classes); class indices alone are
    accepted too (stored as they are, as tlopt 0.1.0 stored them).
    """
    final = final_trial(run, strategy)
    output = np.asarray(trainer.predict(final.setup["backbone"], run.local(final.weights), rows, names, config))
    predictions = {"trial": final.id, "class_names": names, "path": rows["path"].tolist(),
                   "true": rows["label"].map(names.index).tolist()}
    if output.ndim == 2:
        return {**predictions, "predicted": output.argmax(axis=1).tolist(), "probabilities": output.tolist()}
    return {**predictions, "predicted": output.tolist()}


def evaluate_final_model(config: Experiment, run: Run, strategy: str, split: str = "val",
                         trainer: Any = None) -> Evaluation:
    """Predict `split` with the strategy's final weights; per-class metrics, confusion matrix, intervals.

    `split` is one of the split's (val, test) or `EXTERNAL`, the external test set
    (`data.external_test`), which the search never saw. The predictions are stored
    (`<strategy>/predictions-<split>.json`, every class's probability included) and reused,
    so the held-out and external test sets are predicted exactly once, after all
    optimization, however often the analysis runs. Files stored by the first version
    (classes only) are read as they are. The intervals resample whole groups when the split
    keeps groups together (`data.group_pattern`); `final.bootstrap_samples` resamples,
    seeded by the run's seed. `trainer` defaults to `tlopt.training`.
    """
    if trainer is None:
        from tlopt import training as trainer
    run = RunFolder(run)
    manifest = data.read_split(run)
    names = data.class_names(manifest)
    rows = data.read_external(run) if split == EXTERNAL else manifest[manifest["split"] == split]
    if rows is None:
        raise TloptError(f"{run} has no external test set (data.external_test)")
    stored = run.predictions_file(strategy, split)
    if stored.is_file():
        predictions = read_json(stored)
    else:
        predictions = _predict_split(config, run, strategy, rows, names, trainer)
        atomic_write_json(stored, predictions)
    true, predicted = np.asarray(predictions["true"]), np.asarray(predictions["predicted"])
    grouped = config.data.group_pattern and "group" in rows
    groups = rows.set_index("path")["group"].reindex(predictions["path"]) if grouped else None
    probabilities = predictions.get("probabilities")
    return Evaluation(
        strategy=strategy,
        split=split,
        metrics=metrics.per_class_metrics(true, predicted, names),
        confusion=metrics.confusion_matrix(true, predicted, names),
        intervals=bootstrap.intervals(true, predicted, names, config.final.bootstrap_samples, config.seed, groups),
        true=true,
        probabilities=None if probabilities is None else np.asarray(probabilities, dtype=np.float32),
        paths=list(predictions["path"]),
    )


def baseline_comparison(evaluations: list[Evaluation], dataset: str) -> pd.DataFrame | None:
    """The dataset paper's baselines with the average row of each final model; None if unknown."""
    tables = [
        metrics.compare_with_baselines(e.metrics, dataset, model_name=f"tlopt {e.strategy} ({e.split})")
        for e in evaluations
    ]
    if not tables or tables[0] is None:
        return None
    combined = pd.concat(tables)
    return combined[~combined.index.duplicated()]


def _phase_column(trials: pd.DataFrame, phase: str, field: str) -> pd.Series:
    """A `phases.<phase>.<field>` column, or missing values when no trial had that phase."""
    return trials.get(f"phases.{phase}.{field}", pd.Series(np.nan, index=trials.index))


def time_per_strategy(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials, failures, epochs trained and minutes spent, per strategy and step."""
    epochs = sum(_phase_column(trials, phase, "epochs").fillna(0) for phase in PHASES)
    frame = trials.assign(
        failed=trials["status"] == TrialState.FAILED, epochs_trained=epochs, minutes=trials["seconds"] / 60
    )
    return (
        frame.groupby(["strategy", "step"], sort=False)
        .agg(trials=("id", "size"), failed=("failed", "sum"), epochs=("epochs_trained", "sum"),
             minutes=("minutes", "sum"))
        .reset_index()
    )


def nonconvergence_savings(trials: pd.DataFrame, config: Experiment) -> pd.DataFrame:
    """Per strategy and phase: runs the filter stopped, and the epochs and minutes it saved.

    A stopped run would otherwise have trained at most to the phase's epoch limit, so the
    saved epochs are an upper bound (EarlyStopping might have ended some runs sooner);
    minutes saved assume the stopped run's average time per epoch.
    """
    limits = {"block": config.training.block_epochs, "finetune": config.training.finetune_epochs}
    rows = []
    for phase in PHASES:
        epochs = _phase_column(trials, phase, "epochs")
        stopped = _phase_column(trials, phase, "stopped_by") == "nonconvergence"
        seconds = _phase_column(trials, phase, "seconds")
        frame = pd.DataFrame({
            "strategy": trials["strategy"],
            "runs": epochs.notna(),
            "stopped": stopped,
            "epochs_run": epochs.fillna(0),
            "epochs_saved": (limits[phase] - epochs).where(stopped, 0),
            "minutes_saved": ((limits[phase] - epochs) * seconds / epochs / 60).where(stopped, 0),
        })
        summary = frame.groupby("strategy", sort=False).sum().reset_index()
        rows.append(summary.assign(phase=phase))
    table = pd.concat(rows, ignore_index=True)
    table = table[table["runs"] > 0]
    share = table["epochs_saved"] / (table["epochs_run"] + table["epochs_saved"])
    table = table.assign(share_of_epochs_saved=share.fillna(0.0))
    columns = ["strategy", "phase", "runs", "stopped", "epochs_run", "epochs_saved", "share_of_epochs_saved",
               "minutes_saved"]
    return table[columns].astype({"runs": int, "stopped": int, "epochs_run": int, "epochs_saved": int})


def split_counts(split: pd.DataFrame) -> pd.DataFrame:
    """Images per class and split, with totals: the table next to the class-count figure."""
    return pd.crosstab(split["label"], split["split"], margins=True, margins_name="total")


def split_balance(split: pd.DataFrame) -> pd.DataFrame:
    """Per split: images, classes, groups (patients, videos), the largest and the smallest class and their
    ratio (the imbalance ratio; 1 for balanced classes)."""
    rows = {}
    for name, rows_of_split in split.groupby("split", sort=False):
        counts = rows_of_split["label"].value_counts()
        rows[name] = {"images": len(rows_of_split), "classes": len(counts), "groups": rows_of_split["group"].nunique(),
                      "largest_class": counts.idxmax(), "smallest_class": counts.idxmin(),
                      "imbalance_ratio": counts.max() / counts.min()}
    order = [name for name in (*data.SPLITS, EXTERNAL) if name in rows]
    return pd.DataFrame(rows).T.loc[order].astype({"images": int, "classes": int, "groups": int,
                                                   "imbalance_ratio": float})


def failed_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials that failed, with their error: the report lists them rather than hiding them."""
    if trials.empty:
        return pd.DataFrame(columns=["id", "strategy", "step", "error"])
    return trials.loc[trials["status"] == TrialState.FAILED, ["id", "strategy", "step", "error"]].reset_index(drop=True)


def stops_per_strategy(trials: pd.DataFrame) -> pd.DataFrame:
    """Per strategy and phase, how many runs completed, stopped early, were filtered or failed."""
    rows = []
    for phase in PHASES:
        stopped_by = _phase_column(trials, phase, "stopped_by")
        ran = stopped_by.notna()
        rows.append(pd.crosstab(trials.loc[ran, "strategy"], stopped_by[ran]).assign(phase=phase))
    failed = trials[trials["status"] == TrialState.FAILED].groupby("strategy").size()
    table = pd.concat(rows).fillna(0).reset_index().rename(columns={"index": "strategy"})
    for column in ("completed", "early_stopping", "nonconvergence"):
        if column not in table:
            table[column] = 0
    table["failed_trials"] = table["strategy"].map(failed).fillna(0)
    columns = ["strategy", "phase", "completed", "early_stopping", "nonconvergence", "failed_trials"]
    return table[columns].astype({c: int for c in columns[2:]})


def split_note(config: Experiment) -> str | None:
    """A warning in words when a Nerthus split is not grouped by video (docs/method.md section 1)."""
    if "nerthus" in config.data.location.lower() and not config.data.group_pattern:
        return (
            "This Nerthus split is not grouped by video: frames of one video, near-duplicates of each "
            "other, are in both training and validation, which inflates validation accuracy (the thesis "
            "reported 1.00). Set data.group_pattern: 'bowel_(\\d+)_' for an honest split."
        )
    return None


def with_support(evaluation: Evaluation) -> pd.DataFrame:
    """An evaluation's per-class metrics with `support`, the images of each class in the split (the
    `Average` row's: all the split's images), so that every number is read next to what it rests on."""
    support = evaluation.confusion.sum(axis=1)
    return evaluation.metrics.assign(support=[*support, support.sum()])


def validation_and_test(evaluations: list[Evaluation]) -> pd.DataFrame:
    """Each final model's average metrics on validation, the held-out test split and the external test set,
    side by side, each split with its support (`images`)."""
    rows = {(e.strategy, e.split): with_support(e).loc[metrics.AVERAGE_ROW, [*metrics.RATIO_COLUMNS, "support"]]
            .rename({"support": "images"}) for e in evaluations}
    table = pd.DataFrame(rows).T
    table.index.names = ["strategy", "split"]
    order = [name for name in (*data.SPLITS, EXTERNAL) if name in table.index.get_level_values("split")]
    table = table.unstack("split").swaplevel(axis=1)
    return table[[(split, column) for split in order for column in [*metrics.RATIO_COLUMNS, "images"]]]


# The final models with their uncertainty: intervals, ROC curves, calibration (docs/method.md section 14)

CI = "95 % CI"


def metrics_table(evaluation: Evaluation) -> pd.DataFrame:
    """The per-class table with each class's recall interval (`REC 95 % CI`) beside it, and its support."""
    table = with_support(evaluation)
    recall = evaluation.intervals.loc[[bootstrap.recall_name(name) for name in evaluation.confusion.index]]
    cells = [f"[{low:.3f}, {high:.3f}]" for low, high in zip(recall["low"], recall["high"])]
    table.insert(table.columns.get_loc("REC") + 1, f"REC {CI}", [*cells, ""])
    return table


def score_intervals(evaluations: list[Evaluation]) -> pd.DataFrame:
    """Every final model's accuracy, macro F1 and MCC with their intervals, one row per strategy, split and score."""
    frames = [e.intervals.loc[list(bootstrap.SUMMARY_SCORES)].reset_index().assign(strategy=e.strategy, split=e.split)
              for e in evaluations]
    if not frames:
        return pd.DataFrame(columns=["strategy", "split", "score", "estimate", "low", "high"])
    return pd.concat(frames, ignore_index=True)[["strategy", "split", "score", "estimate", "low", "high"]]


def strategy_comparison(evaluations: list[Evaluation], winner: str | None = None) -> pd.DataFrame:
    """One row per final model: accuracy, macro F1 and MCC with 95 % intervals on each split (`val accuracy`, ...); the winner marked."""
    rows: dict[str, dict[str, str]] = {}
    for e in evaluations:
        row = rows.setdefault(e.strategy, {"winner": "yes" if e.strategy == winner else ""})
        for score in bootstrap.SUMMARY_SCORES:
            row[f"{e.split} {score}"] = bootstrap.formatted(e.intervals.loc[score])
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("strategy")


def roc_curves(evaluation: Evaluation, points: int = 201) -> dict[str, tuple[np.ndarray, np.ndarray, float]] | None:
    """One-vs-rest ROC curve (false and true positive rates) and AUC of each class, and their macro average.

    A class that has no image in the split, or only images, has no curve. The macro
    average's curve is the classes' true positive rates averaged on a common grid of false
    positive rates; its AUC is the mean of the classes' AUCs (scikit-learn's macro
    one-vs-rest AUC). None for predictions stored without probabilities.
    """
    from sklearn import metrics as skm

    if evaluation.probabilities is None:
        return None
    curves = {}
    for index, name in enumerate(evaluation.confusion.index):
        positive = evaluation.true == index
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = skm.roc_curve(positive, evaluation.probabilities[:, index])
        curves[name] = (fpr, tpr, float(skm.auc(fpr, tpr)))
    if curves:
        grid = np.linspace(0, 1, points)
        mean_tpr = np.mean([np.interp(grid, fpr, tpr) for fpr, tpr, _ in curves.values()], axis=0)
        curves["macro average"] = (grid, mean_tpr, float(np.mean([auc for _, _, auc in curves.values()])))
    return curves


def auc_table(evaluations: list[Evaluation]) -> pd.DataFrame:
    """AUC per class and its macro average (rows) for each final model and split with probabilities (columns)."""
    columns = {}
    for e in evaluations:
        curves = roc_curves(e)
        if curves:
            columns[e.name] = pd.Series({name: auc for name, (_, _, auc) in curves.items()})
    if not columns:
        return pd.DataFrame()
    names = [*evaluations[0].confusion.index, "macro average"]
    return pd.DataFrame(columns).reindex(names).rename_axis("class")


def reliability(evaluation: Evaluation, bins: int = 10) -> pd.DataFrame | None:
    """The reliability diagram's table: per confidence bin, its images, mean confidence and accuracy.

    Confidence is the predicted class's probability; a calibrated model is right as often
    as it is confident. None for predictions stored without probabilities.
    """
    if evaluation.probabilities is None:
        return None
    confidence = evaluation.probabilities.max(axis=1)
    correct = evaluation.probabilities.argmax(axis=1) == evaluation.true
    edges = np.linspace(0, 1, bins + 1)
    frame = pd.DataFrame({"bin": np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1),
                          "confidence": confidence, "correct": correct})
    table = frame.groupby("bin").agg(images=("correct", "size"), confidence=("confidence", "mean"),
                                     accuracy=("correct", "mean"))
    return table.assign(low=edges[table.index], high=edges[table.index + 1])[
        ["low", "high", "images", "confidence", "accuracy"]].reset_index(drop=True)


def expected_calibration_error(table: pd.DataFrame) -> float:
    """The images' share-weighted mean gap between accuracy and confidence over the bins of `reliability`."""
    return float((table["images"] * (table["accuracy"] - table["confidence"]).abs()).sum() / table["images"].sum())


def calibration_table(evaluations: list[Evaluation]) -> pd.DataFrame:
    """Per final model and split with probabilities: images, accuracy, mean confidence and expected calibration error."""
    rows = {}
    for e in evaluations:
        table = reliability(e)
        if table is not None:
            rows[e.name] = {"images": int(table["images"].sum()),
                            "accuracy": float((table["accuracy"] * table["images"]).sum() / table["images"].sum()),
                            "mean confidence": float(e.probabilities.max(axis=1).mean()),
                            "expected calibration error": expected_calibration_error(table)}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("final model")


def explanation_sample(split: pd.DataFrame, per_class: int, seed: int = 0) -> pd.DataFrame:
    """A fixed, seeded sample of `per_class` images of each class of a split's rows, ordered by class and path."""
    sampled = [rows.sample(min(per_class, len(rows)), random_state=seed) for _, rows in split.groupby("label")]
    return pd.concat(sampled).sort_values(["label", "path"]).reset_index(drop=True)
