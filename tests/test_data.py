"""Tests of tlopt.data: discovery, image checks, splits, the manifest and the tf.data pipeline."""

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from tlopt import data
from tlopt.errors import DataError

# Nerthus: BBPS score (class) -> the videos of that score (SPEC.md section 1).
NERTHUS_VIDEOS = {"0": [1, 2], "1": list(range(3, 13)), "2": list(range(13, 17)), "3": list(range(17, 22))}
NERTHUS_PATTERN = r"bowel_(\d+)_"


def _write_image(
    path: Path, size: tuple[int, int] = (8, 8), colour: tuple[int, int, int] = (200, 80, 60)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def _fake_frame(counts: dict[str, int]) -> pd.DataFrame:
    """A discovered-like frame (no files needed: split reads names only)."""
    rows = [
        (f"/data/{label}/{label}_{index:04d}.jpg", label) for label, n in counts.items() for index in range(n)
    ]
    return pd.DataFrame(rows, columns=["path", "label"])


def _nerthus_tree(root: Path, videos: dict[str, list[int]]) -> pd.DataFrame:
    """Empty files named like Nerthus frames; videos have different lengths, as in the real set."""
    rng = np.random.default_rng(7)
    for score, video_ids in videos.items():
        for video in video_ids:
            for frame in range(rng.integers(8, 40)):
                _touch(root / score / f"bowel_{video}_score_{score}-{frame // 10 + 1}_{frame:05d}.jpg")
    return data.discover(root)


# discover


def test_discover_lists_image_files_sorted_with_absolute_paths(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _write_image(root / "b" / "2.jpg")
    _write_image(root / "b" / "1.PNG")
    _write_image(root / "a" / "x.jpeg")
    _write_image(root / "a" / "y.bmp")
    (root / "a" / "notes.txt").write_text("not an image")
    _write_image(root / "a" / "._x.jpeg")
    _write_image(root / ".ipynb_checkpoints" / "z.jpg")
    monkeypatch.chdir(tmp_path)

    frame = data.discover("data")

    assert list(frame.columns) == ["path", "label"]
    assert frame["label"].tolist() == ["a", "a", "b", "b"]
    assert frame["path"].tolist() == [
        str(root / "a" / "x.jpeg"),
        str(root / "a" / "y.bmp"),
        str(root / "b" / "1.PNG"),
        str(root / "b" / "2.jpg"),
    ]
    assert all(os.path.isabs(path) for path in frame["path"])


def test_discover_reads_the_doubled_mirror_layout(tmp_path):
    for label in ["polyps", "esophagitis"]:
        for index in range(2):
            _write_image(tmp_path / label / label / f"{index}.jpg")

    frame = data.discover(tmp_path)

    assert frame["label"].tolist() == ["esophagitis"] * 2 + ["polyps"] * 2
    assert frame["path"].tolist()[0] == str(tmp_path / "esophagitis" / "esophagitis" / "0.jpg")


def test_discover_missing_root_names_it(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"not found: {tmp_path / 'nowhere'}")):
        data.discover(tmp_path / "nowhere")


def test_discover_root_without_class_folders(tmp_path):
    _write_image(tmp_path / "loose.jpg")
    with pytest.raises(DataError, match="no class folders in"):
        data.discover(tmp_path)


def test_discover_class_folder_without_images_names_the_folder(tmp_path):
    _write_image(tmp_path / "a" / "1.jpg")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=f"has no images.*{re.escape(str(tmp_path / 'b'))}$"):
        data.discover(tmp_path)


def test_discover_single_class(tmp_path):
    _write_image(tmp_path / "only" / "1.jpg")
    with pytest.raises(DataError, match="only one class folder \\(only\\)"):
        data.discover(tmp_path)


# find_bad_images


def test_find_bad_images_finds_truncated_fake_and_empty_files(tmp_path):
    rng = np.random.default_rng(0)
    good = tmp_path / "a" / "good.jpg"
    good.parent.mkdir()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good, quality=90)
    truncated = tmp_path / "a" / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "b" / "text.jpg"
    text.parent.mkdir()
    text.write_text("this is not an image\n")
    empty = _touch(tmp_path / "b" / "empty.png")
    tiff = tmp_path / "b" / "tiff.png"
    Image.new("RGB", (8, 8)).save(tiff, format="TIFF")
    good_png = _write_image(tmp_path / "b" / "good.png")
    frame = pd.DataFrame(
        {
            "path": [str(p) for p in [good, truncated, text, empty, tiff, good_png]],
            "label": ["a", "a", "b", "b", "b", "b"],
        }
    )

    bad = data.find_bad_images(frame)

    assert list(bad.columns) == ["path", "label", "reason"]
    assert bad["path"].tolist() == [str(truncated), str(text), str(empty), str(tiff)]
    assert bad["label"].tolist() == ["a", "b", "b", "b"]
    reasons = dict(zip(bad["path"], bad["reason"]))
    assert "truncated" in reasons[str(truncated)]
    assert "cannot identify image file" in reasons[str(text)]
    assert reasons[str(empty)] == "empty file"
    assert "TIFF" in reasons[str(tiff)]


def test_find_bad_images_of_a_clean_dataset_is_empty(demo_root):
    bad = data.find_bad_images(data.discover(demo_root))
    assert bad.empty
    assert list(bad.columns) == ["path", "label", "reason"]


# split without groups


def _val_share(frame: pd.DataFrame, name: str = "val") -> pd.Series:
    return frame.groupby("label")["split"].apply(lambda splits: (splits == name).mean())


def test_split_is_stratified_per_class():
    frame = _fake_frame({"a": 100, "b": 40, "c": 17})

    result = data.split(frame, val_fraction=0.3, seed=0)

    assert list(result.columns) == ["path", "label", "group", "split"]
    pd.testing.assert_frame_equal(result[["path", "label"]], frame)
    assert set(result["split"]) == {"train", "val"}
    counts = frame["label"].value_counts()
    for label, share in _val_share(result).items():
        assert abs(share - 0.3) <= 1 / counts[label], (label, share)
    assert result["group"].tolist() == [Path(path).name for path in frame["path"]]


def test_split_with_a_test_fraction_gives_every_class_three_splits():
    frame = _fake_frame({"a": 100, "b": 40, "c": 20})

    result = data.split(frame, val_fraction=0.2, test_fraction=0.1, seed=3)

    counts = frame["label"].value_counts()
    for name, fraction in [("val", 0.2), ("test", 0.1), ("train", 0.7)]:
        for label, share in _val_share(result, name).items():
            assert abs(share - fraction) <= 1 / counts[label], (name, label, share)


def test_split_is_deterministic_by_seed_and_seeds_differ():
    frame = _fake_frame({"a": 50, "b": 50})

    first = data.split(frame, seed=1)

    pd.testing.assert_frame_equal(first, data.split(frame, seed=1))
    assert not first["split"].equals(data.split(frame, seed=2)["split"])


@pytest.mark.parametrize(
    ("val_fraction", "test_fraction", "message"),
    [
        (0.0, 0.0, "val_fraction must be between 0 and 1"),
        (1.0, 0.0, "val_fraction must be between 0 and 1"),
        (0.3, -0.1, "test_fraction must be at least 0"),
        (0.6, 0.4, "val_fraction \\+ test_fraction must be below 1"),
    ],
)
def test_split_rejects_bad_fractions(val_fraction, test_fraction, message):
    with pytest.raises(DataError, match=message):
        data.split(_fake_frame({"a": 10, "b": 10}), val_fraction, test_fraction)


def test_split_rejects_a_class_too_small_for_the_split():
    with pytest.raises(DataError, match="class 'b' has 1 image"):
        data.split(_fake_frame({"a": 10, "b": 1}))
    with pytest.raises(DataError, match="class 'b' has 2 image.*test_fraction=0.2"):
        data.split(_fake_frame({"a": 10, "b": 2}), val_fraction=0.3, test_fraction=0.2)


# split with groups


def test_grouped_split_keeps_each_nerthus_video_on_one_side(tmp_path):
    frame = _nerthus_tree(tmp_path, NERTHUS_VIDEOS)

    for seed in range(10):
        result = data.split(frame, val_fraction=0.3, seed=seed, group_pattern=NERTHUS_PATTERN)

        assert set(result["group"]) == {str(video) for videos in NERTHUS_VIDEOS.values() for video in videos}
        assert (result.groupby("group")["split"].nunique() == 1).all()
        sides = result.groupby("label")["split"].agg(set)
        assert (sides == {"train", "val"}).all(), sides
        # Class 1 has ten videos: its share of validation frames stays near the asked fraction.
        assert abs(_val_share(result)["1"] - 0.3) < 0.15
        assert abs((result["split"] == "val").mean() - 0.3) < 0.15


def test_grouped_split_is_deterministic_by_seed_and_seeds_differ(tmp_path):
    frame = _nerthus_tree(tmp_path, NERTHUS_VIDEOS)

    first = data.split(frame, seed=0, group_pattern=NERTHUS_PATTERN)

    pd.testing.assert_frame_equal(first, data.split(frame, seed=0, group_pattern=NERTHUS_PATTERN))
    assert not first["split"].equals(data.split(frame, seed=1, group_pattern=NERTHUS_PATTERN)["split"])


def test_grouped_split_with_a_test_fraction(tmp_path):
    videos = {"0": [1, 2, 3], "1": [4, 5, 6, 7, 8, 9], "2": [10, 11, 12, 13]}
    frame = _nerthus_tree(tmp_path, videos)

    result = data.split(frame, val_fraction=0.3, test_fraction=0.2, seed=0, group_pattern=NERTHUS_PATTERN)

    assert (result.groupby("group")["split"].nunique() == 1).all()
    assert (result.groupby("label")["split"].agg(set) == {"train", "val", "test"}).all()


def test_grouped_split_rejects_a_class_with_a_single_group(tmp_path):
    frame = _nerthus_tree(tmp_path, {"0": [1], "1": [2, 3, 4]})
    with pytest.raises(DataError, match="class '0' has 1 group\\(s\\)"):
        data.split(frame, val_fraction=0.3, group_pattern=NERTHUS_PATTERN)


def test_grouped_nerthus_split_with_test_leaves_two_video_class_out_of_test(tmp_path):
    frame = _nerthus_tree(tmp_path, NERTHUS_VIDEOS)
    with pytest.warns(UserWarning, match="class '0' has only 2 groups"):
        result = data.split(frame, val_fraction=0.3, test_fraction=0.15, group_pattern=NERTHUS_PATTERN)
    sides = result.groupby("label")["split"].agg(set)
    assert sides["0"] == {"train", "val"}
    assert all(sides[label] == {"train", "val", "test"} for label in ("1", "2", "3"))
    assert (result.groupby("group")["split"].nunique() == 1).all()


def test_grouped_split_names_a_file_that_does_not_match(tmp_path):
    frame = _nerthus_tree(tmp_path, {"0": [1, 2], "1": [3, 4]})
    odd = pd.DataFrame({"path": [str(tmp_path / "1" / "IMG_0001.jpg")], "label": ["1"]})
    with pytest.raises(DataError, match="'IMG_0001.jpg' does not match group_pattern 'bowel_"):
        data.split(pd.concat([frame, odd], ignore_index=True), group_pattern=NERTHUS_PATTERN)


def test_group_pattern_needs_a_capture_group():
    with pytest.raises(DataError, match="no capture group"):
        data.split(_fake_frame({"a": 10, "b": 10}), group_pattern=r"\d+")


# manifest


def test_manifest_round_trip_keeps_strings(tmp_path):
    frame = data.split(
        _nerthus_tree(tmp_path / "data", NERTHUS_VIDEOS), seed=0, group_pattern=NERTHUS_PATTERN
    )
    path = tmp_path / "run" / "split.csv"

    data.write_manifest(frame.assign(extra=1), path)
    data.write_manifest(frame, path)  # overwrites

    assert path.read_text().splitlines()[0] == "path,label,group,split"
    assert os.listdir(path.parent) == ["split.csv"]
    pd.testing.assert_frame_equal(data.read_manifest(path), frame)
    assert data.class_names(data.read_manifest(path)) == ["0", "1", "2", "3"]


def test_write_manifest_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "split.csv"
    frame = data.split(_fake_frame({"a": 10, "b": 10}))
    data.write_manifest(frame, path)
    before = path.read_text()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        data.write_manifest(data.split(_fake_frame({"c": 5, "d": 5})), path)

    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["split.csv"]


def test_manifest_errors(tmp_path):
    with pytest.raises(DataError, match="lacks column\\(s\\) group, split"):
        data.write_manifest(_fake_frame({"a": 2}), tmp_path / "split.csv")
    with pytest.raises(DataError, match="manifest not found"):
        data.read_manifest(tmp_path / "missing.csv")


def test_class_names_are_sorted_unique_labels():
    assert data.class_names(_fake_frame({"b": 2, "c": 1, "a": 3})) == ["a", "b", "c"]


# make_dataset


@pytest.fixture(scope="module")
def pixel_frame(tmp_path_factory):
    """12 lossless 8x8 PNGs: red = a unique id, green = class index, blue = an asymmetric ramp.

    The ramp (20 per row, 3 per column) tells an unflipped image from each flip.
    """
    root = tmp_path_factory.mktemp("pixels")
    rows, columns = np.mgrid[:8, :8]
    ramp = (20 * rows + 3 * columns).astype(np.uint8)
    records = []
    for index in range(12):
        label = "abc"[index % 3]
        pixels = np.stack([np.full((8, 8), 10 * index + 5), np.full((8, 8), 50 * (index % 3)), ramp], axis=-1)
        path = root / label / f"{index:02d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        records.append((str(path), label, pixels.astype(np.float32)))
    return pd.DataFrame(records, columns=["path", "label", "pixels"])


def _epoch(dataset) -> tuple[np.ndarray, np.ndarray]:
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in dataset])
    return np.concatenate(images), np.concatenate(labels)


def test_validation_dataset_keeps_order_pixels_and_labels(pixel_frame):
    frame = pixel_frame.iloc[::-1]  # an order that is neither sorted nor by class
    dataset = data.make_dataset(frame, ["a", "b", "c"], 8, 5, training=False)

    batches = [(x.numpy(), y.numpy()) for x, y in dataset]

    assert [len(y) for _, y in batches] == [5, 5, 2]
    assert all(x.dtype == np.uint8 and x.shape[1:] == (8, 8, 3) for x, _ in batches)
    assert all(y.dtype == np.int32 for _, y in batches)
    images, labels = _epoch(dataset)
    np.testing.assert_array_equal(images, np.stack(frame["pixels"]))
    np.testing.assert_array_equal(labels, frame["label"].map({"a": 0, "b": 1, "c": 2}).to_numpy())


def test_dataset_decodes_other_formats_and_resizes(tmp_path):
    paths = [
        _write_image(tmp_path / "gray.jpg", (30, 20)),
        _write_image(tmp_path / "wide.bmp", (40, 10)),
        _write_image(tmp_path / "tiny.gif", (4, 4)),
    ]
    Image.open(paths[0]).convert("L").save(paths[0])
    frame = pd.DataFrame({"path": [str(p) for p in paths], "label": ["x", "y", "x"]})

    images, labels = _epoch(data.make_dataset(frame, ["x", "y"], 16, 8, training=False))

    assert images.shape == (3, 16, 16, 3)
    assert images.min() >= 0 and images.max() <= 255
    assert labels.tolist() == [0, 1, 0]


def test_training_dataset_shuffles_each_epoch_and_flips(pixel_frame):
    dataset = data.make_dataset(pixel_frame, ["a", "b", "c"], 8, 4, training=True, seed=0)
    originals = {
        int(pixels[0, 0, 0]): (pixels, label)
        for pixels, label in zip(pixel_frame["pixels"], pixel_frame["label"])
    }
    orders, variants = [], set()

    for _ in range(3):
        images, labels = _epoch(dataset)
        ids = images[:, 0, 0, 0].astype(int)
        assert sorted(ids) == sorted(originals)  # every image once per epoch
        orders.append(ids.tolist())
        for image, label, image_id in zip(images, labels, ids):
            original, original_label = originals[image_id]
            assert "abc"[label] == original_label
            flips = {
                "none": original,
                "horizontal": original[:, ::-1],
                "vertical": original[::-1],
                "both": original[::-1, ::-1],
            }
            matches = [name for name, flipped in flips.items() if np.array_equal(image, flipped)]
            assert len(matches) == 1
            variants.add(matches[0])

    assert orders[0] != sorted(orders[0]) and orders[0] != orders[1] != orders[2]
    assert variants == {"none", "horizontal", "vertical", "both"}


def test_every_flip_function_flips_the_same_way():
    """flip_images with a variant per image or one for the batch, and flip_array (the image cache's)."""
    images = np.arange(4 * 3 * 5 * 1, dtype=np.uint8).reshape(4, 3, 5, 1)
    expected = np.stack([images[0], images[1, :, ::-1], images[2, ::-1], images[3, ::-1, ::-1]])
    variants = np.arange(4)
    np.testing.assert_array_equal(data.flip_images(tf.constant(images), variants).numpy(), expected)
    np.testing.assert_array_equal(data.flip_array(images.copy(), variants), expected)
    for variant in variants:
        whole_batch = data.flip_images(tf.constant(images), int(variant)).numpy()
        np.testing.assert_array_equal(whole_batch, data.flip_images(tf.constant(images), [variant] * 4).numpy())
    draws = tf.constant([-5, -1, 0, 6, 2**40 + 3], tf.int64)  # a draw's variant is the draw modulo 4
    assert data.flip_variants(draws).numpy().tolist() == [3, 3, 0, 2, 3]


def test_training_dataset_is_reproducible_by_seed(pixel_frame):
    def first_epoch(seed):
        return _epoch(data.make_dataset(pixel_frame, ["a", "b", "c"], 8, 4, training=True, seed=seed))

    images, labels = first_epoch(1)
    again_images, again_labels = first_epoch(1)
    other_images, _ = first_epoch(2)

    np.testing.assert_array_equal(images, again_images)
    np.testing.assert_array_equal(labels, again_labels)
    assert not np.array_equal(images, other_images)


def test_make_dataset_rejects_unknown_labels_and_empty_frames(pixel_frame):
    with pytest.raises(DataError, match="label\\(s\\) 'c' not among class_names"):
        data.make_dataset(pixel_frame, ["a", "b"], 8, 4, training=False)
    with pytest.raises(DataError, match="empty frame"):
        data.make_dataset(pixel_frame.iloc[:0], ["a", "b", "c"], 8, 4, training=True)
