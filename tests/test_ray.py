"""Parallel steps on a real Ray in this process (2 CPUs and one logical GPU, started once for the module),
with the fake trainer in the workers: fractional GPUs, a killed worker, a trial no node can hold, and an
interrupted step that leaves no Ray process behind.
"""

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import TESTS, end_processes_of, processes_of
from fakes import FakeTrainer, TrialIs
from tlopt import data, optimize
from tlopt.errors import TloptError
from tlopt.observers import ProgressBar
from tlopt.params import validate
from tlopt.store import RunFolder
from tlopt.trials import TrialState

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def module_ray_root():
    root = Path(tempfile.mkdtemp(prefix="tlopt-ray-", dir="/tmp"))
    yield root
    import ray

    ray.shutdown()
    end_processes_of(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cluster(module_ray_root, monkeypatch):
    """Ray in this process, as a notebook might have started it: 2 CPUs and one logical GPU; tests/ is on
    the workers' PYTHONPATH (the fake trainer is unpickled there)."""
    import ray

    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.setenv("RAY_TMPDIR", str(module_ray_root))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # Ray refuses a logical GPU that is hidden
    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    return ray


def experiment(tmp_path, trials, **execution):
    config = validate({
        "run_name": "r", "results_dir": str(tmp_path / "results"), "seed": 1,
        "data": {"root": str(tmp_path / "data"), "image_size": 32},
        "backbones": ["VGG16"], "optimizers": ["SGD", "Adam"], "layer_optimization": {"enabled": False},
        "bo": {"initial_points": trials, "iterations": 0},
        "execution": {"parallel_trials": 2, **execution},
    })
    run = RunFolder.open(config)
    data.write_manifest(pd.DataFrame({"path": ["/a.jpg", "/b.jpg"], "label": ["a", "b"], "group": ["a", "b"],
                                      "split": ["train", "val"]}), run.split_file)
    return config, run


def test_two_fractional_trials_share_the_one_gpu(cluster, tmp_path):
    config, run = experiment(tmp_path, trials=2)
    optimize.run_strategy(config, "shared", run, trainer=FakeTrainer(seconds=2.0), progress=False)
    first, second = run.trials.records()
    assert first.worker["gpu_ids"] == second.worker["gpu_ids"] == ["0"], "0.5 GPU each, on the same device"
    assert first.worker["pid"] != second.worker["pid"] and first.worker["pid"] != os.getpid()
    assert first.start_time < second.end_time and second.start_time < first.end_time, "they ran at once"
    assert {(t.parallel_trials, t.schedule, t.status) for t in (first, second)} == {(2, "ordered", "ok")}


def test_a_worker_killed_mid_trial_is_a_failed_trial_and_the_step_goes_on(cluster, tmp_path):
    config, run = experiment(tmp_path, trials=3)
    trainer = FakeTrainer(die_when=TrialIs("shared-model-001"))
    optimize.run_strategy(config, "shared", run, trainer=trainer, progress=False)
    trials = {trial.id: trial for trial in run.trials.records()}
    assert sorted(trials) == ["shared-model-000", "shared-model-001", "shared-model-002"]
    killed = trials.pop("shared-model-001")
    assert killed.status == TrialState.FAILED and killed.error.startswith("WorkerCrashedError"), killed.error
    assert all(trial.ok for trial in trials.values())
    assert json.loads(run.step_status_file("shared", "model").read_text()) == {"trials": 3, "stop_reason": "budget"}


def test_a_trial_no_node_can_hold_is_a_one_line_error(cluster, tmp_path):
    config, run = experiment(tmp_path, trials=2, gpus_per_trial=2)
    started = time.time()
    with pytest.raises(TloptError) as error:
        optimize.run_strategy(config, "shared", run, trainer=FakeTrainer(), progress=False)
    assert str(error.value) == ("no node of this machine can run a trial that asks for 1 CPU and 2 GPU "
                                "(execution.cpus_per_trial, execution.gpus_per_trial); its largest node has "
                                "2 CPU and 1 GPU")
    assert time.time() - started < 60 and cluster.is_initialized(), "no wait, and a session it did not start stays"


def interrupt(self, progress):
    """Ctrl-C (JupyterLab's interrupt) while the step waits for its running trials."""
    raise KeyboardInterrupt


def test_an_interrupted_step_shuts_down_the_ray_it_started(module_ray_root, tmp_path, monkeypatch):
    """Last in this module: it needs Ray not started yet, so it ends the module's session first."""
    import ray

    ray.shutdown()
    end_processes_of(module_ray_root)
    root = Path(tempfile.mkdtemp(prefix="tlopt-ray-", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(root))
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.setattr(ProgressBar, "trials_running", interrupt)
    config, run = experiment(tmp_path, trials=2)
    try:
        with pytest.raises(KeyboardInterrupt):
            optimize.run_strategy(config, "shared", run, trainer=FakeTrainer(seconds=30.0), progress=True)
        assert not ray.is_initialized()
        deadline = time.time() + 20
        while processes_of(root) and time.time() < deadline:
            time.sleep(0.5)
        assert processes_of(root) == [], "Ray processes outlived the interrupted step"
        assert [trial.status for trial in run.trials.latest()] == [TrialState.ISSUED] * 2
    finally:
        end_processes_of(root)
        shutil.rmtree(root, ignore_errors=True)
