"""The trial record: what one evaluation of a BO step chose, trained and reached.

`trials.jsonl` holds one `Trial` a line (`Trial.to_record`); its fields are the ones the
first version wrote, so that runs made by it still resume. `status` is a `TrialState`,
a string enum: the file says "ok" or "failed", and code compares with the enum. A trial
records the objective it was scored on and that objective's value (docs/method.md
section 10); a record of the first version, which has neither, was scored on validation accuracy.

A step that runs several trials at once (`execution.parallel_trials` > 1) first writes
each trial as "issued", before it starts, and later its result under the same id; the
fields that describe such a trial (`PARALLEL_FIELDS`) are left out of the records of
one-at-a-time runs, which stay what the first version wrote.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from tlopt import objectives

class TrialState(StrEnum):
    """How a trial ended: trained to its result, or raised (NaN loss, out of memory, a killed
    worker, ...); or, in a parallel step, issued and not finished yet."""

    OK = "ok"
    FAILED = "failed"
    ISSUED = "issued"


# What a trial of a parallel step records besides the rest (None, and absent from the record,
# in one-at-a-time steps): the indices of the finished trials its point was computed from and
# of the trials still running then, the step's parallel_trials and schedule, the worker that ran
# it (host, pid, the GPU ids Ray gave it) and its start and end (Unix seconds, on the worker).
PARALLEL_FIELDS = ("based_on", "pending", "parallel_trials", "schedule", "worker", "start_time", "end_time")


@dataclass(frozen=True)
class Trial:
    """One trial of a BO step: finished, or (parallel steps) issued.

    `x` is the GPyOpt row BO chose, `hyperparameters` its decoded values, `setup` the
    complete description of what was trained (layer optimization and the final
    evaluation read it), `phases` a summary of each training run (block, finetune).
    The result fields are None for a failed or issued trial; `PARALLEL_FIELDS` are None
    outside parallel steps.
    """

    id: str
    strategy: str
    step: str
    index: int
    method: str
    x: list[float]
    hyperparameters: dict[str, Any]
    started_at: str
    status: TrialState
    error: str | None = None
    val_accuracy: float | None = None
    val_loss: float | None = None
    epochs: int | None = None
    stopped_by: str | None = None
    weights: str | None = None
    setup: dict[str, Any] = field(default_factory=dict)
    phases: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    traceback: str | None = None
    objective: str = objectives.DEFAULT
    objective_value: float | None = None
    based_on: list[int] | None = None
    pending: list[int] | None = None
    parallel_trials: int | None = None
    schedule: str | None = None
    worker: dict[str, Any] | None = None
    start_time: float | None = None
    end_time: float | None = None

    @property
    def ok(self) -> bool:
        return self.status is TrialState.OK

    @property
    def finished(self) -> bool:
        """Trained to a result or failed (not merely issued)."""
        return self.status is not TrialState.ISSUED

    @property
    def score(self) -> float:
        """The value BO maximizes (`Objective.score`, in [0, 1]); a failed trial scores the worst, 0."""
        return objectives.get(self.objective).score(self.objective_value) if self.ok else 0.0

    def to_record(self) -> dict[str, Any]:
        """The trial as one line of trials.jsonl (a failed trial's traceback included)."""
        record = dataclasses.asdict(self)
        record["status"] = str(self.status)
        for name in ("traceback", *PARALLEL_FIELDS):
            if record[name] is None:
                del record[name]
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Trial:
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in record.items() if k in names}
        if "objective_value" not in record:  # the first version scored validation accuracy
            fields["objective_value"] = record.get("val_accuracy")
        return cls(**{**fields, "status": TrialState(record["status"])})


def best_trial(trials: Iterable[Trial]) -> Trial | None:
    """The best score (the objective's value, in its direction); ties (at 1.0, say) broken by lower validation loss."""
    finished = [trial for trial in trials if trial.ok]
    if not finished:
        return None
    return max(finished, key=lambda trial: (trial.score, -trial.val_loss))
