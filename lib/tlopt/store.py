"""The run folder: the one place that knows where every file of an experiment lives.

```
<results_dir>/<run>/
  params.yaml  environment.json  split.csv  split_summary.json  external.csv  trials.jsonl  report.html
  best.json             the winner: the best final model across strategies
  repeats.jsonl         the winner's setup retrained with other seeds (final.repeats)
  model.keras           the winner exported (`tlopt export`); <strategy>/model.keras a strategy's
  <strategy>/best.json  <strategy>/predictions-<split>.json
  <strategy>/<step>/    GPyOpt's files, figures, status.json
  runs/<trial>/         <phase>/history.csv, <phase>/best.weights.h5 (kept where read), tensorboard/<phase>/
  tables/ figures/      notebook 05's tables (CSV, LaTeX) and figures (PNG, SVG), for a paper
  cache/                decoded images, pooled features and activations shared by the trials
  notebooks/            the executed notebooks
```

`trials.jsonl` is the source of truth of an experiment: resume replays it and never
runs a finished trial again. Every file is replaced atomically (`tlopt.files`).
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from tlopt.errors import ConfigError
from tlopt.files import atomic_write_bytes, atomic_write_json, read_json, to_json
from tlopt.params import Experiment, dump_params, validate
from tlopt.trials import Trial

RECORDED_PACKAGES = ("tensorflow", "tensorflow-cpu", "keras", "gpyopt", "gpy", "numpy", "scikit-learn", "tlopt")


class TrialFolder:
    """`runs/<trial>/`: the training runs of one trial, a folder per phase (block, finetune)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"TrialFolder({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    def phase_dir(self, phase: str) -> Path:
        return self.path / phase

    def history(self, phase: str) -> Path:
        """Per-epoch scalars of a phase (Keras's CSVLogger)."""
        return self.phase_dir(phase) / "history.csv"

    def histories(self) -> list[Path]:
        """The history files of the phases that have begun, in the order they were written."""
        found = [path for path in self.path.glob("*/history.csv") if path.is_file()]
        return sorted(found, key=lambda path: path.stat().st_mtime_ns)

    def weights(self, phase: str) -> Path:
        """The phase's best weights (by validation accuracy)."""
        return self.phase_dir(phase) / "best.weights.h5"

    def tensorboard(self, phase: str) -> Path:
        return self.path / "tensorboard" / phase

    def remove_weights(self, phases: tuple[str, ...] = ("block", "finetune")) -> None:
        """Delete the phases' checkpoints (`training.keep_weights: best`); histories and events stay."""
        for phase in phases:
            self.weights(phase).unlink(missing_ok=True)


class TrialStore:
    """The trials of a run, one JSON object a line, in the order they finished.

    A parallel step writes a trial twice: issued, then finished. The last line of an id
    is its state; `records` gives the finished trials, `unfinished` the issued ones that
    have no result (the run stopped while they ran).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def latest(self) -> list[Trial]:
        """The last record of every trial, in the order of those records."""
        if not self.path.is_file():
            return []
        last: dict[str, Trial] = {}
        for line in self.path.read_text().splitlines():
            if line.strip():
                trial = Trial.from_record(json.loads(line))
                last.pop(trial.id, None)
                last[trial.id] = trial
        return list(last.values())

    def records(self) -> list[Trial]:
        """The finished trials (ok or failed), in the order they finished."""
        return [trial for trial in self.latest() if trial.finished]

    def unfinished(self, label: str, step: str) -> list[Trial]:
        """Trials of a step that were issued and have no result, by index."""
        issued = [trial for trial in self.latest()
                  if not trial.finished and trial.strategy == label and trial.step == step]
        return sorted(issued, key=lambda trial: trial.index)

    def of_step(self, label: str, step: str) -> list[Trial]:
        return [trial for trial in self.records() if trial.strategy == label and trial.step == step]

    def append(self, trial: Trial) -> None:
        """Rewrite the whole file with one more line: atomic, unlike an in-place append."""
        existing = self.path.read_bytes() if self.path.is_file() else b""
        atomic_write_bytes(self.path, existing + (to_json(trial.to_record()) + "\n").encode("utf-8"))

    def frame(self) -> pd.DataFrame:
        """The trials as a table, nested fields flattened into columns (`setup.backbone`, ...)."""
        records = [trial.to_record() for trial in self.records()]
        return pd.json_normalize(records, sep=".") if records else pd.DataFrame()


class RunFolder:
    """A run folder and every path in it; `open` creates it or checks that a resume matches."""

    PARAMS = "params.yaml"
    ENVIRONMENT = "environment.json"
    SPLIT = "split.csv"
    SPLIT_SUMMARY = "split_summary.json"
    EXTERNAL = "external.csv"
    TRIALS = "trials.jsonl"
    REPORT = "report.html"
    NOTEBOOKS = "notebooks"
    BEST = "best.json"
    STATUS = "status.json"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunFolder) and self.path == other.path

    def __hash__(self) -> int:
        return hash(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def of(cls, config: Experiment) -> RunFolder:
        """`results_dir/run_name` of a parameter file."""
        return cls(Path(config.results_dir) / config.run_name)

    @classmethod
    def open(cls, config: Experiment, path: str | os.PathLike | RunFolder | None = None) -> RunFolder:
        """Create the run folder with its `params.yaml`, or check that a resumed run matches.

        A run resumed with other parameters would mix two experiments in one trial store,
        so that is refused, naming the first key that differs. The stored file is validated
        first, so that a key added to the schema since the run started counts with its
        default, as it does in the new parameters. Where the trials run (`PLACEMENT_KEYS`
        of `execution`) may change: the stored file then takes the new values.
        """
        run = cls.of(config) if path is None else cls(path)
        stored = run.params_file
        if stored.is_file():
            started = validate(run.read_params(), source=str(stored))
            difference = _first_difference(_without_placement(started.to_dict()), _without_placement(config.to_dict()))
            if difference:
                raise ConfigError(
                    f"{stored}: the parameters differ from the ones this run started with "
                    f"({difference}); start a new run instead of resuming"
                )
            if started.execution != config.execution:
                dump_params(config, stored)  # where the trials run now (another cluster, other GPUs)
        else:
            dump_params(config, stored)
            atomic_write_json(run.environment_file, environment())
        return run

    # Files of the whole run
    @property
    def params_file(self) -> Path:
        return self.path / self.PARAMS

    @property
    def environment_file(self) -> Path:
        return self.path / self.ENVIRONMENT

    @property
    def split_file(self) -> Path:
        return self.path / self.SPLIT

    @property
    def split_summary_file(self) -> Path:
        return self.path / self.SPLIT_SUMMARY

    @property
    def external_file(self) -> Path:
        """The external test set (`data.external_test`), kept apart from the split the search sees."""
        return self.path / self.EXTERNAL

    @property
    def trials_file(self) -> Path:
        return self.path / self.TRIALS

    @property
    def report_file(self) -> Path:
        return self.path / self.REPORT

    @property
    def notebooks_dir(self) -> Path:
        return self.path / self.NOTEBOOKS

    @property
    def cache_dir(self) -> Path:
        """Decoded images and pooled features, shared by every trial of the run."""
        return self.path / "cache"

    @property
    def trials(self) -> TrialStore:
        return TrialStore(self.trials_file)

    def read_params(self) -> dict:
        """The resolved parameters the run started with, as written."""
        return yaml.safe_load(self.params_file.read_text())

    def read_config(self) -> Experiment:
        """The run's parameters, validated (a key added since the run started has its default); ConfigError
        when the folder is not a run's."""
        if not self.params_file.is_file():
            raise ConfigError(f"{self} is not a run folder (no {self.PARAMS})")
        return validate(self.read_params(), source=str(self.params_file))

    def environment(self) -> dict[str, str]:
        return read_json(self.environment_file)

    # Per strategy (a label: the strategy, or `strategy@Backbone` in per-backbone mode) and step
    def strategy_dir(self, label: str) -> Path:
        return self.path / label

    def step_dir(self, label: str, step: str) -> Path:
        return self.path / label / step

    def step_status_file(self, label: str, step: str) -> Path:
        """Written when a step has ended: how many trials it ran and why it stopped."""
        return self.step_dir(label, step) / self.STATUS

    def best_file(self, label: str) -> Path:
        return self.path / label / self.BEST

    def read_best(self, label: str) -> dict:
        return read_json(self.best_file(label))

    def update_best(self, label: str, **entries: Any) -> dict:
        """Set entries of `<label>/best.json` ("model", "final", "steps", "per_backbone")."""
        path = self.best_file(label)
        updated = {**(read_json(path) if path.is_file() else {"strategy": label}), **entries}
        atomic_write_json(path, updated)
        return updated

    def predictions_file(self, label: str, split: str) -> Path:
        return self.path / label / f"predictions-{split}.json"

    # The end of the run: its winner, the winner's repeats, exported models, tables and figures
    @property
    def winner_file(self) -> Path:
        """`best.json` at the root: the final model the run names, the best across strategies."""
        return self.path / self.BEST

    def read_winner(self) -> dict:
        return read_json(self.winner_file)

    @property
    def repeats(self) -> TrialStore:
        """The winner's setup trained again with other seeds (`final.repeats`), one trial a line."""
        return TrialStore(self.path / "repeats.jsonl")

    def model_file(self, label: str | None = None) -> Path:
        """Where `tlopt export` writes: the winner's model at the root, a strategy's in its folder."""
        return (self.path if label is None else self.strategy_dir(label)) / "model.keras"

    @property
    def tables_dir(self) -> Path:
        return self.path / "tables"

    def table_file(self, name: str, suffix: str) -> Path:
        """A table of notebook 05 as `csv` or `tex`."""
        return self.tables_dir / f"{name}.{suffix}"

    @property
    def figures_dir(self) -> Path:
        return self.path / "figures"

    def figure_file(self, name: str, suffix: str) -> Path:
        """A figure of notebook 05 as `png` or `svg`."""
        return self.figures_dir / f"{name}.{suffix}"

    # Per trial
    def trial(self, trial_id: str) -> TrialFolder:
        return TrialFolder(self.path / "runs" / trial_id)

    def local(self, recorded: str | os.PathLike) -> Path:
        """A trial file's path as a record holds it (absolute, written wherever the run folder was then)
        in this run folder now: a run folder moved to another machine finds its weights."""
        parts = Path(recorded).parts
        if "runs" not in parts or Path(recorded).is_file():
            return Path(recorded)
        return self.path.joinpath(*parts[len(parts) - 1 - parts[::-1].index("runs"):])


# Keys that say where trials run, not what they compute: a resumed run may change them.
PLACEMENT_KEYS = ("ray_address", "gpus_per_trial", "cpus_per_trial")


def _without_placement(parameters: dict) -> dict:
    execution = {key: value for key, value in parameters["execution"].items() if key not in PLACEMENT_KEYS}
    return {**parameters, "execution": execution}


def _first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if old == new else f"{prefix.rstrip('.')}: {old!r} -> {new!r}"


def environment() -> dict[str, str]:
    """Versions that decide a run's numbers, written beside its parameters for the report."""
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for package in RECORDED_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def read_trials(run: str | os.PathLike) -> pd.DataFrame:
    """Every finished trial of a run as a DataFrame (for notebooks and the report)."""
    return RunFolder(run).trials.frame()
