"""Trials of a BO step on Ray: several at once on this machine's CPUs and GPUs, or on a cluster.

`RayExecutor` is the step loop's executor (`tlopt.optimize`) when
`execution.parallel_trials` is above 1. It starts Ray inside this process (or joins the
cluster at `execution.ray_address`, or uses a session the notebook started), asks the
cluster whether a trial can be placed at all, and runs each trial as a Ray task in a fresh
worker process (`max_calls=1`: TensorFlow's GPU memory goes with the process), with
TensorFlow's memory growth on (so that trials sharing a GPU by fractions fit) and no
retry (`max_retries=0`: a trial whose worker died is recorded as failed, never silently
run twice). What a worker runs is a picklable task built by `tlopt.optimize`: the step's
objective is rebuilt there from the strategy registry, never shipped. Ray is imported
only here and only when a parallel step starts (docs/decisions.md, "Parallel trials").
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from tlopt.errors import TloptError
from tlopt.params import Execution
from tlopt.trials import Trial

if TYPE_CHECKING:
    from tlopt.optimize import TrialRequest

# Every trial's worker: TensorFlow allocates GPU memory as it needs it, and keeps its start-up log to itself.
WORKER_ENV = {"TF_FORCE_GPU_ALLOW_GROWTH": "true", "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"}
# How often a waiting step looks at its running trials (the live figure reads their history files).
POLL_SECONDS = 2.0
# Ray keeps resource amounts to four decimals; a share is rounded down so that k of them fit.
_RESOLUTION = 10_000


def _ray():
    """Ray, imported when a parallel step starts: a run of one trial at a time never loads it."""
    import ray

    return ray


@dataclasses.dataclass(frozen=True)
class Placement:
    """What each trial reserves on a Ray node."""

    cpus: float
    gpus: float


def _share(total: float, parts: int) -> float:
    """`total` split into `parts`, rounded down to Ray's resolution, at most one each."""
    return min(1.0, math.floor(total / parts * _RESOLUTION) / _RESOLUTION)


def placement(execution: Execution, cluster_cpus: float, cluster_gpus: float) -> Placement:
    """The settings, or the cluster's CPUs and GPUs shared evenly among the k trials (at most one of each).

    One GPU and k = 4 gives 0.25 GPU a trial; no GPU gives 0. A trial trains on one GPU,
    so the default never gives it more.
    """
    k = execution.parallel_trials
    cpus = execution.cpus_per_trial if execution.cpus_per_trial is not None else _share(cluster_cpus, k)
    gpus = execution.gpus_per_trial if execution.gpus_per_trial is not None else _share(cluster_gpus, k)
    return Placement(cpus=cpus, gpus=gpus)


def check_placeable(nodes: Sequence[dict[str, float]], wanted: Placement, where: str) -> None:
    """TloptError when no node has the CPUs and GPUs one trial asks for (Ray would wait forever)."""
    if any(node.get("CPU", 0) >= wanted.cpus and node.get("GPU", 0) >= wanted.gpus for node in nodes):
        return
    largest = max(nodes, key=lambda node: (node.get("GPU", 0), node.get("CPU", 0)), default={})
    raise TloptError(
        f"no node of {where} can run a trial that asks for {wanted.cpus:g} CPU and {wanted.gpus:g} GPU "
        f"(execution.cpus_per_trial, execution.gpus_per_trial); its largest node has "
        f"{largest.get('CPU', 0):g} CPU and {largest.get('GPU', 0):g} GPU"
    )


def worker_env(placed: Placement) -> dict[str, str]:
    """The environment of a trial's worker: `WORKER_ENV`, this process's PYTHONPATH, no GPU for a CPU trial.

    Ray leaves the GPUs of a task without GPUs visible; TensorFlow would take them.
    """
    env = dict(WORKER_ENV)
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    if placed.gpus == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _on_worker(task: Callable[[TrialRequest], Trial], request: TrialRequest) -> Trial:
    """A trial in a Ray worker: its record also says where (host, pid, GPU ids) and when it ran."""
    started = time.time()
    trial = task(request)
    worker = {"host": socket.gethostname(), "pid": os.getpid(), "gpu_ids": [str(i) for i in _ray().get_gpu_ids()]}
    return dataclasses.replace(trial, worker=worker, start_time=started, end_time=time.time())


def _missing_paths(paths: list[str]) -> tuple[str, list[str]]:
    """On a node: its name and which of `paths` it cannot see."""
    return socket.gethostname(), [path for path in paths if not os.path.exists(path)]


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


class RayExecutor:
    """Runs up to `execution.parallel_trials` trials at once as Ray tasks; a context manager.

    `task(request)` runs a trial in a worker (it must pickle); `failed(request, error,
    seconds)` is the record of a trial whose worker died. `shared_paths` must be visible
    on every node of a cluster. Ray starts at the first `submit`, so that a finished step
    costs nothing, and `close` (the end of the `with` block, also on errors and
    interrupts) cancels what still runs and shuts down a Ray this executor started.
    """

    def __init__(self, execution: Execution, task: Callable[[TrialRequest], Trial],
                 failed: Callable[[TrialRequest, str, float], Trial], shared_paths: Sequence[str] = ()) -> None:
        self.execution = execution
        self.slots = execution.parallel_trials
        self.task = task
        self.failed = failed
        self.shared_paths = [str(path) for path in shared_paths]
        self.placed: Placement | None = None
        self.running: dict[Any, tuple[TrialRequest, float]] = {}
        self._remote = None
        self._task_ref = None
        self._owns_ray = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def submit(self, request: TrialRequest) -> None:
        if self._remote is None:
            self._start()
        self.running[self._remote.remote(self._task_ref, request)] = (request, time.time())

    def next_result(self, waiting: Callable[[], None] | None = None) -> Trial:
        """The record of the first trial to end; `waiting()` runs before and every `POLL_SECONDS` until then."""
        ray = _ray()
        ready: list = []
        while not ready:
            if waiting is not None:
                waiting()
            ready, _ = ray.wait(list(self.running), num_returns=1, timeout=POLL_SECONDS)
        request, submitted = self.running.pop(ready[0])
        try:
            return ray.get(ready[0])
        except ray.exceptions.RayError as error:  # the worker died (killed, out of memory) or could not start
            # A task that raised outside the trial's own handling carries the original exception as its cause.
            return self.failed(request, _one_line(getattr(error, "cause", None) or error), time.time() - submitted)

    def close(self) -> None:
        """Cancel the trials still running (their workers are killed) and shut down a Ray started here."""
        if self._remote is None and not self._owns_ray:
            return
        ray = _ray()
        for ref in self.running:
            ray.cancel(ref, force=True)
        self.running.clear()
        self._remote = self._task_ref = None
        if self._owns_ray:
            self._owns_ray = False
            ray.shutdown()

    def _where(self) -> str:
        return f"the Ray cluster at {self.execution.ray_address}" if self.execution.ray_address else "this machine"

    def _start(self) -> None:
        ray = _ray()
        if not ray.is_initialized():
            self._init(ray)
        try:
            nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
            self.placed = placement(self.execution, sum(node.get("CPU", 0) for node in nodes),
                                    sum(node.get("GPU", 0) for node in nodes))
            check_placeable(nodes, self.placed, self._where())
            if self.execution.ray_address and self.shared_paths:
                self._check_shared_paths(ray)
            self._task_ref = ray.put(self.task)
            self._remote = ray.remote(max_retries=0, max_calls=1)(_on_worker).options(
                num_cpus=self.placed.cpus, num_gpus=self.placed.gpus,
                runtime_env={"env_vars": worker_env(self.placed)},
            )
        except BaseException:
            self.close()
            raise

    def _init(self, ray) -> None:
        """Start Ray in this process (this machine's CPUs and visible GPUs), or join the cluster at the address."""
        quiet = dict(logging_level="ERROR", log_to_driver=False)
        address = self.execution.ray_address
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report from a Ray started for tlopt
        try:
            if address:
                ray.init(address=address, **quiet)
            else:
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
        except BaseException as error:  # Ray raises plain Exceptions and ConnectionErrors; or an interrupt
            if ray.is_initialized():
                ray.shutdown()
            if not isinstance(error, Exception):
                raise
            if address:
                raise TloptError(
                    f"cannot join the Ray cluster at {address} (execution.ray_address): {_one_line(error)}; "
                    f"is it running, and does RAY_AUTH_MODE match its authentication?"
                ) from None
            raise TloptError(f"Ray did not start on this machine: {_one_line(error)}") from None
        self._owns_ray = True

    def _check_shared_paths(self, ray) -> None:
        """Every node must see the run folder and the data at the same path (a shared filesystem)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe = ray.remote(num_cpus=0, max_retries=0)(_missing_paths)
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                .remote(self.shared_paths) for node in ray.nodes() if node["Alive"]]
        for host, missing in ray.get(refs):
            if missing:
                raise TloptError(
                    f"the Ray node {host} does not see {missing[0]}: the data and the run folder must be on a "
                    f"shared filesystem, at the same path on every node"
                )
