"""The same transfer-learning search with tlopt and with KerasTuner, side by side.

What a user would pick instead of tlopt is KerasTuner's `BayesianOptimization`. Both
sides search the same space (backbone, optimizer, log-scaled learning rate, delimiting
layer as a fraction of depth: tlopt's `joint` strategy), train the same two phases
(classification block on the frozen backbone, then fine-tuning from its best weights
with the layers from the delimiting layer on trainable), with the same model, input
pipeline (reading the decoded-image cache), epochs, EarlyStopping, trial budget and
initial random points, all taken from one tlopt parameter file (`comparable`). tlopt's
nonconvergence filtering is off, since KerasTuner has no counterpart; both stop a trial
whose loss becomes NaN.

The KerasTuner side is written as its documentation recommends for a custom training
procedure: a `HyperModel` whose `build` declares the hyperparameters and returns the
compiled block model, and a tuner subclass whose `run_trial` trains the two phases and
returns the objective.

Run alone: `python bench/kerastuner_side.py` (params/demo.yaml with 2 + 2 trials, a few minutes);
`make bench` runs it too.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import keras_tuner
import pandas as pd

from tlopt import data, optimize
from tlopt.backbones import build_transfer_model, set_delimiting_layer
from tlopt.params import Experiment, load_params
from tlopt.store import RunFolder
from tlopt.training import LOSS, make_optimizer

DEMO_PARAMS = Path(__file__).resolve().parent.parent / "params" / "demo.yaml"


def comparable(params: Experiment, initial_points: int, iterations: int) -> Experiment:
    """`params` as both sides run them: strategy `joint` alone, `initial_points` + `iterations` trials.

    No layer optimization and no nonconvergence filter: KerasTuner has neither.
    """
    return params.updated({
        "strategies": ["joint"], "layer_optimization.enabled": False, "training.nonconvergence.enabled": False,
        "bo.initial_points": initial_points, "bo.iterations": iterations,
    })


@dataclass(frozen=True)
class Search:
    """What KerasTuner needs to know of tlopt's parameters to run the same search."""

    backbones: tuple[str, ...]
    optimizers: tuple[str, ...]
    learning_rate: tuple[float, float]
    initial_points: int
    trials: int
    block_epochs: int
    finetune_epochs: int
    patience: int
    image_size: int
    batch_size: int
    weights: str | None
    seed: int

    @classmethod
    def from_params(cls, params: Experiment) -> Search:
        if params.learning_rate.scale != "log":
            raise ValueError("the side-by-side searches the learning rate on a log scale")
        return cls(
            backbones=tuple(params.backbones),
            optimizers=tuple(params.optimizers),
            learning_rate=(params.learning_rate.min, params.learning_rate.max),
            initial_points=params.bo.initial_points,
            trials=params.bo.budget,
            block_epochs=params.training.block_epochs,
            finetune_epochs=params.training.finetune_epochs,
            patience=params.training.early_stopping_patience,
            image_size=params.data.image_size,
            batch_size=params.data.batch_size,
            weights=params.weights,
            seed=params.seed,
        )


@dataclass(frozen=True)
class SearchResult:
    """What one side's search took and found.

    `cpu_seconds`: the process's CPU time (all threads), which other processes on the
    machine change less than the wall time. `epochs`: every epoch of every phase it ran.
    """

    seconds: float
    cpu_seconds: float
    best_val_accuracy: float
    trials: int
    epochs: int


def run_tlopt(params: Experiment, split_frame: pd.DataFrame) -> SearchResult:
    """tlopt's `joint` strategy on `split_frame`, in a new run folder."""
    run = RunFolder.open(params)
    data.write_manifest(split_frame, run.split_file)
    started, cpu_started = time.perf_counter(), time.process_time()
    best = optimize.run_strategy(params, "joint", run, progress=False)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    trials = run.trials.records()
    epochs = sum(phase["epochs"] for trial in trials for phase in trial.phases.values())
    return SearchResult(seconds, cpu_seconds, float(best.val_accuracy), len(trials), epochs)


class TransferHyperModel(keras_tuner.HyperModel):
    """The classification-block model of a trial: backbone frozen, compiled with the trial's optimizer."""

    def __init__(self, search: Search, num_classes: int):
        super().__init__()
        self.search = search
        self.num_classes = num_classes

    def build(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        backbone = hp.Choice("backbone", list(self.search.backbones))
        optimizer = hp.Choice("optimizer", list(self.search.optimizers))
        low, high = self.search.learning_rate
        learning_rate = hp.Float("learning_rate", low, high, sampling="log")
        hp.Float("delimiting_fraction", 0.0, 1.0)
        model, base = build_transfer_model(backbone, self.num_classes, self.search.image_size,
                                           self.search.weights)
        base.trainable = False
        model.compile(optimizer=make_optimizer(optimizer, learning_rate), loss=LOSS, metrics=["accuracy"])
        return model


def backbone_of(model: keras.Model) -> keras.Model:
    """The backbone nested in a transfer model (its only sub-model)."""
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


class TwoPhaseTuner(keras_tuner.BayesianOptimization):
    """KerasTuner's GP tuner with a two-phase trial: block training, then fine-tuning."""

    def __init__(self, search: Search, frame: pd.DataFrame, class_names: list[str], directory: Path, **kwargs):
        super().__init__(
            hypermodel=TransferHyperModel(search, len(class_names)),
            objective=keras_tuner.Objective("val_accuracy", "max"),
            max_trials=search.trials,
            num_initial_points=search.initial_points,
            seed=search.seed,
            directory=str(directory),
            **kwargs,
        )
        self.search_settings = search
        self.frame = frame
        self.class_names = class_names
        # The same decoded images as tlopt's pipeline: decoding is not what is compared.
        self.image_cache = data.cache_images(frame, search.image_size, Path(directory) / "cache")

    def datasets(self):
        """The manifest's train and val pipelines (the transfer model preprocesses for its backbone)."""
        s = self.search_settings
        return tuple(
            data.make_dataset(self.frame[self.frame["split"] == split], self.class_names, s.image_size,
                              s.batch_size, split == "train", s.seed, self.image_cache)
            for split in ("train", "val")
        )

    def _callbacks(self) -> list[keras.callbacks.Callback]:
        stopping = keras.callbacks.EarlyStopping(
            "val_accuracy", patience=self.search_settings.patience, mode="max", restore_best_weights=True
        )
        return [stopping, keras.callbacks.TerminateOnNaN()]

    def run_trial(self, trial, *args, **kwargs) -> dict:
        hp = trial.hyperparameters
        s = self.search_settings
        keras.backend.clear_session()
        keras.utils.set_random_seed(s.seed)
        train, val = self.datasets()
        model = self.hypermodel.build(hp)
        block = model.fit(train, validation_data=val, epochs=s.block_epochs, callbacks=self._callbacks(),
                          shuffle=False, verbose=0)
        base = backbone_of(model)
        set_delimiting_layer(base, math.floor(hp["delimiting_fraction"] * len(base.layers)))
        model.compile(optimizer=make_optimizer(hp["optimizer"], hp["learning_rate"]), loss=LOSS,
                      metrics=["accuracy"])
        finetune = model.fit(train, validation_data=val, epochs=s.finetune_epochs,
                             callbacks=self._callbacks(), shuffle=False, verbose=0)
        # "epochs" is tracked beside the objective, for the time per epoch.
        return {"val_accuracy": max(finetune.history["val_accuracy"]),
                "epochs": len(block.epoch) + len(finetune.epoch)}


def run_kerastuner(search: Search, split_frame: pd.DataFrame, directory: Path) -> SearchResult:
    """KerasTuner's BayesianOptimization on `split_frame` (its files go to `directory`)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    tuner = TwoPhaseTuner(search, split_frame, data.class_names(split_frame), directory,
                          project_name="kerastuner_side", overwrite=True)
    tuner.search(verbose=0)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    trials = [trial for trial in tuner.oracle.trials.values() if trial.metrics.exists("epochs")]
    epochs = sum(int(trial.metrics.get_last_value("epochs")) for trial in trials)
    best = float(tuner.oracle.get_best_trials(1)[0].score)
    return SearchResult(seconds, cpu_seconds, best, len(trials), epochs)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="tlopt-kt-") as work:
        work = Path(work)
        demo = load_params(DEMO_PARAMS, {"results_dir": str(work), "data.root": str(work / "demo")})
        params = comparable(demo, initial_points=2, iterations=2)
        search = Search.from_params(params)
        frame = data.prepare_split(params, work / "split")
        tlopt_side = run_tlopt(params, frame)
        kerastuner = run_kerastuner(search, frame, work / "kerastuner")
    print(f"{search.trials} trials of at most {search.block_epochs} block + {search.finetune_epochs} "
          f"fine-tuning epochs")
    for name, result in (("tlopt", tlopt_side), ("KerasTuner", kerastuner)):
        print(f"{name:10s} {result.seconds:7.1f} s ({result.cpu_seconds:.1f} s CPU), "
              f"best val_accuracy {result.best_val_accuracy:.3f}, "
              f"{result.epochs} epochs in {result.trials} trials, {result.seconds / result.epochs:.2f} s an epoch")
    print(f"KerasTuner time / tlopt time = {kerastuner.seconds / tlopt_side.seconds:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
