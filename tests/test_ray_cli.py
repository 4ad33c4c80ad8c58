"""`tlopt run --parallel 2` as a user runs it, on Ray, with real (tiny) training: killed with SIGKILL in the
middle of a step while Ray runs inside its notebook, then resumed with `--ray-address` on a cluster started
with `ray start --head`. One scenario, because a run costs a minute on 2 cores.

The test gives Ray its own temporary directory and ends every process started with it, by pid.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from conftest import REPOSITORY, TLOPT, end_processes_of
from tlopt.params import dump_params, load_params
from tlopt.store import RunFolder

pytestmark = pytest.mark.slow

RAY = Path(sys.executable).parent / "ray"
NOTEBOOKS = ["00_data_split", "01_shared_strategy", "05_analysis"]
TRIALS = [f"shared-model-{index:03d}" for index in range(3)]
# What `tlopt run` prints, and nothing else (Ray's logs stay out).
OUTPUT = re.compile(r"^(\[\d+/\d+\] \S+ (\.\.\.|done in \d+ s|finished before, skipped)"
                    r"|    trial shared-model-\d{3}: val_accuracy \d\.\d{3} \(\d+ s\)|report: .* \(run took \d+ s\))$")


@pytest.fixture
def tiny(tmp_path):
    """params/ci.yaml cut to the shared strategy, 2 random + 1 model-based trial of 1 + 1 epochs; `asap`, so
    that the model-based trial starts as soon as either random one ends; every trial keeps its checkpoints
    (`keep_weights: all`), so that the test can tell that no finished trial was trained again."""
    params = load_params(REPOSITORY / "params" / "ci.yaml", {
        "results_dir": str(tmp_path / "results"), "data.root": str(tmp_path / "data"), "backbones": ["VGG16"],
        "strategies": ["shared"], "layer_optimization.enabled": False, "execution.schedule": "asap",
        "training.block_epochs": 1, "training.finetune_epochs": 1, "bo.initial_points": 2, "bo.iterations": 1,
        "training.keep_weights": "all",
    })
    return dump_params(params, tmp_path / "tiny.yaml")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_parallel_run_killed_mid_step_resumes_on_a_cluster_without_running_a_finished_trial_again(tiny, ray_root):
    # Token authentication off for the local cluster (Ray 2.x turns it on), and this test's Ray directory.
    env = {**os.environ, "RAY_TMPDIR": str(ray_root), "RAY_AUTH_MODE": "disabled"}
    run_dir = tiny.parent / "results" / "tiny"
    run = RunFolder(run_dir)
    process = subprocess.Popen([str(TLOPT), "run", str(tiny), "--name", "tiny", "--parallel", "2"], cwd=REPOSITORY,
                               env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    deadline = time.time() + 600
    try:
        # Kill once a trial has finished while another runs.
        while not run.trials.records():
            assert process.poll() is None, process.stdout.read()
            assert time.time() < deadline, "no trial finished"
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    finished = {trial.id: trial for trial in run.trials.records()}
    running = {trial.id: trial for trial in run.trials.unfinished("shared", "model")}
    assert running, "the kill came after the step"
    weights = {trial_id: Path(trial.weights).stat().st_mtime_ns for trial_id, trial in finished.items()}
    # The kernel ends with its parent, and its Ray with it; what outlives them is ended here, by pid.
    assert end_processes_of(ray_root) == []

    port = free_port()
    head_env = {key: value for key, value in env.items() if key != "CUDA_VISIBLE_DEVICES"}  # one logical GPU
    started = subprocess.run([str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                              "--num-cpus=2", "--num-gpus=1", "--include-dashboard=false", "--disable-usage-stats"],
                             env=head_env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    result = subprocess.run([str(TLOPT), "run", str(tiny), "--resume", str(run_dir), "--parallel", "2",
                             "--ray-address", f"127.0.0.1:{port}"], cwd=REPOSITORY, env=env, capture_output=True,
                            text=True, timeout=900)

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == "" and all(OUTPUT.match(line) for line in result.stdout.splitlines()), result.stdout
    trials = {trial.id: trial for trial in run.trials.records()}
    assert sorted(trials) == TRIALS and not run.trials.unfinished("shared", "model"), "the budget, exactly"
    assert {trial_id: trials[trial_id].to_record() for trial_id in finished} == \
        {trial_id: trial.to_record() for trial_id, trial in finished.items()}
    assert {trial_id: Path(trials[trial_id].weights).stat().st_mtime_ns for trial_id in finished} == weights, \
        "a trial that had finished ran again"
    for trial_id, issued in running.items():
        trial = trials[trial_id]
        assert (trial.x, trial.based_on, trial.pending) == (issued.x, issued.based_on, issued.pending)
        assert trial.worker["gpu_ids"] == ["0"], "on the cluster's logical GPU, not in a Ray of its own"
    for trial_id in TRIALS:
        assert result.stdout.count(f"trial {trial_id}:") == (trial_id not in finished)
    # The two random trials start together; if one ended before the kill, the other runs again with the
    # model-based one (`asap`: as soon as a slot is free).
    assert any(a.start_time < b.end_time and b.start_time < a.end_time
               for a in trials.values() for b in trials.values() if a.id < b.id), "no two trials ran at once"
    assert run.read_params()["execution"] == {"parallel_trials": 2, "ray_address": f"127.0.0.1:{port}",
                                              "gpus_per_trial": None, "cpus_per_trial": None, "schedule": "asap"}

    for name in ("params.yaml", "environment.json", "split.csv", "split_summary.json", "trials.jsonl",
                 "report.html", "shared/best.json"):
        assert (run_dir / name).is_file(), name
    for name in ("evaluations.txt", "report.txt", "convergence.png", "status.json"):
        assert (run.step_dir("shared", "model") / name).is_file(), name
    assert json.loads(run.step_status_file("shared", "model").read_text()) == {"trials": 3, "stop_reason": "budget"}
    for trial in trials.values():
        folder = run.trial(trial.id)
        for phase in ("block", "finetune"):
            assert folder.history(phase).is_file() and folder.weights(phase).is_file()
            assert any((folder.tensorboard(phase) / "validation").iterdir())
    assert sorted(path.stem for path in run.notebooks_dir.glob("*.ipynb")) == NOTEBOOKS
    for name in NOTEBOOKS:
        metadata = nbformat.read(run.notebooks_dir / f"{name}.ipynb", as_version=4).metadata["papermill"]
        assert metadata["end_time"] and not metadata["exception"]
    assert "Strategy comparison" in run.report_file.read_text()
    assert run.read_best("shared")["model"]["id"] in TRIALS

    # The cluster: stopped by pid, not with `ray stop` (which stops every Ray of the machine).
    assert end_processes_of(ray_root) == []
