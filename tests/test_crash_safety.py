"""Crash safety: a process killed with SIGKILL while writing leaves every file whole."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from tlopt import store

WRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from tlopt import store

    real_fsync = os.fsync

    def slow_fsync(fd):
        # The new file is written but not yet renamed: the moment a kill hurts most.
        Path(sys.argv[2]).write_text("writing")
        time.sleep(60)
        real_fsync(fd)

    os.fsync = slow_fsync
    store.TrialStore(Path(sys.argv[1])).append({"id": "t-3", "strategy": "s", "step": "model"})
    """
)


def wait_for(path, seconds=30.0):
    deadline = time.time() + seconds
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_sigkill_while_a_trial_record_is_written_keeps_the_store_whole(tmp_path):
    trials = store.TrialStore(tmp_path)
    for index in range(3):
        trials.append({"id": f"t-{index}", "strategy": "s", "step": "model"})
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
    assert [r["id"] for r in trials.records()] == ["t-0", "t-1", "t-2"]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the killed writer's temporary file is where a half write would be"
    trials.append({"id": "t-3", "strategy": "s", "step": "model"})
    assert [json.loads(line)["id"] for line in trials.path.read_text().splitlines()] == [
        "t-0", "t-1", "t-2", "t-3"
    ]


def test_atomic_write_replaces_whole_files_only(tmp_path):
    path = tmp_path / "best.json"
    store.atomic_write_json(path, {"a": 1})
    store.atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert os.listdir(tmp_path) == ["best.json"]
