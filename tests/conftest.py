"""Shared fixtures: the generated demo dataset, small and cached per session."""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import tlopt  # noqa: F401  TensorFlow's environment (backend, log level, oneDNN) before a test module imports it

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
TLOPT = Path(sys.executable).parent / "tlopt"
TESTS = Path(__file__).resolve().parent


def experiment(values: dict | None = None):
    """A validated configuration for tests that train without a parameter file; dotted keys set values."""
    from tlopt.params import validate

    return validate({"data": {"root": "unused"}, "backbones": ["VGG16"]}).updated(values or {})


def run_tlopt(*args) -> subprocess.CompletedProcess:
    """The console script, as a user runs it, from the repository root."""
    return subprocess.run([str(TLOPT), *map(str, args)], capture_output=True, text=True, cwd=REPOSITORY)


# `make test` runs the suite in two processes (pytest-xdist, `--dist loadgroup`): a module's tests stay
# in one process, so its module fixtures are built once; the notebooks share one run folder and run
# in order in one process; the modules that read the session's `finished_run` share one process, which
# runs it once; the real Ray tests run one after another (two Rays starting at once on 2 cores can miss
# Ray's fixed 30 s start-up wait).
XDIST_GROUPS = {
    "test_e2e.py": "finished_run", "test_crash_safety.py": "finished_run", "test_report_offline.py": "finished_run",
    "test_ray.py": "ray", "test_ray_cli.py": "ray", "test_parallel.py": "ray",
}
# The groups that take minutes on 2 cores, longest first. They are handed out first (the Makefile turns
# pytest-xdist's own order, by number of tests, off), so that the suite does not end with one process
# running one of them while the other idles.
LONGEST_FIRST = ("ray", "finished_run", "test_activations.py", "notebooks", "test_optimize.py", "test_training.py",
                 "test_browser.py")


def xdist_group(item) -> str:
    name = Path(str(item.fspath)).name
    return "notebooks" if name.endswith(".ipynb") else XDIST_GROUPS.get(name, name)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.xdist_group(xdist_group(item)))
    rank = {group: place for place, group in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(xdist_group(item), len(rank)))  # stable: each group keeps its order


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A small demo dataset: 4 classes x 30 images of 64 px."""
    from tlopt.demo_data import generate_demo_dataset

    return generate_demo_dataset(
        tmp_path_factory.mktemp("demo") / "data", images_per_class=30, image_size=64, seed=0
    )


@pytest.fixture(scope="module")
def manifest(demo_root):
    """The demo dataset split 70/30 (seed 0), with its class names: what the training tests train on."""
    from tlopt import data

    frame = data.split(data.discover(demo_root), val_fraction=0.3, seed=0)
    return frame, data.class_names(frame)


@pytest.fixture(scope="session")
def ci_params(tmp_path_factory):
    """params/ci.yaml with its data and results in a temporary folder, and the options of imbalanced
    medical data (nbval runs the notebooks on ci.yaml's faithful settings): balanced accuracy as the
    objective, balanced class weights, and an external test set from another "site" (the demo
    generator with another seed, the same two classes)."""
    from tlopt.demo_data import generate_demo_dataset
    from tlopt.params import dump_params, load_params

    folder = tmp_path_factory.mktemp("e2e")
    external = generate_demo_dataset(folder / "site_b", images_per_class=3, image_size=32, seed=7, num_classes=2)
    params = load_params(REPOSITORY / "params" / "ci.yaml", {
        "results_dir": str(folder / "results"), "data.root": str(folder / "data"),
        "data.external_test": str(external), "objective": "balanced_accuracy", "training.class_weight": "balanced",
    })
    return dump_params(params, folder / "ci.yaml")


@pytest.fixture(scope="session")
def finished_run(ci_params):
    """One uninterrupted `tlopt run --strategy shared` of the CI experiment, shared by the end-to-end,
    crash-safety and offline-report tests (a run costs a minute or two on 2 cores)."""
    result = run_tlopt("run", ci_params, "--name", "e2e", "--strategy", "shared")
    assert result.returncode == 0, result.stderr
    return ci_params.parent / "results" / "e2e", result


def processes_of(ray_root: Path) -> list[int]:
    """Processes (but this one) started with RAY_TMPDIR=`ray_root`: the Ray that a test started, its workers
    (whose command lines Ray renames, hence the environment), and a `tlopt run` of the test with its kernels."""
    marker = f"RAY_TMPDIR={ray_root}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # ended meanwhile, or not ours to read
                continue
    return found


def end_processes(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is still there after `grace` seconds; by pid."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.time() + grace
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue


def end_processes_of(ray_root: Path) -> list[int]:
    """End every process started with `ray_root`, by pid, again while Ray spawns new ones as others end
    (a raylet replaces a dead worker); the pids that are still there after a few rounds."""
    for _ in range(4):
        pids = processes_of(ray_root)
        if not pids:
            return []
        end_processes(pids)
    return processes_of(ray_root)


@pytest.fixture
def ray_root():
    """A temporary directory for Ray (short: Ray's socket paths must fit in 107 bytes); afterwards every
    process started with it is ended, by pid."""
    root = Path(tempfile.mkdtemp(prefix="tlopt-ray-", dir="/tmp"))
    yield root
    end_processes_of(root)
    shutil.rmtree(root, ignore_errors=True)
