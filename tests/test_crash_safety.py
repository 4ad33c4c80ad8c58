"""Crash safety: a process killed with SIGKILL while writing leaves every file whole."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPOSITORY, TLOPT
from tlopt.files import atomic_write_json
from tlopt.store import RunFolder
from tlopt.trials import Trial, TrialState


def trial(index):
    return Trial(f"t-{index}", "s", "model", index, "initial", [0.0], {}, "", TrialState.OK)

WRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from tlopt.store import RunFolder
    from tlopt.trials import Trial, TrialState

    real_fsync = os.fsync

    def slow_fsync(fd):
        # The new file is written but not yet renamed: the moment a kill hurts most.
        Path(sys.argv[2]).write_text("writing")
        time.sleep(60)
        real_fsync(fd)

    os.fsync = slow_fsync
    RunFolder(Path(sys.argv[1])).trials.append(Trial("t-3", "s", "model", 3, "initial", [0.0], {}, "", TrialState.OK))
    """
)


def wait_for(path, seconds=30.0):
    deadline = time.time() + seconds
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_sigkill_while_a_trial_record_is_written_keeps_the_store_whole(tmp_path):
    trials = RunFolder(tmp_path).trials
    for index in range(3):
        trials.append(trial(index))
    before = trials.path.read_bytes()
    marker = tmp_path / "writing"
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(marker)])
    try:
        wait_for(marker)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert trials.path.read_bytes() == before
    assert [r.id for r in trials.records()] == ["t-0", "t-1", "t-2"]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the killed writer's temporary file is where a half write would be"
    trials.append(trial(3))
    assert [json.loads(line)["id"] for line in trials.path.read_text().splitlines()] == [
        "t-0", "t-1", "t-2", "t-3"
    ]


def test_atomic_write_replaces_whole_files_only(tmp_path):
    path = tmp_path / "best.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert os.listdir(tmp_path) == ["best.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask, "run files must be readable by others"


def start_tlopt(*args):
    """`tlopt run` in its own process group, so that a kill takes its notebook kernel too."""
    return subprocess.Popen([str(TLOPT), *map(str, args)], cwd=REPOSITORY, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def trial_lines(run_dir):
    path = RunFolder(run_dir).trials_file
    return path.read_text().splitlines() if path.is_file() else []


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_trial_then_resume(ci_params, finished_run):
    """Killed mid-trial and resumed, the run equals the uninterrupted one (same seed)."""
    ci_file = ci_params
    uninterrupted = RunFolder(finished_run[0]).trials.records()
    run_dir = ci_file.parent / "results" / "killed"
    process = start_tlopt("run", ci_file, "--name", "killed", "--strategy", "shared")
    deadline = time.time() + 600
    try:
        # Kill once the second trial has started training: one finished, one half done.
        while not (run_dir / "runs" / "shared-model-001" / "tensorboard").exists():
            assert process.poll() is None, process.stdout.read()
            assert time.time() < deadline, "the second trial never started"
            time.sleep(0.1)
        time.sleep(1.0)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    before = [json.loads(line) for line in trial_lines(run_dir)]
    assert [r["id"] for r in before] in (["shared-model-000"], ["shared-model-000", "shared-model-001"])
    # Histories stay (checkpoints of beaten trials are deleted): a trial run again rewrites its history.
    history = lambda trial_id: run_dir / "runs" / trial_id / "finetune" / "history.csv"  # noqa: E731
    finished_histories = {r["id"]: history(r["id"]).stat().st_mtime_ns for r in before}

    resumed = subprocess.run([str(TLOPT), "run", ci_file, "--resume", run_dir, "--strategy", "shared"],
                             cwd=REPOSITORY, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = RunFolder(run_dir).trials.records()
    lines = trial_lines(run_dir)
    assert len(lines) == len(after) == len({r.id for r in after}) == len(uninterrupted)
    assert [r.id for r in after] == [r.id for r in uninterrupted]
    assert {r.id: history(r.id).stat().st_mtime_ns for r in after if r.id in finished_histories} == \
        finished_histories, "a trial that had finished before the kill ran again"
    # Same seed, same machine: the resumed run suggested and measured what the uninterrupted one did.
    assert [r.x for r in after] == [r.x for r in uninterrupted]
    assert [r.val_accuracy for r in after] == [r.val_accuracy for r in uninterrupted]
    assert (run_dir / "report.html").is_file()
