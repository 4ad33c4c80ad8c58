"""`training.keep_weights`: `best` keeps only the checkpoints that later steps and the final evaluation read.

The fake trainer writes empty checkpoints and, like the real one, needs the block's
checkpoint to fine-tune from; every reader must still find its file, also after a resume.
"""

from pathlib import Path

import pandas as pd
import pytest

from fakes import FakeTrainer
from tlopt import analysis, checks, final, optimize
from tlopt.data import write_manifest
from tlopt.params import validate
from tlopt.store import RunFolder

STRATEGY = "separate_optimizations"  # the most steps: block, finetune, then layers


class ReadingTrainer(FakeTrainer):
    """Fine-tunes only from a block checkpoint on disk, as `training.fine_tune` does."""

    def fine_tune(self, backbone, optimizer, learning_rate, delimiting_layer, block_weights, *args, **kwargs):
        assert Path(block_weights).is_file(), f"fine-tuning reads {block_weights}, which is gone"
        return super().fine_tune(backbone, optimizer, learning_rate, delimiting_layer, block_weights, *args, **kwargs)


class Killed(BaseException):
    """Not an `Exception`, which a trial would record as failed: the process dies."""


def make_run(tmp_path, keep="best", repeats=0):
    params = validate({
        "run_name": "keep", "results_dir": str(tmp_path), "seed": 1,
        "data": {"root": str(tmp_path / "data"), "image_size": 32},
        "backbones": ["VGG16", "VGG19"], "optimizers": ["Adam", "SGD"],
        "bo": {"initial_points": 2, "iterations": 2}, "strategies": [STRATEGY],
        "training": {"keep_weights": keep}, "final": {"repeats": repeats},
    })
    run = RunFolder(tmp_path / "keep")
    write_manifest(pd.DataFrame({"path": ["/a.jpg", "/b.jpg"], "label": ["a", "b"], "group": ["a", "b"],
                                 "split": ["train", "val"]}), run.split_file)
    return params, run


def checkpoints_on_disk(run):
    return sorted(str(path.relative_to(run.path / "runs")) for path in (run.path / "runs").glob("*/*/best.weights.h5"))


def best_of(run, step):
    return run.read_best(STRATEGY)["steps"][step]["id"] if step != "layers" else run.read_best(STRATEGY)["final"]["id"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The strategy, its layer optimization and two repeats of the winner with `keep_weights: best`, checked
    after each part as the notebooks check them; the checkpoints on disk after each part."""
    params, run = make_run(tmp_path_factory.mktemp("uninterrupted"), repeats=2)
    on_disk = {}
    model = optimize.run_strategy(params, STRATEGY, run, trainer=ReadingTrainer(), progress=False)
    checks.check_strategy(params, run, STRATEGY, model)
    on_disk["model"] = checkpoints_on_disk(run)
    layers = optimize.run_layer_optimization(params, STRATEGY, run, trainer=ReadingTrainer(), progress=False)
    checks.check_layer_optimization(params, run, STRATEGY, layers)
    checks.check_strategy(params, run, STRATEGY, model)  # notebook 03 run again after 04
    on_disk["layers"] = checkpoints_on_disk(run)
    assert [repeat.ok for repeat in final.repeat_winner(params, run, trainer=ReadingTrainer())] == [True, True]
    on_disk["repeats"] = checkpoints_on_disk(run)
    return run, layers, on_disk


def test_keep_best_leaves_each_step_its_best_then_the_final_model_and_no_repeat(uninterrupted):
    run, layers, on_disk = uninterrupted
    assert len(run.trials.records()) == 12
    assert on_disk["model"] == [f"{best_of(run, 'block')}/block/best.weights.h5",
                                f"{best_of(run, 'finetune')}/finetune/best.weights.h5"]
    # Model optimization's fine-tuned model gave way to the final one; the block checkpoint is the final's basis.
    assert on_disk["layers"] == sorted([f"{best_of(run, 'block')}/block/best.weights.h5",
                                        f"{layers.id}/finetune/best.weights.h5"])
    assert Path(analysis.final_trial(run, STRATEGY).weights).is_file()
    assert Path(layers.setup["block_weights"]).is_file()
    assert on_disk["repeats"] == on_disk["layers"]


def test_keep_all_keeps_every_trials_checkpoints(tmp_path):
    params, run = make_run(tmp_path, keep="all", repeats=1)
    model = optimize.run_strategy(params, STRATEGY, run, trainer=ReadingTrainer(), progress=False)
    layers = optimize.run_layer_optimization(params, STRATEGY, run, trainer=ReadingTrainer(), progress=False)
    checks.check_strategy(params, run, STRATEGY, model)
    checks.check_layer_optimization(params, run, STRATEGY, layers)
    final.repeat_winner(params, run, trainer=ReadingTrainer())
    trials = [*run.trials.records(), *run.repeats.records()]
    assert all(Path(trial.weights).is_file() for trial in trials)
    assert len(checkpoints_on_disk(run)) == 4 + 4 + 4 + 2  # block, fine-tuning, layers; a repeat trains both phases


@pytest.mark.parametrize("kill_at", [6, 10])
def test_a_run_killed_anywhere_resumes_with_every_checkpoint_it_reads(tmp_path, uninterrupted, kill_at):
    """Killed in the fine-tuning step (the block step's best checkpoint is read) and in layer optimization
    (model optimization's best is its basis); resumed to the end, as the uninterrupted run ended."""
    params, run = make_run(tmp_path, repeats=2)
    reference_run, _, on_disk = uninterrupted
    started = []

    def kill(call):
        started.append(call["run_dir"].name)
        if len(started) > kill_at:
            raise Killed()

    with pytest.raises(Killed):
        optimize.run_strategy(params, STRATEGY, run, trainer=ReadingTrainer(fail_when=kill), progress=False)
        optimize.run_layer_optimization(params, STRATEGY, run, trainer=ReadingTrainer(fail_when=kill),
                                        progress=False)
    model = optimize.run_strategy(params, STRATEGY, run, trainer=ReadingTrainer(), progress=False)
    layers = optimize.run_layer_optimization(params, STRATEGY, run, trainer=ReadingTrainer(), progress=False)
    checks.check_layer_optimization(params, run, STRATEGY, layers)
    checks.check_strategy(params, run, STRATEGY, model)
    assert [(t.id, t.x) for t in run.trials.records()] == [(t.id, t.x) for t in reference_run.trials.records()]
    assert checkpoints_on_disk(run) == on_disk["layers"]


class CachingTrainer(FakeTrainer):
    """Writes an activation cache per (backbone, delimiting layer) as `training.fine_tune` does with the cache on."""

    def fine_tune(self, backbone, optimizer, learning_rate, delimiting_layer, block_weights, *args, **kwargs):
        Path(kwargs["cache_dir"]).mkdir(parents=True, exist_ok=True)
        (Path(kwargs["cache_dir"]) / f"activations-{backbone}-{delimiting_layer}-key.npy").write_bytes(b"")
        return super().fine_tune(backbone, optimizer, learning_rate, delimiting_layer, block_weights, *args, **kwargs)


def test_a_layer_step_leaves_only_model_optimizations_activation_caches(tmp_path):
    params, run = make_run(tmp_path)
    model = optimize.run_strategy(params, STRATEGY, run, trainer=CachingTrainer(), progress=False)
    model_caches = sorted(path.name for path in run.cache_dir.glob("activations-*"))
    optimize.run_layer_optimization(params, STRATEGY, run, trainer=CachingTrainer(), progress=False)

    tried = {trial.setup["delimiting_layer"] for trial in run.trials.of_step(STRATEGY, "layers")}
    assert len(tried - {model.setup["delimiting_layer"]}) >= 2, "the layer step wrote caches of other layers"
    assert f"activations-{model.setup['backbone']}-{model.setup['delimiting_layer']}-key.npy" in model_caches
    assert sorted(path.name for path in run.cache_dir.glob("activations-*")) == model_caches
