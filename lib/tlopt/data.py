"""The dataset: read a folder-per-class tree or a manifest, check its images, split it, feed it to Keras.

Labels are the class folder names (strings, also for Nerthus's `0`..`3`) or a manifest's
`label` column; a model sees integer indices into the sorted class names. Groups (a
patient, a video) never span two splits: they come from a manifest's `group` column, the
patient folders below the classes (`data.group_by: folder`) or a regex on the file name
(docs/method.md sections 6 and 13). A run's `split.csv` holds paths relative to the
dataset's root, recorded in `split_summary.json`, so that a run can follow its dataset to
another machine (`relocate`). An external test set (`data.external_test`) is read and
checked with the split and kept apart in `external.csv`, for one evaluation at the end.

Decoding and resizing an image costs far more than everything after it, so the decoded
pixels can be cached on disk once per (set of images, image size) and read from there by
every epoch and trial (`cache_images`).
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
import yaml
from PIL import Image
from sklearn.model_selection import train_test_split

from tlopt.errors import DataError
from tlopt.files import atomic_path, atomic_write_json, atomic_write_text, build_once, read_json
from tlopt.params import Experiment
from tlopt.store import RunFolder

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif"})
MANIFEST_COLUMNS = ["path", "label", "group", "split"]
SPLITS = ("train", "val", "test")
# The data section's keys that say where files are: a run may follow them elsewhere (`relocate`).
LOCATIONS = ("root", "manifest", "external_test")
# The formats tf.io.decode_image reads (MPO is a JPEG with extra frames); PIL opens more
# (TIFF, WebP, ...), which would fail in training.
_TF_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "GIF"})


def _files_below(folder: Path) -> list[Path]:
    """Every file below `folder`, at any depth, hidden files and folders (`.ipynb_checkpoints`, `._*`) left out."""
    found = []
    for directory, folders, files in os.walk(folder, followlinks=True):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        found += [Path(directory) / name for name in sorted(files) if not name.startswith(".")]
    return found


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _class_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    return sorted(entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def _patient(path: Path, class_dir: Path) -> str:
    """The group of an image under `group_by: folder`: the first folder below its class folder."""
    parts = path.relative_to(class_dir).parts
    if len(parts) < 2:
        raise DataError(f"data.group_by: folder: {path} lies directly in its class folder, not in a patient folder")
    return parts[0]


def _class_folder_images(root: Path, group_by: str) -> pd.DataFrame:
    """The images of every class folder, at any depth below it, as DataFrame[path, label(, group)]."""
    class_dirs = _class_dirs(root)
    if not class_dirs:
        raise DataError(f"no class folders in {root}: expected one folder of images per class")
    rows = []
    for class_dir in class_dirs:
        files = [path for path in _files_below(class_dir) if _is_image(path)]
        if not files:
            raise DataError(
                f"class folder has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}): {class_dir}"
            )
        rows += [(str(path), class_dir.name, *([_patient(path, class_dir)] if group_by == "folder" else []))
                 for path in files]
    columns = ["path", "label", *(["group"] if group_by == "folder" else [])]
    return pd.DataFrame(rows, columns=columns).sort_values(["label", "path"], ignore_index=True)


def discover(root: str | os.PathLike, group_by: str = "filename") -> pd.DataFrame:
    """List the images of a folder-per-class dataset as DataFrame[path, label].

    The label is the class folder's name. Images in folders below a class folder count for
    the class: patient folders (`<class>/<patient>/*.jpg`), and the doubled class folder of
    some Kvasir mirrors (`<class>/<class>/*.jpg`). With `group_by="folder"` a `group`
    column names each image's patient folder, the first folder below its class (the same
    name under two classes is one patient). Hidden entries (`.ipynb_checkpoints`, macOS
    `._*` files) are skipped. Files are matched by extension only; `find_bad_images`
    checks that they decode.
    """
    root = Path(os.path.abspath(root))
    frame = _class_folder_images(root, group_by)
    if frame["label"].nunique() == 1:
        raise DataError(
            f"only one class folder ({frame['label'].iloc[0]}) in {root}: classification needs at least two"
        )
    return frame


def _image_problem(path: str) -> str | None:
    """Why the file at `path` cannot be used as an image, or None if it decodes."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as image:
            image.verify()
        # verify() reads the structure only; a truncated JPEG fails only when decoded.
        with Image.open(path) as image:
            if image.format not in _TF_FORMATS:
                return f"format {image.format} is not read by TensorFlow (JPEG, PNG, BMP, GIF are)"
            # Decoding at reduced scale still reads every compressed byte, several times faster.
            image.draft("RGB", (image.width // 8, image.height // 8))
            image.load()
    except Exception as error:  # any failure to decode makes the file unusable
        return f"{type(error).__name__}: {error}"
    return None


def find_bad_images(frame: pd.DataFrame) -> pd.DataFrame:
    """Return the rows of `frame` whose files do not decode, with a `reason` column.

    A bad file would stop training mid-epoch, so notebooks check the whole dataset first.
    Decoding runs in threads: PIL releases the GIL while it decodes.
    """
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        reasons = list(pool.map(_image_problem, frame["path"]))
    bad = frame[["path", "label"]].assign(reason=reasons)
    return bad[bad["reason"].notna()].reset_index(drop=True)


def non_image_files(root: str | os.PathLike) -> pd.DataFrame:
    """Files in the class folders that `discover` leaves out (no image extension).

    Listed so that a user learns that a stray file was ignored, not silently dropped.
    """
    rows = [(str(path), class_dir.name, "not an image file (extension)")
            for class_dir in _class_dirs(Path(os.path.abspath(root)))
            for path in _files_below(class_dir) if not _is_image(path)]
    return pd.DataFrame(rows, columns=["path", "label", "reason"])


def _listing(items: Sequence[str], limit: int = 10) -> str:
    """`a, b, c` or `a, ..., j and 5 more`: an error stays one readable line."""
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def _row(position: int) -> int:
    """A data row's line in its CSV file (line 1 is the header)."""
    return position + 2


def read_image_list(path: str | os.PathLike) -> pd.DataFrame:
    """A researcher's manifest: a CSV file of images, `path,label` and optionally `group` and `split`.

    Paths are relative to the CSV's folder (absolute ones are kept); they come back absolute.
    An empty optional column counts as absent. Every problem is a one-line DataError naming
    the file and the row, column or value: a missing column, an empty cell, a split other
    than train/val/test, a path listed twice, an image that is not there.
    """
    path = Path(os.path.abspath(path))
    if not path.is_file():
        raise DataError(f"manifest not found: {path}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a CSV file of images: {' '.join(str(error).split())}") from None
    frame.columns = [str(column).strip() for column in frame.columns]
    for column in ("path", "label"):
        if column not in frame.columns:
            raise DataError(f"{path}: missing column '{column}' (columns: {', '.join(frame.columns)}); "
                            f"a manifest needs path and label, optionally group and split")
    frame = frame[[column for column in MANIFEST_COLUMNS if column in frame.columns]].apply(lambda c: c.str.strip())
    for column in ("group", "split"):
        if column in frame.columns and (frame[column] == "").all():
            frame = frame.drop(columns=column)
    for column in frame.columns:
        empty = np.flatnonzero(frame[column] == "")
        if empty.size:
            hint = "" if column in ("path", "label") else f" (give every row a {column}, or none)"
            raise DataError(f"{path}: row {_row(empty[0])}: column '{column}' is empty{hint}")
    if "split" in frame.columns:
        unknown = np.flatnonzero(~frame["split"].isin(SPLITS))
        if unknown.size:
            value = frame["split"].iloc[unknown[0]]
            raise DataError(f"{path}: row {_row(unknown[0])}: column 'split': {value!r} is not train, val or test")
    frame["path"] = [os.path.normpath(path.parent / image) for image in frame["path"]]
    repeated = frame["path"].duplicated(keep=False)
    if repeated.any():
        rows = np.flatnonzero(frame["path"] == frame["path"][repeated].iloc[0])
        raise DataError(f"{path}: {frame['path'][repeated].iloc[0]} is listed twice (rows "
                        f"{_row(rows[0])} and {_row(rows[1])})")
    missing = np.flatnonzero(~frame["path"].map(os.path.isfile))
    if missing.size:
        more = f" ({missing.size} images are missing)" if missing.size > 1 else ""
        raise DataError(f"{path}: row {_row(missing[0])}: image not found: {frame['path'].iloc[missing[0]]}{more}")
    return frame


def groups_on_two_sides(frame: pd.DataFrame) -> dict[str, list[str]]:
    """Groups whose images lie in more than one split (a leak), with those splits."""
    sides = frame.groupby("group")["split"].unique()
    return {str(group): sorted(splits, key=SPLITS.index) for group, splits in sides.items() if len(splits) > 1}


def check_given_split(frame: pd.DataFrame, source: str | os.PathLike) -> None:
    """A split taken as given (a manifest's `split` column): two classes or more, each in train and val,
    and no group on two sides (the error lists the groups)."""
    names = class_names(frame)
    if len(names) < 2:
        raise DataError(f"{source}: only one class ({names[0]}): classification needs at least two")
    counts = pd.crosstab(frame["label"], frame["split"]).reindex(columns=list(SPLITS), fill_value=0)
    for split_name in ("train", "val"):
        lacking = counts.index[counts[split_name] == 0].tolist()
        if lacking:
            raise DataError(f"{source}: column split: class(es) {_listing(lacking)} have no {split_name} images")
    if "group" in frame.columns:
        leaks = groups_on_two_sides(frame)
        if leaks:
            listed = [f"{group} ({', '.join(splits)})" for group, splits in leaks.items()]
            raise DataError(f"{source}: {len(leaks)} group(s) on two sides of the split: {_listing(listed)}")


def split_root(config: Experiment) -> str:
    """The folder `split.csv`'s paths are relative to: `data.root`, or the manifest's folder."""
    settings = config.data
    return settings.root if settings.root is not None else str(Path(settings.manifest).parent)


def read_dataset(config: Experiment) -> pd.DataFrame:
    """The dataset's images, every input checked, none decoded: DataFrame[path, label(, group)(, split)].

    A manifest gives `group` and `split` when it has those columns (a given split is
    checked: `check_given_split`); a folder tree gives `group` with `data.group_by: folder`.
    """
    settings = config.data
    if settings.manifest is None:
        return discover(settings.root, settings.group_by)
    frame = read_image_list(settings.manifest)
    if "split" in frame.columns:
        check_given_split(frame, settings.manifest)
    elif frame["label"].nunique() < 2:
        raise DataError(f"{settings.manifest}: only one class ({frame['label'].iloc[0]}): classification needs "
                        f"at least two")
    return frame


def read_external_test(config: Experiment, names: Sequence[str]) -> pd.DataFrame:
    """`data.external_test` (a folder per class, or a manifest) as DataFrame[path, label].

    Its classes must be the training data's `names`: a class it lacks or adds is a
    DataError naming it, since its numbers would not be comparable with the internal test.
    """
    location = Path(config.data.external_test)
    if not location.exists():
        raise DataError(f"data.external_test: not found: {location}")
    if location.is_file():
        frame = read_image_list(location)[["path", "label"]]
    else:
        frame = _class_folder_images(location, "filename")
    lacking, adding = sorted(set(names) - set(frame["label"])), sorted(set(frame["label"]) - set(names))
    problems = ([f"lacks class(es) {_listing(lacking)}"] if lacking else []) + (
        [f"adds class(es) {_listing(adding)} the training data does not have"] if adding else [])
    if problems:
        raise DataError(f"data.external_test {location}: {'; '.join(problems)}")
    return frame


def check_dataset(config: Experiment) -> None:
    """Check the data section's inputs without decoding an image: `tlopt run` calls it before it makes the
    run folder, so that a mistyped `data.root` costs an error line, not a run folder to delete.

    A demo dataset is generated by notebook 00, so there is nothing to check yet.
    """
    if config.data.demo is not None:
        return
    frame = read_dataset(config)
    if config.data.external_test is not None:
        read_external_test(config, class_names(frame))


def _skipped(frame: pd.DataFrame, root: str | None, on_bad_image: str) -> pd.DataFrame:
    """The files of `frame` (and non-images under a folder `root`) that are not readable images: skipped
    with a warning that lists them, or a DataError (`data.on_bad_image: error`)."""
    skipped = pd.concat([non_image_files(root) if root else None, find_bad_images(frame)], ignore_index=True)
    if len(skipped):
        listing = "; ".join(f"{path} ({reason})" for path, reason in zip(skipped["path"], skipped["reason"]))
        if on_bad_image == "error":
            raise DataError(
                f"{len(skipped)} file(s) are not readable images: {listing} "
                f"(data.on_bad_image: skip leaves them out)"
            )
        warnings.warn(f"skipped {len(skipped)} file(s) that are not readable images: {listing}", stacklevel=3)
    return skipped


def _relative(frame: pd.DataFrame, root: str) -> pd.DataFrame:
    return frame.assign(path=[Path(os.path.relpath(path, root)).as_posix() for path in frame["path"]])


def _absolute(frame: pd.DataFrame, root: str | None) -> pd.DataFrame:
    """Paths joined to `root`; absolute ones (a run of the first version) stay as they are."""
    if root is None:
        return frame
    return frame.assign(path=[os.path.normpath(os.path.join(root, path)) for path in frame["path"]])


def _counts(frame: pd.DataFrame) -> dict[str, dict[str, int]]:
    counts = frame.groupby(["label", "split"]).size().unstack(fill_value=0)
    return {label: {k: int(v) for k, v in row.items()} for label, row in counts.iterrows()}


def prepare_split(config: Experiment, run: RunFolder | str | os.PathLike) -> pd.DataFrame:
    """The run's split, made once: read the dataset, check every image, split, write split.csv and its summary.

    A run that has its `split.csv` keeps it: resuming must never reshuffle the data.
    A manifest's `split` column is taken as given (checked: `check_given_split`);
    otherwise the images are split by `split`, grouped when they have groups. Unreadable
    files are skipped with a warning that lists them (`data.on_bad_image: skip`) or stop
    the run (`error`); either way the summary (`split_summary.json`) records them for the
    report. The external test set, if any, is checked against the split's classes and
    kept in `external.csv`. Both files hold paths relative to their root, which the
    summary records (`relocate` moves it).
    """
    run = RunFolder(run)
    if run.split_file.is_file():
        return read_split(run)
    settings = config.data
    if settings.demo:
        from tlopt.demo_data import generate_demo_dataset

        generate_demo_dataset(settings.root, **settings.demo.model_dump(), seed=config.seed)
    images = read_dataset(config)
    skipped = _skipped(images, settings.root, settings.on_bad_image)
    images = images[~images["path"].isin(skipped["path"])]
    given = "split" in images.columns
    if given:
        frame = images if "group" in images.columns else images.assign(group=_names(images["path"]))
        frame = frame[MANIFEST_COLUMNS]
        check_given_split(frame, settings.manifest)  # again: a skipped file may have emptied a class
    else:
        frame = split(images, settings.val_fraction, settings.test_fraction, config.seed, settings.group_pattern)
    root = split_root(config)
    external = None
    if settings.external_test is not None:
        external = read_external_test(config, class_names(frame))
        external_skipped = _skipped(external, None, settings.on_bad_image)
        external = external[~external["path"].isin(external_skipped["path"])]
        external = external.assign(group=_names(external["path"]), split="external")
        skipped = pd.concat([skipped, external_skipped], ignore_index=True)
    summary = {
        "root": root,
        "images": len(frame),
        "classes": class_names(frame),
        "source": "manifest" if settings.manifest else "folders",
        "split_given": given,
        "grouped_by": _grouping(config, images),
        "group_pattern": settings.group_pattern,
        "counts": _counts(frame),
        "groups": {name: int(count) for name, count in frame.groupby("split")["group"].nunique().items()},
        "skipped": skipped.to_dict("records"),
        "external": None,
    }
    if external is not None:
        external_root = _external_root(settings.external_test)
        write_manifest(_relative(external, external_root), run.external_file)
        summary["external"] = {"root": external_root, "images": len(external),
                               "counts": {k: int(v) for k, v in external["label"].value_counts().sort_index().items()}}
    write_manifest(_relative(frame, root), run.split_file)
    atomic_write_json(run.split_summary_file, summary)
    return read_split(run)


def _grouping(config: Experiment, images: pd.DataFrame) -> str | None:
    """What the split's groups are, in words; None when every image is split on its own."""
    if "group" in images.columns:
        return "the manifest's group column" if config.data.manifest else "patient folders"
    pattern = config.data.group_pattern
    return f"file names matching {pattern}" if pattern else None


def _external_root(location: str) -> str:
    """The folder external.csv's paths are relative to: the external test folder, or its manifest's folder."""
    return str(Path(location).parent) if Path(location).is_file() else location


def read_split(run: RunFolder | str | os.PathLike) -> pd.DataFrame:
    """The run's split manifest (`split.csv`) with absolute paths, joined to the root its summary records."""
    run = RunFolder(run)
    summary = read_json(run.split_summary_file) if run.split_summary_file.is_file() else {}
    return _absolute(read_manifest(run.split_file), summary.get("root"))


def read_external(run: RunFolder | str | os.PathLike) -> pd.DataFrame | None:
    """The run's external test set (`external.csv`, split "external") with absolute paths; None without one."""
    run = RunFolder(run)
    if not run.external_file.is_file():
        return None
    return _absolute(read_manifest(run.external_file), read_split_summary(run)["external"]["root"])


def read_split_summary(run: RunFolder | str | os.PathLike) -> dict:
    """What `prepare_split` recorded: counts per class and split, groups per split, the skipped files,
    the roots of the split's and the external test set's paths."""
    return read_json(RunFolder(run).split_summary_file)


def _missing(paths: pd.Series, what: str, root: str) -> None:
    missing = paths[~paths.map(os.path.isfile)]
    if len(missing):
        raise DataError(f"{root}: {len(missing)} of the {len(paths)} images of {what} are not there "
                        f"(first: {missing.iloc[0]})")


def relocate(run: RunFolder | str | os.PathLike, root: str | os.PathLike | None = None,
             external_test: str | os.PathLike | None = None) -> None:
    """Record where a run folder and its dataset are now (`tlopt run PARAMS --resume DIR [--data-root NEWROOT]`).

    The run folder's own place becomes its `results_dir`: a run folder copied to another
    machine resumes there. `root` is the dataset's new folder (the folder per class, or
    the manifest's folder); `external_test` the external test set's new folder or
    manifest. Every image of the split (and of the external set) must be there; then
    `split_summary.json` records the new roots and `params.yaml` the new locations, so
    that the resumed run and its notebooks read the moved files. A split of the first
    version, with absolute paths, is made relative to its old root first. A run that
    stopped before its split only records the new locations.
    """
    run = RunFolder(run)
    summary = read_split_summary(run) if run.split_summary_file.is_file() else {}
    params = run.read_params()
    recorded = yaml.safe_dump(params, sort_keys=False)
    params["results_dir"] = str(run.path.parent)
    settings = params["data"]
    if root is not None:
        root = os.path.abspath(root)
        if run.split_file.is_file():
            old = summary.get("root") or settings["root"]
            relative = _relative(_absolute(read_manifest(run.split_file), old), old)
            if relative["path"].str.startswith("../").any():
                raise DataError(f"{run.split_file}: images outside the dataset's root {old} cannot move with it")
            _missing(_absolute(relative, root)["path"], run.split_file.name, root)
            write_manifest(relative, run.split_file)
            summary["root"] = root
        if settings.get("manifest"):
            settings["manifest"] = os.path.join(root, Path(settings["manifest"]).name)
        else:
            settings["root"] = root
    if external_test is not None:
        if not settings.get("external_test"):
            raise DataError(f"{run} has no external test set to move (data.external_test was not set)")
        external_test = os.path.abspath(external_test)
        if run.external_file.is_file():
            external_root = _external_root(external_test)
            _missing(_absolute(read_manifest(run.external_file), external_root)["path"], run.external_file.name,
                     external_root)
            summary["external"]["root"] = external_root
        settings["external_test"] = external_test
    if summary and (root is not None or external_test is not None):
        atomic_write_json(run.split_summary_file, summary)
    if yaml.safe_dump(params, sort_keys=False) != recorded:
        atomic_write_text(run.params_file, yaml.safe_dump(params, sort_keys=False))


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if not 0 <= test_fraction < 1:
        raise DataError(f"test_fraction must be at least 0 and below 1, got {test_fraction}")
    if val_fraction + test_fraction >= 1:
        raise DataError(
            f"val_fraction + test_fraction must be below 1 to leave training images, "
            f"got {val_fraction} + {test_fraction}"
        )


def _names(paths: pd.Series) -> pd.Series:
    return paths.map(lambda path: Path(path).name)


def _groups(paths: pd.Series, group_pattern: str | None) -> pd.Series:
    """The group of each file: the pattern's first capture group on the file name, or the name."""
    names = _names(paths)
    if group_pattern is None:
        return names
    try:
        regex = re.compile(group_pattern)
    except re.error as error:
        raise DataError(
            f"group_pattern {group_pattern!r} is not a valid regular expression: {error}"
        ) from None
    if regex.groups == 0:
        raise DataError(f"group_pattern {group_pattern!r} has no capture group, e.g. 'bowel_(\\d+)_'")

    def group_of(name: str) -> str:
        match = regex.search(name)
        if match is None or match.group(1) is None:
            raise DataError(f"file name {name!r} does not match group_pattern {group_pattern!r}")
        return match.group(1)

    return names.map(group_of)


def _split_rows(frame: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.Series:
    """Split each class's images on their own with scikit-learn.

    Each class gives round(fraction x its images), at least one, to validation (and test);
    integer counts keep float fuzz (0.2 + 0.1 > 0.3) from moving an image.
    """
    result = pd.Series("train", index=frame.index)
    for label, rows in frame.groupby("label"):
        n_val = max(1, round(len(rows) * val_fraction))
        n_test = max(1, round(len(rows) * test_fraction)) if test_fraction > 0 else 0
        if len(rows) - n_val - n_test < 1:
            raise DataError(
                f"class {label!r} has {len(rows)} image(s): too few for val_fraction={val_fraction}, "
                f"test_fraction={test_fraction} (every split needs at least one image of each class)"
            )
        _, held = train_test_split(rows.index, test_size=n_val + n_test, random_state=seed)
        result[held] = "val"
        if n_test:
            _, test = train_test_split(held, test_size=n_test, random_state=seed)
            result[test] = "test"
    return result


def _assign_groups(sizes: pd.Series, targets: dict[str, float], rng: np.random.Generator) -> dict[str, str]:
    """Assign whole groups to splits so that image counts approach `targets` (image counts).

    Groups come in random order; the first goes to each split in turn so that no split is
    empty, then each next group goes to the split furthest below its target.
    """
    filled = dict.fromkeys(targets, 0)
    assignment = {}
    for position, group in enumerate(rng.permutation(sizes.index.to_numpy())):
        if position < len(targets):
            name = list(targets)[position]
        else:
            name = max(targets, key=lambda split_name: targets[split_name] - filled[split_name])
        assignment[group] = name
        filled[name] += sizes[group]
    return assignment


def _split_groups(frame: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.Series:
    """Split whole groups, class by class (a group counts for its most frequent label).

    scikit-learn's group splitters either split by group count (GroupShuffleSplit) or into
    equal folds (StratifiedGroupKFold); neither guarantees that a class with two groups
    (Nerthus's class 0) gets one in training and one in validation.
    """
    fractions = {"train": 1 - val_fraction - test_fraction, "val": val_fraction}
    if test_fraction > 0:
        fractions["test"] = test_fraction
    group_labels = frame.groupby("group")["label"].agg(lambda labels: labels.mode().iloc[0])
    group_sizes = frame.groupby("group").size()
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for label in sorted(group_labels.unique()):
        sizes = group_sizes[group_labels.index[group_labels == label]]
        class_fractions = fractions
        if len(sizes) < 2:
            raise DataError(
                f"class {label!r} has {len(sizes)} group(s) ({len(frame[frame['label'] == label])} images): "
                f"too few for a train/val split that keeps groups whole (needs at least 2)"
            )
        if len(sizes) < len(fractions):
            # Nerthus's class 0 has two videos: one trains, one validates, none is left to test.
            warnings.warn(
                f"class {label!r} has only {len(sizes)} groups: it gets one in train and one in val "
                f"and none in test",
                stacklevel=3,
            )
            class_fractions = {name: f for name, f in fractions.items() if name != "test"}
        targets = {name: fraction * sizes.sum() for name, fraction in class_fractions.items()}
        assignment |= _assign_groups(sizes, targets, rng)
    return frame["group"].map(assignment)


def split(
    frame: pd.DataFrame,
    val_fraction: float = 0.3,
    test_fraction: float = 0.0,
    seed: int = 0,
    group_pattern: str | None = None,
) -> pd.DataFrame:
    """Add `group` and `split` (train/val/test) columns: a seeded split stratified by label.

    Without groups every image is split on its own (the thesis's 70/30 per class) and its
    group is its file name. A `group` column of `frame` (a manifest's, or the patient
    folders of `discover(root, "folder")`) or a pattern (Nerthus: `bowel_(\\d+)_`, whose
    first capture group on the file name is the group) groups the images, and a group never
    spans two splits, because near-duplicate images of one patient or video on both sides
    inflate validation accuracy.
    """
    _check_fractions(val_fraction, test_fraction)
    grouped = "group" in frame.columns or group_pattern is not None
    groups = frame["group"] if "group" in frame.columns else _groups(frame["path"], group_pattern)
    result = frame[["path", "label"]].assign(group=groups)
    splitter = _split_groups if grouped else _split_rows
    return result.assign(split=splitter(result, val_fraction, test_fraction, seed))


def write_manifest(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write the split manifest (path,label,group,split) atomically: a reader never sees half a file."""
    missing = [column for column in MANIFEST_COLUMNS if column not in frame.columns]
    if missing:
        raise DataError(f"cannot write manifest {path}: the frame lacks column(s) {', '.join(missing)}")
    with atomic_path(path) as temporary:
        frame[MANIFEST_COLUMNS].to_csv(temporary, index=False)


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read a split manifest; every column stays a string (Nerthus labels `0`..`3` are names)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split manifest not found: {path}")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [column for column in MANIFEST_COLUMNS if column not in frame.columns]
    if missing:
        raise DataError(f"split manifest {path} lacks column(s) {', '.join(missing)}")
    return frame[MANIFEST_COLUMNS]


def class_names(frame: pd.DataFrame) -> list[str]:
    """The sorted labels: index i of a model's output is class_names(frame)[i]."""
    return sorted(frame["label"].unique())


def label_indices(frame: pd.DataFrame, class_names: list[str]) -> np.ndarray:
    """The int32 class index of each row's label; DataError for a label outside `class_names`."""
    indices = {name: index for index, name in enumerate(class_names)}
    unknown = sorted(set(frame["label"]) - set(indices))
    if unknown:
        raise DataError(f"label(s) {', '.join(map(repr, unknown))} not among class_names {class_names}")
    return frame["label"].map(indices).to_numpy(dtype=np.int32)


def _load_image(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """Read, decode and resize one image to a uint8 (size, size, 3) tensor.

    Rounding the resized pixels to uint8 (as PIL-based loaders such as the thesis's Keras
    ImageDataGenerator do) lets the decoded-image cache hold exactly what decoding gives.
    """
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image = tf.image.resize(image, (image_size, image_size), method="bilinear")
    image = tf.saturate_cast(tf.round(image), tf.uint8)
    image.set_shape((image_size, image_size, 3))
    return image


def decode_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """One image file as (size, size, 3) uint8 pixels, decoded and resized exactly as training decodes it.

    `tf.errors.OpError` (InvalidArgumentError, NotFoundError) when TensorFlow cannot decode the file.
    """
    return _load_image(tf.constant(os.fspath(path)), image_size).numpy()


def files_key(paths: Sequence[str], *extra: object) -> str:
    """A short hash of the files (path, size, modification time, in order) and `extra` values.

    Caches derived from images are named by it: a changed manifest, a replaced image (the
    demo data regenerated in place) or another image size gives another key, so a stale
    cache is never read.
    """
    digest = hashlib.sha256(repr(extra).encode())
    for path in paths:
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise DataError(f"image not found: {path}") from None
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class ImageCache:
    """The decoded, resized uint8 pixels of a set of images, memory-mapped from one .npy file.

    Reading a batch copies only that batch from the page cache: Kvasir at 299 px (2.1 GB)
    never has to fit in memory, nor in a TensorFlow graph.
    """

    path: Path
    image_size: int
    paths: pd.Index
    pixels: np.ndarray

    def positions(self, paths: pd.Series) -> np.ndarray:
        """The row of each image in `pixels`; DataError for an image the cache lacks."""
        positions = self.paths.get_indexer(paths)
        if (positions < 0).any():
            missing = paths[positions < 0].iloc[0]
            raise DataError(f"image {missing} is not in the image cache {self.path}")
        return positions


def _build_image_cache(paths: list[str], image_size: int, temporary: Path) -> None:
    """Decode every image once (in parallel) into a new .npy file (`build_once` renames it into place)."""
    decoded = (
        tf.data.Dataset.from_tensor_slices(paths)
        .map(lambda file: _load_image(file, image_size), num_parallel_calls=tf.data.AUTOTUNE)
        .batch(64)
        .prefetch(tf.data.AUTOTUNE)
    )
    pixels = np.lib.format.open_memmap(
        temporary, mode="w+", dtype=np.uint8, shape=(len(paths), image_size, image_size, 3)
    )
    start = 0
    try:
        for batch in decoded.as_numpy_iterator():
            pixels[start : start + len(batch)] = batch
            start += len(batch)
    except tf.errors.InvalidArgumentError as error:
        raise DataError(
            f"an image does not decode while building the image cache (find_bad_images lists "
            f"such files): {error.message.splitlines()[0]}"
        ) from None
    pixels.flush()
    del pixels


def cache_images(frame: pd.DataFrame, image_size: int, cache_dir: str | os.PathLike) -> ImageCache:
    """The decoded-image cache of the frame's images at `image_size`, built on first use.

    One file `images-<size>-<key>.npy` in `cache_dir` holds every image of the frame, so
    that the training, validation and test rows of a manifest, every epoch and every trial
    share one decoding. The key (`files_key`) changes with the set of images, their files
    and the size; an unchanged manifest reuses the file. Concurrent trials build it once.
    """
    paths = sorted(set(frame["path"]))
    path = Path(cache_dir) / f"images-{image_size}-{files_key(paths, image_size)}.npy"
    build_once(path, lambda temporary: _build_image_cache(paths, image_size, temporary), suffix=".npy")
    return ImageCache(path, image_size, pd.Index(paths), np.load(path, mmap_mode="r"))


FLIP_VARIANTS: tuple[str, ...] = ("none", "horizontal", "vertical", "both")


def _flip_image(image: tf.Tensor, variant: tf.Tensor) -> tf.Tensor:
    image = tf.cond(variant % 2 == 1, lambda: tf.reverse(image, axis=[1]), lambda: image)
    return tf.cond(variant // 2 == 1, lambda: tf.reverse(image, axis=[0]), lambda: image)


def flip_images(images: tf.Tensor, variants: tf.Tensor | int) -> tf.Tensor:
    """Flip each image of a NHWC batch by its variant (an index into FLIP_VARIANTS).

    `variants`: one per image, or one Python int for the whole batch. Bit 0 of a variant
    flips horizontally, bit 1 vertically. Image by image, so that only the flips drawn
    are computed: a batched `tf.where` of flipped and unflipped copies costs more than
    decoding a small JPEG. One variant for the batch is one reversal, no graph loop.
    """
    if isinstance(variants, int):
        axes = [axis for bit, axis in ((1, 2), (2, 1)) if variants & bit]
        return tf.reverse(images, axis=axes) if axes else images
    variants = tf.broadcast_to(tf.cast(variants, tf.int32), tf.shape(images)[:1])
    signature = tf.TensorSpec(images.shape[1:], images.dtype)
    return tf.map_fn(lambda pair: _flip_image(*pair), (images, variants), fn_output_signature=signature)


def flip_array(images: np.ndarray, variants: np.ndarray) -> np.ndarray:
    """`flip_images` for a numpy NHWC batch, in place: views and copies, no TensorFlow ops.

    The decoded-image cache's reader flips here, on the batch it has just copied from
    the cache, where `flip_images` costs a graph loop. A horizontal flip moves whole
    pixels: seen as one 3-byte item a pixel, it copies items, not single bytes (measured:
    twice as fast at 299 px). `images` must be C-contiguous, as a fresh batch is.
    """
    pixels = images.view(np.dtype((np.void, images.shape[-1] * images.itemsize)))
    for index in np.flatnonzero(variants & 1):
        pixels[index] = pixels[index, :, ::-1]
    for index in np.flatnonzero(variants & 2):
        pixels[index] = pixels[index, ::-1]
    return images


def flip_variants(draws: tf.Tensor) -> tf.Tensor:
    """The flip variants (int32, 0..3) of the draws of `epoch_rows`: each draw modulo 4."""
    return tf.cast(tf.bitwise.bitwise_and(draws, len(FLIP_VARIANTS) - 1), tf.int32)


def epoch_rows(count: int, training: bool, seed: int = 0) -> tf.data.Dataset:
    """The (row, flip draw) pairs of one epoch over `count` rows; `flip_variants` of a draw is its flip.

    Training: every row once, in a seeded order that changes in every epoch, each with a
    flip variant drawn uniformly (that is, horizontal and vertical flips with probability
    1/2 each, independently), also anew in every epoch: the thesis's augmentation.
    Otherwise: rows in order, unflipped. The image pipeline and the cached-feature
    pipeline both draw from here, so for one seed they see the same images in the same
    order with the same flips. No `map` here: each map of a pipeline costs milliseconds
    whenever Keras starts an epoch (measured: about 5 ms), as much as a cached epoch's work.
    """
    rows = tf.data.Dataset.range(count)
    if not training:
        return tf.data.Dataset.zip(rows, tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).repeat())
    rows = rows.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    return tf.data.Dataset.zip(rows, tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True))


def make_dataset(
    frame: pd.DataFrame,
    class_names: list[str],
    image_size: int,
    batch_size: int,
    training: bool,
    seed: int = 0,
    cache: ImageCache | None = None,
) -> tf.data.Dataset:
    """A tf.data pipeline of (uint8 NHWC images, int32 labels) batches for Keras.

    Training: the whole frame is shuffled again in every epoch (seeded) and images are
    randomly flipped horizontally and vertically, the thesis's only augmentation.
    Otherwise: the frame's order, no augmentation. The backbone's `preprocess_input` is
    the transfer model's first layer (`backbones.Preprocessing`). With `cache` (see
    `cache_images`) the pixels are read from it instead of decoded, and flipped as they
    are read, in one step per batch; they are the same pixels.
    """
    if frame.empty:
        raise DataError("cannot make a dataset of an empty frame: the split has no images")
    labels = tf.constant(label_indices(frame, class_names))

    rows = epoch_rows(len(frame), training, seed)
    if cache is None:
        paths = tf.constant(frame["path"].to_numpy(dtype=str))

        def flip(images: tf.Tensor, draws: tf.Tensor) -> tf.Tensor:
            return flip_images(images, flip_variants(draws)) if training else images

        batches = rows.map(
            lambda row, draw: (_load_image(tf.gather(paths, row), image_size), draw, tf.gather(labels, row)),
            num_parallel_calls=tf.data.AUTOTUNE,
        ).batch(batch_size)
        batches = batches.map(
            lambda images, draws, labels: (flip(images, draws), labels), num_parallel_calls=tf.data.AUTOTUNE
        )
    else:
        if cache.image_size != image_size:
            raise DataError(f"the image cache {cache.path} holds {cache.image_size} px images, not {image_size} px")
        positions = tf.constant(cache.positions(frame["path"]))
        shape = (None, image_size, image_size, 3)

        def read_flipped(positions: np.ndarray, variants: np.ndarray) -> np.ndarray:
            return flip_array(cache.pixels[positions], variants)

        def read(rows: tf.Tensor, draws: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            if training:
                arguments = [tf.gather(positions, rows), flip_variants(draws)]
                images = tf.numpy_function(read_flipped, arguments, tf.uint8, stateful=False)
            else:
                images = tf.numpy_function(cache.pixels.__getitem__, [tf.gather(positions, rows)], tf.uint8, stateful=False)
            return tf.ensure_shape(images, shape), tf.gather(labels, rows)

        batches = rows.batch(batch_size).map(read, num_parallel_calls=tf.data.AUTOTUNE)
    return batches.prefetch(tf.data.AUTOTUNE)
