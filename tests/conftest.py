"""Shared fixtures: the generated demo dataset, small and cached per session."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
TLOPT = Path(sys.executable).parent / "tlopt"


def experiment(values: dict | None = None):
    """A validated configuration for tests that train without a parameter file; dotted keys set values."""
    from tlopt.params import validate

    return validate({"data": {"root": "unused"}, "backbones": ["VGG16"]}).updated(values or {})


def run_tlopt(*args) -> subprocess.CompletedProcess:
    """The console script, as a user runs it, from the repository root."""
    return subprocess.run([str(TLOPT), *map(str, args)], capture_output=True, text=True, cwd=REPOSITORY)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A small demo dataset: 4 classes x 30 images of 64 px."""
    from tlopt.demo_data import generate_demo_dataset

    return generate_demo_dataset(
        tmp_path_factory.mktemp("demo") / "data", images_per_class=30, image_size=64, seed=0
    )


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
