"""The backbone registry, the transfer model, weights handling and the delimiting layer."""

import socket
import urllib.error

import keras
import numpy as np
import pytest

from tlopt import backbones
from tlopt.backbones import (
    BACKBONES,
    THESIS_BACKBONES,
    build_transfer_model,
    default_delimiting_layer,
    get_backbone,
    layer_count,
    set_delimiting_layer,
)
from tlopt.errors import ConfigError, WeightsError

# SPEC.md section 3: len(base.layers) with include_top=False in Keras 3.
THESIS_LAYER_COUNTS = {
    "Xception": 132,
    "VGG16": 19,
    "VGG19": 22,
    "ResNet50": 175,
    "InceptionV3": 311,
    "InceptionResNetV2": 780,
    "DenseNet121": 427,
    "DenseNet169": 595,
    "DenseNet201": 707,
}


@pytest.fixture(autouse=True)
def _free_keras():
    yield
    keras.backend.clear_session()


def test_thesis_backbones_in_thesis_order_and_registered():
    assert THESIS_BACKBONES == tuple(THESIS_LAYER_COUNTS)
    assert list(BACKBONES)[:9] == list(THESIS_BACKBONES)
    assert {"MobileNetV2", "MobileNetV3Small", "EfficientNetB0"} <= set(BACKBONES)


def test_each_backbone_uses_its_own_modules_preprocess_input():
    apps = keras.applications
    assert get_backbone("VGG16").preprocess_input is apps.vgg16.preprocess_input
    assert get_backbone("ResNet50").preprocess_input is apps.resnet.preprocess_input
    assert get_backbone("InceptionResNetV2").preprocess_input is apps.inception_resnet_v2.preprocess_input
    assert get_backbone("DenseNet201").preprocess_input is apps.densenet.preprocess_input
    # MobileNetV3 rescales inside the model; its preprocess_input passes 0-255 values through.
    images = np.full((1, 8, 8, 3), 200.0, dtype="float32")
    np.testing.assert_array_equal(get_backbone("MobileNetV3Small").preprocess_input(images), images)


def test_unknown_backbone_is_a_config_error_listing_the_known_ones():
    with pytest.raises(ConfigError, match="ResNet51") as error:
        get_backbone("ResNet51")
    assert "DenseNet201" in str(error.value) and "MobileNetV3Small" in str(error.value)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_min_input_size_is_the_one_keras_enforces(name):
    backbone = get_backbone(name)
    size = backbone.min_input_size - 1
    with pytest.raises(ValueError, match=f"at least {backbone.min_input_size}"):
        backbone.constructor(include_top=False, weights=None, input_shape=(size, size, 3))


def test_min_input_sizes_of_the_inception_family():
    assert get_backbone("Xception").min_input_size == 71
    assert get_backbone("InceptionV3").min_input_size == 75
    assert get_backbone("InceptionResNetV2").min_input_size == 75
    assert get_backbone("DenseNet121").min_input_size == 32


def test_image_smaller_than_the_minimum_is_a_config_error():
    with pytest.raises(ConfigError, match="at least 71x71"):
        build_transfer_model("Xception", 3, 70, weights=None)


@pytest.mark.parametrize(("name", "count"), [("VGG16", 19), ("VGG19", 22), ("MobileNetV3Small", 157)])
def test_layer_count_of_cheap_backbones(name, count):
    assert layer_count(name) == count


@pytest.mark.slow
def test_layer_counts_of_the_thesis_backbones_match_the_spec():
    assert {name: layer_count(name) for name in THESIS_BACKBONES} == THESIS_LAYER_COUNTS


@pytest.mark.parametrize(
    ("n_layers", "fraction", "expected"),
    [(132, 2 / 3, 88), (19, 2 / 3, 12), (780, 2 / 3, 520), (707, 2 / 3, 471), (175, 0.5, 87), (10, 0, 0), (10, 1, 10)],
)
def test_default_delimiting_layer_is_the_floor_of_the_fraction(n_layers, fraction, expected):
    assert default_delimiting_layer(n_layers, fraction) == expected


def test_default_delimiting_layer_rejects_a_fraction_outside_0_1():
    with pytest.raises(ConfigError, match="fraction"):
        default_delimiting_layer(100, 1.5)


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
@pytest.mark.parametrize("name", ["VGG16", "ResNet50", "MobileNetV3Small"])
def test_transfer_model_preprocesses_uint8_pixels_with_its_backbones_function_in_float32(name, policy):
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    keras.mixed_precision.set_global_policy(policy)
    try:
        model, base = build_transfer_model(name, 3, 32, weights=None)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.inputs[0].dtype == "uint8"
    layer = model.get_layer("preprocess")
    again = type(layer).from_config(layer.get_config())  # what saving a whole model would do
    assert (again.backbone, again.dtype_policy.name) == (name, "float32")
    preprocessed = keras.ops.convert_to_numpy(layer(pixels))
    assert preprocessed.dtype == np.float32
    np.testing.assert_array_equal(preprocessed, get_backbone(name).preprocess_input(pixels.astype(np.float32)))
    pooled = keras.Model(model.inputs, model.get_layer("pool").output).predict(pixels, verbose=0)
    expected = keras.ops.convert_to_numpy(base(preprocessed)).max(axis=(1, 2))  # what the backbone sees
    np.testing.assert_allclose(pooled, expected, rtol=1e-5 if policy == "float32" else 1e-2, atol=1e-6)


@pytest.mark.parametrize(("pooling", "layer_class"), [("max", "GlobalMaxPooling2D"), ("avg", "GlobalAveragePooling2D")])
def test_transfer_model_is_backbone_pool_dense_softmax(pooling, layer_class):
    model, base = build_transfer_model("VGG16", 5, 48, weights=None, pooling=pooling)
    assert [layer.name for layer in model.layers] == ["image", "preprocess", base.name, "pool", "predictions"]
    assert model.get_layer(base.name) is base
    assert type(model.get_layer("pool")).__name__ == layer_class
    head = model.get_layer("predictions")
    assert head.units == 5 and head.activation is keras.activations.softmax
    assert len(base.layers) == 19  # include_top=False
    probabilities = model.predict(np.random.default_rng(0).integers(0, 256, (2, 48, 48, 3), dtype=np.uint8), verbose=0)
    assert probabilities.shape == (2, 5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)


def test_unknown_pooling_is_a_config_error():
    with pytest.raises(ConfigError, match="pooling"):
        build_transfer_model("VGG16", 3, 32, weights=None, pooling="sum")


def test_local_weights_file_is_loaded_into_the_base(tmp_path):
    keras.utils.set_random_seed(1)
    _, saved = build_transfer_model("MobileNetV3Small", 3, 32, weights=None)
    path = tmp_path / "base.weights.h5"
    saved.save_weights(path)
    keras.utils.set_random_seed(2)
    _, loaded = build_transfer_model("MobileNetV3Small", 3, 32, weights=str(path))
    for expected, actual in zip(saved.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(actual, expected)


def test_missing_weights_file_is_a_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        build_transfer_model("VGG16", 3, 32, weights=str(tmp_path / "missing.h5"))


@pytest.mark.filterwarnings("ignore:Skipping nested container")
def test_weights_file_of_another_backbone_is_a_one_line_weights_error(tmp_path):
    _, other = build_transfer_model("VGG19", 3, 32, weights=None)
    path = tmp_path / "vgg19.weights.h5"
    other.save_weights(path)
    with pytest.raises(WeightsError, match="cannot load weights file") as error:
        build_transfer_model("VGG16", 3, 32, weights=str(path))
    assert "\n" not in str(error.value)


@pytest.fixture
def offline(monkeypatch):
    """Make every Keras download fail the way it does without network access."""

    def unreachable(url, *args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr("keras.src.utils.file_utils.urlretrieve", unreachable)


@pytest.mark.filterwarnings("ignore:`input_shape` is undefined or non-square")
@pytest.mark.parametrize(
    ("name", "size", "file_name"),
    [
        ("VGG16", 32, "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ("Xception", 71, "xception_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        # MobileNetV2's file depends on the input size.
        ("MobileNetV2", 96, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"),
        ("MobileNetV3Small", 64, "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"),
        # The other naming rules of the table that check_weights reads (the rest are constants).
        ("ResNet50V2", 32, "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ("MobileNetV3SmallMinimalistic", 32, "weights_mobilenet_v3_small_minimalistic_224_1.0_float_no_top_v2.h5"),
    ],
)
def test_offline_imagenet_weights_name_the_file_and_the_keras_cache(
    offline, monkeypatch, tmp_path, name, size, file_name
):
    if (backbones._keras_models_dir() / file_name).exists():
        pytest.skip(f"{file_name} is in the Keras cache: nothing to download")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as error:
        build_transfer_model(name, 3, size, weights="imagenet")
    message = str(error.value)
    assert f"place {file_name} in {tmp_path / 'models'}/" in message
    assert name in message and "\n" not in message
    # The table check_weights reads names the file and URL that Keras itself asked for.
    path, url = backbones.imagenet_weights(name, size)
    assert path == tmp_path / "models" / file_name and f"(from {url})" in message


def _weights_params(tmp_path, names, weights="imagenet"):
    from tlopt.params import validate

    return validate({"data": {"root": str(tmp_path), "image_size": 96}, "backbones": names, "weights": weights})


def test_check_weights_offline_lists_every_missing_file_and_where_it_goes(offline, monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(b"present")
    with pytest.raises(WeightsError) as error:
        backbones.check_weights(_weights_params(tmp_path, ["VGG16", "MobileNetV2", "Xception"]))
    message = str(error.value)
    assert message.startswith(f"ImageNet weights of 2 backbone(s) are not in Keras's cache and cannot be downloaded "
                              f"here: they go in {tmp_path / 'models'}/: MobileNetV2 needs "
                              f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5 (from https://")
    assert "Xception needs xception_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert "VGG16" not in message and "tlopt weights PARAMS" in message and "\n" not in message


def test_check_weights_downloads_what_is_missing_into_the_keras_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    fetched = []

    def fetch(file_name, url, folder):
        fetched.append((file_name, url, folder))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / file_name).write_bytes(b"weights")

    params = _weights_params(tmp_path, ["VGG16", "EfficientNetB0"])
    files = backbones.check_weights(params, fetch=fetch)
    assert files == [tmp_path / "models" / name for name, _, _ in fetched]
    assert [url.rsplit("/", 1)[1] for _, url, _ in fetched] == [name for name, _, _ in fetched]
    assert backbones.check_weights(params, fetch=fetch) == files and len(fetched) == 2, "present files are kept"
    with pytest.raises(WeightsError, match="are not in"):
        backbones.check_weights(_weights_params(tmp_path, ["VGG19"]), download=False, fetch=fetch)
    assert len(fetched) == 2
    assert backbones.check_weights(_weights_params(tmp_path, ["VGG16"], weights=None)) == []


def test_tlopt_weights_downloads_or_refuses_in_one_line(monkeypatch, tmp_path, capsys):
    from tlopt import cli

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    params = tmp_path / "p.yaml"
    params.write_text("data: {root: data, image_size: 32}\nbackbones: [VGG16, VGG19]\n")

    def unreachable(file_name, url, folder):
        raise Exception(f"URL fetch failure on {url}: None -- [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(backbones, "_keras_download", unreachable)
    assert cli.main(["weights", str(params)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "VGG16 needs" in err[0] and "VGG19 needs" in err[0]

    monkeypatch.setattr(backbones, "_keras_download",
                        lambda name, url, folder: folder.mkdir(exist_ok=True) or (folder / name).write_bytes(b"w"))
    assert cli.main(["weights", str(params)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"weights: {tmp_path / 'models' / name}" for name in ("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                                                              "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5")]


def test_the_search_checks_the_weights_before_its_first_trial(monkeypatch, tmp_path):
    from tlopt import optimize, training
    from tlopt.store import RunFolder

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(backbones, "_keras_download", lambda *args: None)  # a download that brings nothing
    monkeypatch.setattr(training, "train_block", lambda *args, **kwargs: pytest.fail("a trial trained"))
    params = _weights_params(tmp_path, ["VGG16"]).updated({"results_dir": str(tmp_path / "results")})
    with pytest.raises(WeightsError, match="VGG16 needs"):
        optimize.run_strategy(params, "shared", RunFolder.open(params), progress=False)


def _trainable_flags(base):
    return [layer.trainable for layer in base.layers]


def test_set_delimiting_layer_freezes_exactly_the_layers_before_it():
    model, base = build_transfer_model("VGG16", 3, 32, weights=None)
    base.trainable = False
    set_delimiting_layer(base, 11)
    assert _trainable_flags(base) == [False] * 11 + [True] * 8
    assert base.trainable
    # VGG16 without top: block4 and block5 convolutions (6 x kernel, bias) and the Dense head train.
    assert [weight.path for weight in model.trainable_weights][0].endswith("block4_conv1/kernel")
    assert len(model.trainable_weights) == 6 * 2 + 2


def test_set_delimiting_layer_bounds():
    _, base = build_transfer_model("VGG16", 3, 32, weights=None)
    set_delimiting_layer(base, 0)
    assert all(_trainable_flags(base))
    set_delimiting_layer(base, 19)
    assert not any(_trainable_flags(base))
    for index in (-1, 20):
        with pytest.raises(ConfigError, match="0 to 19"):
            set_delimiting_layer(base, index)
