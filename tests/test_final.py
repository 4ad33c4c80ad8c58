"""The end of a run: its winner, the winner's repeats, probabilities, the summary, tables and figures for a paper."""

import json
import shutil
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from sklearn import metrics as skm

from fakes import FakeTrainer
from tlopt import analysis, final, optimize, plots, publish
from tlopt.data import write_manifest
from tlopt.params import validate
from tlopt.report import merged_notebook
from tlopt.store import RunFolder
from tlopt.summary import summary_markdown
from tlopt.trials import TrialState, best_trial

NAMES = ["a", "b", "c"]


@dataclass
class SeedRecordingTrainer(FakeTrainer):
    """A fake trainer that also records the seed each run was given."""

    seeds: list = field(default_factory=list)

    def train_block(self, *args, **kwargs):
        self.seeds.append(kwargs["config"].seed)
        return super().train_block(*args, **kwargs)


class Predictor:
    """Probabilities that favour the true class of most images, seeded; counts its calls."""

    def __init__(self, columns=True):
        self.calls = 0
        self.columns = columns

    def predict(self, backbone, weights, frame, class_names, config):
        self.calls += 1
        rng = np.random.default_rng(len(frame))
        true = frame["label"].map(class_names.index).to_numpy()
        logits = rng.normal(size=(len(frame), len(class_names)))
        logits[np.arange(len(frame)), true] += 1.5
        probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        return probabilities.astype(np.float32) if self.columns else probabilities.argmax(axis=1)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Shared and separate optimizations with their layer optimizations, run by the fake trainer; a test split."""
    folder = tmp_path_factory.mktemp("end")
    params = validate({
        "run_name": "end", "results_dir": str(folder), "seed": 7,
        "data": {"root": str(folder / "d"), "image_size": 32, "test_fraction": 0.2},
        "backbones": ["VGG16"], "optimizers": ["Adam", "SGD"], "bo": {"initial_points": 2, "iterations": 0}, "strategies": ["shared", "separate_optimizations"],
        "final": {"bootstrap_samples": 200},
    })
    run = RunFolder.open(params)
    write_manifest(pd.DataFrame({
        "path": [f"/x/{c}{i}.jpg" for c in NAMES for i in range(10)], "label": [c for c in NAMES for _ in range(10)],
        "group": [f"{c}{i}" for c in NAMES for i in range(10)], "split": (["train"] * 4 + ["val"] * 4 + ["test"] * 2) * 3,
    }), run.split_file)
    for strategy in params.strategies:
        optimize.run_strategy(params, strategy, run, trainer=FakeTrainer(), progress=False)
        optimize.run_layer_optimization(params, strategy, run, trainer=FakeTrainer(), progress=False)
    return params, run


def make_run(finished, tmp_path, repeats=0):
    """A copy of the finished run for a test to write into."""
    params, run = finished
    shutil.copytree(run.path, tmp_path / "end")
    return params.updated({"final.repeats": repeats}), RunFolder(tmp_path / "end")


def test_the_winner_is_the_best_final_model_across_strategies_in_best_json(finished, tmp_path):
    _, run = make_run(finished, tmp_path)
    finals = {strategy: analysis.final_trial(run, strategy) for strategy in ("shared", "separate_optimizations")}

    record = final.name_winner(run)

    assert run.winner_file == run.path / "best.json" and run.read_winner() == json.loads(json.dumps(record))
    assert record["trial"]["id"] == best_trial(finals.values()).id
    assert finals[record["strategy"]].id == record["trial"]["id"]
    assert {name: entry["trial"] for name, entry in record["candidates"].items()} == \
        {name: trial.id for name, trial in finals.items()}
    written = run.winner_file.stat().st_mtime_ns
    final.name_winner(run)
    assert run.winner_file.stat().st_mtime_ns == written, "an unchanged winner is not written again"


def test_repeats_train_the_winners_setup_with_other_seeds_and_resume(finished, tmp_path):
    params, run = make_run(finished, tmp_path, repeats=3)
    trainer = SeedRecordingTrainer()
    winner = analysis.final_trial(run, final.name_winner(run)["strategy"])

    repeats = final.repeat_winner(params, run, trainer=trainer)

    assert [trial.index for trial in repeats] == [1, 2, 3] and trainer.seeds == [8, 9, 10]
    assert [call["phase"] for call in trainer.calls] == ["block", "finetune"] * 3
    for call in trainer.calls:
        assert call["backbone"] == winner.setup["backbone"]
    assert {call["delimiting_layer"] for call in trainer.calls if call["phase"] == "finetune"} == \
        {winner.setup["delimiting_layer"]}
    assert [trial.id for trial in run.repeats.records()] == ["repeat-001", "repeat-002", "repeat-003"]
    assert not any(run.trial(trial.id).weights("finetune").is_file() for trial in repeats)  # keep_weights: best

    again = SeedRecordingTrainer()
    assert [t.id for t in final.repeat_winner(params, run, trainer=again)] == [t.id for t in repeats]
    assert again.calls == [], "finished repeats are not trained again"
    more = params.updated({"final.repeats": 4})
    final.repeat_winner(more, run, trainer=again)
    assert again.seeds == [11]

    table = final.repeats_table(more, run)
    assert list(table.index) == [0, 1, 2, 3, 4] and table.loc[0, "trial"] == winner.id and table.loc[0, "seed"] == 7
    spread = final.repeats_summary(table)
    assert spread.loc["val_accuracy", "count"] == 5
    assert spread.loc["val_accuracy", "mean"] == pytest.approx(table["val_accuracy"].mean())
    figure = plots.repeats_figure(table, {"shared": 0.5, "separate_optimizations": 0.6})
    assert isinstance(figure, Figure)
    assert "trained 4 more times with other seeds" in summary_markdown(run)


def test_a_failing_repeat_is_recorded_as_failed(finished, tmp_path):
    params, run = make_run(finished, tmp_path, repeats=1)
    repeats = final.repeat_winner(params, run, trainer=FakeTrainer(fail_when=lambda call: True))
    assert repeats[0].status is TrialState.FAILED and "NaN" in repeats[0].error
    assert final.repeats_summary(final.repeats_table(params, run)).loc["val_accuracy", "count"] == 1


def test_probabilities_are_stored_and_give_roc_curves_and_calibration(finished, tmp_path):
    params, run = make_run(finished, tmp_path)
    predictor = Predictor()
    evaluation = analysis.evaluate_final_model(params, run, "shared", "val", trainer=predictor)
    stored = json.loads(run.predictions_file("shared", "val").read_text())

    assert stored["class_names"] == NAMES and np.array(stored["probabilities"]).shape == (12, 3)
    assert stored["predicted"] == np.argmax(stored["probabilities"], axis=1).tolist()
    np.testing.assert_array_equal(evaluation.probabilities, np.array(stored["probabilities"], dtype=np.float32))
    assert analysis.evaluate_final_model(params, run, "shared", "val", trainer=predictor).intervals.equals(
        evaluation.intervals) and predictor.calls == 1

    curves = analysis.roc_curves(evaluation)
    assert list(curves) == [*NAMES, "macro average"]
    expected = skm.roc_auc_score(evaluation.true, evaluation.probabilities, multi_class="ovr", average="macro")
    assert curves["macro average"][2] == pytest.approx(expected)
    aucs = analysis.auc_table([evaluation])
    assert list(aucs.index) == [*NAMES, "macro average"] and list(aucs.columns) == ["shared (val)"]

    table = analysis.reliability(evaluation, bins=5)
    assert table["images"].sum() == 12 and (table["low"] < table["high"]).all()
    confidence = evaluation.probabilities.max(axis=1)
    correct = evaluation.probabilities.argmax(axis=1) == evaluation.true
    bins = np.clip(np.digitize(confidence, np.linspace(0, 1, 6)[1:-1]), 0, 4)
    by_hand = sum(abs(correct[bins == b].mean() - confidence[bins == b].mean()) * (bins == b).sum()
                  for b in set(bins)) / 12
    assert analysis.expected_calibration_error(table) == pytest.approx(by_hand)
    assert isinstance(plots.roc_figure(curves, "ROC"), Figure)
    assert isinstance(plots.reliability_figure(table, "shared", 0.1), Figure)

    metrics_table = analysis.metrics_table(evaluation)
    assert metrics_table.loc["a", "REC 95 % CI"].startswith("[") and metrics_table.loc["Average", "REC 95 % CI"] == ""


def test_predictions_stored_by_the_first_version_still_analyse(finished, tmp_path):
    params, run = make_run(finished, tmp_path)
    rows = pd.read_csv(run.split_file).query("split == 'val'")
    run.predictions_file("shared", "val").write_text(json.dumps({  # tlopt 0.1.0's format: classes only
        "trial": analysis.final_trial(run, "shared").id, "path": rows["path"].tolist(),
        "true": rows["label"].map(NAMES.index).tolist(), "predicted": [0] * len(rows)}))

    evaluation = analysis.evaluate_final_model(params, run, "shared", "val", trainer=Predictor())

    assert evaluation.probabilities is None and evaluation.metrics.loc["a", "REC"] == 1.0
    assert evaluation.intervals.loc["accuracy", "estimate"] == pytest.approx(1 / 3)
    assert analysis.roc_curves(evaluation) is None and analysis.reliability(evaluation) is None
    assert analysis.auc_table([evaluation]).empty and analysis.calibration_table([evaluation]).empty
    assert publish.table(run, "auc", analysis.auc_table([evaluation]), empty="none here").data == "none here"
    assert not run.table_file("auc", "csv").exists()
    # A trainer that gives classes alone is stored as the first version stored it.
    plain = analysis.evaluate_final_model(params, run, "shared", "test", trainer=Predictor(columns=False))
    assert plain.probabilities is None and "probabilities" not in json.loads(
        run.predictions_file("shared", "test").read_text())


def test_the_summary_opens_the_report_with_the_winner_and_the_strategies_side_by_side(finished, tmp_path):
    params, run = make_run(finished, tmp_path)
    record = final.name_winner(run)
    assert "Its scores: none yet" in summary_markdown(run)
    evaluations = [analysis.evaluate_final_model(params, run, strategy, split, trainer=Predictor())
                   for strategy in params.strategies for split in ("val", "test")]

    text = summary_markdown(run)

    assert f"**The winner: {record['strategy']}**" in text and record["trial"]["id"] in text
    assert text.count("<table") == 3 and "val accuracy" in text and "test MCC" in text
    assert "trained" not in text.split("**Time**")[0].split("side by side")[1], "no repeats line without repeats"
    comparison = analysis.strategy_comparison(evaluations, record["strategy"])
    assert comparison.loc[record["strategy"], "winner"] == "yes" and len(comparison) == 2
    tidy = analysis.score_intervals(evaluations)
    assert len(tidy) == 2 * 2 * 3 and set(tidy["score"]) == {"accuracy", "macro F1", "MCC"}
    (run.notebooks_dir).mkdir()
    import nbformat

    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# 05 · Analysis")]),
                   run.notebooks_dir / "05_analysis.ipynb")
    cells = merged_notebook(run).cells
    assert cells[1].source.startswith("## Summary") and cells[2].source.startswith("## The notebooks")


def test_tables_and_figures_are_written_for_a_paper(tmp_path):
    run = RunFolder(tmp_path)
    frame = pd.DataFrame({"accuracy": [0.81234, 0.5]}, index=pd.Index(["shared", "joint"], name="strategy"))
    shown = publish.table(run, "comparison", frame)
    assert shown["accuracy"].tolist() == [0.812, 0.5]
    assert pd.read_csv(run.table_file("comparison", "csv"), index_col=0)["accuracy"].tolist() == [0.81234, 0.5]
    assert "0.812" in run.table_file("comparison", "tex").read_text() and "\\begin{tabular}" in \
        run.table_file("comparison", "tex").read_text()
    assert publish.table(run, "nothing", pd.DataFrame()).data == "none"

    figure = Figure()
    figure.subplots().plot([0, 1])
    assert publish.figure(run, "line", figure) is figure
    assert run.figure_file("line", "png").read_bytes()[:4] == b"\x89PNG"
    assert b"<svg" in run.figure_file("line", "svg").read_bytes()[:500]
