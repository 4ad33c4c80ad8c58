"""Tests of tlopt.demo_data: layout, determinism, idempotency and that the task is learnable."""

import time

import numpy as np
import pytest
from PIL import Image

from tlopt import data
from tlopt.demo_data import DEMO_CLASSES, MARKER, generate_demo_dataset
from tlopt.errors import DataError


def _files(root):
    return sorted(path.relative_to(root) for path in root.rglob("*") if path.is_file())


def test_demo_layout_is_kvasir_like(demo_root):
    frame = data.discover(demo_root)

    assert data.class_names(frame) == sorted(list(DEMO_CLASSES)[:4])
    assert frame.groupby("label").size().tolist() == [30] * 4
    first = frame.iloc[0]
    assert first["path"].endswith(f"{first['label']}/{first['label']}_0000.jpg")
    with Image.open(first["path"]) as image:
        assert (image.format, image.size, image.mode) == ("JPEG", (64, 64), "RGB")
    assert data.find_bad_images(frame).empty


def test_demo_classes_differ_in_colour(demo_root):
    frame = data.discover(demo_root)
    pixels = {
        label: np.stack([np.asarray(Image.open(path), dtype=float) for path in rows["path"]])
        for label, rows in frame.groupby("label")
    }
    blue_share = {label: np.mean(images[..., 2] > images[..., 0] + 30) for label, images in pixels.items()}
    brightness = {label: images.mean() for label, images in pixels.items()}

    # Only the dyed class has blue pixels; the smooth pale field is the brightest.
    assert blue_share["dyed-lifted-polyps"] > 0.03
    assert max(share for label, share in blue_share.items() if label != "dyed-lifted-polyps") < 0.005
    assert max(brightness, key=brightness.get) == "normal-cecum"


def test_demo_is_byte_identical_for_the_same_arguments(tmp_path):
    first = generate_demo_dataset(tmp_path / "one", images_per_class=6, image_size=48, seed=3, num_classes=8)
    second = generate_demo_dataset(tmp_path / "two", images_per_class=6, image_size=48, seed=3, num_classes=8)
    other = generate_demo_dataset(
        tmp_path / "three", images_per_class=6, image_size=48, seed=4, num_classes=8
    )

    assert _files(first) == _files(second) == _files(other)
    assert len(_files(first)) == 8 * 6 + 1
    assert all((first / name).read_bytes() == (second / name).read_bytes() for name in _files(first))
    images = [name for name in _files(first) if name.suffix == ".jpg"]
    assert sum((first / name).read_bytes() != (other / name).read_bytes() for name in images) == len(images)


def test_demo_is_idempotent_and_regenerates_on_new_arguments(tmp_path):
    root = generate_demo_dataset(tmp_path / "demo", images_per_class=4, image_size=32)
    image = root / "polyps" / "polyps_0000.jpg"
    image.write_bytes(b"changed by the user")

    generate_demo_dataset(root, images_per_class=4, image_size=32)
    assert image.read_bytes() == b"changed by the user"  # same arguments: nothing written

    generate_demo_dataset(root, images_per_class=3, image_size=32, num_classes=2)
    frame = data.discover(root)
    assert data.class_names(frame) == sorted(list(DEMO_CLASSES)[:2])
    assert len(frame) == 6
    assert not image.exists()

    generate_demo_dataset(root, images_per_class=4, image_size=32)
    assert image.read_bytes() != b"changed by the user"
    assert '"images_per_class": 4' in (root / MARKER).read_text()


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "my-data").mkdir()
    (tmp_path / "my-data" / "notes.txt").write_text("precious")
    with pytest.raises(DataError, match="refusing .* 'notes.txt'"):
        generate_demo_dataset(tmp_path / "my-data", images_per_class=2, image_size=32)
    assert (tmp_path / "my-data" / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"num_classes": 1}, "num_classes must be between 2 and 8"),
        ({"num_classes": 9}, "num_classes must be between 2 and 8"),
        ({"images_per_class": 0}, "images_per_class must be at least 1"),
        ({"image_size": 8}, "image_size must be at least 16"),
    ],
)
def test_demo_rejects_bad_arguments(tmp_path, arguments, message):
    with pytest.raises(DataError, match=message):
        generate_demo_dataset(tmp_path / "demo", **arguments)


def test_demo_default_size_is_fast(tmp_path):
    start = time.perf_counter()
    root = generate_demo_dataset(tmp_path / "demo")
    assert time.perf_counter() - start < 5
    assert len(data.discover(root)) == 4 * 50


def _to_unit(images):
    return images / 255


@pytest.mark.slow
def test_demo_is_learnable_by_a_tiny_cnn_from_scratch(demo_root):
    import keras

    frame = data.split(data.discover(demo_root), val_fraction=0.3, seed=0)
    names = data.class_names(frame)
    keras.utils.set_random_seed(0)
    train = data.make_dataset(frame[frame["split"] == "train"], names, 64, 16, training=True)
    val = data.make_dataset(frame[frame["split"] == "val"], names, 64, 16, training=False)
    model = keras.Sequential(
        [
            keras.Input((64, 64, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(len(names), activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )

    history = model.fit(train, validation_data=val, epochs=15, shuffle=False, verbose=0)

    # Chance is 0.25 with four balanced classes; the last epochs are well above it.
    assert max(history.history["val_accuracy"][-3:]) >= 0.6
