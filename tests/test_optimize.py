"""The BO loop: search quality, routing of hyperparameters, resume, failures, GPyOpt traps.

Every test here injects `FakeTrainer` (tests/fakes.py), so GPyOpt runs for
real while no network is trained.
"""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from fakes import FakeResult, FakeTrainer, peaked_score
from tlopt import backbones, bo, optimize
from tlopt.data import write_manifest
from tlopt.errors import ConfigError
from tlopt.params import validate
from tlopt.space import Layer, SearchSpace
from tlopt.store import RunFolder
from tlopt.strategies import Outcome, layer_space
from tlopt.trials import TrialState, best_trial


def make_params(tmp_path, **bo):
    return validate({
        "run_name": "t",
        "results_dir": str(tmp_path / "results"),
        "data": {"root": str(tmp_path / "data"), "image_size": 96},
        "backbones": ["Xception", "VGG16", "ResNet50"],
        "optimizers": ["Nadam", "SGD", "RMSprop", "Adam"],
        "bo": {"initial_points": 3, "iterations": 4, **bo},
    })


@pytest.fixture
def run_dir(tmp_path):
    run_dir = tmp_path / "results" / "t"
    frame = pd.DataFrame({
        "path": [f"/x/{c}/{i}.jpg" for c in "ab" for i in range(3)],
        "label": [c for c in "ab" for _ in range(3)],
        "group": [f"{c}{i}" for c in "ab" for i in range(3)],
        "split": ["train", "train", "val"] * 2,
    })
    write_manifest(frame, run_dir / "split.csv")
    return run_dir


def records(run_dir):
    return RunFolder(run_dir).trials.records()


def x_sequence(run_dir, strategy=None):
    return [(r.id, r.x) for r in records(run_dir) if strategy is None or r.strategy == strategy]


def test_bo_finds_the_peak_and_beats_random_on_average(tmp_path):
    """Shared strategy on a known function of {backbone, optimizer, log rate}; 4 seeds.

    The continuous part of the optimum (rate 1e-2) must be found by every
    seed; on average BO's best must beat uniform random search's.
    """
    best = {"bayesian": [], "random": []}
    for seed in range(4):
        for method in best:
            params = make_params(tmp_path / f"{method}{seed}", method=method, initial_points=5,
                                 iterations=10).updated({"seed": seed})
            run_dir = tmp_path / f"{method}{seed}" / "results" / "t"
            write_manifest(pd.DataFrame({"path": ["/a.jpg", "/b.jpg"], "label": ["a", "b"],
                                         "group": ["a", "b"], "split": ["train", "val"]}), run_dir / "split.csv")
            best[method].append(optimize.run_strategy(params, "shared", trainer=FakeTrainer(), progress=False))
    for record in best["bayesian"]:
        assert abs(np.log10(record.hyperparameters["learning_rate"]) + 2) < 0.25
    accuracy = {method: np.mean([r.val_accuracy for r in trials]) for method, trials in best.items()}
    assert accuracy["bayesian"] > accuracy["random"] + 0.05, accuracy
    assert accuracy["bayesian"] > 0.75 * peaked_score("VGG16", "Adam", 1e-2)


def test_routing_of_each_strategy(tmp_path, run_dir):
    params = make_params(tmp_path)
    trainer = FakeTrainer()
    optimize.run_strategy(params, "shared", trainer=trainer, progress=False)
    for record in RunFolder(run_dir).trials.of_step("shared", "model"):
        hp = record.hyperparameters
        block, finetune = [c for c in trainer.calls if c["run_dir"].name == record.id]
        assert (block["phase"], finetune["phase"]) == ("block", "finetune")
        for call in (block, finetune):
            assert (call["backbone"], call["optimizer"], call["learning_rate"]) == (
                hp["backbone"], hp["optimizer"], hp["learning_rate"])
        assert finetune["block_weights"] == run_dir / "runs" / record.id / "block" / "best.weights.h5"
        assert finetune["delimiting_layer"] == int(2 / 3 * backbones.layer_count(hp["backbone"]))

    trainer.calls.clear()
    optimize.run_strategy(params, "separate_hyperparameters", trainer=trainer, progress=False)
    for record in RunFolder(run_dir).trials.of_step("separate_hyperparameters", "model"):
        hp = record.hyperparameters
        block, finetune = [c for c in trainer.calls if c["run_dir"].name == record.id]
        assert (block["optimizer"], block["learning_rate"]) == (hp["block_optimizer"], hp["block_learning_rate"])
        assert (finetune["optimizer"], finetune["learning_rate"]) == (
            hp["finetune_optimizer"], hp["finetune_learning_rate"])

    trainer.calls.clear()
    best = optimize.run_strategy(params, "separate_optimizations", trainer=trainer, progress=False)
    block_trials = RunFolder(run_dir).trials.of_step("separate_optimizations", "block")
    best_block = best_trial(block_trials)
    assert all(c["phase"] == "block" for c in trainer.calls if "-block-" in c["run_dir"].name)
    finetunes = [c for c in trainer.calls if "-finetune-" in c["run_dir"].name]
    assert finetunes and all(c["phase"] == "finetune" for c in finetunes)
    assert {str(c["block_weights"]) for c in finetunes} == {best_block.setup["block_weights"]}
    assert {c["backbone"] for c in finetunes} == {best_block.setup["backbone"]}
    assert best.setup["block_optimizer"] == best_block.hyperparameters["optimizer"]

    trainer.calls.clear()
    optimize.run_strategy(params, "joint", trainer=trainer, progress=False)
    for record in RunFolder(run_dir).trials.of_step("joint", "model"):
        hp = record.hyperparameters
        finetune = [c for c in trainer.calls if c["run_dir"].name == record.id][1]
        n = backbones.layer_count(hp["backbone"])
        assert finetune["delimiting_layer"] == int(hp["delimiting_fraction"] * n)

    trainer.calls.clear()
    final = optimize.run_layer_optimization(params, "shared", trainer=trainer, progress=False)
    model_best = json.loads((run_dir / "shared" / "best.json").read_text())["model"]
    assert trainer.calls and all(c["phase"] == "finetune" for c in trainer.calls)
    assert {str(c["block_weights"]) for c in trainer.calls} == {model_best["setup"]["block_weights"]}
    assert {(c["backbone"], c["optimizer"], c["learning_rate"]) for c in trainer.calls} == {(
        model_best["setup"]["backbone"], model_best["setup"]["finetune_optimizer"],
        model_best["setup"]["finetune_learning_rate"])}
    assert json.loads((run_dir / "shared" / "best.json").read_text())["final"]["id"] == final.id


def test_step_writes_its_files_and_the_best_breaks_ties_by_loss(tmp_path, run_dir):
    optimize.run_strategy(make_params(tmp_path), "shared", trainer=FakeTrainer(), progress=False)
    step_dir = run_dir / "shared" / "model"
    for name in ("evaluations.txt", "report.txt", "convergence.png", "status.json"):
        assert (step_dir / name).is_file(), name
    assert len((step_dir / "evaluations.txt").read_text().splitlines()) == 1 + 7
    assert "GPyOpt Report file" in (step_dir / "report.txt").read_text()
    trials = records(run_dir)
    assert [r.index for r in trials] == list(range(7))
    assert [r.method for r in trials] == ["initial"] * 3 + ["bayesian"] * 4
    tied = [dataclasses.replace(trials[0], val_accuracy=1.0, val_loss=0.3, id="a"),
            dataclasses.replace(trials[0], val_accuracy=1.0, val_loss=0.1, id="b")]
    assert best_trial(tied).id == "b"


def test_layer_optimization_plots_its_one_dimensional_surrogate(tmp_path, run_dir):
    params = make_params(tmp_path).updated({"backbones": ["VGG16"]})
    optimize.run_strategy(params, "shared", trainer=FakeTrainer(), progress=False)
    optimize.run_layer_optimization(params, "shared", trainer=FakeTrainer(), progress=False)
    trials = RunFolder(run_dir).trials.of_step("shared", "layers")
    assert len(trials) == 7
    assert all(0 <= r.hyperparameters["delimiting_layer"] <= 19 for r in trials)
    assert (run_dir / "shared" / "layers" / "acquisition.png").is_file()
    surface = bo.surrogate_surface(
        layer_space(params, {"backbone": "VGG16"}),
        np.array([r.x for r in trials]), np.array([[-r.val_accuracy] for r in trials]), params.bo,
    )
    (curve,) = surface["curves"]
    assert list(curve["grid"]) == list(range(20))
    assert np.all(curve["std"] >= 0) and np.all(np.isfinite(curve["acquisition"]))


def test_two_coinciding_points_end_the_step_like_gpyopt_eps(tmp_path, run_dir):
    """On a 2-value domain BO must repeat itself before its budget runs out."""
    params = make_params(tmp_path, initial_points=2, iterations=6)
    ctx = optimize.make_context(params, RunFolder.open(params), FakeTrainer())

    def objective(hp, folder):
        result = FakeResult(0.5 + 0.1 * hp["delimiting_layer"], 0.5, str(folder.weights("finetune")), "finetune")
        return Outcome(scored=result, phases={"finetune": result}, setup=hp)

    space = SearchSpace([Layer("delimiting_layer", 1)])
    optimize.run_step(ctx, "shared", "layers", space, objective)
    status = json.loads((run_dir / "shared" / "layers" / "status.json").read_text())
    assert status["stop_reason"] == "eps: two consecutive points coincide"
    trials = records(run_dir)
    assert status["trials"] == len(trials) < 8
    assert trials[-1].x == trials[-2].x


class Killed(BaseException):
    """Like SIGKILL for the loop: not an Exception, so no trial catches it."""


@pytest.mark.parametrize("kill_at", [0, 2, 4, 6])
def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, kill_at):
    reference_dir = tmp_path / "ref" / "results" / "t"
    params_ref = make_params(tmp_path / "ref")
    write_manifest(pd.DataFrame({"path": ["/a.jpg", "/b.jpg"], "label": ["a", "b"],
                                 "group": ["a", "b"], "split": ["train", "val"]}), reference_dir / "split.csv")
    optimize.run_strategy(params_ref, "separate_optimizations", trainer=FakeTrainer(), progress=False)

    run_dir = tmp_path / "cut" / "results" / "t"
    params = make_params(tmp_path / "cut")
    write_manifest(pd.DataFrame({"path": ["/a.jpg", "/b.jpg"], "label": ["a", "b"],
                                 "group": ["a", "b"], "split": ["train", "val"]}), run_dir / "split.csv")
    started = []

    def kill(call):
        if call["phase"] == "block" or "-finetune-" in call["run_dir"].name:
            started.append(call["run_dir"].name)
        if len(started) > kill_at:
            raise Killed()

    with pytest.raises(Killed):
        optimize.run_strategy(params, "separate_optimizations", trainer=FakeTrainer(fail_when=kill), progress=False)
    assert len(records(run_dir)) == kill_at

    resumed = FakeTrainer()
    optimize.run_strategy(params, "separate_optimizations", trainer=resumed, progress=False)
    ids = [r.id for r in records(run_dir)]
    assert len(ids) == len(set(ids)) == 14
    assert x_sequence(run_dir) == x_sequence(reference_dir)
    rerun = {c["run_dir"].name for c in resumed.calls}
    assert rerun == set(ids[kill_at:]), "finished trials must not run again; the killed one must"

    again = FakeTrainer()
    optimize.run_strategy(params, "separate_optimizations", trainer=again, progress=False)
    assert again.calls == [] and len(records(run_dir)) == 14


def test_per_backbone_mode_runs_and_compares_each_backbone(tmp_path, run_dir):
    params = make_params(tmp_path, per_backbone=True, initial_points=2, iterations=1)
    params = params.updated({"backbones": ["VGG16", "ResNet50"]})
    overall = optimize.run_strategy(params, "shared", trainer=FakeTrainer(), progress=False)
    trials = records(run_dir)
    assert {r.strategy for r in trials} == {"shared@VGG16", "shared@ResNet50"}
    for label, backbone in (("shared@VGG16", "VGG16"), ("shared@ResNet50", "ResNet50")):
        assert {r.hyperparameters["backbone"] for r in trials if r.strategy == label} == {backbone}
        assert (run_dir / label / "best.json").is_file()
    summary = json.loads((run_dir / "shared" / "best.json").read_text())
    assert set(summary["per_backbone"]) == {"shared@VGG16", "shared@ResNet50"}
    assert summary["model"]["id"] == overall.id == best_trial(trials).id
    final = optimize.run_layer_optimization(params, "shared", trainer=FakeTrainer(), progress=False)
    layer_trials = [r for r in records(run_dir) if r.step == "layers"]
    assert {r.strategy for r in layer_trials} == {"shared@VGG16", "shared@ResNet50"}
    assert final.id == best_trial(layer_trials).id
    assert json.loads((run_dir / "shared" / "best.json").read_text())["final"]["id"] == final.id


def test_run_folder_records_parameters_and_versions(tmp_path, run_dir):
    params = make_params(tmp_path)
    optimize.run_strategy(params, "shared", trainer=FakeTrainer(), progress=False)
    assert RunFolder(run_dir).read_params() == params.to_dict()
    versions = json.loads((run_dir / "environment.json").read_text())
    assert versions["gpyopt"] == "1.2.6" and versions["keras"].startswith("3.")
    assert "tensorflow-cpu" in versions or "tensorflow" in versions


def test_resume_refuses_other_parameters(tmp_path, run_dir):
    params = make_params(tmp_path)
    optimize.run_strategy(params, "shared", trainer=FakeTrainer(), progress=False)
    with pytest.raises(ConfigError, match=r"differ from the ones this run started with \(bo.iterations: 4 -> 9\)"):
        optimize.run_strategy(params.updated({"bo.iterations": 9}), "shared", trainer=FakeTrainer(), progress=False)


def test_resume_accepts_a_run_that_predates_a_key_with_a_default(tmp_path, run_dir):
    """A key added to the schema after the run started counts with its default on both sides."""
    params = make_params(tmp_path)
    optimize.run_strategy(params, "shared", trainer=FakeTrainer(), progress=False)
    stored = RunFolder(run_dir).read_params()
    del stored["training"]["feature_cache"]  # as written before the key existed
    RunFolder(run_dir).params_file.write_text(yaml.safe_dump(stored, sort_keys=False))
    optimize.run_strategy(params, "shared", trainer=FakeTrainer(), progress=False)  # resumes

    changed = params.updated({"training.feature_cache": not params.training.feature_cache})
    with pytest.raises(ConfigError, match=r"\(training.feature_cache: "):
        optimize.run_strategy(changed, "shared", trainer=FakeTrainer(), progress=False)


def test_failed_trials_are_recorded_scored_worst_and_the_search_goes_on(tmp_path, run_dir):
    trainer = FakeTrainer(fail_when=lambda call: call["optimizer"] == "SGD" and call["phase"] == "finetune")
    optimize.run_strategy(make_params(tmp_path, max_consecutive_failures=7), "shared", trainer=trainer, progress=False)
    trials = records(run_dir)
    failed = [r for r in trials if r.status == TrialState.FAILED]
    assert len(trials) == 7 and failed
    assert all(r.hyperparameters["optimizer"] == "SGD" for r in failed)
    assert all(r.error == "FloatingPointError: loss became NaN" and r.val_accuracy is None for r in failed)
    lines = (run_dir / "shared" / "model" / "evaluations.txt").read_text().splitlines()[1:]
    scores = {int(float(line.split("\t")[0])) - 1: float(line.split("\t")[1]) for line in lines}
    assert all(scores[r.index] == 0.0 for r in failed)


def test_consecutive_failures_stop_the_step_with_a_clear_error(tmp_path, run_dir):
    trainer = FakeTrainer(fail_when=lambda call: True)
    with pytest.raises(optimize.StepFailed, match="shared/model: 3 consecutive trials failed; last error: FloatingPointError"):
        optimize.run_strategy(make_params(tmp_path), "shared", trainer=trainer, progress=False)
    assert len(records(run_dir)) == 3


def test_singular_gp_fit_ends_the_step_cleanly(tmp_path, run_dir, monkeypatch):
    """GPyOpt's own loop would hit np.linalg.linalg (gone in numpy 2) here."""
    import GPyOpt

    def singular(self, *args, **kwargs):
        raise np.linalg.LinAlgError("not positive definite, even with jitter.")

    monkeypatch.setattr(GPyOpt.models.GPModel, "updateModel", singular)
    optimize.run_strategy(make_params(tmp_path), "shared", trainer=FakeTrainer(), progress=False)
    status = json.loads((run_dir / "shared" / "model" / "status.json").read_text())
    assert status == {"trials": 3, "stop_reason": "singular GP fit: not positive definite, even with jitter."}


def test_gpyopt_traps_are_still_there_and_handled():
    """If these fail, GPyOpt or a pin changed: revisit docs/decisions.md."""
    import setuptools
    import GPyOpt

    assert GPyOpt.__version__ == "1.2.6"  # needs pkg_resources: setuptools < 82
    assert int(setuptools.__version__.split(".")[0]) < 82
    if int(np.__version__.split(".")[0]) >= 2:
        assert not hasattr(np.linalg, "linalg"), "GPyOpt's run_optimization would catch this again"
