"""`make bench`: what tlopt's caches buy on this machine, measured side by side in one run.

Each ratio compares two ways of doing the same work in the same process, run
alternately (A B, B A, A B, ...) so that a change in the machine's load hits both,
and takes the median of `--repeats` repetitions. The whole experiment and the
KerasTuner comparison take minutes a side and run once each.

Prints a markdown table, writes it with the machine's description into
docs/performance.md (between the bench markers), and prints
`parallel_speedup=<ratio>` (the reduced demo search, one trial at a time vs two at once
on Ray) and `head_cache_speedup=<ratio>` as its last two lines.

Everything starts from params/demo.yaml (its dataset, 32 px input, random weights:
no GPU, no download); the classification-block and overhead measurements use its
VGG16 alone, the backbone that learns with random weights (no BatchNormalization).
The input pipeline is also measured on the demo drawn at Kvasir's resolution (576 px
JPEGs) at the thesis's 299 px, where decoding costs what it costs on real data.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import pandas as pd
import tensorflow as tf

from tlopt import data, optimize
from tlopt.backbones import (
    Preprocessing,
    build_transfer_model,
    default_delimiting_layer,
    set_delimiting_layer,
)
from tlopt.params import Experiment, load_params
from tlopt.store import RunFolder
from tlopt.training import LOSS, make_optimizer, train_block

import kerastuner_side

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "performance.md"
DEMO_PARAMS = REPO / "params" / "demo.yaml"
BEGIN, END = "<!-- bench:begin (written by bench/run.py) -->", "<!-- bench:end -->"

BACKBONE = "VGG16"
HEAD_EPOCHS = 10
# The whole experiment and the KerasTuner comparison: (random initial points, BO iterations).
EXPERIMENT_TRIALS = (2, 1)
KERASTUNER_TRIALS = (2, 2)
# The whole experiment again with this many trials at once (`execution.parallel_trials`).
PARALLEL_TRIALS = 2
# Five block trials of one backbone, as BO's initial design would draw them.
HEAD_TRIALS = (("Adam", 1e-3), ("SGD", 1e-2), ("RMSprop", 3e-4), ("Nadam", 2e-3), ("Adagrad", 3e-2))


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


def experiment(params: Experiment, frame: pd.DataFrame) -> tuple[float, float, float, int]:
    """Every strategy and layer optimization of `params` in a new run folder.

    Returns wall seconds, CPU seconds of the process, the best final validation
    accuracy, and how many cache files (`images-*.npy`, `features-*.npy`) the run folder
    holds afterwards: none means that the switches did not reach the training runs.
    """
    run = RunFolder.open(params)
    data.write_manifest(frame, run.split_file)
    started, cpu_started = time.perf_counter(), time.process_time()
    finals = []
    for strategy in params.strategies:
        best = optimize.run_strategy(params, strategy, run, progress=False)
        if params.layer_optimization.enabled:
            best = optimize.run_layer_optimization(params, strategy, run, progress=False)
        finals.append(best.val_accuracy)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    cache_files = [path for pattern in ("images-*.npy", "features-*.npy") for path in run.path.rglob(pattern)]
    return seconds, cpu_seconds, max(finals), len(cache_files)


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
        # The classification block at the demo's input size and at its images' own size: at
        # 32 px a VGG16 pass is so cheap that Keras's fixed cost of a run sets the ratio.
        heads = {}
        for head_size in (size, demo.data.demo.image_size):
            print(f"classification block, {len(HEAD_TRIALS)} trials at {head_size} px ...", flush=True)
            heads[head_size] = head_cache(frame, names, head.updated({"data.image_size": head_size}),
                                          work / f"cache-head-{head_size}", work / "runs", args.repeats)
        head_on, head_off = heads[size]
        print("per-trial overhead ...", flush=True)
        block_epochs, finetune_epochs = demo.training.block_epochs, demo.training.finetune_epochs
        overhead = trial_overhead(frame, names, demo.updated({"backbones": [BACKBONE]}), work / "cache",
                                  args.repeats)

        experiments = {}
        for caches in (False, True):
            state = "on" if caches else "off"
            print(f"whole experiment, caches {state} ...", flush=True)
            experiments[state] = experiment(demo_params(work, f"experiment-caches-{state}", {
                "bo.initial_points": EXPERIMENT_TRIALS[0], "bo.iterations": EXPERIMENT_TRIALS[1],
                "strategies": ["shared"],
                "data.image_cache": caches, "training.feature_cache": caches,
            }), frame)
        # The same search, two trials at a time on Ray, right after its one-at-a-time run (caches on).
        print(f"whole experiment, {PARALLEL_TRIALS} trials at once ...", flush=True)
        parallel = experiment(demo_params(work, "experiment-parallel", {
            "bo.initial_points": EXPERIMENT_TRIALS[0], "bo.iterations": EXPERIMENT_TRIALS[1],
            "strategies": ["shared"], "execution.parallel_trials": PARALLEL_TRIALS,
        }), frame)

        side = kerastuner_side.comparable(demo_params(work, "kerastuner-side"), *KERASTUNER_TRIALS)
        search = kerastuner_side.Search.from_params(side)
        print(f"same search, tlopt and KerasTuner ({search.trials} trials each) ...", flush=True)
        tl = kerastuner_side.run_tlopt(side, frame)
        kt = kerastuner_side.run_kerastuner(search, frame, work / "kerastuner")

    on_seconds, on_cpu, on_best, on_files = experiments["on"]
    off_seconds, off_cpu, off_best, _ = experiments["off"]
    parallel_seconds, _, parallel_best, _ = parallel
    rows = [
        "| measurement | tlopt | without / other | ratio | target |",
        "|---|---|---|---|---|",
        *(f"| classification block, {len(HEAD_TRIALS)} trials x {HEAD_EPOCHS} epochs ({BACKBONE}, "
          f"{head_size} px, {'the demo input size' if head_size == size else 'the size of the demo images'}): "
          f"feature cache (extraction included) vs the frozen backbone in every epoch "
          f"| {on:.1f} s | {off:.1f} s | {ratio(off, on)} | >= 8x |" for head_size, (on, off) in heads.items()),
        *pipeline_rows(pipeline, f"{train_images} demo JPEGs of {demo.data.demo.image_size} px "
                                 f"at {size} px"),
        *pipeline_rows(pipeline_299, f"{train_images} Kvasir-sized JPEGs (the demo drawn at 576 px) at 299 px"),
        f"| whole experiment, caches on vs off: params/demo.yaml reduced to strategy `shared` + its layer "
        f"optimization, {sum(EXPERIMENT_TRIALS)} + {sum(EXPERIMENT_TRIALS)} trials; "
        f"best val accuracy {on_best:.2f} (on) vs {off_best:.2f} (off); "
        f"{on_files} cache files in the cached run's folder; one run each; CPU time {on_cpu:.0f} s vs "
        f"{off_cpu:.0f} s ({ratio(off_cpu, on_cpu)}) | {on_seconds:.0f} s | {off_seconds:.0f} s "
        f"| {ratio(off_seconds, on_seconds)} | |",
        f"| the same search (caches on), {PARALLEL_TRIALS} trials at once on Ray (`--parallel "
        f"{PARALLEL_TRIALS}`, embedded Ray, ordered schedule: each trial a fresh worker process) vs one at a "
        f"time (the run above); best val accuracy {parallel_best:.2f} vs {on_best:.2f}; one run each "
        f"| {parallel_seconds:.0f} s | {on_seconds:.0f} s | {ratio(on_seconds, parallel_seconds)} | |",
        f"| per-trial overhead on the fly: 2 model builds + 2 compiles + first-step tracing vs training "
        f"{block_epochs} block + {finetune_epochs} fine-tuning epochs | {overhead['overhead']:.1f} s "
        f"| {overhead['training']:.1f} s | {overhead['overhead'] / overhead['training']:.2f} | |",
        f"| the same search with KerasTuner `BayesianOptimization` (params/demo.yaml, strategy `joint`, "
        f"{search.trials} trials of at most {search.block_epochs} + {search.finetune_epochs} epochs); "
        f"best val accuracy {tl.best_val_accuracy:.2f} (tlopt) vs {kt.best_val_accuracy:.2f} (KerasTuner); "
        f"epochs run {tl.epochs} vs {kt.epochs}; one run each; CPU time {tl.cpu_seconds:.0f} s vs "
        f"{kt.cpu_seconds:.0f} s ({ratio(kt.cpu_seconds, tl.cpu_seconds)}) "
        f"| {tl.seconds:.0f} s | {kt.seconds:.0f} s | {ratio(kt.seconds, tl.seconds)} | |",
        f"| the same, time per epoch run | {tl.seconds / tl.epochs:.2f} s | {kt.seconds / kt.epochs:.2f} s "
        f"| {ratio(kt.seconds / kt.epochs, tl.seconds / tl.epochs)} | |",
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
    if not args.no_doc:
        write_doc(DOC, table, description)
        print(f"written to {DOC.relative_to(REPO)}")
    print(f"parallel_speedup={on_seconds / parallel_seconds:.2f}")
    print(f"head_cache_speedup={head_off / head_on:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
