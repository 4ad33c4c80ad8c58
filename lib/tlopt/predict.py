"""`tlopt predict`: classify new images with an exported model, and explain each prediction if asked.

Images are files, folders (searched recursively for image files) or CSV files with a
`path` column (relative paths are relative to the CSV's folder). Each image is decoded and
resized as training decoded it (`data.decode_image`), so the model sees the pixels it
would have seen in the run; a file that does not decode is listed with the reason and
skipped. The images are decoded in threads (TensorFlow's decoders release the GIL) and
predicted a batch at a time, on whatever device Keras has (a CPU is enough).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
from PIL import Image

from tlopt import data, explain
from tlopt.errors import TloptError
from tlopt.export import ExportedModel, load_model
from tlopt.files import atomic_path

PATH_COLUMN = "path"


def probability_column(class_name: str) -> str:
    """The column of a class's probability in the predictions table."""
    return f"p_{class_name}"


def _folder_images(folder: Path) -> list[str]:
    """The image files under `folder`, recursively, sorted; hidden files and folders left out."""
    return sorted(
        str(path) for path in folder.rglob("*")
        if path.is_file() and path.suffix.lower() in data.IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def _csv_images(path: Path) -> list[str]:
    listed = pd.read_csv(path, dtype=str, keep_default_na=False)
    if PATH_COLUMN not in listed.columns:
        raise TloptError(f"{path} has no '{PATH_COLUMN}' column (columns: {', '.join(listed.columns)})")
    return [str(path.parent / value) for value in listed[PATH_COLUMN] if value]


def image_paths(inputs: Iterable[str | os.PathLike]) -> list[str]:
    """The image files that `inputs` name (files, folders, CSV files with a `path` column), in order.

    TloptError when an input does not exist or when there is no image at all.
    """
    paths: list[str] = []
    inputs = list(inputs)
    for item in map(Path, inputs):
        if item.is_dir():
            paths += _folder_images(item)
        elif item.suffix.lower() == ".csv" and item.is_file():
            paths += _csv_images(item)
        elif item.is_file():
            paths.append(str(item))
        else:
            raise TloptError(f"image, folder or CSV file not found: {item}")
    if not paths:
        raise TloptError(f"no images in {', '.join(map(str, inputs)) or 'the arguments'}")
    return paths


def _decoded(path: str, image_size: int) -> tuple[np.ndarray | None, str | None]:
    """The image's pixels, or why they cannot be had (the first line of TensorFlow's message)."""
    try:
        return data.decode_image(path, image_size), None
    except tf.errors.NotFoundError:
        return None, "file not found"
    except tf.errors.OpError as error:  # "{{function_node ...}} <reason> [Op:DecodeImage] name: "
        reason = error.message.splitlines()[0].split("}} ", 1)[-1].split(" [Op:", 1)[0]
        return None, f"does not decode as an image: {reason}"


@dataclass
class Predictions:
    """One row per predicted image (`path`, `predicted`, `p_<class>` for every class), and the files skipped (`path`, `reason`)."""

    table: pd.DataFrame
    skipped: pd.DataFrame


def _explanation_file(folder: Path, path: str, taken: set[str]) -> Path:
    """`<folder>/<image name>.png`, numbered when two images share a name."""
    stem, number = Path(path).stem, 1
    name = f"{stem}.png"
    while name in taken:
        number += 1
        name = f"{stem}-{number}.png"
    taken.add(name)
    return folder / name


def _write_overlay(path: str, cam: np.ndarray, target: Path) -> None:
    """The map over the image at its own resolution, as decoding gives it (RGB)."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False).numpy()
    with atomic_path(target, suffix=".png") as temporary:
        Image.fromarray(explain.overlay(image, cam)).save(temporary)


def _predicted_rows(loaded: ExportedModel, paths: list[str], images: np.ndarray, explain_dir: Path | None,
                    taken: set[str]) -> list[dict]:
    """The table's rows of a batch of decoded images (and their overlays, written to `explain_dir`)."""
    names = loaded.class_names
    probabilities = np.asarray(loaded.model.predict_on_batch(images))
    rows = [{PATH_COLUMN: path, "predicted": names[int(np.argmax(p))],
             **{probability_column(name): float(value) for name, value in zip(names, p)}}
            for path, p in zip(paths, probabilities)]
    if explain_dir is not None:
        maps, _ = explain.grad_cam(loaded.model, images, probabilities.argmax(axis=1))
        for row, cam in zip(rows, maps):
            row["explanation"] = str(_explanation_file(explain_dir, row[PATH_COLUMN], taken))
            _write_overlay(row[PATH_COLUMN], cam, Path(row["explanation"]))
    return rows


def predict_images(model: ExportedModel | str | os.PathLike, images: Iterable[str | os.PathLike],
                   batch_size: int = 32, explain_dir: str | os.PathLike | None = None,
                   progress: bool = True) -> Predictions:
    """Classify image files with an exported model (a `.keras` file of `tlopt export`, or one `export.load_model` loaded).

    `images`: files, folders, CSV files with a `path` column (`image_paths`). With
    `explain_dir`, a Grad-CAM overlay of each image's predicted class is written there as
    `<image name>.png`, and the table gains an `explanation` column. The files are decoded
    a batch at a time (in threads), so memory holds one batch however long the list; a
    progress bar shows on lists longer than one batch.
    """
    from tqdm.auto import tqdm

    paths = image_paths(images)
    loaded = model if isinstance(model, ExportedModel) else load_model(model)
    folder = None if explain_dir is None else Path(explain_dir)
    rows, skipped, taken = [], [], set()
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool, \
            tqdm(total=len(paths), unit="image", disable=not progress or len(paths) <= batch_size) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            decoded = list(pool.map(lambda path: _decoded(path, loaded.image_size), chunk))
            skipped += [(path, reason) for path, (image, reason) in zip(chunk, decoded) if image is None]
            good = [(path, image) for path, (image, _) in zip(chunk, decoded) if image is not None]
            if good:
                rows += _predicted_rows(loaded, [path for path, _ in good], np.stack([image for _, image in good]),
                                        folder, taken)
            bar.update(len(chunk))
    if not rows:
        path, reason = skipped[0]
        raise TloptError(f"none of the {len(paths)} file(s) is an image that decodes (first: {path}: {reason})")
    columns = [PATH_COLUMN, "predicted", *map(probability_column, loaded.class_names),
               *(["explanation"] if folder else [])]
    return Predictions(pd.DataFrame(rows, columns=columns), pd.DataFrame(skipped, columns=[PATH_COLUMN, "reason"]))


def write_predictions(predictions: Predictions, path: str | os.PathLike) -> Path:
    """The predictions table as CSV, written atomically."""
    with atomic_path(path, suffix=".csv") as temporary:
        predictions.table.to_csv(temporary, index=False)
    return Path(path)
