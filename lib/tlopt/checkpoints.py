"""A run's checkpoint: the weights of the layers it trained, and a reference to the rest.

A training run changes only its trainable layers: the Dense layer of the classification
block, and in fine-tuning also the backbone's layers from the delimiting layer on. Every
other weight is the backbone's own starting weight, which the run's parameters name: the
backbone, its weights source (ImageNet, a local file, or random with the run's seed), the
image size, the pooling and the number of classes. So a checkpoint stores the trained
layers' weights (every variable of each, BatchNormalization's moving statistics included)
with that reference, and no optimizer state, which a finished run never reads: Keras 3's
`save_weights` of a compiled VGG16 writes 175 MB, 116 MB of them Adam's moments.

Loading builds the transfer model as training built it (`Reference`) and sets the stored
layers (`load_into`). The file is HDF5: the attribute `tlopt` holds the reference and the
stored layers' keys as JSON; the group `layers/<key>/` holds a layer's arrays `0`, `1`, ...
in the order of `layer.get_weights()`. A key is `model/<name>` for a layer of the transfer
model and `base/<name>` for one of the backbone nested in it. Keras weights files (the
checkpoints of tlopt before lean checkpoints, the whole model with its optimizer state)
still load: `is_lean` tells them apart.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import h5py
import keras

from tlopt.errors import WeightsError
from tlopt.files import atomic_path

FORMAT = "tlopt-checkpoint"
VERSION = 1
_ATTRIBUTE = "tlopt"


@dataclass(frozen=True)
class Reference:
    """What rebuilds the layers a checkpoint leaves out: the transfer model as its run built it.

    `weights` is the backbone's weights source (None: random, drawn after seeding with
    `seed`; "imagenet"; or a weights file's path).
    """

    backbone: str
    weights: str | None
    seed: int
    image_size: int
    pooling: str
    num_classes: int


def layers_by_key(model: keras.Model) -> dict[str, keras.layers.Layer]:
    """Every layer of a transfer model with weights, by key: `model/<name>`, or `base/<name>` inside the backbone."""
    found = {}
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.update({f"base/{inner.name}": inner for inner in layer.layers if inner.weights})
        elif layer.weights:
            found[f"model/{layer.name}"] = layer
    return found


def trained_layers(model: keras.Model) -> dict[str, keras.layers.Layer]:
    """The layers with weights that training changes: the trainable ones (freezing the backbone freezes each of its layers)."""
    return {key: layer for key, layer in layers_by_key(model).items() if layer.trainable}


def write(path: str | os.PathLike, layers: dict[str, keras.layers.Layer], reference: Reference) -> None:
    """Replace `path` (atomically) with the weights of `layers` (by key) and the reference."""
    with atomic_path(path, suffix=".h5") as temporary:
        with h5py.File(temporary, "w") as file:
            file.attrs[_ATTRIBUTE] = json.dumps(
                {"format": FORMAT, "version": VERSION, "reference": asdict(reference), "layers": list(layers)})
            for key, layer in layers.items():
                group = file.create_group(f"layers/{key}")
                for index, array in enumerate(layer.get_weights()):
                    group.create_dataset(str(index), data=array)


def _open(path: str | os.PathLike) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise WeightsError(f"{path} is not a weights file: {error}") from None


def is_lean(path: str | os.PathLike) -> bool:
    """Whether `path` is a checkpoint of this module (not a Keras weights file of the whole model)."""
    with _open(path) as file:
        return _ATTRIBUTE in file.attrs


def _header(path: str | os.PathLike) -> dict:
    with _open(path) as file:
        if _ATTRIBUTE not in file.attrs:
            raise WeightsError(f"{path} is not a tlopt checkpoint (a Keras weights file?)")
        header = json.loads(file.attrs[_ATTRIBUTE])
    if header.get("format") != FORMAT or header.get("version", 0) > VERSION:
        raise WeightsError(f"{path}: checkpoint format {header.get('format')} version {header.get('version')} "
                           f"is not one this tlopt reads ({FORMAT} up to version {VERSION})")
    return header


def read_reference(path: str | os.PathLike) -> Reference:
    """The reference a checkpoint was written with."""
    return Reference(**_header(path)["reference"])


def stored_keys(path: str | os.PathLike) -> list[str]:
    """The keys of the layers a checkpoint stores, in the order they were written."""
    return list(_header(path)["layers"])


def load_into(model: keras.Model, path: str | os.PathLike) -> None:
    """Set the stored layers of `model` (a transfer model, or the Dense layer alone) to the checkpoint's weights.

    Layers the checkpoint does not store keep theirs. WeightsError, naming the file and the
    layer, when the model lacks a stored layer or its weights have other shapes.
    """
    keys = stored_keys(path)
    layers = layers_by_key(model)
    with _open(path) as file:
        for key in keys:
            if key not in layers:
                raise WeightsError(f"{path}: the model {model.name} has no layer {key}")
            group = file[f"layers/{key}"]
            arrays = [group[str(index)][()] for index in range(len(group))]
            expected = [tuple(weight.shape) for weight in layers[key].weights]
            if [array.shape for array in arrays] != expected:
                raise WeightsError(f"{path}: layer {key} stores shapes {[a.shape for a in arrays]}, "
                                   f"the model's are {expected}")
            layers[key].set_weights(arrays)
