"""Parallel steps without Ray: the scheduler against a fake executor that finishes trials in scripted orders,
the trial store's issued records, resume, the shared caches' lock, the settings and the live figure.

The Ray executor itself is tested in test_ray.py and test_ray_cli.py.
"""

import threading
import time

import numpy as np
import pandas as pd
import pytest
import yaml

from fakes import FakeResult, FakeTrainer
from tlopt import bo, data, optimize
from tlopt.cli import TrialPrinter
from tlopt.errors import ConfigError, TloptError
from tlopt.files import build_once
from tlopt.live import LiveAccuracy
from tlopt.observers import ProgressBar, StepProgress
from tlopt.parallel import Placement, check_placeable, placement, worker_env
from tlopt.params import load_params, validate
from tlopt.space import Layer, SearchSpace
from tlopt.store import RunFolder
from tlopt.strategies import Outcome, one_optimizer_space, shared
from tlopt.trials import Trial, TrialState

from conftest import REPOSITORY


class Killed(BaseException):
    """Like SIGKILL for the loop: not an Exception, so no trial catches it."""


class ScriptedExecutor:
    """`slots` trials at once in this process; `order` picks which running trial ends next.

    `order(running)` returns a position in the list of running requests (submission order);
    after `kill_after` results the next wait raises Killed, as if the process died.
    """

    def __init__(self, objective, slots, order, kill_after=None):
        self.objective, self.slots, self.order, self.kill_after = objective, slots, order, kill_after
        self.running = []
        self.submitted = []
        self.waited = 0

    def submit(self, request):
        self.running.append(request)
        self.submitted.append(request)

    def next_result(self, waiting=None):
        if waiting is not None:
            waiting()
        if self.kill_after is not None and self.waited >= self.kill_after:
            raise Killed()
        self.waited += 1
        return optimize.run_trial(self.objective, self.running.pop(self.order(self.running)))


def first(running):
    return 0


def last(running):
    return len(running) - 1


def shuffled(seed):
    rng = np.random.default_rng(seed)
    return lambda running: int(rng.integers(len(running)))


def params(tmp_path, schedule="ordered", slots=3, **bo_settings):
    return validate({
        "run_name": "p", "results_dir": str(tmp_path / "results"),
        "data": {"root": str(tmp_path / "data"), "image_size": 32},
        "backbones": ["VGG16", "ResNet50"], "optimizers": ["SGD", "Adam"],
        "bo": {"initial_points": 3, "iterations": 3, **bo_settings},
        "execution": {"parallel_trials": slots, "schedule": schedule},
    })


def shared_step(config, executor_for):
    """Run the `shared` model step with the executor `executor_for(objective)`; its records by index."""
    run = RunFolder.open(config)
    if not run.split_file.is_file():
        data.write_manifest(pd.DataFrame({"path": ["/a.jpg", "/b.jpg"], "label": ["a", "b"],
                                          "group": ["a", "b"], "split": ["train", "val"]}), run.split_file)
    ctx = optimize.make_context(config, run, FakeTrainer())
    objective = shared(ctx)
    executor = executor_for(objective)
    optimize.run_step(ctx, "shared", "model", one_optimizer_space(config), objective, executor=executor)
    return {trial.index: trial for trial in run.trials.records()}, executor


@pytest.mark.parametrize("schedule", ["ordered", "asap"])
def test_ordered_points_do_not_depend_on_the_order_trials_finish_in(tmp_path, schedule):
    points = {}
    orders = (("first", first), ("last", last), ("shuffled", shuffled(3)))
    for name, order in orders if schedule == "ordered" else orders[:2]:
        trials, _ = shared_step(params(tmp_path / name, schedule),
                                lambda objective: ScriptedExecutor(objective, 3, order))
        assert sorted(trials) == list(range(6)), "the budget is exact"
        points[name] = {index: trial.x for index, trial in trials.items()}
        for index, trial in trials.items():
            assert (trial.parallel_trials, trial.schedule) == (3, schedule)
            if index < 3:
                assert (trial.method, trial.based_on, trial.pending) == ("initial", [], [])
            elif schedule == "ordered":
                assert trial.based_on == list(range(index - 2)) and trial.pending == [index - 2, index - 1]
            else:
                assert set(trial.based_on).isdisjoint(trial.pending)
                assert set(trial.based_on) | set(trial.pending) <= set(range(index))
    if schedule == "ordered":
        assert points["first"] == points["last"] == points["shuffled"]
    else:  # asap: what a point is based on depends on which trials ended first
        assert points["first"] != points["last"]


def peak_at_six(hp, folder):
    """A narrow peak at layer 6 of 0..11."""
    result = FakeResult(1.0 - abs(hp["delimiting_layer"] - 6) / 12, 0.5, str(folder.weights("finetune")), "finetune")
    return Outcome(scored=result, phases={"finetune": result}, setup=dict(hp))


LAYERS = SearchSpace([Layer("delimiting_layer", 11)])


def test_a_constant_liar_gives_k_distinct_points_where_the_plain_gp_repeats_one():
    config = validate({"data": {"root": "d"}, "bo": {"initial_points": 2}})
    X = np.array([[0.0], [3.0], [9.0], [11.0]])
    Y = -(1 - abs(X - 6) / 12)
    plain = {tuple(bo.suggest(LAYERS, X, Y, config.bo, seed).reshape(-1)) for seed in range(4)}
    assert len(plain) == 1, "without pending points every slot would get the same point"
    pending = np.zeros((0, 1))
    for _ in range(4):
        pending = np.vstack([pending, bo.suggest(LAYERS, X, Y, config.bo, 7, pending=pending)])
    points = pending.reshape(-1).tolist()
    assert len(set(points)) == 4 and not set(points) & set(X.reshape(-1)), points
    assert bo.constant_lie(Y) == float(Y.max()), "the lie is the worst score seen"


def test_the_points_running_together_are_distinct(tmp_path):
    config = params(tmp_path, slots=3, initial_points=2, iterations=4)
    run = RunFolder.open(config)
    data.write_manifest(pd.DataFrame({"path": ["/a.jpg"], "label": ["a"], "group": ["a"], "split": ["train"]}),
                        run.split_file)
    ctx = optimize.make_context(config, run, FakeTrainer())
    optimize.run_step(ctx, "shared", "layers", LAYERS, peak_at_six,
                      executor=ScriptedExecutor(peak_at_six, 3, shuffled(0)))
    trials = {trial.index: trial for trial in run.trials.records()}
    assert sorted(trials) == list(range(6))
    assert [len(trials[index].pending) for index in range(2, 6)] == [1] + [2] * 3
    for trial in trials.values():
        together = [trial.x] + [trials[index].x for index in trial.pending]
        assert len({tuple(x) for x in together}) == len(together), trial.id


@pytest.mark.parametrize("schedule", ["ordered", "asap"])
def test_resume_with_trials_running_at_the_kill(tmp_path, schedule):
    config = params(tmp_path / "cut", schedule)
    with pytest.raises(Killed):
        shared_step(config, lambda objective: ScriptedExecutor(objective, 3, last, kill_after=3))
    store = RunFolder.of(config).trials
    finished_before = {trial.id for trial in store.records()}
    issued = {trial.id: trial for trial in store.unfinished("shared", "model")}
    assert len(finished_before) == 3 and len(issued) >= 1
    assert all(trial.status == TrialState.ISSUED and trial.val_accuracy is None for trial in issued.values())

    trials, resumed = shared_step(config, lambda objective: ScriptedExecutor(objective, 3, first))
    ran_again = [request.id for request in resumed.submitted]
    assert sorted(trials) == list(range(6)) and not store.unfinished("shared", "model")
    assert finished_before.isdisjoint(ran_again), "a finished trial ran again"
    assert ran_again[:len(issued)] == sorted(issued), "the trials running at the kill run first, by index"
    for trial_id, before in issued.items():
        after = next(trial for trial in trials.values() if trial.id == trial_id)
        assert (after.x, after.based_on, after.pending) == (before.x, before.based_on, before.pending)
    if schedule == "ordered":  # the points of an uninterrupted run, whose trials end in another order
        reference, _ = shared_step(params(tmp_path / "ref", schedule),
                                   lambda objective: ScriptedExecutor(objective, 3, first))
        assert {i: t.x for i, t in trials.items()} == {i: t.x for i, t in reference.items()}
    lines = store.path.read_text().splitlines()
    assert len(lines) == 6 + len(finished_before) + len(issued) + len(ran_again), \
        "a record when a trial is issued (again, after the kill) and one when it finishes"


def test_ordered_resume_refuses_an_issued_point_its_trials_no_longer_give(tmp_path):
    config = params(tmp_path)
    with pytest.raises(Killed):
        shared_step(config, lambda objective: ScriptedExecutor(objective, 3, first, kill_after=5))
    store = RunFolder.of(config).trials
    [*_, changed] = store.unfinished("shared", "model")
    assert changed.method == "bayesian"
    store.append(Trial(**{**changed.to_record(), "x": [0.5] * len(changed.x), "status": TrialState.ISSUED}))
    with pytest.raises(TloptError, match=f"{changed.id} was issued at"):
        shared_step(config, lambda objective: ScriptedExecutor(objective, 3, first))


def test_one_slot_is_the_loop_of_the_first_version(tmp_path):
    """`execution.parallel_trials: 1` is the default loop: the same records, with the first version's fields."""
    default = params(tmp_path / "default", slots=1, iterations=1)
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text(yaml.safe_dump({**default.to_dict(), "results_dir": str(tmp_path / "explicit"),
                                        "execution": {"parallel_trials": 1}}))
    runs = []
    for config in (default, load_params(explicit)):
        run = RunFolder.open(config)
        data.write_manifest(pd.DataFrame({"path": ["/a.jpg", "/b.jpg"], "label": ["a", "b"], "group": ["a", "b"],
                                          "split": ["train", "val"]}), run.split_file)
        optimize.run_strategy(config, "shared", run, trainer=FakeTrainer(), progress=False)
        runs.append([{key: value for key, value in trial.to_record().items()
                      if key not in ("started_at", "seconds", "weights", "phases", "setup")}
                     for trial in run.trials.records()])
    assert runs[0] == runs[1] and len(runs[0]) == 4
    first_version = yaml.safe_load((REPOSITORY / "tests" / "data" / "run-0.1.0" / "complete-trials.jsonl")
                                   .read_text().splitlines()[0])
    lines = (tmp_path / "explicit" / "p" / "trials.jsonl").read_text().splitlines()
    # The first version's fields, and the objective a trial was scored on with its value.
    assert all(set(yaml.safe_load(line)) == {*first_version, "objective", "objective_value"} for line in lines)


# The trial store


def record(index, status, **fields):
    if "val_accuracy" in fields:  # scored on the default objective, validation accuracy
        fields.setdefault("objective_value", fields["val_accuracy"])
    return Trial(f"s-model-{index:03d}", "s", "model", index, "initial", [0.0], {}, "", status, **fields)


def test_the_store_keeps_the_last_record_of_each_trial(tmp_path, capsys):
    store = RunFolder(tmp_path).trials
    for trial in (record(0, TrialState.ISSUED), record(1, TrialState.ISSUED), record(1, TrialState.OK),
                  record(2, TrialState.ISSUED), record(0, TrialState.FAILED, error="WorkerCrashedError: died")):
        store.append(trial)
    assert [(t.id, t.status) for t in store.records()] == [("s-model-001", "ok"), ("s-model-000", "failed")]
    assert [t.id for t in store.unfinished("s", "model")] == ["s-model-002"]
    assert store.unfinished("s", "layers") == [] and len(store.frame()) == 2
    printer = TrialPrinter(store)
    assert printer.seen == 2
    store.append(record(3, TrialState.ISSUED))
    store.append(record(2, TrialState.OK, val_accuracy=0.5))
    printer.print_new()
    assert capsys.readouterr().out == "    trial s-model-002: val_accuracy 0.500 (0 s)\n", "issued ones are not"


def test_a_parallel_record_says_what_it_was_based_on_and_where_it_ran(tmp_path):
    trial = record(4, TrialState.OK, val_accuracy=0.5, based_on=[0, 1], pending=[2, 3], parallel_trials=3,
                   schedule="ordered", worker={"host": "h", "pid": 7, "gpu_ids": ["0"]}, start_time=1.0,
                   end_time=2.0)
    stored = trial.to_record()
    assert stored["based_on"] == [0, 1] and stored["worker"]["gpu_ids"] == ["0"]
    assert Trial.from_record(stored) == trial
    assert "based_on" not in record(0, TrialState.OK).to_record(), "one-at-a-time records stay as they were"


# Settings


def test_execution_settings_are_checked(tmp_path):
    base = {"data": {"root": "d"}}
    assert validate(base).execution.model_dump() == {
        "parallel_trials": 1, "ray_address": None, "gpus_per_trial": None, "cpus_per_trial": None,
        "schedule": "ordered"}
    for execution, message in (({"parallel_trials": 0}, "execution.parallel_trials"),
                               ({"gpus_per_trial": 1.5}, "a fraction of one GPU or whole GPUs"),
                               ({"schedule": "greedy"}, "execution.schedule"),
                               ({"cpus_per_trial": 0}, "execution.cpus_per_trial")):
        with pytest.raises(ConfigError, match=message):
            validate({**base, "execution": execution})
    assert validate({**base, "execution": {"gpus_per_trial": 2}}).execution.gpus_per_trial == 2


def test_a_resumed_run_may_move_to_other_machines_but_not_change_its_points(tmp_path):
    config = params(tmp_path)
    run = RunFolder.open(config)
    moved = config.updated({"execution.ray_address": "10.0.0.1:6379", "execution.gpus_per_trial": 0.5})
    RunFolder.open(moved, run)
    assert run.read_params()["execution"]["ray_address"] == "10.0.0.1:6379"
    with pytest.raises(ConfigError, match=r"\(execution.parallel_trials: 3 -> 2\)"):
        RunFolder.open(config.updated({"execution.parallel_trials": 2}), run)
    with pytest.raises(ConfigError, match=r"\(execution.schedule: 'ordered' -> 'asap'\)"):
        RunFolder.open(config.updated({"execution.schedule": "asap"}), run)


def test_each_trial_gets_an_even_share_of_the_cluster_unless_the_settings_say(tmp_path):
    execution = params(tmp_path, slots=4).execution
    assert placement(execution, cluster_cpus=16, cluster_gpus=1) == Placement(cpus=1.0, gpus=0.25)
    assert placement(execution, cluster_cpus=2, cluster_gpus=0) == Placement(cpus=0.5, gpus=0.0)
    assert placement(execution.model_copy(update={"parallel_trials": 3}), 2, 1) == Placement(0.6666, 0.3333)
    assert placement(execution, 64, 8) == Placement(1.0, 1.0), "a trial trains on one GPU"
    assert placement(execution.model_copy(update={"gpus_per_trial": 2.0, "cpus_per_trial": 4.0}), 8, 8) == \
        Placement(4.0, 2.0)


def test_a_trial_no_node_can_hold_is_an_error_not_a_wait():
    nodes = [{"CPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}]
    check_placeable(nodes, Placement(cpus=4, gpus=0.5), "the cluster")
    with pytest.raises(TloptError) as error:
        check_placeable([{"CPU": 2.0}], Placement(cpus=1, gpus=0.5), "this machine")
    assert str(error.value) == ("no node of this machine can run a trial that asks for 1 CPU and 0.5 GPU "
                                "(execution.cpus_per_trial, execution.gpus_per_trial); its largest node has "
                                "2 CPU and 0 GPU")


def test_a_worker_gets_growing_gpu_memory_and_no_gpu_for_a_cpu_trial(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    env = worker_env(Placement(cpus=1, gpus=0))
    assert env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["PYTHONPATH"] == "/somewhere"
    assert "CUDA_VISIBLE_DEVICES" not in worker_env(Placement(cpus=1, gpus=0.5))


# Shared files


def test_concurrent_builders_of_one_cache_file_build_it_once(tmp_path):
    builds, seen = [], []
    target = tmp_path / "cache" / "features-x.npy"

    def build(temporary):
        builds.append(temporary)
        time.sleep(0.3)  # long enough for the others to arrive while the file is missing
        np.save(temporary, np.arange(5))

    def trial():
        seen.append(np.load(build_once(target, build, suffix=".npy")).tolist())

    threads = [threading.Thread(target=trial) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and seen == [list(range(5))] * 4
    assert sorted(path.name for path in target.parent.iterdir()) == [".features-x.npy.lock", "features-x.npy"]


def test_two_trials_share_one_decoded_image_cache(demo_root, tmp_path, monkeypatch):
    frame = data.split(data.discover(demo_root), val_fraction=0.3, seed=0)
    built = []
    real_build = data._build_image_cache

    def slow_build(paths, size, temporary):
        built.append(temporary)
        time.sleep(0.5)
        real_build(paths, size, temporary)

    monkeypatch.setattr(data, "_build_image_cache", slow_build)
    caches = []
    threads = [threading.Thread(target=lambda: caches.append(data.cache_images(frame, 32, tmp_path)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(built) == 1 and len(caches) == 2
    assert caches[0].path == caches[1].path and np.array_equal(caches[0].pixels, caches[1].pixels)


# What a notebook shows


def progress_with(tmp_path, running):
    run = RunFolder(tmp_path)
    return StepProgress("s", "model", tmp_path, SearchSpace([Layer("delimiting_layer", 3)]),
                        validate({"data": {"root": "d"}}).bo, np.zeros((0, 1)), np.zeros((0, 1)),
                        running={trial_id: run.trial(trial_id) for trial_id in running})


def write_history(folder, phase, accuracies):
    folder.phase_dir(phase).mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{epoch},{value},0.5\n" for epoch, value in enumerate(accuracies))
    folder.history(phase).write_text("epoch,val_accuracy,val_loss\n" + rows)


def test_the_live_figure_follows_the_running_trials_through_their_history_files(tmp_path):
    from test_live import FakeDisplay

    display = FakeDisplay()
    live = LiveAccuracy("shared", display=display)
    progress = progress_with(tmp_path, ["s-model-000", "s-model-001"])
    first_folder, second_folder = progress.running.values()
    write_history(first_folder, "block", [0.3, 0.4])
    live.trials_running(progress)
    write_history(second_folder, "block", [0.5])
    (second_folder.history("block")).write_text(second_folder.history("block").read_text() + "1,0.")
    live.trials_running(progress)
    live.trials_running(progress)  # nothing new: no redraw
    assert len(display.calls) == 1 and len(display.handle.updates) == 1
    axis = display.handle.updates[-1].axes[0]
    assert sorted(text.get_text() for text in axis.get_legend().get_texts()) == [
        "s-model-000 run 1", "s-model-001 run 1"]
    assert [list(line.get_ydata()) for line in axis.lines] == [[0.3, 0.4], [0.5]], "a half-written line waits"

    write_history(first_folder, "finetune", [0.6])
    del progress.running["s-model-000"]
    live.trial_end(progress, record(0, TrialState.OK))
    assert [label for label, _ in live.curves] == ["s-model-000 run 1", "s-model-000 run 2"]


def test_the_progress_bar_counts_running_trials(tmp_path):
    bar = ProgressBar()
    progress = progress_with(tmp_path, ["s-model-000", "s-model-001"])
    bar.step_begin(progress)
    bar.trial_begin(progress, "s-model-001")
    assert bar.bar.postfix == "running=2, best val_accuracy=n/a" and bar.bar.n == 0
    del progress.running["s-model-000"]
    progress.tell(record(0, TrialState.OK, val_accuracy=0.75, val_loss=0.1))
    bar.trial_end(progress, progress.done[-1])
    assert bar.bar.postfix == "running=1, best val_accuracy=0.750" and bar.bar.n == 1
    bar.step_end(progress, "budget")


# The command line


def test_parallel_and_ray_address_on_the_command_line_set_the_execution_section(tmp_path, demo_root):
    from tlopt import cli

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"data": {"root": str(demo_root)}, "results_dir": "results",
                                    "backbones": ["VGG16"], "weights": None}))
    args = cli.parser().parse_args(["run", str(path), "--parallel", "4", "--ray-address", "10.0.0.1:6379"])
    config, run, lock = cli.open_run_dir(args)
    lock.close()
    assert (config.execution.parallel_trials, config.execution.ray_address) == (4, "10.0.0.1:6379")
    assert run.read_params()["execution"]["parallel_trials"] == 4
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", str(path), "--parallel", "0"])
    assert exit_info.value.code == 2
