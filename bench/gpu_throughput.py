"""Fine-tuning throughput of the nine thesis backbones, and the thesis protocol's projected time.

Run it on a GPU machine (`python bench/gpu_throughput.py`, under 8 minutes on one modern
GPU); `--quick` runs a tiny version on a CPU. Synthetic data and random weights
(`weights=None`): throughput depends on the shapes, not on the pixels or the weights.

For every backbone, batch size and precision it builds tlopt's transfer model at the
default delimiting layer (2/3 of the depth, the model-optimization steps' setting),
then times training steps (fine-tuning) and forward passes (validation, feature
extraction, and the frozen classification-block phase without the feature cache).
Each measurement is time-boxed: a few warm-up steps (the first one traces the graph),
then timed steps until a step count or a number of seconds is reached. A global time
budget skips a measurement that its backbone's previous one says would overrun it.

The projection (`project_hours`) turns the throughput into the time of the thesis's
full Kvasir protocol on this one device; `PROTOCOL_ASSUMPTIONS` states what it counts.

`--concurrent 1 2 4 8` measures instead what parallel trials (`tlopt run --parallel K`)
get from one GPU: K processes at once, each as a Ray trial worker is (its own TensorFlow,
memory growth on), fine-tune one backbone at 299 px for the same time window, and the
table gives their images/s together, per trial, and the gain over one trial alone. A K
that does not fit in the GPU's memory is reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

THESIS_NINE = (
    "Xception", "VGG16", "VGG19", "ResNet50", "InceptionV3",
    "InceptionResNetV2", "DenseNet121", "DenseNet169", "DenseNet201",
)
PRECISIONS = ("float32", "mixed_float16")


@dataclass(frozen=True)
class Protocol:
    """The thesis's full Kvasir experiment, counted in training runs and images.

    Block runs: shared 15 + separate hyperparameters 15 + separate optimizations step A 15.
    Fine-tuning runs: shared 15 + separate hyperparameters 15 + separate optimizations
    step B 15 + layer optimization 3 x 15.
    """

    train_images: int = 5600  # 70 % of Kvasir v2's 8,000
    val_images: int = 2400
    block_epochs: int = 10
    finetune_epochs: int = 50
    block_runs: int = 45
    finetune_runs: int = 90
    flip_variants: int = 4  # the feature cache extracts none/horizontal/vertical/both


PROTOCOL_ASSUMPTIONS = (
    "every run lasts its full epochs (10 block + 50 fine-tuning: an upper bound; early stopping "
    "and nonconvergence filtering end many runs sooner)",
    "each trial's backbone is any of the measured ones (the nine by default) with equal probability",
    "every fine-tuning run trains at the default delimiting layer (2/3 of the depth); layer "
    "optimization's lower layers cost more, its higher ones less",
    "a frozen-backbone (block) training step costs one forward pass; validation costs one forward pass "
    "per image",
    "with the feature cache each backbone's features are extracted once (4 flip variants of the "
    "training images + the validation images) and training the Dense layer on them costs nothing",
    "not counted: model building and graph tracing (seconds a run), JPEG decoding (the decoded-image "
    "cache), the Gaussian-process fits (under a second a trial)",
)


def project_hours(
    train_ips: dict[str, float], infer_ips: dict[str, float], protocol: Protocol = Protocol()
) -> dict[str, float]:
    """Hours of the protocol on one device: faithful (no feature cache) and with the feature cache.

    `train_ips`: fine-tuning images/s per backbone; `infer_ips`: forward-pass images/s.
    """
    names = sorted(train_ips)
    if not names or sorted(infer_ips) != names:
        raise ValueError("train_ips and infer_ips need the same, non-empty set of backbones")
    p = protocol

    def validation(name: str) -> float:
        return p.val_images / infer_ips[name]

    block_run = statistics.mean(
        p.block_epochs * ((p.train_images + p.val_images) / infer_ips[name]) for name in names
    )
    finetune_run = statistics.mean(
        p.finetune_epochs * (p.train_images / train_ips[name] + validation(name)) for name in names
    )
    extraction = sum(
        (p.flip_variants * p.train_images + p.val_images) / infer_ips[name] for name in names
    )
    finetune_total = p.finetune_runs * finetune_run
    return {
        "faithful": (p.block_runs * block_run + finetune_total) / 3600,
        "feature_cache": (extraction + finetune_total) / 3600,
    }


def _images_per_second(step, batch_size: int, warmup: int, max_steps: int, max_seconds: float) -> float:
    """Throughput of `step()`: warm-up steps (the first traces), then timed steps until a limit."""
    for _ in range(warmup):
        step()
    steps, started = 0, time.perf_counter()
    while steps < max_steps and (steps < 2 or time.perf_counter() - started < max_seconds):
        step()
        steps += 1
    return steps * batch_size / (time.perf_counter() - started)


def measure(name: str, size: int, batch: int, precision: str, jit_compile: bool,
            warmup: int, max_steps: int, max_seconds: float) -> tuple[float, float]:
    """(fine-tuning images/s, forward images/s) of one backbone at one batch size and precision."""
    import keras
    import numpy as np

    from tlopt.backbones import build_transfer_model, default_delimiting_layer, set_delimiting_layer

    keras.backend.clear_session()
    keras.mixed_precision.set_dtype_policy(precision)
    try:
        model, base = build_transfer_model(name, 8, size, weights=None)
        set_delimiting_layer(base, default_delimiting_layer(len(base.layers)))
        model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy",
                      jit_compile=jit_compile)
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)  # pixels, as the pipeline gives
        labels = rng.integers(0, 8, batch)
        train = _images_per_second(lambda: model.train_on_batch(images, labels), batch,
                                   warmup, max_steps, max_seconds)
        forward = _images_per_second(lambda: model.predict_on_batch(images), batch,
                                     warmup, max_steps, max_seconds)
        return train, forward
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def measurement_order(precisions: tuple[str, ...], batch_sizes: tuple[int, ...]) -> list[tuple[str, int]]:
    """(precision, batch) pairs, most wanted first, so that a spent budget skips the least wanted.

    First the thesis's setting (the first precision and batch size), then the fastest
    candidate (the last of each), then the rest.
    """
    wanted = [(precisions[0], batch_sizes[0]), (precisions[-1], batch_sizes[-1])]
    wanted += [(p, b) for p in precisions for b in batch_sizes]
    return list(dict.fromkeys(wanted))


def _device() -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return f"CPU only ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    details = tf.config.experimental.get_device_details(gpus[0])
    return f"{len(gpus)} GPU(s): {details.get('device_name', gpus[0].name)}"


def _table(results: dict, names: tuple[str, ...], batch_sizes: tuple[int, ...],
           precisions: tuple[str, ...]) -> str:
    columns = [(p, b) for p in precisions for b in batch_sizes]
    header = "| backbone | " + " | ".join(f"{p} b{b} train / forward" for p, b in columns) + " |"
    lines = [header, "|---" * (len(columns) + 1) + "|"]
    for name in names:
        cells = []
        for p, b in columns:
            found = results.get((name, p, b))
            cells.append(f"{found[0]:.0f} / {found[1]:.0f}" if found else "skipped")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _projection(results: dict, names: tuple[str, ...], batch_sizes: tuple[int, ...],
                precisions: tuple[str, ...], protocol: Protocol) -> str:
    lines = ["| precision | batch | faithful (h) | feature cache (h) |", "|---|---|---|---|"]
    for p in precisions:
        for b in batch_sizes:
            if not all((name, p, b) in results for name in names):
                lines.append(f"| {p} | {b} | incomplete | incomplete |")
                continue
            hours = project_hours({n: results[(n, p, b)][0] for n in names},
                                  {n: results[(n, p, b)][1] for n in names}, protocol)
            lines.append(f"| {p} | {b} | {hours['faithful']:.1f} | {hours['feature_cache']:.1f} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Concurrent:
    """K trials fine-tuning at once on one GPU: their images/s together and per trial (None: did not fit)."""

    trials: int
    total: float | None
    per_trial: float | None
    failure: str | None = None


def combine(trials: int, reports: list[dict]) -> Concurrent:
    """The throughput of K trials from each worker's report ({"images", "seconds"} or {"error"})."""
    errors = [report["error"] for report in reports if "error" in report]
    if errors or len(reports) != trials:
        return Concurrent(trials, None, None, errors[0] if errors else f"{trials - len(reports)} trial(s) missing")
    rates = [report["images"] / report["seconds"] for report in reports]
    return Concurrent(trials, sum(rates), sum(rates) / trials)


def scaling_table(results: list[Concurrent]) -> str:
    """Markdown: images/s of K concurrent trials, per trial, and the gain over one trial alone."""
    alone = next((result.total for result in results if result.trials == 1 and result.total), None)
    lines = ["| concurrent trials | images/s, all | images/s, each | gain over one trial |", "|---|---|---|---|"]
    for result in results:
        if result.total is None:
            lines.append(f"| {result.trials} | failed: {result.failure} | | |")
            continue
        gain = f"{result.total / alone:.2f}x" if alone else "n/a"
        lines.append(f"| {result.trials} | {result.total:.0f} | {result.per_trial:.0f} | {gain} |")
    return "\n".join(lines)


def worker(name: str, size: int, batch: int, seconds: float) -> None:
    """One trial's process: build and warm up, say `ready`, wait for `go` on stdin, train for `seconds`."""
    import keras
    import numpy as np

    from tlopt.backbones import build_transfer_model, default_delimiting_layer, set_delimiting_layer

    try:
        model, base = build_transfer_model(name, 8, size, weights=None)
        set_delimiting_layer(base, default_delimiting_layer(len(base.layers)))
        model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
        rng = np.random.default_rng(os.getpid())
        images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        labels = rng.integers(0, 8, batch)
        for _ in range(3):  # the first step traces the graph
            model.train_on_batch(images, labels)
    except Exception as error:  # noqa: BLE001 - out of memory, mostly: reported, not raised
        print(json.dumps({"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}), flush=True)
        return
    print("ready", flush=True)
    sys.stdin.readline()
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        model.train_on_batch(images, labels)
        steps += 1
    print(json.dumps({"images": steps * batch, "seconds": time.perf_counter() - started}), flush=True)


def concurrent(trials: int, name: str, size: int, batch: int, seconds: float, timeout: float) -> Concurrent:
    """Start K worker processes, let them all train for the same window, combine their reports."""
    env = {**os.environ, "TF_FORCE_GPU_ALLOW_GROWTH": "true", "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, __file__, "--worker", name, "--image-size", str(size), "--batch-sizes", str(batch),
               "--seconds", str(seconds)]
    processes = [subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True) for _ in range(trials)]
    try:
        ready = [process.stdout.readline().strip() for process in processes]  # each: "ready" or its error
        for process, line in zip(processes, ready):
            if line == "ready":
                process.stdin.write("go\n")
                process.stdin.flush()
        reports = []
        for process, line in zip(processes, ready):
            text = process.stdout.readline() if line == "ready" else line
            reports.append(json.loads(text) if text.strip() else {"error": "the process died (out of memory?)"})
            process.wait(timeout=timeout)
        return combine(trials, reports)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny run for a CPU: VGG16 and ResNet50 at 64 px, batch 4 and 8, few steps")
    parser.add_argument("--backbones", nargs="+", default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--jit-compile", action="store_true", help="XLA-compile the steps (tracing takes longer)")
    parser.add_argument("--concurrent", type=int, nargs="+", metavar="K",
                        help="measure K concurrent fine-tuning trials on one GPU instead (e.g. 1 2 4 8); "
                             "the first of --backbones (default ResNet50), 299 px, batch 16")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="with --concurrent: the window every trial trains in")
    parser.add_argument("--worker", metavar="BACKBONE", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds for all measurements; what is left after it is skipped")
    args = parser.parse_args(argv)

    if args.worker:
        worker(args.worker, args.image_size or 299, (args.batch_sizes or [16])[0], args.seconds)
        return 0
    if args.concurrent:
        os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")  # this process only looks at the device
        name, size, batch = (args.backbones or ["ResNet50"])[0], args.image_size or 299, (args.batch_sizes or [16])[0]
        print(f"device: {_device()}; {name} fine-tuning at {size}x{size} px, batch {batch}, float32, "
              f"{args.seconds:.0f} s window per measurement", flush=True)
        results = []
        for trials in args.concurrent:
            results.append(concurrent(trials, name, size, batch, args.seconds, timeout=600))
            print(f"{trials} concurrent trial(s): {results[-1]}", flush=True)
        print("\nImages per second of concurrent trials on one GPU (`tlopt run --parallel K`):\n")
        print(scaling_table(results))
        return 0

    if args.quick:
        names = tuple(args.backbones or ("VGG16", "ResNet50"))
        size, batch_sizes = args.image_size or 64, tuple(args.batch_sizes or (4, 8))
        warmup, max_steps, max_seconds = 1, 3, 1.0
    else:
        names = tuple(args.backbones or THESIS_NINE)
        size, batch_sizes = args.image_size or 299, tuple(args.batch_sizes or (16, 64))
        warmup, max_steps, max_seconds = 3, 20, 1.5
    precisions = tuple(args.precisions)

    started = time.perf_counter()
    deadline = started + args.budget
    print(f"device: {_device()}; {size}x{size} px, weights=None, jit_compile={args.jit_compile}", flush=True)
    results: dict[tuple[str, str, int], tuple[float, float]] = {}
    took: dict[str, float] = {}  # each backbone's last measurement, seconds: the estimate of its next
    for precision, batch in measurement_order(precisions, batch_sizes):
        for name in names:
            if time.perf_counter() + took.get(name, 0.0) > deadline:
                print(f"time budget: skipping {name} {precision} batch {batch}", flush=True)
                continue
            measured = time.perf_counter()
            value = measure(name, size, batch, precision, args.jit_compile, warmup, max_steps, max_seconds)
            took[name] = time.perf_counter() - measured
            results[(name, precision, batch)] = value
            print(f"{name} {precision} batch {batch}: {value[0]:.1f} train, {value[1]:.1f} "
                  f"forward images/s ({time.perf_counter() - started:.0f} s)", flush=True)

    protocol = Protocol()
    print("\nImages per second (fine-tuning step / forward pass):\n")
    print(_table(results, names, batch_sizes, precisions))
    print(f"\nProjected time of the thesis's Kvasir protocol on this device, from the {len(names)} "
          f"backbone(s) above ({size} px):\n")
    print(_projection(results, names, batch_sizes, precisions, protocol))
    print("\nAssumptions:")
    for assumption in PROTOCOL_ASSUMPTIONS:
        print(f"- {assumption}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
