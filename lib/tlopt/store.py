"""The run folder on disk: atomic writes, the trial store, the run's parameters.

`trials.jsonl` is the source of truth of an experiment (DESIGN.md): resume
replays it and never runs a finished trial again. Every file is replaced
atomically (write a temporary file in the same folder, fsync, rename), so a
process killed at any moment leaves either the old or the new file, never a
truncated one.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from tlopt.errors import ConfigError
from tlopt.params import validate

TRIALS_FILE = "trials.jsonl"
PARAMS_FILE = "params.yaml"
SPLIT_FILE = "split.csv"
ENVIRONMENT_FILE = "environment.json"
RECORDED_PACKAGES = ("tensorflow", "tensorflow-cpu", "keras", "gpyopt", "gpy", "numpy", "scikit-learn", "tlopt")


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary file next to `path` that replaces `path` when the block succeeds.

    A process killed mid-write leaves a hidden temporary file, never a half-written file
    under the final name that a later run would take for complete. `suffix` keeps the
    file type for writers that insist on one (Keras: `.weights.h5`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(handle)
    try:
        yield Path(temporary)
        # mkstemp makes the file owner-only; run files (the report too) are meant to be shared.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Replace `path` with `data` in one rename, the data on disk before the rename."""
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    return Path(path)


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, value: Any) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    """numpy scalars and paths in records become plain JSON values."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def environment() -> dict[str, str]:
    """Versions that decide a run's numbers, written beside its parameters for the report."""
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for package in RECORDED_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def run_dir_for(params: dict) -> Path:
    return Path(params["results_dir"]) / params["run_name"]


def _first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if old == new else f"{prefix.rstrip('.')}: {old!r} -> {new!r}"


def open_run(params: dict, run_dir: Path | None = None) -> Path:
    """Create the run folder with its `params.yaml`, or check that a resumed run matches.

    A run resumed with other parameters would mix two experiments in one
    trial store, so that is refused, naming the first key that differs. The stored
    file is validated first, so that a key added to the schema since the run started
    counts with its default, as it does in `params`.
    """
    run_dir = Path(run_dir) if run_dir is not None else run_dir_for(params)
    stored = run_dir / PARAMS_FILE
    if stored.is_file():
        difference = _first_difference(validate(load_run_params(run_dir), source=str(stored)), params)
        if difference:
            raise ConfigError(
                f"{stored}: the parameters differ from the ones this run started with "
                f"({difference}); start a new run instead of resuming"
            )
    else:
        atomic_write_text(stored, yaml.safe_dump(params, sort_keys=False))
        atomic_write_json(run_dir / ENVIRONMENT_FILE, environment())
    return run_dir


def load_run_params(run_dir: Path) -> dict:
    """The resolved parameters a run started with."""
    return yaml.safe_load((Path(run_dir) / PARAMS_FILE).read_text())


class TrialStore:
    """The finished trials of a run, one JSON object a line, in the order they finished."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / TRIALS_FILE

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def of_step(self, strategy: str, step: str) -> list[dict]:
        return [r for r in self.records() if r["strategy"] == strategy and r["step"] == step]

    def append(self, record: dict) -> None:
        """Rewrite the whole file with one more line: atomic, unlike an in-place append."""
        existing = self.path.read_bytes() if self.path.is_file() else b""
        line = json.dumps(record, default=_jsonable) + "\n"
        atomic_write_bytes(self.path, existing + line.encode("utf-8"))

    def frame(self) -> pd.DataFrame:
        """The trials as a table, hyperparameters flattened into columns."""
        records = self.records()
        if not records:
            return pd.DataFrame()
        return pd.json_normalize(records, sep=".")


def read_trials(run_dir: str | Path) -> pd.DataFrame:
    """Every finished trial of a run as a DataFrame (for notebooks and the report)."""
    return TrialStore(Path(run_dir)).frame()
