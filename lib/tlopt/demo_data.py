"""A small synthetic, Kvasir-like dataset, so that the whole system runs offline in minutes.

Every class is drawn on a noisy pink tissue background with a black endoscope frame; classes
differ in colour, texture and shape, and each image varies in position, scale, rotation and
brightness. Kvasir's nuisances (a text overlay, the green-on-black scope position box in a
corner) appear in random images of every class, so a model must learn to ignore them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tlopt.errors import DataError

MARKER = ".demo.json"
# Bump when the drawing changes, so that existing demo folders are regenerated.
GENERATOR_VERSION = 1

Canvas = np.ndarray  # (size, size, 3) float32, 0-255


def _rotated(x: np.ndarray, y: np.ndarray, angle: float, cx: float, cy: float) -> list[tuple[float, float]]:
    """Points (x, y) rotated by `angle` and moved to the centre (cx, cy), for ImageDraw."""
    cos, sin = np.cos(angle), np.sin(angle)
    return list(zip(cx + x * cos - y * sin, cy + x * sin + y * cos, strict=True))


def _ellipse(cx: float, cy: float, rx: float, ry: float, angle: float) -> list[tuple[float, float]]:
    """The outline of a rotated ellipse, as a polygon."""
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    return _rotated(rx * np.cos(t), ry * np.sin(t), angle, cx, cy)


def _paint(canvas: Canvas, shape: str, xy: list, colour: tuple, blur: float, **options) -> Canvas:
    """Paint `colour` where ImageDraw's `shape` ("polygon", "line", ...) fills, with soft edges."""
    mask = Image.new("L", canvas.shape[1::-1], 0)
    getattr(ImageDraw.Draw(mask), shape)(xy, fill=255, **options)
    alpha = np.asarray(mask.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32)[..., None] / 255
    return canvas * (1 - alpha) + np.asarray(colour, dtype=np.float32) * alpha


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a coarse random grid, smoothly upsampled."""
    grid = Image.fromarray(rng.normal(0, 0.5, (cells, cells)).astype(np.float32), mode="F")
    return np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC))


def _placement(rng: np.random.Generator, size: int) -> tuple[float, float, float, float]:
    """A random centre, radius and angle for the class's main structure."""
    cx, cy = rng.uniform(0.3, 0.7, 2) * size
    return cx, cy, rng.uniform(0.14, 0.28) * size, rng.uniform(0, np.pi)


def _dyed_lifted_polyp(canvas: Canvas, rng: np.random.Generator, size: int) -> Canvas:
    """A round bluish blob (indigo carmine under a lifted polyp) with a specular highlight."""
    cx, cy, r, angle = _placement(rng, size)
    ry = r * rng.uniform(0.65, 1.0)
    canvas = _paint(canvas, "polygon", _ellipse(cx, cy, r, ry, angle), (70, 105, 195), size / 40)
    hx, hy = cx - 0.3 * r, cy - 0.3 * ry
    return _paint(canvas, "ellipse", [hx, hy, hx + r / 4, hy + r / 5], (235, 240, 255), size / 80)


def _dyed_resection_margin(canvas: Canvas, rng: np.random.Generator, size: int) -> Canvas:
    """A blue ring around a pale resection bed."""
    cx, cy, r, angle = _placement(rng, size)
    r *= 1.3
    ry = r * rng.uniform(0.6, 0.95)
    canvas = _paint(canvas, "polygon", _ellipse(cx, cy, r, ry, angle), (60, 90, 185), size / 50)
    return _paint(canvas, "polygon", _ellipse(cx, cy, 0.6 * r, 0.6 * ry, angle), (235, 205, 190), size / 50)


def _esophagitis(canvas: Canvas, rng: np.random.Generator, size: int) -> Canvas:
    """Streaky dark-red erosions running roughly in one direction."""
    angle = rng.uniform(0, np.pi)
    for _ in range(rng.integers(4, 8)):
        cx, cy = rng.uniform(0.2, 0.8, 2) * size
        half = rng.uniform(0.2, 0.45) * size
        line = _rotated(np.array([-half, half]), np.zeros(2), angle + rng.normal(0, 0.15), cx, cy)
        width = max(1, round(rng.uniform(0.02, 0.05) * size))
        canvas = _paint(canvas, "line", line, (150, 25, 35), size / 100, width=width)
    return canvas


def _normal_cecum(canvas: Canvas, rng: np.random.Generator, size: int) -> Canvas:
    """A smooth pale field crossed by faint folds."""
    canvas = canvas * 0.3 + np.array([235, 185, 170], dtype=np.float32) * 0.7
    for _ in range(rng.integers(1, 3)):
        cx, cy, r, angle = _placement(rng, size)
        start = np.degrees(angle)
        canvas = _paint(
            canvas,
            "arc",
            [cx - 2 * r, cy - r, cx + 2 * r, cy + r],
            (200, 130, 125),
            size / 60,
            start=start,
            end=start + 140,
            width=max(1, size // 40),
        )
    return canvas


def _normal_pylorus(canvas: Canvas, rng: np.random.Generator, size: int) -> Canvas:
    """A dark round opening with a pinker halo."""
    cx, cy, r, angle = _placement(rng, size)
    ry = r * rng.uniform(0.7, 1.0)
    canvas = _paint(canvas, "polygon", _ellipse(cx, cy, 1.5 * r, 1.5 * ry, angle), (225, 120, 120), size / 20)
    return _paint(canvas, "polygon", _ellipse(cx, cy, 0.6 * r, 0.6 * ry, angle), (45, 15, 20), size / 60)


def _normal_z_line(canvas: Canvas, rng: np.random.Generator, size: int) -> Canvas:
    """A wavy border between pale oesophageal and red gastric mucosa."""
    t = np.linspace(-size, size, 24)
    wave = rng.uniform(-0.15, 0.15) * size + rng.uniform(0.03, 0.08) * size * np.sin(
        t / size * rng.uniform(6, 12)
    )
    # The border, closed through two far points on one side: that side is oesophagus.
    x, y = np.append(t, [size, -size]), np.append(wave, [-2 * size, -2 * size])
    pale = _rotated(x, y, rng.uniform(0, 2 * np.pi), size / 2, size / 2)
    return _paint(canvas, "polygon", pale, (235, 210, 200), size / 50)


def _polyp(canvas: Canvas, rng: np.random.Generator, size: int) -> Canvas:
    """A bumpy reddish bulge with a dark rim and bright bumps."""
    cx, cy, r, angle = _placement(rng, size)
    ry = r * rng.uniform(0.7, 1.0)
    canvas = _paint(canvas, "polygon", _ellipse(cx, cy, 1.1 * r, 1.1 * ry, angle), (130, 45, 45), size / 60)
    canvas = _paint(canvas, "polygon", _ellipse(cx, cy, r, ry, angle), (225, 110, 95), size / 60)
    for _ in range(rng.integers(4, 8)):
        bx, by = cx + rng.uniform(-0.6, 0.6) * r, cy + rng.uniform(-0.6, 0.6) * ry
        br = rng.uniform(0.12, 0.25) * r
        canvas = _paint(canvas, "ellipse", [bx - br, by - br, bx + br, by + br], (250, 165, 150), size / 120)
    return canvas


def _ulcerative_colitis(canvas: Canvas, rng: np.random.Generator, size: int) -> Canvas:
    """Inflamed red mucosa with scattered white fibrin spots."""
    canvas = canvas * 0.6 + np.array([185, 50, 45], dtype=np.float32) * 0.4
    for _ in range(rng.integers(8, 16)):
        x, y = rng.uniform(0.1, 0.9, 2) * size
        rx, ry = rng.uniform(0.02, 0.05, 2) * size
        canvas = _paint(canvas, "ellipse", [x - rx, y - ry, x + rx, y + ry], (245, 240, 225), size / 150)
    return canvas


# The first four are the most distinct, so that the default 4-class demo is the clearest.
DEMO_CLASSES: dict[str, Callable[[Canvas, np.random.Generator, int], Canvas]] = {
    "dyed-lifted-polyps": _dyed_lifted_polyp,
    "esophagitis": _esophagitis,
    "normal-cecum": _normal_cecum,
    "polyps": _polyp,
    "dyed-resection-margins": _dyed_resection_margin,
    "normal-pylorus": _normal_pylorus,
    "normal-z-line": _normal_z_line,
    "ulcerative-colitis": _ulcerative_colitis,
}


def _tissue(rng: np.random.Generator, size: int) -> Canvas:
    """Pink mucosa: a base colour with blotches and fine noise."""
    base = np.array([205, 115, 105], dtype=np.float32) * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    blotches = 1 + 0.15 * _smooth_noise(rng, size, 5)[..., None]
    return base * blotches + rng.normal(0, 8, (size, size, 3)).astype(np.float32)


def _text_overlay(image: Image.Image, rng: np.random.Generator) -> None:
    """Kvasir's burnt-in acquisition text (a date or an id) near the top-left corner."""
    text = f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/20{rng.integers(10, 18)}"
    size = image.width
    ImageDraw.Draw(image).text((0.04 * size, 0.06 * size), text, fill=(255, 255, 255))


def _scope_box(image: Image.Image, rng: np.random.Generator) -> None:
    """Kvasir's scope position box: a black square with a green shape, bottom-left."""
    size = image.width
    side = rng.uniform(0.2, 0.3) * size
    top = size - side
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, top, side, size], fill=(0, 0, 0))
    draw.ellipse(
        [side * 0.25, top + side * 0.2, side * 0.7, top + side * 0.85],
        outline=(40, 200, 60),
        width=max(1, size // 64),
    )


def _render(class_name: str, rng: np.random.Generator, size: int) -> Image.Image:
    """One image of `class_name`: tissue, the class's structure, brightness, frame, artefacts."""
    canvas = DEMO_CLASSES[class_name](_tissue(rng, size), rng, size) * rng.uniform(0.75, 1.15)
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    canvas[np.hypot(x, y) > 0.66 * size] = 0  # the black corners of the endoscope's view
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    if rng.random() < 0.4:
        _text_overlay(image, rng)
    if rng.random() < 0.35:
        _scope_box(image, rng)
    return image


def _clear_previous(root: Path) -> None:
    """Remove a previous demo from `root`; refuse if `root` holds anything the demo did not write."""
    if not root.exists():
        return
    foreign = sorted(entry.name for entry in root.iterdir() if entry.name not in {MARKER, *DEMO_CLASSES})
    if foreign:
        raise DataError(
            f"refusing to write the demo dataset into {root}: "
            f"it holds {foreign[0]!r}, which the demo did not write"
        )
    for class_name in DEMO_CLASSES:
        shutil.rmtree(root / class_name, ignore_errors=True)
    (root / MARKER).unlink(missing_ok=True)


def generate_demo_dataset(
    root: str | os.PathLike,
    images_per_class: int = 50,
    image_size: int = 96,
    seed: int = 0,
    num_classes: int = 4,
    imbalance: float | None = None,
) -> Path:
    """Write the demo dataset to `root/<class>/<class>_<index:04d>.jpg` and return `root`.

    `imbalance` (a share in (0, 1]) makes the last class rare: it gets that share of
    `images_per_class` (at least one image), the case of a rare finding in medical data.
    Deterministic: the same arguments give byte-identical files (image i of class c depends
    only on seed, c and i). Idempotent: a marker file records the arguments; if it matches,
    nothing is written, otherwise the previous demo is replaced.
    """
    if not 2 <= num_classes <= len(DEMO_CLASSES):
        raise DataError(f"demo num_classes must be between 2 and {len(DEMO_CLASSES)}, got {num_classes}")
    if images_per_class < 1:
        raise DataError(f"demo images_per_class must be at least 1, got {images_per_class}")
    if image_size < 16:
        raise DataError(f"demo image_size must be at least 16 pixels, got {image_size}")
    if imbalance is not None and not 0 < imbalance <= 1:
        raise DataError(f"demo imbalance must be a share in (0, 1], got {imbalance}")
    root = Path(root)
    config = {
        "version": GENERATOR_VERSION,
        "images_per_class": images_per_class,
        "image_size": image_size,
        "seed": seed,
        "num_classes": num_classes,
        **({"imbalance": imbalance} if imbalance is not None else {}),  # older markers have no such key
    }
    marker = root / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == config:
        return root
    _clear_previous(root)
    for class_index, class_name in enumerate(list(DEMO_CLASSES)[:num_classes]):
        folder = root / class_name
        folder.mkdir(parents=True)
        rare = imbalance is not None and class_index == num_classes - 1
        for index in range(max(1, round(imbalance * images_per_class)) if rare else images_per_class):
            rng = np.random.default_rng([seed, class_index, index])
            _render(class_name, rng, image_size).save(folder / f"{class_name}_{index:04d}.jpg", quality=90)
    marker.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")  # last: marks a complete demo
    return root
