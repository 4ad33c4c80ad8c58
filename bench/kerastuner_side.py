"""The race: one transfer-learning search with tlopt and with KerasTuner, over three seeds.

What a user would pick instead of tlopt is KerasTuner's `BayesianOptimization`. Both
tools get the same search, taken from one tlopt parameter file (params/demo.yaml,
`comparable`): the same domain (tlopt's `joint` strategy: backbone, optimizer,
log-scaled learning rate and delimiting layer as a fraction of depth; the KerasTuner
hyperparameters are made from tlopt's own search space), the same budget (10 trials: 3
random, then 7 chosen by a Gaussian process), the same epochs (the demo's: at most 2 of
the classification block, then at most 3 of fine-tuning, scored by the best fine-tuning
validation accuracy), the same data (the demo's split, 32 px) and, in each repetition,
the same seed (training and the random points). Each tool runs as its users run it.

tlopt: `optimize.run_strategy` on a new run folder with the parameter file's settings:
the decoded-image cache, the classification block trained on cached backbone features,
nonconvergence filtering (a run below 30 % validation accuracy for 2 epochs stops),
EarlyStopping, and everything it writes (CSV and TensorBoard logs, best-weights
checkpoints, the trial store, GPyOpt's report files, a convergence plot).

KerasTuner, as its guides and Keras's transfer-learning guide advise:
- a `keras_tuner.HyperModel` whose `build` declares the hyperparameters and returns the
  compiled model with its backbone frozen, and whose `fit` trains the two phases
  (KerasTuner's pattern for tuning the training itself); the tuner is a plain
  `BayesianOptimization` with `num_initial_points` equal to tlopt's (its default, 3 per
  hyperparameter, would spend 9 of the 10 trials on random points);
- two-phase training: the classification block on the frozen backbone (BatchNormalization
  in inference mode), then fine-tuning from the delimiting layer, recompiled with a
  tenth of the block's learning rate (Keras's guide: fine-tune with a low rate);
- EarlyStopping on validation accuracy with `restore_best_weights` in both phases (so
  fine-tuning starts from the best block), and TerminateOnNaN;
- a `tf.data` pipeline made once per search: the same decoded-image cache as tlopt's,
  shuffled, flipped, batched and prefetched (`data.make_dataset`);
- KerasTuner's own checkpoint of each trial's best epoch (its `run_trial`), as tlopt keeps its.

Both run in one process with TensorFlow's deterministic ops (tlopt turns them on at its
first run, for the whole process). In each repetition the two run one after the other,
in alternating order (tlopt first, then KerasTuner first, ...), so that a change in the
machine's load hits both. Reported: the median wall time and the median best validation
accuracy over the seeds, their ratio and difference, and where each side's time goes.

Run alone: `python bench/kerastuner_side.py` (about 20 minutes on 2 CPU cores);
`make bench` runs it too.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tlopt  # noqa: F401  TensorFlow's environment (backend, log level, oneDNN) before keras imports it
import keras
import keras_tuner
import pandas as pd
import tensorflow as tf

from tlopt import data, optimize
from tlopt.backbones import build_transfer_model, set_delimiting_layer
from tlopt.params import Experiment, load_params
from tlopt.space import Choice, Fraction, Rate
from tlopt.store import RunFolder
from tlopt.strategies import joint_space, layer_from_fraction
from tlopt.training import LOSS, make_optimizer

DEMO_PARAMS = Path(__file__).resolve().parent.parent / "params" / "demo.yaml"
# (random initial points, points chosen by the Gaussian process): the budget of 10 trials.
RACE_TRIALS = (3, 7)
# The demo's seed, then two more: each repetition runs both tools with one of them.
RACE_SEEDS = (2, 3, 4)
# Keras's transfer-learning guide fine-tunes with a much lower rate than the new head trained with.
FINETUNE_RATE_FACTOR = 0.1
SPEEDUP_TARGET = 2.0


def comparable(params: Experiment, initial_points: int, iterations: int) -> Experiment:
    """`params` as both tools search: strategy `joint` alone, `initial_points` + `iterations` trials.

    No layer optimization: it would add trials that KerasTuner has no counterpart for.
    Nonconvergence filtering stays as `params` set it: tlopt's users run with it.
    """
    return params.updated({
        "strategies": ["joint"], "layer_optimization.enabled": False,
        "bo.initial_points": initial_points, "bo.iterations": iterations,
    })


@dataclass(frozen=True)
class SearchResult:
    """What one tool's search of one seed took and found.

    `cpu_seconds`: the process's CPU time (all threads), which other processes on the
    machine change less than the wall time. `epochs`: every epoch of both phases of every
    trial; `block_seconds` and `finetune_seconds`: the time of those phases (model
    building included); the rest of `seconds` is the search around them (suggestions,
    trial bookkeeping, files, failed trials). `stopped_early`: fine-tuning runs stopped
    before their last epoch (EarlyStopping, nonconvergence filtering).
    """

    seed: int
    seconds: float
    cpu_seconds: float
    best_val_accuracy: float
    trials: int
    epochs: int
    block_seconds: float
    finetune_seconds: float
    stopped_early: int

    @property
    def rest_seconds(self) -> float:
        return self.seconds - self.block_seconds - self.finetune_seconds

    @property
    def seconds_per_epoch(self) -> float:
        return self.seconds / self.epochs


def run_tlopt(params: Experiment, split_frame: pd.DataFrame) -> SearchResult:
    """tlopt's `joint` strategy on `split_frame`, in a new run folder."""
    run = RunFolder.open(params)
    data.write_manifest(split_frame, run.split_file)
    started, cpu_started = time.perf_counter(), time.process_time()
    best = optimize.run_strategy(params, "joint", run, progress=False)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    trials = run.trials.records()
    phases = [trial.phases for trial in trials]
    return SearchResult(
        seed=params.seed, seconds=seconds, cpu_seconds=cpu_seconds, best_val_accuracy=float(best.val_accuracy),
        trials=len(trials), epochs=sum(phase["epochs"] for runs in phases for phase in runs.values()),
        block_seconds=sum(runs["block"]["seconds"] for runs in phases if "block" in runs),
        finetune_seconds=sum(runs["finetune"]["seconds"] for runs in phases if "finetune" in runs),
        stopped_early=sum(runs["finetune"]["stopped_by"] != "completed" for runs in phases if "finetune" in runs),
    )


def declare_hyperparameters(hp: keras_tuner.HyperParameters, config: Experiment) -> None:
    """tlopt's `joint` search space as KerasTuner hyperparameters (a single-option choice is fixed)."""
    space = joint_space(config)
    for name, value in space.fixed.items():
        hp.Fixed(name, value)
    for variable in space.variables:
        if isinstance(variable, Choice):
            hp.Choice(variable.name, list(variable.options))
        elif isinstance(variable, Rate):
            hp.Float(variable.name, variable.low, variable.high, sampling=variable.scale)
        elif isinstance(variable, Fraction):
            hp.Float(variable.name, 0.0, 1.0)
        else:
            raise ValueError(f"the race has no KerasTuner counterpart of {variable!r}")


def backbone_of(model: keras.Model) -> keras.Model:
    """The backbone nested in a transfer model (its only sub-model)."""
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def early_stopping(config: Experiment) -> keras.callbacks.EarlyStopping:
    return keras.callbacks.EarlyStopping("val_accuracy", patience=config.training.early_stopping_patience,
                                         mode="max", restore_best_weights=True)


@dataclass(frozen=True)
class PhaseRun:
    """One training phase of a KerasTuner trial, for the report."""

    phase: str
    epochs: int
    seconds: float
    stopped_early: bool


class TransferHyperModel(keras_tuner.HyperModel):
    """The transfer model of a trial and its two-phase training, as a KerasTuner hypermodel.

    `build` returns the model with its backbone frozen, compiled for the classification
    block; `fit` trains the block, then fine-tunes from the delimiting layer with a tenth
    of the rate and returns the fine-tuning history (KerasTuner scores its best epoch).
    `runs` records every phase it trained.
    """

    def __init__(self, config: Experiment, num_classes: int):
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.runs: list[PhaseRun] = []
        self.build_started = 0.0

    def build(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        self.build_started = time.perf_counter()
        declare_hyperparameters(hp, self.config)
        keras.utils.set_random_seed(self.config.seed)
        model, base = build_transfer_model(hp["backbone"], self.num_classes, self.config.data.image_size,
                                           self.config.weights, self.config.pooling)
        base.trainable = False
        model.compile(optimizer=make_optimizer(hp["optimizer"], hp["learning_rate"]), loss=LOSS,
                      metrics=["accuracy"])
        return model

    def fit(self, hp: keras_tuner.HyperParameters, model: keras.Model, *args, epochs: int = 1,
            callbacks: Sequence[keras.callbacks.Callback] = (), **kwargs) -> keras.callbacks.History:
        kwargs["shuffle"] = False  # the tf.data pipeline shuffles itself (Keras cannot shuffle one)
        block = model.fit(*args, epochs=self.config.training.block_epochs,
                          callbacks=[early_stopping(self.config), keras.callbacks.TerminateOnNaN()], **kwargs)
        finetune_started = time.perf_counter()
        self.runs.append(PhaseRun("block", len(block.epoch), finetune_started - self.build_started,
                                  len(block.epoch) < self.config.training.block_epochs))
        set_delimiting_layer(backbone_of(model), layer_from_fraction(hp["backbone"], hp["delimiting_fraction"]))
        model.compile(optimizer=make_optimizer(hp["optimizer"], hp["learning_rate"] * FINETUNE_RATE_FACTOR),
                      loss=LOSS, metrics=["accuracy"])
        finetune = model.fit(*args, epochs=epochs, callbacks=list(callbacks), **kwargs)
        self.runs.append(PhaseRun("finetune", len(finetune.epoch), time.perf_counter() - finetune_started,
                                  len(finetune.epoch) < epochs))
        return finetune


def make_tuner(config: Experiment, num_classes: int, directory: Path) -> keras_tuner.BayesianOptimization:
    """KerasTuner's GP tuner with `config`'s budget, initial points and seed."""
    return keras_tuner.BayesianOptimization(
        hypermodel=TransferHyperModel(config, num_classes),
        objective=keras_tuner.Objective("val_accuracy", "max"),
        max_trials=config.bo.budget,
        num_initial_points=config.bo.initial_points,
        seed=config.seed,
        directory=str(directory),
        project_name="race",
        overwrite=True,
    )


def run_kerastuner(config: Experiment, split_frame: pd.DataFrame, directory: Path) -> SearchResult:
    """KerasTuner's BayesianOptimization on `split_frame` (its files and image cache go to `directory`)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    names = data.class_names(split_frame)
    size, batch_size = config.data.image_size, config.data.batch_size
    cache = data.cache_images(split_frame, size, directory / "cache")
    train, val = (data.make_dataset(split_frame[split_frame["split"] == split], names, size, batch_size,
                                    split == "train", config.seed, cache)
                  for split in ("train", "val"))
    tuner = make_tuner(config, len(names), directory)
    tuner.search(train, validation_data=val, epochs=config.training.finetune_epochs,
                 callbacks=[early_stopping(config), keras.callbacks.TerminateOnNaN()], verbose=0)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    runs = tuner.hypermodel.runs
    return SearchResult(
        seed=config.seed, seconds=seconds, cpu_seconds=cpu_seconds,
        best_val_accuracy=float(tuner.oracle.get_best_trials(1)[0].score),
        trials=len(tuner.oracle.trials), epochs=sum(run.epochs for run in runs),
        block_seconds=sum(run.seconds for run in runs if run.phase == "block"),
        finetune_seconds=sum(run.seconds for run in runs if run.phase == "finetune"),
        stopped_early=sum(run.stopped_early for run in runs if run.phase == "finetune"),
    )


MEDIANS = ("seconds", "cpu_seconds", "best_val_accuracy", "trials", "epochs", "seconds_per_epoch",
           "block_seconds", "finetune_seconds", "rest_seconds", "stopped_early")


def medians(results: Sequence[SearchResult]) -> dict[str, float]:
    """The median over seeds of every number in `MEDIANS`."""
    return {name: statistics.median(getattr(result, name) for result in results) for name in MEDIANS}


@dataclass(frozen=True)
class Race:
    """Both tools' searches, one per seed, and what the bench reports of them."""

    tlopt: tuple[SearchResult, ...]
    kerastuner: tuple[SearchResult, ...]

    def medians(self) -> dict[str, dict[str, float]]:
        return {"tlopt": medians(self.tlopt), "KerasTuner": medians(self.kerastuner)}

    @property
    def speedup(self) -> float:
        """KerasTuner's median wall time over tlopt's."""
        return medians(self.kerastuner)["seconds"] / medians(self.tlopt)["seconds"]

    @property
    def accuracy_delta(self) -> float:
        """tlopt's median best validation accuracy minus KerasTuner's."""
        return medians(self.tlopt)["best_val_accuracy"] - medians(self.kerastuner)["best_val_accuracy"]

    def lines(self) -> list[str]:
        """What the bench prints: each seed, each side's medians with where its time goes, what misses a
        target, then `kerastuner_speedup=<ratio>` and `kerastuner_accuracy_delta=<difference>`."""
        lines = [f"seed {tl.seed}: tlopt {tl.seconds:.0f} s, best {tl.best_val_accuracy:.3f}; "
                 f"KerasTuner {kt.seconds:.0f} s, best {kt.best_val_accuracy:.3f}"
                 for tl, kt in zip(self.tlopt, self.kerastuner)]
        lines.append("medians over the seeds (wall, CPU, best val_accuracy; epochs run; time in the "
                     "classification block, fine-tuning, the rest of the search; fine-tuning runs stopped early):")
        for name, m in self.medians().items():
            lines.append(
                f"{name:10s} {m['seconds']:6.1f} s, {m['cpu_seconds']:6.1f} s CPU, "
                f"best {m['best_val_accuracy']:.3f}; {m['epochs']:.0f} epochs, "
                f"{m['seconds_per_epoch']:.2f} s an epoch; "
                f"block {m['block_seconds']:.1f} s, fine-tuning {m['finetune_seconds']:.1f} s, "
                f"rest {m['rest_seconds']:.1f} s; {m['stopped_early']:.0f} of {m['trials']:.0f} stopped early"
            )
        lines.append(f"KerasTuner / tlopt wall time {self.speedup:.2f}x (target >= {SPEEDUP_TARGET:.0f}x); "
                     f"tlopt's median best minus KerasTuner's {self.accuracy_delta:+.3f} (target >= 0)")
        return [*lines, *self.shortfall(), f"kerastuner_speedup={self.speedup:.2f}",
                f"kerastuner_accuracy_delta={self.accuracy_delta:+.3f}"]

    def shortfall(self) -> list[str]:
        """What keeps a target out of reach, in the numbers' own terms; nothing when both are met."""
        missed = []
        tl, kt = self.medians().values()
        if self.speedup < SPEEDUP_TARGET:
            parts = (("classification block", "block_seconds"), ("fine-tuning", "finetune_seconds"),
                     ("rest of the search", "rest_seconds"))
            missed.append(
                f"{SPEEDUP_TARGET:.0f}x missed: tlopt would need {kt['seconds'] / SPEEDUP_TARGET:.0f} s a seed, "
                f"not {tl['seconds']:.0f} s; tlopt vs KerasTuner (medians): "
                + "; ".join(f"{part} {tl[key]:.0f} s vs {kt[key]:.0f} s" for part, key in parts)
                + f"; epochs {tl['epochs']:.0f} vs {kt['epochs']:.0f} at {tl['seconds_per_epoch']:.2f} s vs "
                f"{kt['seconds_per_epoch']:.2f} s an epoch"
            )
        if self.accuracy_delta < 0:
            missed.append(
                f"accuracy missed: best val_accuracy per seed, tlopt "
                f"{', '.join(f'{r.best_val_accuracy:.3f}' for r in self.tlopt)}, KerasTuner "
                f"{', '.join(f'{r.best_val_accuracy:.3f}' for r in self.kerastuner)}"
            )
        return missed

    def table_rows(self, description: str) -> list[str]:
        """The bench table's rows: medians and ratio, then where the time goes."""
        tl, kt = self.medians().values()

        def parts(m: dict[str, float]) -> str:
            return " / ".join(f"{m[key]:.0f} s" for key in ("block_seconds", "finetune_seconds", "rest_seconds"))

        return [
            f"| the race with KerasTuner `BayesianOptimization` ({description}): median wall time over seeds "
            f"{', '.join(str(r.seed) for r in self.tlopt)}; median best val accuracy "
            f"{tl['best_val_accuracy']:.2f} (tlopt) vs {kt['best_val_accuracy']:.2f} (KerasTuner), difference "
            f"{self.accuracy_delta:+.2f}; median CPU time {tl['cpu_seconds']:.0f} s vs {kt['cpu_seconds']:.0f} s "
            f"| {tl['seconds']:.0f} s | {kt['seconds']:.0f} s | {self.speedup:.1f}x "
            f"| >= {SPEEDUP_TARGET:.0f}x at equal or better accuracy |",
            f"| the same, medians of classification block / fine-tuning / rest of the search; epochs run "
            f"{tl['epochs']:.0f} vs {kt['epochs']:.0f}; fine-tuning runs stopped early {tl['stopped_early']:.0f} "
            f"vs {kt['stopped_early']:.0f} | {parts(tl)} | {parts(kt)} | | |",
        ]


def race(params: Experiment, split_frame: pd.DataFrame, work: Path, seeds: Sequence[int] = RACE_SEEDS) -> Race:
    """Both tools on `params` (made `comparable` by the caller) once per seed, in alternating order."""
    tf.config.experimental.enable_op_determinism()
    found: dict[str, list[SearchResult]] = {"tlopt": [], "KerasTuner": []}
    for rep, seed in enumerate(seeds):
        config = params.updated({"seed": seed, "run_name": f"race-seed-{seed}"})
        sides = {"tlopt": lambda: run_tlopt(config, split_frame),
                 "KerasTuner": lambda: run_kerastuner(config, split_frame, work / f"kerastuner-seed-{seed}")}
        for name in (("tlopt", "KerasTuner") if rep % 2 == 0 else ("KerasTuner", "tlopt")):
            print(f"race, seed {seed}: {name} ...", flush=True)
            found[name].append(sides[name]())
            print(f"race, seed {seed}: {name} took {found[name][-1].seconds:.0f} s, "
                  f"best val_accuracy {found[name][-1].best_val_accuracy:.3f}", flush=True)
    return Race(tuple(found["tlopt"]), tuple(found["KerasTuner"]))


def describe(params: Experiment, split_frame: pd.DataFrame) -> str:
    """The race's setting in words, for the printed lines and the bench table."""
    counts = split_frame["split"].value_counts()
    return (f"params/demo.yaml, strategy `joint`, {params.bo.budget} trials ({params.bo.initial_points} random), "
            f"at most {params.training.block_epochs} block + {params.training.finetune_epochs} fine-tuning epochs, "
            f"{', '.join(params.backbones)} at {params.data.image_size} px, weights {params.weights}, "
            f"{counts.get('train', 0)} training and {counts.get('val', 0)} validation images")


def demo_race_params(work: Path) -> Experiment:
    """params/demo.yaml made comparable, its data and results under `work`."""
    demo = load_params(DEMO_PARAMS, {"results_dir": str(work / "results"), "data.root": str(work / "demo")})
    return comparable(demo, *RACE_TRIALS)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="tlopt-race-") as work:
        work = Path(work)
        params = demo_race_params(work)
        frame = data.prepare_split(params, work / "split")
        print(f"race: {describe(params, frame)}", flush=True)
        result = race(params, frame, work)
    print("\n".join(result.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
