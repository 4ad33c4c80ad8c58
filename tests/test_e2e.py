"""`tlopt run params/ci.yaml` end to end, as a user runs it: the results layout, the report, resume."""

import json
import re
import shutil

import nbformat
import pytest

from conftest import REPOSITORY, run_tlopt
from tlopt import checkpoints
from tlopt.params import dump_params, load_params

pytestmark = pytest.mark.slow

NOTEBOOKS = ["00_data_split", "01_shared_strategy", "04_layer_optimization-shared", "05_analysis"]
REPORT_SECTIONS = [
    "00 · Data split", "Sample images per class",
    "01 · Shared hyperparameters", "Did Bayesian optimization improve on its random initial points?",
    "04 · Layer optimization", "Surrogate and acquisition",
    "05 · Analysis", "The objective of every run against epoch",
    "The objective of every run against wall-clock time", "Strategy comparison", "Best hyperparameters",
    "Final models: per-class metrics and confusion matrices", "Comparison with the dataset paper",
    "Time per strategy", "Nonconvergence filtering", "Environment",
    "Validation, held-out test and external test, side by side", "Failed trials and stopped runs",
    "Summary", "The winner: shared", "The strategies side by side", "The notebooks", "Training noise",
    "ROC curves and AUC", "Calibration", "Explanation maps",
    # The run's objective is balanced accuracy and it has an external test set (tests/conftest.py).
    "objective: validation balanced accuracy (val_balanced_accuracy)", "The external test set and the search",
    "External test set: 6 images",
]
# What TensorFlow and absl write at start-up (absl's "I0000 00:00:..." prefix, the CPU feature guard, oneDNN).
START_UP_LINE = re.compile(r"absl::|cpu_feature_guard|oneDNN|^[IWEF]\d{4} \d\d:\d\d:", re.MULTILINE)


def test_the_run_writes_every_file_of_the_results_layout(finished_run):
    run_dir, result = finished_run
    for name in ("params.yaml", "environment.json", "split.csv", "trials.jsonl", "report.html",
                 "shared/best.json", "best.json", "tables/strategy_comparison.csv", "tables/metrics-shared-val.tex",
                 "figures/roc-shared-val.svg", "figures/gradcam-shared-val.png"):
        assert (run_dir / name).is_file(), name
    assert load_params(run_dir / "params.yaml").run_name == "e2e"

    trials = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]
    assert [t["id"] for t in trials] == [f"shared-{step}-{i:03d}" for step in ("model", "layers") for i in range(3)]
    assert all(t["status"] == "ok" for t in trials)
    for step, surrogate in (("model", False), ("layers", True)):
        for name in ("evaluations.txt", "report.txt", "convergence.png", "status.json"):
            assert (run_dir / "shared" / step / name).is_file(), f"{step}/{name}"
        assert (run_dir / "shared" / step / "acquisition.png").is_file() == surrogate
    best = json.loads((run_dir / "shared" / "best.json").read_text())
    assert best["model"]["id"].startswith("shared-model-") and best["final"]["id"].startswith("shared-layers-")
    # training.keep_weights: best keeps the final model's checkpoint and its basis's block (lean: no optimizer
    # state, the layers fine-tuning trained); every trial's history and events stay.
    kept = {f"{best['model']['id']}/block", f"{best['final']['id']}/finetune"}
    for trial in trials:
        phases = ("block", "finetune") if trial["step"] == "model" else ("finetune",)
        for phase in phases:
            folder = run_dir / "runs" / trial["id"] / phase
            assert (folder / "history.csv").is_file()
            assert (folder / "best.weights.h5").is_file() == (f"{trial['id']}/{phase}" in kept), folder
            assert any((run_dir / "runs" / trial["id"] / "tensorboard" / phase / "validation").iterdir())
    final_checkpoint = run_dir / "runs" / best["final"]["id"] / "finetune" / "best.weights.h5"
    assert checkpoints.is_lean(final_checkpoint)
    assert "model/predictions" in checkpoints.stored_keys(final_checkpoint)

    assert sorted(path.stem for path in (run_dir / "notebooks").glob("*.ipynb")) == NOTEBOOKS
    for name in NOTEBOOKS:
        metadata = nbformat.read(run_dir / "notebooks" / f"{name}.ipynb", as_version=4).metadata["papermill"]
        assert metadata["end_time"] and not metadata["exception"]
        assert metadata["parameters"]["run_dir"] == str(run_dir)
    for trial in trials:
        assert f"trial {trial['id']}: val_balanced_accuracy {trial['objective_value']:.3f}" in result.stdout
        assert trial["objective"] == "balanced_accuracy"
    for name in ("external.csv", "shared/predictions-val.json", "shared/predictions-external.json"):
        assert (run_dir / name).is_file(), name


def test_the_report_holds_every_section_and_fetches_nothing(finished_run):
    run_dir, _ = finished_run
    html = (run_dir / "report.html").read_text()
    for section in REPORT_SECTIONS:
        assert section in html, section
    assert "<script" not in html


def test_no_tensorflow_or_absl_start_up_line_in_a_notebook_or_the_report(finished_run):
    run_dir, _ = finished_run
    for path in (run_dir / "notebooks").glob("*.ipynb"):
        for cell in nbformat.read(path, as_version=4).cells:
            for output in cell.get("outputs", []):
                assert not START_UP_LINE.search(output.get("text", "")), f"{path.name}: {output['text'][:300]}"
    assert not START_UP_LINE.search((run_dir / "report.html").read_text())


def test_resume_of_a_finished_run_does_no_new_work(finished_run, ci_params):
    run_dir, _ = finished_run
    before = {path: path.stat().st_mtime_ns for path in run_dir.rglob("*") if path.is_file() and path.name != "report.html"}

    result = run_tlopt("run", ci_params, "--resume", run_dir, "--strategy", "shared")

    assert result.returncode == 0, result.stderr
    assert result.stdout.count("finished before, skipped") == len(NOTEBOOKS)
    assert "trial " not in result.stdout
    after = {path: path.stat().st_mtime_ns for path in run_dir.rglob("*") if path.is_file() and path.name != "report.html"}
    assert after == before, "resume wrote or changed files"


def test_a_failing_notebook_stops_the_run_and_keeps_what_it_wrote(tmp_path, demo_root):
    """A dataset that passes `tlopt run`'s check but cannot be split: notebook 00 fails."""
    for label, count in (("a", 4), ("b", 1)):
        (tmp_path / "few" / label).mkdir(parents=True)
        for image in sorted(demo_root.rglob("*.jpg"))[:count]:
            shutil.copy(image, tmp_path / "few" / label)
    params = load_params(REPOSITORY / "params" / "ci.yaml",
                         {"results_dir": str(tmp_path / "results"), "data.root": str(tmp_path / "few"),
                          "data.demo": None})
    result = run_tlopt("run", dump_params(params, tmp_path / "broken.yaml"), "--name", "broken")

    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: 00_data_split.ipynb failed in cell [")
    assert "DataError: class 'b' has 1 image(s): too few" in line
    run_dir = tmp_path / "results" / "broken"
    assert (run_dir / "params.yaml").is_file() and (run_dir / "notebooks" / "00_data_split.ipynb").is_file()
    assert not (run_dir / "report.html").exists() and "01_shared_strategy" not in result.stdout
