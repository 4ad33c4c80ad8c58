"""`tlopt run` executes the notebook suite on a parameter file; `tlopt report` renders a run;
`tlopt export` writes its model as one file and `tlopt predict` classifies new images with it;
`tlopt weights` downloads the pretrained weights a parameter file needs.

The notebooks are the program: `tlopt run` only decides which notebooks run,
in what order and with which parameters, and executes them with papermill, in a kernel
of this very interpreter. Everything a run writes stays in its folder, so a stopped or
failed run resumes from the first notebook that did not finish. Before it makes a run
folder, `tlopt run` checks the dataset and the pretrained weights, so that a mistyped
path or an offline machine costs one error line, not a run folder to clean up.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import TextIO


@contextlib.contextmanager
def native_stderr_silenced():
    """Send what is written to file descriptor 2 to /dev/null for a while.

    TensorFlow 2.21 writes INFO lines at import (oneDNN's, and on some CPUs their
    features), before absl logging is initialised, which TF_CPP_MIN_LOG_LEVEL does not
    hold back; kernels started meanwhile inherit the descriptor, so their own logs stay
    out too (what a notebook prints is in the notebook). Without this they would bury the
    CLI's one-line messages. Python's errors still surface: they are raised, and printed
    after the descriptor is restored.
    """
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# tlopt's modules import TensorFlow: its start-up lines stay out of the command's output.
with native_stderr_silenced():
    from tlopt import data
    from tlopt.backbones import check_weights
    from tlopt.errors import TloptError
    from tlopt.objectives import get as get_objective
    from tlopt.params import Experiment, load_params
    from tlopt.report import render_report
    from tlopt.store import RunFolder, TrialStore
    from tlopt.strategies import REGISTRY, strategy_names

# The source notebooks: the repository's notebooks/ folder (tlopt is installed editable from it).
SOURCE_NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
KERNEL_NAME = "python3"
EXIT_USER_ERROR = 2
EXIT_NOTEBOOK_FAILED = 1
EXIT_INTERRUPTED = 130  # the shell's convention for Ctrl-C


class NotebookFailed(Exception):
    """A notebook raised an error or its kernel died; the message is one line."""


def executed_name(strategy: str) -> str:
    """The name of a strategy notebook's executed copy: the notebook's own name for the first
    strategy registered with it, `<notebook>-<strategy>` for the others (01 runs shared and joint)."""
    notebook = REGISTRY[strategy].notebook
    owner = next(entry.name for entry in REGISTRY.values() if entry.notebook == notebook)
    return notebook if owner == strategy else f"{notebook}-{strategy}"


def plan(config: Experiment, strategies: list[str]) -> list[tuple[str, str, dict]]:
    """(executed copy's name, source notebook, its own parameters) of every notebook of a run, in order.

    Notebooks 00-04 show widgets and progress bars only when `interactive`; headless they
    would end up in the report as widget state that needs a script from the internet.
    """
    headless = {"interactive": False}
    steps = [("00_data_split", "00_data_split", headless)]
    for strategy in strategies:
        steps.append((executed_name(strategy), REGISTRY[strategy].notebook, {"strategy": strategy, **headless}))
    if config.layer_optimization.enabled:
        for strategy in strategies:
            steps.append((f"04_layer_optimization-{strategy}", "04_layer_optimization",
                          {"strategy": strategy, **headless}))
    steps.append(("05_analysis", "05_analysis", {}))
    return steps


def finished(notebook: Path) -> bool:
    """Whether papermill executed this notebook to its end without an error."""
    import nbformat

    if not notebook.is_file():
        return False
    metadata = nbformat.read(notebook, as_version=4).metadata.get("papermill", {})
    return metadata.get("end_time") is not None and not metadata.get("exception")


def check_kernel() -> None:
    """The kernel papermill starts must be this interpreter, or the notebooks import another tlopt.

    jupyter_client runs a kernel spec whose command is plain `python` with the current
    interpreter; a `python3` kernel spec elsewhere with an absolute path would not.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        command = KernelSpecManager().get_kernel_spec(KERNEL_NAME).argv[0]
    except NoSuchKernel:
        raise TloptError(f"no '{KERNEL_NAME}' Jupyter kernel: install ipykernel in {sys.prefix}") from None
    version = sys.version_info
    plain = {"python", f"python{version.major}", f"python{version.major}.{version.minor}"}
    if command not in plain and Path(command).resolve() != Path(sys.executable).resolve():
        raise TloptError(
            f"the '{KERNEL_NAME}' Jupyter kernel runs {command}, not {sys.executable}: "
            f"remove that kernel spec (`jupyter kernelspec list`) or run from its environment"
        )


def restrict_gpus(count: int) -> None:
    """Make only the first `count` GPUs visible to the notebooks' kernels (0: CPU only).

    The kernels inherit this process's environment, and so does the Ray that a parallel
    step starts in a kernel: its trials share these GPUs (`execution.gpus_per_trial`).
    One trial at a time trains on the first visible GPU only.
    """
    available = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = available.split(",") if available else [str(index) for index in range(count)]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices[:count])


class TrialPrinter(threading.Thread):
    """Prints a line for every trial that a notebook finishes (a search runs for hours); the store's
    `records` are the finished trials only, so trials issued to Ray and still running are not printed."""

    def __init__(self, trials: TrialStore):
        super().__init__(daemon=True)
        self.trials = trials
        self.seen = len(self.trials.records())
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(2.0):
            self.print_new()

    def print_new(self) -> None:
        records = self.trials.records()
        for trial in records[self.seen:]:
            key = get_objective(trial.objective).key
            result = f"{key} {trial.objective_value:.3f}" if trial.ok else trial.error
            print(f"    trial {trial.id}: {result} ({trial.seconds:.0f} s)", flush=True)
        self.seen = len(records)

    def stop(self) -> None:
        self.stopping.set()
        self.join()
        self.print_new()


# ipykernel copies what is written to the kernel's file descriptors 1 and 2 into the notebook;
# TensorFlow's and absl's C++ start-up lines (written before absl logging is initialised, or on
# GPU builds as errors that TF_CPP_MIN_LOG_LEVEL=2 lets through) would stand in red in the
# executed notebooks and the report. Off, they go to the kernel's own stderr (silenced below);
# what Python code prints, warnings included, still lands in the notebook.
KERNEL_ARGUMENTS = ["--IPKernelApp.capture_fd_output=False"]


def execute(source: Path, output: Path, parameters: dict) -> None:
    """Run one notebook with papermill; a failure becomes a one-line NotebookFailed."""
    import papermill
    from nbclient.exceptions import DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    try:
        with native_stderr_silenced():
            papermill.execute_notebook(
                str(source), str(output), parameters=parameters, kernel_name=KERNEL_NAME,
                cwd=str(source.parent), progress_bar=False, extra_arguments=KERNEL_ARGUMENTS,
            )
    except PapermillExecutionError as error:
        message = " ".join(str(error.evalue).split())
        raise NotebookFailed(
            f"{source.name} failed in cell [{error.exec_count}]: {error.ename}: {message} (executed notebook: {output})"
        ) from None
    except DeadKernelError as error:
        raise NotebookFailed(f"{source.name}: the kernel died ({error}); executed notebook: {output}") from None


def lock_run_dir(run_dir: Path) -> TextIO:
    """Hold a lock beside the run folder while this process runs it; refuse if another does.

    Two `tlopt run`s on one folder would interleave their trials (and `--replace` would
    delete the other's folder). The lock file sits beside the folder, so that it outlives a
    replaced folder, and the operating system releases it when the process ends, however.
    """
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir.parent / f".{run_dir.name}.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise TloptError(f"{run_dir} is in use by another `tlopt run`") from None
    return handle


def _stopped_before_its_split(run: RunFolder) -> bool:
    """A tlopt run folder that holds nothing computed: it failed before its split (a wrong data.root, say)."""
    return run.params_file.is_file() and not run.split_file.exists() and not run.trials_file.exists()


def open_run_dir(args: argparse.Namespace) -> tuple[Experiment, RunFolder, TextIO]:
    """The run's parameters, folder and lock: a new folder (`--name`, `--replace`) or a resumed one.

    A resumed run folder may have moved (to another machine); it keeps its dataset's
    location (data.root, data.manifest, data.external_test), which `--data-root` and
    `--external-test` move (`data.relocate`). The dataset and the pretrained weights are checked before a new
    folder is made; a folder that stopped before its split is started again without `--replace`.
    """
    overrides: dict = {}
    lock: TextIO | None = None
    if args.no_nonconvergence_filter:
        overrides["training.nonconvergence.enabled"] = False
    if args.parallel is not None:
        overrides["execution.parallel_trials"] = args.parallel
    if args.ray_address is not None:
        overrides["execution.ray_address"] = args.ray_address
    if args.resume:
        resumed = RunFolder(Path(args.resume).resolve())
        if not resumed.params_file.is_file():
            raise TloptError(f"cannot resume {resumed}: not a run folder (no {RunFolder.PARAMS})")
        lock = lock_run_dir(resumed.path)
        data.relocate(resumed, args.data_root, args.external_test)  # the folder, or its data, may have moved
        stored = resumed.read_params().get("data") or {}
        overrides.update({f"data.{key}": stored[key] for key in data.LOCATIONS if stored.get(key) is not None})
        overrides.update(run_name=resumed.name, results_dir=str(resumed.path.parent))
    elif args.name:
        overrides["run_name"] = args.name
    config = load_params(args.params, overrides)
    run = RunFolder.of(config)
    if lock is None:
        lock = lock_run_dir(run.path)
    replacing = not args.resume and run.path.exists()
    if replacing and not (args.replace or _stopped_before_its_split(run)):
        raise TloptError(f"{run} already exists: choose another --name, --resume it or --replace it")
    if replacing and any(run.path.iterdir()) and not run.params_file.is_file():
        raise TloptError(f"refusing to replace {run}: it is not a tlopt run folder")
    if not (args.resume and run.split_file.is_file()):
        data.check_dataset(config)
    check_weights(config)
    if replacing:
        if not args.replace:
            print(f"{run} stopped before its split: starting it again", flush=True)
        shutil.rmtree(run.path)
    return config, RunFolder.open(config, run), lock


def run(args: argparse.Namespace) -> int:
    if not SOURCE_NOTEBOOKS.is_dir():
        raise TloptError(f"notebooks not found in {SOURCE_NOTEBOOKS}: install tlopt editable from its repository")
    check_kernel()
    config, run, _lock = open_run_dir(args)  # held until the process ends
    if args.gpus is not None:
        restrict_gpus(args.gpus)
    notebooks = plan(config, config.strategies if args.strategy == "all" else [args.strategy])
    started = time.time()
    executing = not args.resume  # a resumed run executes from its first unfinished notebook on
    printer = TrialPrinter(run.trials)
    printer.start()
    try:
        for number, (name, source, extra) in enumerate(notebooks, start=1):
            step = f"[{number}/{len(notebooks)}] {name}"
            output = run.notebooks_dir / f"{name}.ipynb"
            executing = executing or not finished(output)
            if not executing:
                print(f"{step}: finished before, skipped", flush=True)
                continue
            print(f"{step} ...", flush=True)
            output.parent.mkdir(parents=True, exist_ok=True)
            notebook_started = time.time()
            parameters = {"params_file": str(run.params_file), "run_dir": str(run), **extra}
            execute(SOURCE_NOTEBOOKS / f"{source}.ipynb", output, parameters)
            printer.print_new()
            print(f"{step} done in {time.time() - notebook_started:.0f} s", flush=True)
    finally:
        printer.stop()
    print(f"report: {render_report(run)} (run took {time.time() - started:.0f} s)")
    return 0


def report(args: argparse.Namespace) -> int:
    print(f"report: {render_report(RunFolder(Path(args.run_dir).resolve()))}")
    return 0


def export(args: argparse.Namespace) -> int:
    from tlopt.export import export_model

    path = export_model(Path(args.run_dir).resolve(), args.strategy, args.output)
    print(f"model: {path} ({path.stat().st_size / 2**20:.0f} MB)")
    return 0


def predict(args: argparse.Namespace) -> int:
    from tlopt.predict import predict_images, write_predictions

    predictions = predict_images(args.model, args.images, explain_dir=args.explain)
    for path, reason in predictions.skipped.itertuples(index=False):
        print(f"skipped {path}: {reason}", file=sys.stderr)
    written = write_predictions(predictions, args.output)
    skipped = f"; {len(predictions.skipped)} file(s) skipped" if len(predictions.skipped) else ""
    explained = f"; explanation maps in {args.explain}" if args.explain else ""
    print(f"{len(predictions.table)} image(s) predicted: {written}{skipped}{explained}")
    return 0


def weights(args: argparse.Namespace) -> int:
    """Download the pretrained weights of every backbone of a parameter file into Keras's cache."""
    config = load_params(args.params)
    files = check_weights(config)
    if not files:
        print("weights: null: random initialisation, nothing to download")
    for path in files:
        print(f"weights: {path}", flush=True)
    return 0


def parser() -> argparse.ArgumentParser:
    main_parser = argparse.ArgumentParser(prog="tlopt", description=__doc__.splitlines()[0])
    commands = main_parser.add_subparsers(dest="command", required=True)

    run_parser = commands.add_parser(
        "run", help="execute the notebooks on a parameter file",
        description="Execute 00_data_split, the strategies, their layer optimizations and 05_analysis "
                    "with papermill, then render <run>/report.html.",
    )
    run_parser.add_argument("params", help="the parameter file (YAML)")
    run_parser.add_argument("--strategy", default="all", choices=["all", *strategy_names()],
                            help="one strategy, or all of the parameter file's strategies (default)")
    folder = run_parser.add_mutually_exclusive_group()
    folder.add_argument("--name", help="the run's folder name under results_dir (default: run_name); "
                                       "it must not exist yet")
    folder.add_argument("--resume", metavar="DIR", help="continue the run in DIR where it stopped")
    run_parser.add_argument("--replace", action="store_true",
                            help="delete an existing run folder of the same name first")
    run_parser.add_argument("--data-root", metavar="DIR",
                            help="with --resume: the dataset has moved to DIR (the folder per class, or the "
                                 "manifest's folder)")
    run_parser.add_argument("--external-test", metavar="PATH",
                            help="with --resume: the external test set has moved to PATH (its folder or manifest)")
    run_parser.add_argument("--no-nonconvergence-filter", action="store_true",
                            help="switch nonconvergence filtering off (training.nonconvergence.enabled)")
    run_parser.add_argument("--gpus", type=int, metavar="N",
                            help="make only the first N GPUs visible (0: CPU only); parallel trials share them")
    run_parser.add_argument("--parallel", type=int, metavar="K",
                            help="run K trials of each BO step at once, on Ray (execution.parallel_trials)")
    run_parser.add_argument("--ray-address", metavar="ADDR",
                            help="join the Ray cluster at ADDR (execution.ray_address) instead of starting Ray here")
    run_parser.set_defaults(handler=run)

    report_parser = commands.add_parser("report", help="render <run>/report.html from the executed notebooks")
    report_parser.add_argument("run_dir", help="the run folder")
    report_parser.set_defaults(handler=report)

    export_parser = commands.add_parser(
        "export", help="write a final model as one .keras file that loads without tlopt",
        description="Write the run's winner (or a strategy's final model) as one .keras file: standard Keras "
                    "layers only, with the class names, input size, setup, scores and parameters inside.",
    )
    export_parser.add_argument("run_dir", help="the run folder")
    export_parser.add_argument("--strategy", help="a strategy's final model instead of the winner")
    export_parser.add_argument("-o", "--output", metavar="FILE",
                               help="the .keras file (default: <run>/model.keras, <run>/<strategy>/model.keras)")
    export_parser.set_defaults(handler=export)

    predict_parser = commands.add_parser(
        "predict", help="classify images with an exported model",
        description="Classify image files (JPEG, PNG, ...: files, folders searched recursively, CSV files with "
                    "a 'path' column) with a model of `tlopt export`; one CSV row per image with every class's "
                    "probability. Files that do not decode are listed and skipped.",
    )
    predict_parser.add_argument("model", help="the .keras file of `tlopt export`")
    predict_parser.add_argument("images", nargs="+", help="image files, folders or CSV files with a 'path' column")
    predict_parser.add_argument("-o", "--output", default="predictions.csv", metavar="FILE",
                                help="the predictions (CSV; default: predictions.csv)")
    predict_parser.add_argument("--explain", metavar="DIR",
                                help="also write a Grad-CAM overlay of each image's predicted class to DIR")
    predict_parser.set_defaults(handler=predict)

    weights_parser = commands.add_parser(
        "weights", help="download the pretrained weights a parameter file needs",
        description="Download the ImageNet weights of every backbone of PARAMS into Keras's cache "
                    "(on a machine with internet, to copy to one without).",
    )
    weights_parser.add_argument("params", help="the parameter file (YAML)")
    weights_parser.set_defaults(handler=weights)
    return main_parser


def main(argv: list[str] | None = None) -> int:
    command_line = parser()
    args = command_line.parse_args(argv)
    if getattr(args, "replace", False) and args.resume:
        command_line.error("--replace cannot be combined with --resume")
    if (getattr(args, "data_root", None) or getattr(args, "external_test", None)) and not args.resume:
        command_line.error("--data-root and --external-test move a resumed run's data: use them with --resume")
    if getattr(args, "gpus", None) is not None and args.gpus < 0:
        command_line.error("--gpus must be 0 or more")
    if getattr(args, "parallel", None) is not None and args.parallel < 1:
        command_line.error("--parallel must be 1 or more")
    try:
        return args.handler(args)
    except TloptError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except NotebookFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NOTEBOOK_FAILED
    except KeyboardInterrupt:
        print("interrupted: continue with `tlopt run PARAMS --resume RUN_DIR`", file=sys.stderr)
        return EXIT_INTERRUPTED
