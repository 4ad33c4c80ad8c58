"""Atomic file writes: a process killed at any moment leaves the old file or the new one, never half of one.

Every file of a run folder is written here: a temporary file in the same folder, flushed
to disk, then renamed over the final name (a rename within one filesystem is atomic).
Files that concurrent trials share (the caches) are built once, under a lock
(`build_once`).
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary file next to `path` that replaces `path` when the block succeeds.

    A process killed mid-write leaves a hidden temporary file, never a half-written file
    under the final name that a later run would take for complete. `suffix` keeps the
    file type for writers that insist on one (Keras: `.weights.h5`, matplotlib: `.png`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(handle)
    try:
        yield Path(temporary)
        # mkstemp makes the file owner-only; run files (the report too) are meant to be shared.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def lock_file(path: str | os.PathLike) -> Path:
    """The lock file `locked` holds for `path`: `.<name>.lock` beside it."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


@contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock named after `path` (`.<name>.lock` beside it) for the block.

    Processes of one machine that lock the same path wait for each other; the operating
    system releases the lock of a killed process. The lock file stays (it is empty).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file(path), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(path: str | os.PathLike, build: Callable[[Path], None], suffix: str = ".tmp") -> Path:
    """Create `path` with `build(temporary)` unless it exists, atomically and by one process at a time.

    Concurrent trials that need the same cache file: the first builds it, the others wait
    for its lock and then find it; none reads a half-written file (the rename is atomic).
    """
    path = Path(path)
    if not path.is_file():
        with locked(path):
            if not path.is_file():
                with atomic_path(path, suffix=suffix) as temporary:
                    build(temporary)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace `path` with `data` in one rename, the data on disk before the rename."""
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_json(value: Any, indent: int | None = None) -> str:
    """JSON text of `value`; numpy scalars and paths become plain JSON values."""
    return json.dumps(value, indent=indent, default=_jsonable)


def atomic_write_json(path: str | os.PathLike, value: Any) -> Path:
    return atomic_write_text(path, to_json(value, indent=2) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def save_figure(figure: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save a matplotlib figure atomically (its format from the file's suffix)."""
    path = Path(path)
    with atomic_path(path, suffix=path.suffix) as temporary:
        figure.savefig(temporary, dpi=dpi)
    return path
