"""Grad-CAM explanation maps on the transfer model's nested backbone, for every registered backbone."""

import keras
import numpy as np
import pytest

from tlopt import data, explain
from tlopt.backbones import BACKBONES, build_transfer_model
from tlopt.demo_data import generate_demo_dataset
from tlopt.export import with_standard_preprocessing

# Building a backbone is most of the cost; these six took 12-20 s each on 2 busy cores, the others 3-8 s.
SLOW = {"InceptionResNetV2", "DenseNet121", "DenseNet169", "DenseNet201", "InceptionV3", "EfficientNetB0"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
                                  for name in BACKBONES])
def test_every_backbone_gets_a_map_of_its_input_size(name):
    size = BACKBONES[name].min_input_size
    keras.utils.set_random_seed(0)
    model, base = build_transfer_model(name, 3, size, weights=None)
    image = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)

    maps, probabilities = explain.grad_cam(model, image)

    assert maps.shape == (1, size, size)
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert probabilities.shape == (1, 3) and np.isclose(probabilities.sum(), 1)
    layer = base.get_layer(explain.target_layer(base))
    assert len(layer.output.shape) == 4 and not isinstance(layer, keras.layers.MaxPooling2D)
    keras.backend.clear_session()


@pytest.fixture(scope="module")
def vgg(tmp_path_factory):
    """VGG16 at 64 px with random weights (no batch normalisation: its classes' scores differ) and four demo images."""
    keras.utils.set_random_seed(0)
    model, base = build_transfer_model("VGG16", 4, 64, weights=None)
    root = generate_demo_dataset(tmp_path_factory.mktemp("explain"), images_per_class=1, image_size=64, seed=0)
    paths = sorted(str(path) for path in root.rglob("*.jpg"))
    return model, base, paths


def test_the_maps_of_two_classes_differ_and_an_inner_layer_can_be_chosen(vgg):
    model, base, paths = vgg
    explained = explain.explain_files(model, paths[:2], [f"c{i}" for i in range(4)])
    first, _ = explain.grad_cam(model, explained.images, [0, 0])
    second, _ = explain.grad_cam(model, explained.images, [1, 1])

    assert explain.target_layer(base) == "block5_conv3"  # not block5_pool, which halves the map
    assert np.abs(first - second).max() > 0.1
    assert explained.maps.shape == (2, 64, 64)
    np.testing.assert_allclose(explained.probabilities, model.predict(explained.images, verbose=0), atol=1e-5)
    inner, _ = explain.grad_cam(model, explained.images, [0, 0], layer="block4_conv3")
    assert inner.shape == (2, 64, 64) and not np.allclose(inner, first)


def test_an_exported_model_gives_the_same_maps(vgg):
    model, _, paths = vgg
    images = np.stack([data.decode_image(path, 64) for path in paths[:2]])
    exported = with_standard_preprocessing(model, "VGG16")
    np.testing.assert_allclose(explain.grad_cam(exported, images)[0], explain.grad_cam(model, images)[0], atol=1e-5)


def test_overlay_keeps_the_image_size_and_resizes_the_map():
    image = np.zeros((30, 50, 3), dtype=np.uint8)
    cam = np.zeros((8, 8))
    cam[0, 0] = 1.0
    blended = explain.overlay(image, cam)
    assert blended.shape == (30, 50, 3) and blended.dtype == np.uint8
    assert blended[0, 0].tolist() != blended[-1, -1].tolist()
