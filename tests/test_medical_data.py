"""Data as researchers have it (docs/method.md section 13): manifests with and without a split, patient
folders, an external test set, runs that move, and every bad input as one line naming what is wrong."""

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tlopt import analysis, cli, data
from tlopt.demo_data import generate_demo_dataset
from tlopt.errors import DataError
from tlopt.params import validate
from tlopt.store import RunFolder


def _image(path: Path, shade: int = 120) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, 80, 60)).save(path)
    return path


def _patients(root: Path, patients: dict[str, list[str]], images: int = 3) -> Path:
    """`root/<class>/<patient>/<n>.png` for each patient of each class."""
    for label, names in patients.items():
        for patient in names:
            for index in range(images):
                _image(root / label / patient / f"{index}.png", shade=40 * index)
    return root


def _params(tmp_path, **data_settings):
    return validate({"run_name": "r", "results_dir": str(tmp_path / "results"), "seed": 1, "backbones": ["VGG16"],
                     "weights": None, "data": {"image_size": 32, **data_settings}})


def _manifest(tmp_path, rows: list[tuple], columns=("path", "label", "group", "split"), images=True) -> Path:
    folder = tmp_path / "site"
    for row in rows:
        if images:
            _image(folder / row[0])
    path = folder / "images.csv"
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    return path


def _given(tmp_path, leak=False) -> Path:
    """Two classes, patients p1-p6; with `leak`, patient p2 also has an image in validation."""
    rows = [(f"img/{label}_{patient}_{n}.png", label, patient, split)
            for label, patients in (("benign", ["p1", "p2", "p3"]), ("malignant", ["p4", "p5", "p6"]))
            for patient, split in zip(patients, ("train", "train", "val")) for n in range(2)]
    if leak:
        rows.append(("img/benign_p2_late.png", "benign", "p2", "val"))
        rows.append(("img/malignant_p5_late.png", "malignant", "p5", "test"))
    return _manifest(tmp_path, rows)


# A manifest


def test_a_given_split_is_taken_as_given_with_paths_relative_to_the_csv(tmp_path):
    manifest = _given(tmp_path)
    split = data.prepare_split(_params(tmp_path, manifest=str(manifest)), tmp_path / "run")
    given = pd.read_csv(manifest)
    assert split["path"].tolist() == [str(manifest.parent / path) for path in given["path"]]
    assert split["split"].tolist() == given["split"].tolist() and split["group"].tolist() == given["group"].tolist()
    summary = data.read_split_summary(tmp_path / "run")
    assert summary["split_given"] and summary["root"] == str(manifest.parent)
    assert summary["groups"] == {"train": 4, "val": 2}


def test_a_leaking_given_split_is_rejected_with_the_groups_named(tmp_path):
    manifest = _given(tmp_path, leak=True)
    with pytest.raises(DataError) as caught:
        data.prepare_split(_params(tmp_path, manifest=str(manifest)), tmp_path / "run")
    assert str(caught.value) == f"{manifest}: 2 group(s) on two sides of the split: p2 (train, val), p5 (train, test)"
    assert not (tmp_path / "run" / "split.csv").exists()


def test_tlopt_run_refuses_a_leaking_manifest_in_one_line_before_making_a_run_folder(tmp_path, capsys):
    manifest = _given(tmp_path, leak=True)
    params = tmp_path / "exp.yaml"
    params.write_text(f"run_name: exp\nresults_dir: results\ndata: {{manifest: {manifest}, image_size: 32}}\n"
                      "backbones: [VGG16]\nweights: null\n")
    assert cli.main(["run", str(params)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {manifest}: 2 group(s) on two sides of the split: p2 (train, val), p5 (train, test)"]
    assert not (tmp_path / "results" / "exp").exists()


def test_a_manifest_without_a_split_is_split_by_whole_groups(tmp_path):
    rows = [(f"{label}/{patient}_{n}.png", label, patient)
            for label in ("a", "b") for patient in [f"{label}{p}" for p in range(6)] for n in range(3)]
    manifest = _manifest(tmp_path, rows, columns=("path", "label", "group"))
    split = data.prepare_split(_params(tmp_path, manifest=str(manifest), val_fraction=0.3, test_fraction=0.2),
                               tmp_path / "run")
    assert data.groups_on_two_sides(split) == {}
    assert set(split["split"]) == {"train", "val", "test"} and len(split) == 36
    assert data.read_split_summary(tmp_path / "run")["grouped_by"] == "the manifest's group column"


@pytest.mark.parametrize(("rows", "columns", "message"), [
    ([("x.png", "a")], ("path", "labels"), "missing column 'label'"),
    ([("x.png", "a", "train"), ("y.png", "", "val")], ("path", "label", "split"), "row 3: column 'label' is empty"),
    ([("x.png", "a", "train"), ("y.png", "b", "validation")], ("path", "label", "split"),
     "row 3: column 'split': 'validation' is not train, val or test"),
    ([("x.png", "a", "train"), ("y.png", "b", "")], ("path", "label", "split"),
     "row 3: column 'split' is empty (give every row a split, or none)"),
    ([("x.png", "a"), ("./x.png", "b")], ("path", "label"), "x.png is listed twice (rows 2 and 3)"),
    ([("x.png", "a", "train"), ("y.png", "b", "train"), ("z.png", "a", "val"), ("w.png", "a", "test")],
     ("path", "label", "split"), "column split: class(es) b have no val images"),
])
def test_every_bad_manifest_is_one_line_naming_the_file_and_what_is_wrong(tmp_path, rows, columns, message):
    manifest = _manifest(tmp_path, rows, columns)
    with pytest.raises(DataError) as caught:
        data.check_dataset(_params(tmp_path, manifest=str(manifest)))
    assert str(caught.value).startswith(f"{manifest}: ") and message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_missing_image_names_its_row(tmp_path):
    manifest = _manifest(tmp_path, [("a.png", "a"), ("b.png", "b")], ("path", "label"))
    (manifest.parent / "b.png").unlink()
    with pytest.raises(DataError, match=re.escape(f"{manifest}: row 3: image not found: {manifest.parent / 'b.png'}")):
        data.check_dataset(_params(tmp_path, manifest=str(manifest)))


# Groups from folders


def test_groups_from_patient_folders_never_cross(tmp_path):
    patients = {"polyp": [f"p{i}" for i in range(6)], "normal": [f"p{i}" for i in range(4, 12)]}
    root = _patients(tmp_path / "data", patients)
    split = data.prepare_split(_params(tmp_path, root=str(root), group_by="folder", test_fraction=0.2),
                               tmp_path / "run")
    assert data.groups_on_two_sides(split) == {}
    assert split["group"].nunique() == 12  # p4 and p5 have images of both classes: one patient each
    assert set(split[split["group"] == "p4"]["label"]) == {"polyp", "normal"}
    assert data.read_split_summary(tmp_path / "run")["groups"]["train"] >= 1


def test_group_by_folder_needs_every_image_in_a_patient_folder(tmp_path):
    root = _patients(tmp_path / "data", {"a": ["p1", "p2"], "b": ["p3", "p4"]})
    loose = _image(root / "b" / "loose.png")
    with pytest.raises(DataError, match=re.escape(f"{loose} lies directly in its class folder")):
        data.discover(root, group_by="folder")
    assert len(data.discover(root)) == 13  # nested folders are read in any case


# The external test set


@pytest.fixture
def with_external(tmp_path, demo_root):
    external = generate_demo_dataset(tmp_path / "site_b", images_per_class=3, image_size=32, seed=9)
    return _params(tmp_path, root=str(demo_root), external_test=str(external)), external


def test_an_external_test_set_is_kept_apart_and_evaluated_once(tmp_path, with_external):
    params, external = with_external
    run = RunFolder(tmp_path / "run")
    split = data.prepare_split(params, run)
    kept = data.read_external(run)
    assert len(kept) == 12 and set(kept["split"]) == {analysis.EXTERNAL}
    assert kept["path"].str.startswith(str(external)).all() and not kept["path"].isin(split["path"]).any()
    assert not data.read_manifest(run.external_file)["path"].str.startswith("/").any()
    assert data.read_split_summary(run)["external"]["images"] == 12

    final = {"id": "t", "strategy": "shared", "step": "layers", "index": 0, "method": "initial", "x": [0.0],
             "hyperparameters": {}, "started_at": "", "status": "ok", "val_accuracy": 1.0, "val_loss": 0.1,
             "weights": "w.h5", "setup": {"backbone": "VGG16"}}
    run.update_best("shared", model=final)
    calls = []

    class Predictor:
        def predict(self, backbone, weights, frame, class_names, config):
            calls.append(list(frame["path"]))
            return data.label_indices(frame, class_names)  # always right

    for _ in range(2):
        evaluation = analysis.evaluate_final_model(params, run, "shared", analysis.EXTERNAL, trainer=Predictor())
    assert calls == [kept["path"].tolist()], "the external test set is predicted once"
    assert evaluation.confusion.to_numpy().trace() == 12
    assert analysis.with_support(evaluation)["support"].tolist() == [3, 3, 3, 3, 12]
    val = analysis.evaluate_final_model(params, run, "shared", "val", trainer=Predictor())
    table = analysis.validation_and_test([val, evaluation])
    assert list(dict.fromkeys(table.columns.get_level_values(0))) == ["val", "external"]
    assert table.loc[("shared",), ("external", "images")].item() == 12


def test_an_external_test_set_with_other_classes_names_them(tmp_path, demo_root):
    external = generate_demo_dataset(tmp_path / "site_b", images_per_class=2, image_size=32, seed=9, num_classes=5)
    shutil.rmtree(external / "dyed-lifted-polyps")
    params = _params(tmp_path, root=str(demo_root), external_test=str(external))
    with pytest.raises(DataError) as caught:
        data.check_dataset(params)
    assert str(caught.value) == (f"data.external_test {external}: lacks class(es) dyed-lifted-polyps; adds class(es) "
                                 f"dyed-resection-margins the training data does not have")


# Runs that move, mistakes that are cheap


def test_a_run_follows_its_dataset_to_another_root(tmp_path, demo_root):
    laptop = shutil.copytree(demo_root, tmp_path / "laptop" / "data")
    params = _params(tmp_path, root=str(laptop))
    run = RunFolder.open(params)
    before = data.prepare_split(params, run)
    server = shutil.move(laptop, tmp_path / "server" / "data")

    with pytest.raises(DataError, match=f"{re.escape(str(tmp_path))}/elsewhere: 120 of the 120 images of split.csv"):
        data.relocate(run, tmp_path / "elsewhere")
    data.relocate(run, server)

    after = data.read_split(run)
    assert after["path"].tolist() == [path.replace(str(laptop), str(server)) for path in before["path"]]
    assert after.drop(columns="path").equals(before.drop(columns="path"))
    assert run.read_params()["data"]["root"] == str(server) and data.read_split_summary(run)["root"] == str(server)


def test_a_split_of_the_first_version_with_absolute_paths_reads_and_moves(tmp_path, demo_root):
    params = _params(tmp_path, root=str(demo_root))
    run = RunFolder.open(params)
    frame = data.split(data.discover(demo_root), seed=0)
    data.write_manifest(frame, run.split_file)  # absolute paths, no summary: the first version's split
    assert data.read_split(run).equals(frame)
    moved = shutil.copytree(demo_root, tmp_path / "moved")
    data.relocate(run, moved)
    assert data.read_split(run)["path"].tolist() == [p.replace(str(demo_root), str(moved)) for p in frame["path"]]


def _run_args(params, *extra):
    return cli.parser().parse_args(["run", str(params), *map(str, extra)])


def test_a_mistyped_root_leaves_no_run_folder_and_a_run_stopped_before_its_split_restarts(tmp_path, capsys):
    params = tmp_path / "exp.yaml"
    params.write_text("run_name: exp\nresults_dir: results\ndata: {root: dta, image_size: 32}\n"
                      "backbones: [VGG16]\nweights: null\n")
    assert cli.main(["run", str(params)]) == 2
    assert capsys.readouterr().err.strip() == f"error: dataset folder not found: {tmp_path / 'dta'}"
    assert not (tmp_path / "results" / "exp").exists()

    (tmp_path / "results" / "exp").mkdir(parents=True)
    (tmp_path / "results" / "exp" / "params.yaml").write_text("run_name: exp\n")  # an older attempt stopped early
    _patients(tmp_path / "dta", {"a": ["p1"], "b": ["p2"]})
    config, run, lock = cli.open_run_dir(_run_args(params))
    lock.close()
    assert "stopped before its split: starting it again" in capsys.readouterr().out
    assert run.params_file.is_file() and config.data.root == str(tmp_path / "dta")


def test_resume_keeps_the_runs_data_and_data_root_moves_it(tmp_path, demo_root, capsys):
    original = shutil.copytree(demo_root, tmp_path / "original")
    params = tmp_path / "exp.yaml"
    params.write_text(f"run_name: exp\nresults_dir: results\ndata: {{root: {original}, image_size: 32}}\n"
                      "backbones: [VGG16]\nweights: null\n")
    config, run, lock = cli.open_run_dir(_run_args(params))
    lock.close()
    data.prepare_split(config, run)
    elsewhere = tmp_path / "exp-on-a-server.yaml"  # the same experiment, its root relative to another folder
    elsewhere.write_text(params.read_text().replace(str(original), "data"))

    config, _, lock = cli.open_run_dir(_run_args(elsewhere, "--resume", run.path))
    lock.close()
    assert config.data.root == str(original), "a resumed run keeps its data's location"

    moved = shutil.move(original, tmp_path / "moved")
    assert cli.main(["run", str(elsewhere), "--resume", str(run.path), "--data-root", str(tmp_path / "wrong")]) == 2
    assert "images of split.csv are not there" in capsys.readouterr().err
    config, _, lock = cli.open_run_dir(_run_args(elsewhere, "--resume", run.path, "--data-root", moved))
    lock.close()
    assert config.data.root == str(moved) and data.read_split(run)["path"].map(os.path.isfile).all()
    with pytest.raises(SystemExit):
        cli.main(["run", str(params), "--data-root", str(moved)])


def test_a_run_folder_moved_to_another_machine_finds_its_weights(tmp_path):
    """Trial records hold absolute paths of where the run folder was: layer optimization, the checks and
    the evaluation read the weights where the folder is now."""
    from fakes import FakeTrainer
    from tlopt import checks, optimize

    params = _params(tmp_path, root=str(tmp_path / "data")).updated({"bo.initial_points": 2, "bo.iterations": 0,
                                                                      "backbones": ["VGG16", "VGG19"]})
    laptop = RunFolder.open(params)
    data.write_manifest(pd.DataFrame({"path": ["a.png", "b.png", "c.png", "d.png"], "label": ["a", "a", "b", "b"],
                                      "group": ["1", "2", "3", "4"], "split": ["train", "val"] * 2}),
                        laptop.split_file)
    best = optimize.run_strategy(params, "shared", laptop, trainer=FakeTrainer(), progress=False)
    server = RunFolder(shutil.move(laptop.path, tmp_path / "server" / "r"))
    data.relocate(server)  # what `tlopt run PARAMS --resume DIR` does first
    moved = params.updated({"results_dir": str(server.path.parent)})
    assert server.read_params()["results_dir"] == str(server.path.parent)

    class Checking(FakeTrainer):
        def fine_tune(self, backbone, optimizer, rate, layer, block_weights, *args, **kwargs):
            assert Path(block_weights).is_file() and server.path in Path(block_weights).parents
            return super().fine_tune(backbone, optimizer, rate, layer, block_weights, *args, **kwargs)

    final = optimize.run_layer_optimization(moved, "shared", server, trainer=Checking(), progress=False)
    checks.check_strategy(moved, server, "shared", best)
    assert server.local(best.weights) == server.path / "runs" / best.id / "finetune" / "best.weights.h5"
    assert server.local(final.weights) == Path(final.weights), "a path that exists stays as it is"


def test_the_demo_makes_its_last_class_rare(tmp_path):
    root = generate_demo_dataset(tmp_path / "demo", images_per_class=10, image_size=32, num_classes=3, imbalance=0.3)
    counts = data.discover(root)["label"].value_counts()
    assert counts.to_dict() == {"dyed-lifted-polyps": 10, "esophagitis": 10, "normal-cecum": 3}
    balance = analysis.split_balance(data.split(data.discover(root), val_fraction=0.3, seed=0))
    assert balance.loc["train", "imbalance_ratio"] == 7 / 2 and balance.loc["val", "smallest_class"] == "normal-cecum"
    assert np.isclose(balance.loc["val", "imbalance_ratio"], 3.0)
