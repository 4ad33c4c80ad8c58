"""`tlopt export`: a final model as one `.keras` file that loads without tlopt (docs/method.md section 14).

The transfer model's first layer, `backbones.Preprocessing`, is a class of tlopt's: a file
holding it loads only where tlopt is imported. The exported model has standard Keras
pieces there instead, a nested model named "preprocess": the channel flip of the
caffe-style backbones (`keras.ops.flip`, which Keras saves as an operation of the
functional graph) and one `Rescaling` with a scale and an offset per channel. Both are read
off the backbone's own `preprocess_input`, which is an affine map of each pixel for every
registered backbone (checked when a model is exported), so no table of preprocessing
conventions is kept here; the probabilities equal the run's own to about 1e-7.

What a user needs besides the weights travels in the same file, under the key "tlopt" of
the `metadata.json` that Keras writes into the `.keras` zip archive (and does not read when
loading): the class names in order, the input size, the backbone and the whole setup, the
scores, the tlopt version and the run's parameters. `read_model_info` reads it; without
tlopt, `json.loads(zipfile.ZipFile(path).read("metadata.json"))["tlopt"]` does. A member of
its own would cost every load: Keras extracts an archive of more than three members to a
temporary folder.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import keras
import numpy as np

from tlopt import __version__, analysis, data, final
from tlopt.backbones import get_backbone
from tlopt.errors import TloptError
from tlopt.files import atomic_path
from tlopt.params import Experiment
from tlopt.store import RunFolder
from tlopt.trials import Trial

KERAS_METADATA = "metadata.json"
MODEL_INFO = "tlopt"  # the key of the model's information in Keras's metadata.json
FORMAT = "tlopt-model/1"
INPUT = ("uint8 RGB pixels, shape (images, image_size, image_size, 3): each image decoded and resized "
         "(bilinear, rounded) to image_size x image_size, as tlopt.data decodes it for training")


def preprocessing_plan(backbone: str) -> tuple[bool, list[float], list[float]]:
    """(flip the channels first, scale, offset per channel) with `preprocess_input(x) == flip(x) * scale + offset`.

    The backbone's `preprocess_input` is probed in float64 (keras.applications keeps the
    dtype of float input), at black and at each pure channel; random pixels then check
    that the map is affine, so a backbone whose preprocessing is not fails loudly.
    """
    preprocess_input = get_backbone(backbone).preprocess_input
    probe = np.array([[[[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]]]], dtype=np.float64)
    out = np.asarray(preprocess_input(probe.copy()), dtype=np.float64)[0, 0]
    offset = out[0]
    matrix = (out[1:] - offset) / 255  # row i: what input channel i adds to each output channel
    flip = bool(np.count_nonzero(matrix - np.diag(np.diag(matrix))))
    if flip:
        matrix = np.fliplr(matrix)
    pixels = np.random.default_rng(0).uniform(0, 255, (1, 4, 4, 3))
    expected = (pixels[..., ::-1] if flip else pixels) * np.diag(matrix) + offset
    if np.count_nonzero(matrix - np.diag(np.diag(matrix))) or not np.allclose(
            np.asarray(preprocess_input(pixels.copy()), dtype=np.float64), expected, rtol=0, atol=1e-9):
        raise TloptError(f"{backbone}'s preprocess_input is not a per-channel affine map: it cannot be exported")
    return flip, [float(value) for value in np.diag(matrix)], [float(value) for value in offset]


def standard_preprocessing(backbone: str, image_size: int) -> keras.Model:
    """The backbone's `preprocess_input` on uint8 pixels as a model of standard Keras pieces, in float32."""
    flip, scale, offset = preprocessing_plan(backbone)
    pixels = keras.Input((image_size, image_size, 3), dtype="uint8", name="pixels")
    flipped = keras.ops.flip(pixels, axis=-1) if flip else pixels
    scaled = keras.layers.Rescaling(scale, offset, dtype="float32", name="affine")(flipped)
    return keras.Model(pixels, scaled, name="preprocess")


def with_standard_preprocessing(model: keras.Model, backbone: str) -> keras.Model:
    """A transfer model whose first layer is `standard_preprocessing`; it shares every other layer (and weight) with `model`."""
    size = int(model.input.shape[1])
    base = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    inputs = keras.Input((size, size, 3), dtype="uint8", name="image")
    pooled = model.get_layer("pool")(base(standard_preprocessing(backbone, size)(inputs)))
    return keras.Model(inputs, model.get_layer("predictions")(pooled), name=model.name)


def final_model(run: RunFolder | str | os.PathLike, strategy: str, config: Experiment | None = None) -> keras.Model:
    """A strategy's final model with its trained weights, preprocessing in standard layers (what `export_model` saves)."""
    from tlopt import training

    run = RunFolder(run)
    config = config or run.read_config()
    trial = analysis.final_trial(run, strategy)
    names = data.class_names(data.read_manifest(run.split_file))
    model, _ = training.load_trained_model(trial.setup["backbone"], run.local(trial.weights), len(names), config)
    return with_standard_preprocessing(model, trial.setup["backbone"])


def _chosen(run: RunFolder, strategy: str | None) -> tuple[str, bool]:
    """(the strategy to export, whether it is the winner): the winner when `strategy` is None."""
    finished = analysis.finished_strategies(run)
    if not finished:
        raise TloptError(f"{run} has no final model yet: no strategy has finished")
    winner = final.name_winner(run)["strategy"]
    if strategy is None:
        return winner, True
    if strategy not in finished:
        raise TloptError(f"strategy '{strategy}' has no final model in {run} (finished: {', '.join(finished)})")
    return strategy, strategy == winner


def _scores(config: Experiment, run: RunFolder, strategy: str, trial: Trial) -> dict[str, Any]:
    """The trial's own validation result and each evaluated split's scores with their intervals.

    Validation is evaluated (and stored) if notebook 05 has not done it yet; the test split
    only when it has been evaluated, which happens once, after all optimization.
    """
    scores: dict[str, Any] = {"val_accuracy": trial.val_accuracy, "val_loss": trial.val_loss}
    for split in ("val", "test"):
        if split == "val" or run.predictions_file(strategy, split).is_file():
            evaluation = analysis.evaluate_final_model(config, run, strategy, split)
            scores[split] = evaluation.intervals.to_dict(orient="index")
    return scores


def model_info(run: RunFolder | str | os.PathLike, strategy: str | None = None) -> dict[str, Any]:
    """What an exported model carries besides its weights (the "tlopt" entry of its `metadata.json`)."""
    run = RunFolder(run)
    config = run.read_config()
    strategy, winner = _chosen(run, strategy)
    trial = analysis.final_trial(run, strategy)
    return {
        "format": FORMAT,
        "tlopt_version": __version__,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": run.name,
        "strategy": strategy,
        "winner": winner,
        "trial": trial.id,
        "class_names": data.class_names(data.read_manifest(run.split_file)),
        "image_size": config.data.image_size,
        "input": INPUT,
        "backbone": trial.setup["backbone"],
        "pooling": config.pooling,
        "setup": trial.setup,
        "scores": _scores(config, run, strategy, trial),
        "params": run.read_params(),
        "environment": run.environment() if run.environment_file.is_file() else {},
    }


def export_model(run: RunFolder | str | os.PathLike, strategy: str | None = None,
                 path: str | os.PathLike | None = None) -> Path:
    """Write the winner's (or `strategy`'s) final model as one `.keras` file; return its path.

    Default path: `RunFolder.model_file(strategy)` (`<run>/model.keras` for the winner). Keras
    saves the model into a scratch folder beside the target; its archive is copied under a
    temporary name with the information added to `metadata.json`, and renamed into place.
    """
    run = RunFolder(run)
    info = model_info(run, strategy)
    target = Path(path) if path is not None else run.model_file(None if strategy is None else info["strategy"])
    if target.suffix != ".keras":
        raise TloptError(f"{target}: an exported model's file name must end in .keras")
    model = final_model(run, info["strategy"])
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as scratch:
        saved = Path(scratch) / "model.keras"
        model.save(saved)
        with zipfile.ZipFile(saved) as source, atomic_path(target, suffix=".keras") as temporary, \
                zipfile.ZipFile(temporary, "w") as archive:
            for member in source.infolist():
                content = source.read(member)
                if member.filename == KERAS_METADATA:
                    content = json.dumps({**json.loads(content), MODEL_INFO: info}, indent=1).encode()
                archive.writestr(member, content)
    keras.backend.clear_session()
    return target


def read_model_info(path: str | os.PathLike) -> dict[str, Any]:
    """What an exported model carries: class names, input size, setup, scores, parameters, version."""
    path = Path(path)
    if not path.is_file():
        raise TloptError(f"model file not found: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read(KERAS_METADATA))[MODEL_INFO]
    except (zipfile.BadZipFile, KeyError, ValueError):
        raise TloptError(f"{path} is not a model exported by tlopt (no '{MODEL_INFO}' in its {KERAS_METADATA})") from None


@dataclass
class ExportedModel:
    """An exported model loaded: the Keras model and its information (`read_model_info`)."""

    model: keras.Model
    info: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        return list(self.info["class_names"])

    @property
    def image_size(self) -> int:
        return int(self.info["image_size"])


def load_model(path: str | os.PathLike) -> ExportedModel:
    """Load an exported model as any user would (`keras.saving.load_model`, safe mode) with its information."""
    info = read_model_info(path)
    return ExportedModel(keras.saving.load_model(path), info)
