"""`make bench`: what tlopt's caches buy on this machine, measured side by side in one run.

Each ratio compares two ways of doing the same work in the same process, run
alternately (A B, B A, A B, ...) so that a change in the machine's load hits both,
and takes the median of `--repeats` repetitions. The searches and whole experiments
take minutes a side and run once each; the race with KerasTuner (bench/kerastuner_side.py)
runs each tool once per seed, three seeds, in alternating order, and reports medians.
About 40 minutes on 2 CPU cores, half of it the race; the bench prints how long it took.

Prints a markdown table, writes it with the machine's description into
docs/performance.md (between the bench markers), prints `kerastuner_speedup=<ratio>`
and `kerastuner_accuracy_delta=<difference>` (the race with KerasTuner), then
`parallel_speedup=<ratio>` (the reduced demo search, one trial at a time vs two at once
on Ray), `finetune_cache_speedup=<ratio>` and `whole_experiment_speedup=<ratio>` (below),
and `head_cache_speedup=<ratio>` as its last line.

Everything starts from params/demo.yaml (its dataset, 32 px input, random weights:
no GPU, no download); the classification-block and overhead measurements use its
VGG16 alone, the backbone that learns with random weights (no BatchNormalization).
The input pipeline is also measured on the demo drawn at Kvasir's resolution (576 px
JPEGs) at the thesis's 299 px, where decoding costs what it costs on real data.
Fine-tuning is measured where the activation cache is meant to pay, at 224 px (the demo
drawn at 224 px, a few images so that 2 cores run it in minutes): one trial per backbone
(VGG16, ResNet50, DenseNet121) from cached activations, extraction included, vs on the
fly, and a whole experiment with every cache on vs every cache off:
`finetune_cache_speedup` is the geometric mean over the three backbones of the steady
fine-tuning epoch's speedup (the first epoch is mostly tracing; the table gives whole
trials, extraction and tracing too), `whole_experiment_speedup` the experiment's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import tlopt  # noqa: F401  TensorFlow's environment (backend, log level, oneDNN) before keras imports it
import keras
import pandas as pd
import tensorflow as tf

from tlopt import activations, data, features, optimize
from tlopt.backbones import (
    Preprocessing,
    build_transfer_model,
    default_delimiting_layer,
    layer_count,
    set_delimiting_layer,
)
from tlopt.params import Experiment, load_params
from tlopt.store import RunFolder, TrialFolder, TrialStore
from tlopt.training import LOSS, fine_tune, make_optimizer, train_block

import kerastuner_side

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "performance.md"
DEMO_PARAMS = REPO / "params" / "demo.yaml"
BEGIN, END = "<!-- bench:begin (written by bench/run.py) -->", "<!-- bench:end -->"

BACKBONE = "VGG16"
HEAD_EPOCHS = 10
# The reduced demo search (strategy `shared`, model optimization alone): (random initial points, BO iterations).
EXPERIMENT_TRIALS = (2, 1)
# The reduced search again with this many trials at once (`execution.parallel_trials`).
PARALLEL_TRIALS = 2
# Five block trials of one backbone, as BO's initial design would draw them.
HEAD_TRIALS = (("Adam", 1e-3), ("SGD", 1e-2), ("RMSprop", 3e-4), ("Nadam", 2e-3), ("Adagrad", 3e-2))
# Fine-tuning and the whole experiment at a realistic input size: the demo drawn at 224 px,
# 6 images a class (16 training and 8 validation images: one batch), so that 2 CPU cores
# run it in minutes. Each fine-tuning trial runs 3 epochs: the first traces, the faster of the
# other two is the steady epoch (the minimum: other processes only ever add time).
REALISTIC_SIZE = 224
REALISTIC_IMAGES_PER_CLASS = 6
FINETUNE_BACKBONES = ("VGG16", "ResNet50", "DenseNet121")
FINETUNE_EPOCHS = 3
# The whole experiment at 224 px: a model optimization of the three backbones, random points
# only (the same trials on both sides whatever the accuracies), 1 block : 5 fine-tuning epochs
# (the thesis's 10 : 50).
REALISTIC_TRIALS = 3
REALISTIC_EPOCHS = (1, 5)


def machine() -> str:
    """Cores, CPU model, memory and the versions that decide the numbers."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpus = len(tf.config.list_physical_devices("GPU"))
    return (f"{os.cpu_count()} CPU cores ({model}), {memory:.0f} GiB RAM, {gpus or 'no'} GPU; "
            f"Python {platform.python_version()}, TensorFlow {tf.__version__}, Keras {keras.__version__}; "
            f"{date.today().isoformat()}")


def side_by_side(repeats: int, first: Callable[[int], float],
                 second: Callable[[int], float]) -> tuple[float, float]:
    """Medians of `first(rep)` and `second(rep)` (seconds), run alternately to share the load."""
    times: tuple[list[float], list[float]] = ([], [])
    for rep in range(repeats):
        order = (0, 1) if rep % 2 == 0 else (1, 0)
        for which in order:
            times[which].append((first, second)[which](rep))
    return statistics.median(times[0]), statistics.median(times[1])


def demo_params(work: Path, run_name: str, overrides: dict | None = None) -> Experiment:
    """params/demo.yaml with its data and results under `work`, and dotted-key `overrides`."""
    return load_params(DEMO_PARAMS, {"run_name": run_name, "results_dir": str(work / "results"),
                                     "data.root": str(work / "demo"), **(overrides or {})})


def head_cache(frame: pd.DataFrame, names: list[str], config: Experiment, cache_dir: Path, work: Path,
               repeats: int) -> tuple[float, float]:
    """Five block trials: feature cache (extraction included) vs the backbone in every epoch.

    Both read the (already built) decoded-image cache, so the ratio is the feature cache's
    alone. Every trial runs all its epochs (no early stopping, no nonconvergence filter).
    The cache files are deleted before each cached repetition, so that it extracts the
    features (and builds the backbone) again.
    """
    data.cache_images(frame, config.data.image_size, cache_dir)

    def trials(feature_cache: bool) -> Callable[[int], float]:
        def run(rep: int) -> float:
            if feature_cache:
                for pattern in ("features-*.npy", "head-*.npz"):
                    for stale in cache_dir.glob(pattern):
                        stale.unlink()
            started = time.perf_counter()
            for index, (optimizer, rate) in enumerate(HEAD_TRIALS):
                run_dir = work / f"head-{feature_cache}-{rep}-{index}"
                train_block(BACKBONE, optimizer, rate, frame, names, run_dir,
                            config.updated({"training.feature_cache": feature_cache}), cache_dir)
            return time.perf_counter() - started
        return run

    return side_by_side(repeats, trials(True), trials(False))


@dataclasses.dataclass(frozen=True)
class PipelineTimes:
    """Seconds of one epoch, (cached, decoding): `full` the training pipeline (shuffle,
    flips, batches), `pixels` the images alone in order (the stage the cache replaces);
    `build` the cache's one-off construction; `preprocess` what the model's first layer
    (`preprocess_input`) adds to the epoch's steps, wherever the model runs."""

    full: tuple[float, float]
    pixels: tuple[float, float]
    build: float
    preprocess: float


def pipeline_epoch(frame: pd.DataFrame, names: list[str], config: Experiment, cache_dir: Path,
                   repeats: int) -> PipelineTimes:
    """One epoch of the training rows through the input pipeline alone: image cache vs decoding.

    Each epoch iterates an already-made pipeline, as Keras does after its first epoch.
    """
    rows = frame[frame["split"] == "train"]
    started = time.perf_counter()
    size, batch_size, seed = config.data.image_size, config.data.batch_size, config.seed
    cache = data.cache_images(frame, size, cache_dir)
    build = time.perf_counter() - started

    def epochs(image_cache: data.ImageCache | None, full: bool) -> Callable[[int], float]:
        pipeline = data.make_dataset(rows, names, size, batch_size, full, seed, image_cache)
        for _ in pipeline:  # the first pass traces the pipeline's functions
            pass

        def run(rep: int) -> float:
            started = time.perf_counter()
            for _ in pipeline:
                pass
            return time.perf_counter() - started
        return run

    preprocessing = Preprocessing(BACKBONE)
    batches = [images for images, _ in data.make_dataset(rows, names, size, batch_size, True, seed, cache)]

    def preprocess(rep: int) -> float:
        started = time.perf_counter()
        for images in batches:
            preprocessing(images)
        return time.perf_counter() - started

    return PipelineTimes(
        full=side_by_side(repeats, epochs(cache, True), epochs(None, True)),
        pixels=side_by_side(repeats, epochs(cache, False), epochs(None, False)),
        build=build,
        preprocess=statistics.median(preprocess(rep) for rep in range(repeats)),
    )


def trial_overhead(frame: pd.DataFrame, names: list[str], config: Experiment, cache_dir: Path,
                   repeats: int) -> dict[str, float]:
    """A trial's fixed cost (model build, compile, first-step tracing) and its training, on the fly.

    Tracing is the first epoch's time minus a steady epoch's (the median of two more).
    Medians over the repetitions of: the block phase (frozen backbone) and the
    fine-tuning phase (from the default delimiting layer).
    """
    size = config.data.image_size
    cache = data.cache_images(frame, size, cache_dir)
    train, val = (data.make_dataset(frame[frame["split"] == split], names, size, config.data.batch_size,
                                    split == "train", config.seed, cache)
                  for split in ("train", "val"))

    def phase(model: keras.Model) -> tuple[float, float, float]:
        started = time.perf_counter()
        model.compile(optimizer=make_optimizer("Adam", 1e-4), loss=LOSS, metrics=["accuracy"])
        compiled = time.perf_counter()
        model.fit(train, validation_data=val, epochs=1, shuffle=False, verbose=0)
        first = time.perf_counter()
        epochs = []
        for _ in range(2):
            epoch_started = time.perf_counter()
            model.fit(train, validation_data=val, epochs=1, shuffle=False, verbose=0)
            epochs.append(time.perf_counter() - epoch_started)
        steady = statistics.median(epochs)
        return compiled - started, (first - compiled) - steady, steady

    found: dict[str, list[float]] = {}
    for _ in range(repeats):
        keras.backend.clear_session()
        started = time.perf_counter()
        model, base = build_transfer_model(BACKBONE, len(names), size, None)
        base.trainable = False
        build = time.perf_counter() - started
        compile_block, trace_block, epoch_block = phase(model)
        set_delimiting_layer(base, default_delimiting_layer(len(base.layers)))
        compile_finetune, trace_finetune, epoch_finetune = phase(model)
        values = {
            "build": build, "compile": compile_block + compile_finetune,
            "tracing": trace_block + trace_finetune,
            "block_epoch": epoch_block, "finetune_epoch": epoch_finetune,
        }
        for key, value in values.items():
            found.setdefault(key, []).append(value)
    keras.backend.clear_session()
    result = {key: statistics.median(values) for key, values in found.items()}
    # A trial builds the model twice (block, then fine-tuning from the block's weights).
    result["overhead"] = 2 * result["build"] + result["compile"] + result["tracing"]
    result["training"] = (config.training.block_epochs * result["block_epoch"]
                          + config.training.finetune_epochs * result["finetune_epoch"])
    return result


class EpochTimes(keras.callbacks.Callback):
    """Wall seconds of each epoch (training and validation), watched from a run's observers."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None) -> None:
        self.seconds.append(time.perf_counter() - self._started)


@contextmanager
def timed(module, name: str) -> Iterator[list[float]]:
    """Seconds of every call of `module.name` while the block runs (the caches' extraction)."""
    original, spent = getattr(module, name), []

    def measured(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)

    setattr(module, name, measured)
    try:
        yield spent
    finally:
        setattr(module, name, original)


@dataclasses.dataclass(frozen=True)
class FinetuneTimes:
    """One fine-tuning trial of a backbone on the fly and from the activation cache (seconds).

    `trial`: (cached, on the fly), the cached one extracting its cache first (`extraction`);
    `epochs`: each side's epoch times, the first with its tracing; `cache_mb`: the cache's size.
    """

    trial: tuple[float, float]
    epochs: tuple[list[float], list[float]]
    extraction: float
    cache_mb: float

    @property
    def steady(self) -> tuple[float, float]:
        return min(self.epochs[0][1:]), min(self.epochs[1][1:])


def finetune_cache(frame: pd.DataFrame, names: list[str], config: Experiment, work: Path) -> dict[str, FinetuneTimes]:
    """Per backbone, one fine-tuning trial from the default delimiting layer: activation cache vs on the fly.

    Both read the decoded-image cache; the cached trial starts without an activation cache,
    so it pays its extraction. The block's weights are the Dense layer's initial weights
    (the block phase is not measured here).
    """
    measured = {}
    for backbone in FINETUNE_BACKBONES:
        cache_dir = work / f"cache-finetune-{backbone}"
        data.cache_images(frame, config.data.image_size, cache_dir)
        keras.utils.set_random_seed(config.seed)
        model, _ = build_transfer_model(backbone, len(names), config.data.image_size, None)
        block_weights = TrialFolder(work / f"block-{backbone}").weights("block")
        block_weights.parent.mkdir(parents=True, exist_ok=True)
        features.head_of(model).save_weights(block_weights)
        keras.backend.clear_session()
        index = default_delimiting_layer(layer_count(backbone), config.training.default_delimiting_fraction)
        seconds, epochs = {}, {}
        with timed(activations, "extract") as extraction:
            for cached in (False, True):
                watch = EpochTimes()
                started = time.perf_counter()
                fine_tune(backbone, "Adam", 1e-4, index, block_weights, frame, names,
                          work / f"finetune-{backbone}-{cached}",
                          config.updated({"training.activation_cache": cached}), cache_dir, observers=[watch])
                seconds[cached], epochs[cached] = time.perf_counter() - started, watch.seconds
        size = sum(path.stat().st_size for path in cache_dir.glob("activations-*.npy")) / 1e6
        measured[backbone] = FinetuneTimes((seconds[True], seconds[False]), (epochs[True], epochs[False]),
                                           sum(extraction), size)
    return measured


@dataclasses.dataclass(frozen=True)
class ExperimentTimes:
    """A whole experiment's wall and CPU seconds, best validation accuracy, cache files written,
    the seconds its caches spent extracting (pooled features, activations) and the backbones its trials drew."""

    seconds: float
    cpu_seconds: float
    best: float
    cache_files: int
    feature_extraction: float
    activation_extraction: float
    backbones: list[str]


def experiment(params: Experiment, frame: pd.DataFrame) -> ExperimentTimes:
    """Every strategy and layer optimization of `params` in a new run folder.

    The cache files counted are `images-*`, `features-*` and `activations-*.npy`: none means
    that the switches did not reach the training runs.
    """
    run = RunFolder.open(params)
    data.write_manifest(frame, run.split_file)
    started, cpu_started = time.perf_counter(), time.process_time()
    finals = []
    with timed(features, "pooled_features") as pooled, timed(activations, "extract") as extracted:
        for strategy in params.strategies:
            best = optimize.run_strategy(params, strategy, run, progress=False)
            if params.layer_optimization.enabled:
                best = optimize.run_layer_optimization(params, strategy, run, progress=False)
            finals.append(best.val_accuracy)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    cache_files = [path for pattern in ("images-*.npy", "features-*.npy", "activations-*.npy")
                   for path in run.path.rglob(pattern)]
    drawn = [trial.setup.get("backbone", "") for trial in TrialStore(run.trials_file).records()]
    return ExperimentTimes(seconds, cpu_seconds, max(finals), len(cache_files), sum(pooled), sum(extracted), drawn)


def ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.1f}x"


def pipeline_rows(measured: PipelineTimes, images: str) -> list[str]:
    """The table rows of one `pipeline_epoch` measurement."""
    (cached, decoding), (cached_pixels, decoding_pixels) = measured.full, measured.pixels
    return [
        f"| input pipeline, one training epoch of {images} (shuffle, flips, batches of uint8 pixels; "
        f"`preprocess_input` is the model's first layer and adds {measured.preprocess:.3f} s to the epoch's "
        f"steps): decoded-image cache vs decoding (building the cache once: {measured.build:.2f} s) "
        f"| {cached:.3f} s | {decoding:.3f} s | {ratio(decoding, cached)} | >= 5x |",
        f"| the same, pixels alone (in order, no flips) "
        f"| {cached_pixels:.3f} s | {decoding_pixels:.3f} s | {ratio(decoding_pixels, cached_pixels)} | |",
    ]


def write_doc(doc: Path, table: str, description: str) -> None:
    """Replace the bench section of `doc` (the rest of the page is hand-written)."""
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc} lacks the bench markers {BEGIN} ... {END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\nMeasured on {description}.\n\n{table}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of each side-by-side measurement")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/performance.md as it is")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    description = machine()
    print(f"machine: {description}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tlopt-bench-") as work:
        work = Path(work)
        demo = demo_params(work, "demo")
        frame = data.prepare_split(demo, work / "split")
        names = data.class_names(frame)
        train_images = int((frame["split"] == "train").sum())
        head = demo_params(work, "head", {
            "backbones": [BACKBONE], "training.block_epochs": HEAD_EPOCHS,
            "training.early_stopping_patience": HEAD_EPOCHS, "training.nonconvergence.enabled": False,
        })
        size = head.data.image_size

        print("input pipeline ...", flush=True)
        pipeline = pipeline_epoch(frame, names, head, work / "cache", args.repeats)
        kvasir_like = demo_params(work, "kvasir-like", {"data.root": str(work / "kvasir-like"),
                                                       "data.demo.image_size": 576, "data.image_size": 299})
        pipeline_299 = pipeline_epoch(data.prepare_split(kvasir_like, work / "split-299"), names,
                                      head.updated({"data.image_size": 299}), work / "cache-299", args.repeats)
        print(f"classification block, {len(HEAD_TRIALS)} trials ...", flush=True)
        head_on, head_off = head_cache(frame, names, head, work / "cache-head", work / "runs", args.repeats)
        print("per-trial overhead ...", flush=True)
        block_epochs, finetune_epochs = demo.training.block_epochs, demo.training.finetune_epochs
        overhead = trial_overhead(frame, names, demo.updated({"backbones": [BACKBONE]}), work / "cache",
                                  args.repeats)

        # The reduced demo search one trial at a time, then two at a time on Ray.
        searches = {}
        for slots in (1, PARALLEL_TRIALS):
            print(f"reduced demo search, {slots} trial(s) at once ...", flush=True)
            searches[slots] = experiment(demo_params(work, f"search-{slots}", {
                "bo.initial_points": EXPERIMENT_TRIALS[0], "bo.iterations": EXPERIMENT_TRIALS[1],
                "strategies": ["shared"], "layer_optimization.enabled": False, "execution.parallel_trials": slots,
            }), frame)

        realistic = demo_params(work, "realistic", {
            "data.root": str(work / "realistic"), "data.demo.image_size": REALISTIC_SIZE,
            "data.demo.images_per_class": REALISTIC_IMAGES_PER_CLASS, "data.image_size": REALISTIC_SIZE,
        })
        realistic_frame = data.prepare_split(realistic, work / "split-realistic")
        print(f"fine-tuning at {REALISTIC_SIZE} px, activation cache vs on the fly "
              f"({', '.join(FINETUNE_BACKBONES)}) ...", flush=True)
        finetunes = finetune_cache(realistic_frame, data.class_names(realistic_frame), realistic.updated({
            "training.finetune_epochs": FINETUNE_EPOCHS, "training.nonconvergence.enabled": False,
        }), work / "finetune")
        realistic_experiments = {}
        for caches in (False, True):
            state = "on" if caches else "off"
            print(f"whole experiment at {REALISTIC_SIZE} px, caches {state} ...", flush=True)
            realistic_experiments[state] = experiment(realistic.updated({
                "run_name": f"realistic-caches-{state}", "backbones": list(FINETUNE_BACKBONES), "strategies": ["shared"],
                "layer_optimization.enabled": False,
                "bo.initial_points": REALISTIC_TRIALS, "bo.iterations": 0,
                "training.block_epochs": REALISTIC_EPOCHS[0], "training.finetune_epochs": REALISTIC_EPOCHS[1],
                "data.image_cache": caches, "training.feature_cache": caches, "training.activation_cache": caches,
            }), realistic_frame)

        race_params = kerastuner_side.comparable(demo_params(work, "race"), *kerastuner_side.RACE_TRIALS)
        race_setting = kerastuner_side.describe(race_params, frame)
        print(f"race with KerasTuner: {race_setting} ...", flush=True)
        race = kerastuner_side.race(race_params, frame, work)

    serial, parallel = searches[1], searches[PARALLEL_TRIALS]
    real_on, real_off = realistic_experiments["on"], realistic_experiments["off"]
    extraction = real_on.feature_extraction + real_on.activation_extraction
    realistic_train = int((realistic_frame["split"] == "train").sum())
    realistic_val = int((realistic_frame["split"] == "val").sum())
    rows = [
        "| measurement | tlopt | without / other | ratio | target |",
        "|---|---|---|---|---|",
        f"| classification block, {len(HEAD_TRIALS)} trials x {HEAD_EPOCHS} epochs ({BACKBONE}, {size} px): "
        f"feature cache (extraction included) vs the frozen backbone in every epoch "
        f"| {head_on:.1f} s | {head_off:.1f} s | {ratio(head_off, head_on)} | >= 8x |",
        *pipeline_rows(pipeline, f"{train_images} demo JPEGs of {demo.data.demo.image_size} px "
                                 f"at {size} px"),
        *pipeline_rows(pipeline_299, f"{train_images} Kvasir-sized JPEGs (the demo drawn at 576 px) at 299 px"),
        f"| params/demo.yaml reduced to the model optimization of strategy `shared` ({sum(EXPERIMENT_TRIALS)} "
        f"trials: {EXPERIMENT_TRIALS[0]} random, then {EXPERIMENT_TRIALS[1]}), {PARALLEL_TRIALS} trials at once on "
        f"Ray (`--parallel {PARALLEL_TRIALS}`, embedded Ray, ordered schedule: each trial a fresh worker process) "
        f"vs one at a time; best val accuracy {parallel.best:.2f} vs {serial.best:.2f}; one run each "
        f"| {parallel.seconds:.0f} s | {serial.seconds:.0f} s | {ratio(serial.seconds, parallel.seconds)} | |",
        *(f"| fine-tuning trial of {backbone} at {REALISTIC_SIZE} px from its default delimiting layer "
          f"({FINETUNE_EPOCHS} epochs of {realistic_train} + {realistic_val} images; the demo drawn at {REALISTIC_SIZE} px, "
          f"random weights): activation cache, extraction included ({times.extraction:.1f} s, {times.cache_mb:.0f} MB) "
          f"vs on the fly; first epoch (tracing) {times.epochs[0][0]:.1f} s vs {times.epochs[1][0]:.1f} s, steady epoch "
          f"{times.steady[0]:.2f} s vs {times.steady[1]:.2f} s ({ratio(times.steady[1], times.steady[0])}) "
          f"| {times.trial[0]:.1f} s | {times.trial[1]:.1f} s | {ratio(times.trial[1], times.trial[0])} | |"
          for backbone, times in finetunes.items()),
        f"| whole experiment at {REALISTIC_SIZE} px, all caches on vs all off: the demo drawn at {REALISTIC_SIZE} px "
        f"({realistic_train} + {realistic_val} images), strategy `shared`, model optimization of "
        f"{', '.join(FINETUNE_BACKBONES)}, {REALISTIC_TRIALS} random trials (drawn: {', '.join(real_on.backbones)}), "
        f"{REALISTIC_EPOCHS[0]} block : {REALISTIC_EPOCHS[1]} fine-tuning epochs; best val accuracy "
        f"{real_on.best:.2f} (on) vs {real_off.best:.2f} (off); {real_on.cache_files} cache files; the cached run spent "
        f"{real_on.feature_extraction:.0f} s extracting pooled features and {real_on.activation_extraction:.0f} s "
        f"activations, {real_on.seconds - extraction:.0f} s on the rest (model builds, tracing, the trainable "
        f"layers' passes and optimizer updates); one run each; CPU time {real_on.cpu_seconds:.0f} s vs "
        f"{real_off.cpu_seconds:.0f} s | {real_on.seconds:.0f} s | {real_off.seconds:.0f} s "
        f"| {ratio(real_off.seconds, real_on.seconds)} | >= 2x |",
        f"| per-trial overhead on the fly: 2 model builds + 2 compiles + first-step tracing vs training "
        f"{block_epochs} block + {finetune_epochs} fine-tuning epochs | {overhead['overhead']:.1f} s "
        f"| {overhead['training']:.1f} s | {overhead['overhead'] / overhead['training']:.2f} | |",
        *race.table_rows(race_setting),
    ]
    details = (
        f"Per-trial overhead in detail (medians): model build {overhead['build']:.2f} s, compile "
        f"{overhead['compile']:.2f} s and first-step tracing {overhead['tracing']:.2f} s (both phases), a steady "
        f"epoch {overhead['block_epoch']:.2f} s (block) and {overhead['finetune_epoch']:.2f} s (fine-tuning). "
        f"Other rows: medians of {args.repeats} repetitions unless they say otherwise."
    )
    table = "\n".join(rows) + f"\n\n{details}\n"
    print()
    print(table)
    print("\n".join(race.lines()))
    minutes = (time.perf_counter() - started) / 60
    print(f"the bench took {minutes:.0f} minutes")
    if not args.no_doc:
        write_doc(DOC, table, f"{description}; the bench took {minutes:.0f} minutes")
        print(f"written to {DOC.relative_to(REPO)}")
    print(f"parallel_speedup={serial.seconds / parallel.seconds:.2f}")
    steady = [times.steady[1] / times.steady[0] for times in finetunes.values()]
    print(f"finetune_cache_speedup={math.prod(steady) ** (1 / len(steady)):.2f}")
    print(f"whole_experiment_speedup={real_off.seconds / real_on.seconds:.2f}")
    print(f"head_cache_speedup={head_off / head_on:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
