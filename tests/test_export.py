"""`tlopt export` and `tlopt predict`: one .keras file that loads without tlopt, and new images classified with it."""

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import tlopt
from fakes import FakeTrainer
from tlopt import analysis, cli, data, export, optimize
from tlopt.backbones import BACKBONES, Preprocessing, build_transfer_model
from tlopt.demo_data import generate_demo_dataset
from tlopt.params import validate
from tlopt.predict import predict_images
from tlopt.store import RunFolder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A run of three demo classes whose final model is a VGG16 at 32 px (random weights), evaluated and exported."""
    folder = tmp_path_factory.mktemp("export")
    root = generate_demo_dataset(folder / "data", images_per_class=6, image_size=48, seed=0, num_classes=3)
    params = validate({
        "run_name": "run", "results_dir": str(folder), "data": {"root": str(root), "image_size": 32, "val_fraction": 0.5},
        "backbones": ["VGG16"], "weights": None, "optimizers": ["Adam"], "bo": {"initial_points": 1, "iterations": 0},
        "strategies": ["shared"], "layer_optimization": {"enabled": False},
    })
    run = RunFolder.open(params)
    data.prepare_split(params, run)
    optimize.run_strategy(params, "shared", run, trainer=FakeTrainer(), progress=False)
    keras.utils.set_random_seed(0)
    model, _ = build_transfer_model("VGG16", 3, 32, weights=None)
    model.save_weights(analysis.final_trial(run, "shared").weights)  # the "trained" final model
    evaluation = analysis.evaluate_final_model(params, run, "shared", "val")
    return run, export.export_model(run, path=folder / "model.keras"), evaluation


LOADER = textwrap.dedent("""\
    import json, sys, zipfile
    import keras, numpy as np, tensorflow as tf

    path, stored = sys.argv[1], json.load(open(sys.argv[2]))
    model = keras.saving.load_model(path)  # safe mode
    info = json.loads(zipfile.ZipFile(path).read("metadata.json"))["tlopt"]
    size = info["image_size"]

    def load(file):  # the README's decoding: tlopt.data's, op for op
        image = tf.io.decode_image(tf.io.read_file(file), channels=3, expand_animations=False)
        return tf.saturate_cast(tf.round(tf.image.resize(image, (size, size), method="bilinear")), tf.uint8)

    probabilities = model.predict(np.stack([load(file) for file in stored["path"]]), verbose=0)
    print(json.dumps({"tlopt_imported": "tlopt" in sys.modules, "class_names": info["class_names"],
                      "difference": float(np.abs(probabilities - np.array(stored["probabilities"])).max())}))
    """)


def test_the_file_loads_in_safe_mode_without_tlopt_and_gives_the_runs_probabilities(exported):
    run, path, evaluation = exported
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", LOADER, str(path), str(run.predictions_file("shared", "val"))],
                            capture_output=True, text=True, env=environment, cwd=path.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])

    assert found["tlopt_imported"] is False
    assert found["class_names"] == ["dyed-lifted-polyps", "esophagitis", "normal-cecum"]
    assert found["difference"] <= 1e-5
    assert len(evaluation.probabilities) == 9 and np.ptp(evaluation.probabilities) > 0.01


def test_the_file_carries_what_a_user_needs(exported):
    run, path, evaluation = exported
    info = export.read_model_info(path)
    trial = analysis.final_trial(run, "shared")

    assert info["format"] == "tlopt-model/1" and info["tlopt_version"] == tlopt.__version__
    assert info["class_names"] == data.class_names(data.read_manifest(run.split_file))
    assert (info["image_size"], info["backbone"], info["pooling"]) == (32, "VGG16", "max")
    assert info["setup"] == trial.setup and info["trial"] == trial.id
    assert (info["strategy"], info["winner"]) == ("shared", True)
    assert info["scores"]["val"] == evaluation.intervals.to_dict(orient="index") and "test" not in info["scores"]
    assert info["scores"]["val_accuracy"] == trial.val_accuracy
    assert info["params"] == run.read_params() and info["params"]["data"]["image_size"] == 32
    with zipfile.ZipFile(path) as archive:
        assert "tlopt" not in archive.read("config.json").decode()  # standard Keras layers only
        # Three members, as Keras writes them: a fourth would make every load extract the archive.
        assert sorted(archive.namelist()) == ["config.json", "metadata.json", "model.weights.h5"]
        assert "keras_version" in json.loads(archive.read("metadata.json"))
    assert run.read_winner()["strategy"] == "shared"


@pytest.mark.parametrize("name", list(BACKBONES))
def test_the_standard_preprocessing_is_the_backbones_own(name):
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    pixels = np.concatenate([values, values[:, ::-1], values[:, :, ::-1]], axis=-1)  # every value in every channel
    standard = export.standard_preprocessing(name, 16)
    np.testing.assert_allclose(standard(pixels), Preprocessing(name)(pixels), rtol=0, atol=1e-6)
    assert {type(layer).__module__.split(".")[0] for layer in standard.layers} == {"keras"}


@pytest.fixture
def images(tmp_path):
    """A PNG, a JPEG of another size in a subfolder, a corrupt file, a hidden file and a text file."""
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "sub").mkdir()
    Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)).save(tmp_path / "sub" / "large.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    (tmp_path / ".hidden.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_predict_a_folder_with_explanations(exported, images, tmp_path_factory):
    _, path, _ = exported
    maps = tmp_path_factory.mktemp("maps")
    predictions = predict_images(path, [images], explain_dir=maps)
    table = predictions.table

    assert list(table.columns) == ["path", "predicted", "p_dyed-lifted-polyps", "p_esophagitis", "p_normal-cecum",
                                   "explanation"]
    assert table["path"].tolist() == [str(images / "small.png"), str(images / "sub" / "large.jpg")]
    np.testing.assert_allclose(table.filter(like="p_").sum(axis=1), 1, rtol=1e-5)
    assert (table["predicted"] == table.filter(like="p_").idxmax(axis=1).str[2:]).all()
    assert predictions.skipped["path"].tolist() == [str(images / "broken.jpg")]
    assert "does not decode" in predictions.skipped["reason"].iloc[0]
    with Image.open(table.loc[1, "explanation"]) as overlay:
        assert overlay.size == (70, 90) and table.loc[1, "explanation"] == str(maps / "large.png")


def test_predict_a_csv_gives_the_runs_own_probabilities(exported, tmp_path):
    run, path, evaluation = exported
    listing = tmp_path / "list.csv"
    pd.DataFrame({"path": evaluation.paths, "note": "x"}).to_csv(listing, index=False)
    table = predict_images(path, [listing], batch_size=4, progress=False).table
    probabilities = table[[f"p_{name}" for name in export.read_model_info(path)["class_names"]]].to_numpy()
    np.testing.assert_allclose(probabilities, evaluation.probabilities, rtol=0, atol=1e-5)


def run_cli(capsys, *argv):
    code = cli.main([*map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err.strip().splitlines()


def test_the_commands(exported, images, tmp_path, capsys):
    run, path, _ = exported
    code, out, err = run_cli(capsys, "predict", path, images, "-o", tmp_path / "predictions.csv")
    assert code == 0 and out == [f"2 image(s) predicted: {tmp_path / 'predictions.csv'}; 1 file(s) skipped"]
    assert err[-1].startswith(f"skipped {images / 'broken.jpg'}: does not decode")
    written = pd.read_csv(tmp_path / "predictions.csv")
    assert len(written) == 2 and list(written.columns)[:2] == ["path", "predicted"]

    code, out, _ = run_cli(capsys, "export", run.path, "--strategy", "shared", "-o", tmp_path / "shared.keras")
    assert code == 0 and out[0].startswith(f"model: {tmp_path / 'shared.keras'} (")
    assert export.read_model_info(tmp_path / "shared.keras")["strategy"] == "shared"


@pytest.mark.parametrize(("argv", "message"), [
    (["predict", "{tmp}/missing.keras", "{images}"], "model file not found: {tmp}/missing.keras"),
    (["predict", "{model}", "{tmp}/empty"], "no images in {tmp}/empty"),
    (["predict", "{model}", "{tmp}/nowhere"], "image, folder or CSV file not found: {tmp}/nowhere"),
    (["predict", "{model}", "{tmp}/list.csv"], "{tmp}/list.csv has no 'path' column"),
    (["predict", "{model}", "{images}/broken.jpg"], "none of the 1 file(s) is an image that decodes"),
    (["predict", "{images}/notes.txt", "{images}"], "is not a model exported by tlopt"),
    (["export", "{tmp}"], "is not a run folder"),
    (["export", "{run}", "--strategy", "joint"], "strategy 'joint' has no final model"),
    (["export", "{run}", "-o", "{tmp}/model.h5"], "must end in .keras"),
])
def test_mistakes_are_one_line_and_exit_2(exported, images, tmp_path, capsys, argv, message):
    run, path, _ = exported
    (tmp_path / "empty").mkdir()
    (tmp_path / "list.csv").write_text("file\na.png\n")
    values = {"tmp": tmp_path, "images": images, "model": path, "run": run.path}
    code, _, err = run_cli(capsys, *[argument.format(**values) for argument in argv])
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert message.format(**values) in err[0]
