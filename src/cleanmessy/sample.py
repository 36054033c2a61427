"""The embedded default data: a deterministic generator of small synthetic room pictures.

Both classes share the same rooms (wall, floor, window, bed or sofa, shelf); only the clutter
differs. A *clean* room has a few objects, axis-aligned and in rows; a *messy* one has many objects
scattered across floor and furniture at random angles. So a model has to look at the clutter, not
at colours or furniture, which is also what it must do on real photos.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from cleanmessy.errors import UserError

CLASSES = ("clean", "messy")
RECIPE_FILE = "sample.yaml"


@dataclass(frozen=True)
class Recipe:
    """What `data/sample/sample.yaml` holds: how many pictures of what size, from which seed."""

    per_class: int = 120
    size: int = 128
    seed: int = 0


def read_recipe(folder: Path) -> Recipe:
    raw = yaml.safe_load((folder / RECIPE_FILE).read_text()) or {}
    unknown = set(raw) - set(Recipe.__dataclass_fields__)
    if unknown:
        raise UserError(f"{folder / RECIPE_FILE}: unknown key {sorted(unknown)[0]} (known: per_class, size, seed)")
    recipe = Recipe(**raw)
    if not (isinstance(recipe.per_class, int) and recipe.per_class >= 1):
        raise UserError(f"{folder / RECIPE_FILE}: per_class must be a positive integer")
    if not (isinstance(recipe.size, int) and recipe.size >= 32):
        raise UserError(f"{folder / RECIPE_FILE}: size must be an integer of at least 32")
    return recipe


def is_recipe(folder: Path) -> bool:
    return (folder / RECIPE_FILE).is_file()


def _colour(rng: np.random.Generator, lo: int = 40, hi: int = 230) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(lo, hi, size=3))


def _rotated_rect(cx: float, cy: float, w: float, h: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    corners = [(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners]


def _room(draw: ImageDraw.ImageDraw, rng: np.random.Generator, n: int) -> dict[str, tuple[int, int, int, int]]:
    """Paint the shared room and return the boxes where objects can lie."""
    horizon = int(n * rng.uniform(0.45, 0.6))
    draw.rectangle([0, 0, n, horizon], fill=_colour(rng, 150, 245))  # wall
    draw.rectangle([0, horizon, n, n], fill=_colour(rng, 60, 200))  # floor
    draw.line([0, horizon, n, horizon], fill=(70, 60, 50), width=max(1, n // 64))  # skirting
    wx = int(n * rng.uniform(0.05, 0.55))
    draw.rectangle([wx, n * 0.08, wx + n * 0.3, n * 0.32], fill=(170, 210, 240), outline=(250, 250, 250),
                   width=max(1, n // 48))  # window
    shelf_y = int(n * rng.uniform(0.34, 0.4))
    shelf_x = int(n * rng.uniform(0.55, 0.65))
    draw.rectangle([shelf_x, shelf_y, shelf_x + n * 0.32, shelf_y + n * 0.03], fill=(110, 80, 55))  # shelf
    bed_x = int(n * rng.uniform(0.02, 0.3))
    bed_top = horizon - int(n * 0.05)
    bed = (bed_x, bed_top, bed_x + int(n * 0.45), bed_top + int(n * 0.22))
    draw.rectangle(bed, fill=_colour(rng, 80, 220), outline=(60, 50, 40))  # bed or sofa
    return {
        "shelf": (shelf_x, shelf_y, shelf_x + int(n * 0.32), shelf_y),
        "bed": bed,
        "floor": (0, horizon + int(n * 0.2), n, n),
    }


def _tidy(draw: ImageDraw.ImageDraw, rng: np.random.Generator, n: int, spots: dict) -> None:
    """A few objects, squared up: books standing in a row, a centred rug, perhaps a box."""
    sx0, sy, sx1, _ = spots["shelf"]
    x = sx0 + 2
    for _ in range(int(rng.integers(2, 6))):  # books, upright, side by side
        w, h = n * 0.03, n * rng.uniform(0.06, 0.09)
        draw.rectangle([x, sy - h, x + w, sy], fill=_colour(rng))
        x += w + 1
        if x > sx1 - w:
            break
    fx0, fy0, fx1, fy1 = spots["floor"]
    if rng.random() < 0.7:  # a rug, centred and aligned
        cx, cy = (fx0 + fx1) / 2, (fy0 + fy1) / 2
        draw.rectangle([cx - n * 0.2, cy - n * 0.06, cx + n * 0.2, cy + n * 0.06], fill=_colour(rng))
    if rng.random() < 0.5:  # a pillow squared on the bed
        bx0, by0, bx1, _ = spots["bed"]
        draw.rectangle([bx0 + n * 0.02, by0 + n * 0.02, bx0 + n * 0.1, by0 + n * 0.07], fill=(240, 240, 235))


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, n: int, spots: dict) -> None:
    """Many objects at random places and angles: clothes, papers, toys, fallen books."""
    for _ in range(int(rng.integers(18, 36))):
        box = spots["floor"] if rng.random() < 0.7 else spots["bed"]
        x0, y0, x1, y1 = box
        cx, cy = rng.uniform(x0, x1), rng.uniform(y0, max(y0 + 1, y1))
        kind = rng.integers(0, 3)
        if kind == 0:  # a garment or paper: a rotated rectangle
            w, h = n * rng.uniform(0.04, 0.14), n * rng.uniform(0.02, 0.08)
            draw.polygon(_rotated_rect(cx, cy, w, h, rng.uniform(0, math.pi)), fill=_colour(rng))
        elif kind == 1:  # a ball or a bag
            r = n * rng.uniform(0.015, 0.04)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_colour(rng))
        else:  # a crumpled thing: an irregular polygon
            k = int(rng.integers(3, 7))
            angles = np.sort(rng.uniform(0, 2 * math.pi, k))
            radii = n * rng.uniform(0.02, 0.06, k)
            draw.polygon([(cx + r * math.cos(a), cy + r * math.sin(a)) for a, r in zip(angles, radii)],
                         fill=_colour(rng))
    sx0, sy, sx1, _ = spots["shelf"]
    for _ in range(int(rng.integers(1, 4))):  # books fallen over on the shelf
        cx = rng.uniform(sx0, sx1)
        draw.polygon(_rotated_rect(cx, sy - n * 0.02, n * 0.03, n * 0.08, rng.uniform(0.5, 1.3)),
                     fill=_colour(rng))


def render(label: str, index: int, size: int = 128, seed: int = 0) -> Image.Image:
    """One picture; the same (label, index, size, seed) always gives the same pixels."""
    if label not in CLASSES:
        raise ValueError(f"label must be one of {CLASSES}")
    rng = np.random.default_rng([seed, CLASSES.index(label), index])
    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    spots = _room(draw, rng, size)
    (_tidy if label == "clean" else _clutter)(draw, rng, size, spots)
    return img


def pictures(recipe: Recipe) -> Iterator[tuple[str, str, int]]:
    """`(relative_path, label, index)` of every picture of the recipe, in order, none rendered."""
    for label in CLASSES:
        for i in range(recipe.per_class):
            yield f"{label}/{i:04d}.png", label, i


def generate(recipe: Recipe) -> Iterator[tuple[str, str, Image.Image]]:
    """Yield `(relative_path, label, image)` for every picture of the recipe."""
    for rel, label, i in pictures(recipe):
        yield rel, label, render(label, i, recipe.size, recipe.seed)
