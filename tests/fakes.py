"""A fake trainer: the `training` module's interface with a known, cheap score.

Strategy and optimizer tests inject it to check what reaches which phase and
how the BO loop behaves, without training a network. It pickles, so that Ray workers
run it too (with tests/ on their PYTHONPATH); there `calls` stays in the worker.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from tlopt import objectives


@dataclass
class FakeResult:
    """A run's result; the objective's value is validation accuracy's unless given."""

    val_accuracy: float
    val_loss: float
    weights_path: str
    phase: str
    best_epoch: int = 0
    epochs: int = 3
    stopped_by: str = "completed"
    seconds: float = 0.01
    objective: str = objectives.DEFAULT
    objective_value: float | None = None

    def __post_init__(self):
        if self.objective_value is None:
            self.objective_value = self.val_accuracy


def measures(accuracy: float) -> dict[str, float]:
    """Every objective's value of a fake run, by log key: here they all follow its accuracy."""
    return {"val_accuracy": accuracy, "val_balanced_accuracy": accuracy, "val_macro_f1": accuracy,
            "val_loss": 1 - accuracy}


def peaked_score(backbone: str, optimizer: str, learning_rate: float, layer: int = 0) -> float:
    """Best at VGG16 + Adam + rate 1e-2; a narrow smooth peak in log10(rate)."""
    value = 0.15 * (backbone == "VGG16") + 0.15 * (optimizer == "Adam")
    value += 0.65 * math.exp(-((math.log10(learning_rate) + 2.0) ** 2) / 0.1)
    return value + 0.0001 * layer


@dataclass(frozen=True)
class TrialIs:
    """A picklable `fail_when`/`die_when`: true for the calls of one trial (by its id)."""

    trial_id: str

    def __call__(self, call: dict) -> bool:
        return call["run_dir"].name == self.trial_id


@dataclass
class FakeTrainer:
    """Records every call; `fail_when(call)` makes a phase raise like a crashed run, `die_when(call)`
    kills the process with SIGKILL (like the out-of-memory killer); each phase lasts `seconds`.

    `score(backbone, optimizer, rate, layer)` is a run's accuracy, `measures(accuracy, call)`
    every objective's value, of which the result reports the parameter file's objective.
    """

    calls: list = field(default_factory=list)
    fail_when: object = None
    score: object = peaked_score
    measures: object = lambda accuracy, call: measures(accuracy)
    die_when: object = None
    seconds: float = 0.0

    def _maybe_fail(self, call: dict) -> None:
        time.sleep(self.seconds)
        if self.die_when is not None and self.die_when(call):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fail_when is not None and self.fail_when(call):
            raise FloatingPointError("loss became NaN")

    @staticmethod
    def _weights(folder, phase: str) -> str:
        """The phase's weights file, as a run leaves it (empty: nothing reads a fake model)."""
        path = folder.weights(phase)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        return str(path)

    def train_block(self, backbone, optimizer, learning_rate, frame, class_names, folder, config, cache_dir=None,
                    observers=()):
        call = dict(phase="block", backbone=backbone, optimizer=optimizer, learning_rate=learning_rate,
                    run_dir=Path(folder))
        self.calls.append(call)
        self._maybe_fail(call)
        return self._result(self.score(backbone, optimizer, learning_rate), call, config, folder)

    def fine_tune(self, backbone, optimizer, learning_rate, delimiting_layer, block_weights,
                  frame, class_names, folder, config, cache_dir=None, observers=()):
        call = dict(phase="finetune", backbone=backbone, optimizer=optimizer,
                    learning_rate=learning_rate, delimiting_layer=delimiting_layer,
                    block_weights=block_weights, run_dir=Path(folder))
        self.calls.append(call)
        self._maybe_fail(call)
        return self._result(self.score(backbone, optimizer, learning_rate, delimiting_layer), call, config, folder)

    def _result(self, accuracy: float, call: dict, config, folder) -> FakeResult:
        values, objective = self.measures(accuracy, call), objectives.get(config.objective)
        return FakeResult(accuracy, values["val_loss"], self._weights(folder, call["phase"]), call["phase"],
                          objective=objective.name, objective_value=values[objective.key])
