"""The run's split, made once: bad files skipped (listed) or fatal, a summary for the report."""

import json
import shutil

import pytest

from tlopt import data
from tlopt.errors import DataError
from tlopt.params import validate


def make_params(root, **data_settings):
    return validate({"seed": 3, "backbones": ["VGG16"],
                     "data": {"root": str(root), "image_size": 32, **data_settings}})


@pytest.fixture
def dataset(tmp_path, demo_root):
    root = tmp_path / "images"
    shutil.copytree(demo_root, root, ignore=shutil.ignore_patterns(".*"))
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    (classes[0] / "truncated.jpg").write_bytes(next(classes[0].glob("*.jpg")).read_bytes()[:200])
    (classes[1] / "notes.txt").write_text("not an image")
    return root


def test_bad_files_are_skipped_with_a_warning_that_lists_them(dataset, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"skipped 2 file\(s\).*truncated\.jpg.*notes\.txt|notes\.txt.*truncated\.jpg"):
        frame = data.prepare_split(make_params(dataset), run_dir)
    assert not frame["path"].str.endswith(("truncated.jpg", "notes.txt")).any()
    assert len(frame) == 4 * 30
    summary = data.read_split_summary(run_dir)
    assert sorted(p.rsplit("/", 1)[1] for p in (s["path"] for s in summary["skipped"])) == [
        "notes.txt", "truncated.jpg"]
    assert summary["images"] == 120 and len(summary["classes"]) == 4
    assert sum(summary["counts"][summary["classes"][0]].values()) == 30
    assert data.read_split(run_dir).equals(frame)
    stored = data.read_manifest(run_dir / "split.csv")  # relative to the root the summary records
    assert stored["path"].iloc[0] == "dyed-lifted-polyps/dyed-lifted-polyps_0000.jpg"
    assert summary["root"] == str(dataset)


def test_bad_files_stop_the_run_when_asked(dataset, tmp_path):
    with pytest.raises(DataError, match=r"2 file\(s\) are not readable images: .*truncated\.jpg") as caught:
        data.prepare_split(make_params(dataset, on_bad_image="error"), tmp_path / "run")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "run" / "split.csv").exists()


def test_an_existing_split_is_kept_not_redrawn(dataset, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.warns(UserWarning):
        first = data.prepare_split(make_params(dataset), run_dir)
    (dataset / sorted(first["label"].unique())[0] / "late-arrival.txt").write_text("x")
    again = data.prepare_split(make_params(dataset), run_dir)
    assert again.equals(first)


def test_the_demo_dataset_is_generated_when_the_parameters_ask(tmp_path):
    params = make_params(tmp_path / "demo", demo={"images_per_class": 6, "image_size": 32, "num_classes": 2})
    frame = data.prepare_split(params, tmp_path / "run")
    assert len(frame) == 12 and set(frame["split"]) == {"train", "val"}
    assert json.loads((tmp_path / "run" / "split_summary.json").read_text())["skipped"] == []
