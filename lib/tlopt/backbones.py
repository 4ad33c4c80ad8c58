"""The backbones: which `keras.applications` models a trial may use, and the transfer model built on one.

A transfer model is `Input (uint8 pixels) -> the backbone's preprocessing ("preprocess")
-> backbone (include_top=False) -> global pooling ("pool") -> Dense softmax
("predictions")`. The backbone is one nested layer of the model, so `base.layers` indexes
the delimiting layer exactly as the thesis counts it (0 = input layer), and the head keeps
stable names: its Dense layer can be trained elsewhere (on cached pooled features) and its
weights set by name.

Preprocessing: each backbone keeps Keras's default architecture and its own module's
`preprocess_input`, applied on the fly to every batch by the model's first layer, in
float32: the input pipeline carries uint8 pixels (a quarter of the bytes to copy, to a GPU
too) and the preprocessing runs where the model runs. For the MobileNetV3 and
EfficientNet families that function is the identity and the rescaling is a layer inside
the backbone (`include_preprocessing=True`, Keras's default), because their ImageNet
weights were trained that way; no backbone needs a special case.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import keras

from tlopt.errors import ConfigError, WeightsError

if TYPE_CHECKING:
    from tlopt.params import Experiment

_APPS = keras.applications


@dataclass(frozen=True)
class Backbone:
    """One backbone: how to build it, how to preprocess its input, its smallest input size."""

    name: str
    constructor: Callable[..., keras.Model]
    preprocess_input: Callable
    min_input_size: int


class Preprocessing(keras.layers.Layer):
    """A backbone's `preprocess_input` on 0-255 pixels (uint8 or float), in float32.

    The transfer model's first layer. Float32 also under mixed precision, as the input
    pipeline computed it before the model: the backbone casts its result to float16.
    """

    def __init__(self, backbone: str, **kwargs) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.backbone = backbone
        self.preprocess_input = get_backbone(backbone).preprocess_input

    def call(self, images):
        return self.preprocess_input(keras.ops.cast(images, "float32"))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "backbone": self.backbone}


def _backbone(name: str, module, min_input_size: int = 32, constructor: Callable | None = None) -> Backbone:
    return Backbone(name, constructor or getattr(_APPS, name), module.preprocess_input, min_input_size)


# Minimum sizes are Keras's own checks (measured: 71 for Xception, 75 for the Inception
# family, 32 for the others).
THESIS_BACKBONES: tuple[str, ...] = (
    "Xception",
    "VGG16",
    "VGG19",
    "ResNet50",
    "InceptionV3",
    "InceptionResNetV2",
    "DenseNet121",
    "DenseNet169",
    "DenseNet201",
)

BACKBONES: dict[str, Backbone] = {
    backbone.name: backbone
    for backbone in (
        _backbone("Xception", _APPS.xception, 71),
        _backbone("VGG16", _APPS.vgg16),
        _backbone("VGG19", _APPS.vgg19),
        _backbone("ResNet50", _APPS.resnet),
        _backbone("InceptionV3", _APPS.inception_v3, 75),
        _backbone("InceptionResNetV2", _APPS.inception_resnet_v2, 75),
        _backbone("DenseNet121", _APPS.densenet),
        _backbone("DenseNet169", _APPS.densenet),
        _backbone("DenseNet201", _APPS.densenet),
        # Smaller models: quick on a CPU, for the demo, tests and small budgets.
        _backbone("ResNet50V2", _APPS.resnet_v2),
        _backbone("MobileNetV2", _APPS.mobilenet_v2),
        _backbone("MobileNetV3Small", _APPS.mobilenet_v3),
        _backbone("MobileNetV3Large", _APPS.mobilenet_v3),
        # Without squeeze-excite and hard-swish: quicker to trace on a CPU; has ImageNet weights too.
        _backbone(
            "MobileNetV3SmallMinimalistic",
            _APPS.mobilenet_v3,
            constructor=functools.partial(_APPS.MobileNetV3Small, minimalistic=True),
        ),
        _backbone("EfficientNetB0", _APPS.efficientnet),
    )
}


def get_backbone(name: str) -> Backbone:
    """The registered backbone called `name`; ConfigError listing the known names otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}") from None


@functools.cache
def layer_count(name: str) -> int:
    """`len(base.layers)` of the backbone with include_top=False: the delimiting layer's upper bound.

    Measured by building the backbone with random weights at its smallest input size (the
    count does not depend on the size); cached because building the largest takes seconds.
    """
    backbone = get_backbone(name)
    size = backbone.min_input_size
    return len(backbone.constructor(include_top=False, weights=None, input_shape=(size, size, 3)).layers)


def default_delimiting_layer(n_layers: int, fraction: float = 2 / 3) -> int:
    """floor(fraction x n_layers): the thesis's delimiting layer during model optimization."""
    if not 0 <= fraction <= 1:
        raise ConfigError(f"delimiting fraction must be between 0 and 1, got {fraction}")
    if n_layers < 0:
        raise ConfigError(f"number of layers must be at least 0, got {n_layers}")
    return math.floor(fraction * n_layers)


def _keras_models_dir() -> Path:
    """The folder where Keras caches downloaded weights (the rule of `keras.utils.get_file`)."""
    home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    if not os.access(home, os.W_OK):
        home = Path("/tmp/.keras")
    return home / "models"


def _mobilenet_v2_rows(image_size: int) -> int:
    """The input size MobileNetV2's ImageNet weights are chosen by (224 for a size it has none for)."""
    return image_size if image_size in (96, 128, 160, 192, 224) else 224


def _imagenet_no_top_url(name: str, image_size: int) -> str:
    """The URL of a backbone's ImageNet weights without top, from its keras.applications source module's
    constants (the public modules do not export them); MobileNetV2's depend on the input size."""
    from keras.src.applications import (densenet, efficientnet, inception_resnet_v2, inception_v3, mobilenet_v2,
                                        mobilenet_v3, resnet, vgg16, vgg19, xception)

    urls = {
        "Xception": xception.WEIGHTS_PATH_NO_TOP,
        "VGG16": vgg16.WEIGHTS_PATH_NO_TOP,
        "VGG19": vgg19.WEIGHTS_PATH_NO_TOP,
        "ResNet50": f"{resnet.BASE_WEIGHTS_PATH}resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "InceptionV3": inception_v3.WEIGHTS_PATH_NO_TOP,
        "InceptionResNetV2": f"{inception_resnet_v2.BASE_WEIGHT_URL}"
                             "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "DenseNet121": densenet.DENSENET121_WEIGHT_PATH_NO_TOP,
        "DenseNet169": densenet.DENSENET169_WEIGHT_PATH_NO_TOP,
        "DenseNet201": densenet.DENSENET201_WEIGHT_PATH_NO_TOP,
        "ResNet50V2": f"{resnet.BASE_WEIGHTS_PATH}resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "MobileNetV2": f"{mobilenet_v2.BASE_WEIGHT_PATH}mobilenet_v2_weights_tf_dim_ordering_tf_kernels_"
                       f"1.0_{_mobilenet_v2_rows(image_size)}_no_top.h5",
        "MobileNetV3Small": f"{mobilenet_v3.BASE_WEIGHT_PATH}weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
        "MobileNetV3Large": f"{mobilenet_v3.BASE_WEIGHT_PATH}weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
        "MobileNetV3SmallMinimalistic": f"{mobilenet_v3.BASE_WEIGHT_PATH}"
                                        "weights_mobilenet_v3_small_minimalistic_224_1.0_float_no_top_v2.h5",
        "EfficientNetB0": f"{efficientnet.BASE_WEIGHTS_PATH}efficientnetb0_notop.h5",
    }
    return urls[name]


def imagenet_weights(name: str, image_size: int) -> tuple[Path, str]:
    """Where Keras keeps the ImageNet weights (without top) of backbone `name` at `image_size`, and their URL.

    Keras caches each file under its URL's last component in its models folder; nothing
    is downloaded here.
    """
    get_backbone(name)
    url = _imagenet_no_top_url(name, image_size)
    return _keras_models_dir() / url.rsplit("/", 1)[-1], url


def check_weights(config: Experiment, download: bool = True,
                  fetch: Callable[[str, str, Path], object] | None = None) -> list[Path]:
    """Make sure every backbone the run may choose has its pretrained weights on this machine.

    Called before the first trial (and by anything that trains elsewhere, a worker on
    another machine): a missing file would otherwise fail every trial that draws its
    backbone, and the search would learn to avoid a backbone that was never trained. With
    `weights: imagenet`, missing files are downloaded into Keras's own cache when
    `download` (`fetch(file_name, url, folder)` does it; Keras's `get_file` by default);
    whatever is still missing is one WeightsError that lists every file and where it
    goes. A local weights file must exist. Returns the weights files the run uses.
    """
    if config.weights is None:
        return []
    if config.weights != "imagenet":
        if not Path(config.weights).is_file():
            raise WeightsError(f"weights file not found: {config.weights}")
        return [Path(config.weights)]
    fetch = fetch or _keras_download
    files, missing = [], []
    for name in config.backbones:
        path, url = imagenet_weights(name, config.data.image_size)
        files.append(path)
        if path.is_file():
            continue
        if download:
            try:
                fetch(path.name, url, path.parent)
            except Exception:  # noqa: BLE001 - offline, a proxy, an HTTP error: listed below
                pass
        if not path.is_file():
            missing.append((name, path, url))
    if missing:
        listing = "; ".join(f"{name} needs {path.name} (from {url})" for name, path, url in missing)
        where = "are not" if not download else "are not in Keras's cache and cannot be downloaded here: they go"
        raise WeightsError(
            f"ImageNet weights of {len(missing)} backbone(s) {where} in {missing[0][1].parent}/: {listing}; "
            f"`tlopt weights PARAMS` on a machine with internet downloads them there, to copy over"
        )
    return files


def _keras_download(file_name: str, url: str, folder: Path) -> None:
    """Keras's own download into its cache (`keras.utils.get_file`)."""
    keras.utils.get_file(file_name, url, cache_dir=str(folder.parent), cache_subdir=folder.name)


# Keras's message when a download fails (offline, HTTP error): "URL fetch failure on <url>: ...".
_FETCH_FAILURE = re.compile(r"URL fetch failure on (\S+): ")


def _build_base(backbone: Backbone, image_size: int, weights: str | os.PathLike | None) -> keras.Model:
    """The backbone without its top, with ImageNet weights, a local weights file, or random weights."""
    shape = (image_size, image_size, 3)
    if weights is None or weights == "imagenet":
        try:
            return backbone.constructor(include_top=False, weights=weights, input_shape=shape)
        except Exception as error:
            match = _FETCH_FAILURE.search(str(error))
            if match is None:
                raise
            # For every registered backbone Keras caches the file under the URL's last component.
            file_name = match.group(1).rsplit("/", 1)[-1]
            raise WeightsError(
                f"ImageNet weights for {backbone.name} cannot be downloaded: place {file_name} "
                f"in {_keras_models_dir()}/ (from {match.group(1)}), or set weights to a local file"
            ) from None
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"weights file for {backbone.name} not found: {path}")
    base = backbone.constructor(include_top=False, weights=None, input_shape=shape)
    try:
        base.load_weights(path)
    except ValueError as error:
        first_line = str(error).splitlines()[0]
        raise WeightsError(f"cannot load weights file {path} into {backbone.name}: {first_line}") from None
    return base


def build_transfer_model(
    name: str,
    num_classes: int,
    image_size: int,
    weights: str | os.PathLike | None = "imagenet",
    pooling: str = "max",
) -> tuple[keras.Model, keras.Model]:
    """Build the thesis's transfer model; return (model, base).

    `weights`: "imagenet" (Keras's download cache; WeightsError with the file to place
    there when offline), a local weights file of the base without its top, or None for
    random weights. `pooling`: "max" (the thesis) or "avg". The head's layers are named
    "pool" and "predictions". The model takes uint8 pixels, as the input pipelines give
    them (Keras casts other inputs to uint8: float pixels must be rounded 0-255 values).

    Frozen BatchNormalization layers run in inference mode (Keras 3, unlike the thesis's
    Keras 2.1). With random weights, the batch-normalised backbones (MobileNet,
    EfficientNet, ...) then give near-zero features to the classification block; VGG16
    has no BatchNormalization and learns the demo data even with random weights.
    """
    backbone = get_backbone(name)
    if image_size < backbone.min_input_size:
        raise ConfigError(
            f"image size {image_size} is too small for {name}: it needs at least "
            f"{backbone.min_input_size}x{backbone.min_input_size} pixels"
        )
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
    poolings = {"max": keras.layers.GlobalMaxPooling2D, "avg": keras.layers.GlobalAveragePooling2D}
    if pooling not in poolings:
        raise ConfigError(f"pooling must be one of {', '.join(poolings)}, got {pooling!r}")
    base = _build_base(backbone, image_size, weights)
    inputs = keras.Input(shape=(image_size, image_size, 3), dtype="uint8", name="image")
    pooled = poolings[pooling](name="pool")(base(Preprocessing(name, name="preprocess")(inputs)))
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(pooled)
    return keras.Model(inputs, outputs, name=f"{name}_transfer"), base


def set_delimiting_layer(base: keras.Model, index: int) -> None:
    """Freeze the layers of `base` before `index`; train the layer at `index` and every later one.

    `index` runs from 0 (everything trains) to len(base.layers) (everything frozen).
    Compile the model again afterwards: Keras reads `trainable` when compiling.
    """
    n_layers = len(base.layers)
    if not 0 <= index <= n_layers:
        raise ConfigError(f"delimiting layer {index} is out of range for {base.name}: 0 to {n_layers}")
    base.trainable = True
    for position, layer in enumerate(base.layers):
        layer.trainable = position >= index
