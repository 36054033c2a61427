"""The out-of-distribution set evaluate measures the familiarity detector on: pictures that are
not photos of rooms like the training data, made here in code with nothing to download, each
with its kind:

- `noise`: uniform and blurred random pixels;
- `flat`: one colour, and two-colour gradients;
- `text`: rendered lines of text on a plain page;
- `chart`: bar and line charts;
- `photo`: crops of the two photos scikit-learn bundles (a temple, a flower: real photos, not rooms);
- `sample`: the other domain for a model trained on photos: the synthetic cartoon rooms of sample.py
  (a model trained on the sample gets none: for it the other domain is real room photos, which
  bench/ood_bench.py measures where `../shared` has them);
- `feedback`: photos users marked "not a room" in the app (data/feedback/not-a-room), read by evaluate.

Deterministic: the same seed gives the same pictures.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SIDE = 256  # px: every picture is drawn at this size; the model resizes it as any photo
PER_KIND = 12
WORDS = ("invoice total due net amount quarterly report revenue chart meeting notes agenda item "
         "summary figure table lorem ipsum dolor sit amet").split()


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def noise(rng: np.random.Generator, i: int) -> Image.Image:
    pixels = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    return img.filter(ImageFilter.GaussianBlur(radius=1 + i % 4 * 2)) if i % 2 else img


def flat(rng: np.random.Generator, i: int) -> Image.Image:
    a, b = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
    if i % 2 == 0:
        return Image.new("RGB", (SIDE, SIDE), tuple(int(v) for v in a))
    t = np.linspace(0, 1, SIDE, dtype=np.float32)[:, None, None]
    ramp = (a * (1 - t) + b * t).astype(np.uint8)
    return Image.fromarray(np.broadcast_to(ramp, (SIDE, SIDE, 3)).copy())


def text(rng: np.random.Generator, i: int) -> Image.Image:
    paper = tuple(int(v) for v in rng.integers(200, 256, 3))
    img = Image.new("RGB", (SIDE, SIDE), paper)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=int(rng.integers(12, 28)))
    y = int(rng.integers(4, 20))
    while y < SIDE - 10:
        line = " ".join(rng.choice(WORDS, int(rng.integers(2, 6))))
        draw.text((int(rng.integers(4, 30)), y), line, fill=tuple(int(v) for v in rng.integers(0, 90, 3)), font=font)
        y += int(font.size * 1.5)
    return img


def chart(rng: np.random.Generator, i: int) -> Image.Image:
    img = Image.new("RGB", (SIDE, SIDE), "white")
    draw = ImageDraw.Draw(img)
    left, bottom = 30, SIDE - 30
    draw.line([(left, 10), (left, bottom), (SIDE - 10, bottom)], fill="black", width=2)
    values = rng.uniform(0.1, 1.0, int(rng.integers(4, 10)))
    step = (SIDE - 10 - left) / len(values)
    if i % 2 == 0:
        for j, v in enumerate(values):
            x = left + j * step + 3
            draw.rectangle([x, bottom - v * (bottom - 20), x + step - 6, bottom - 1], fill=_colour(rng))
    else:
        points = [(left + (j + 0.5) * step, bottom - v * (bottom - 20)) for j, v in enumerate(values)]
        draw.line(points, fill=_colour(rng), width=3)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill="black")
    for y in range(bottom - 40, 10, -40):
        draw.line([(left - 5, y), (left, y)], fill="black")
    return img


def photo_crops(rng: np.random.Generator, n: int) -> list[Image.Image]:
    """`n` square crops of scikit-learn's two bundled photos (installed with it: no download)."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        side = int(rng.integers(min(w, h) // 2, min(w, h) + 1))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        out.append(photo.crop((x, y, x + side, y + side)).resize((SIDE, SIDE), Image.BILINEAR))
    return out


GENERATED = {"noise": noise, "flat": flat, "text": text, "chart": chart}


def pictures(trained_on_sample: bool, seed: int = 0, per_kind: int = PER_KIND) -> Iterator[tuple[str, Image.Image]]:
    """`(kind, picture)` for the generated out-of-distribution set; the synthetic rooms (`sample`)
    only for a model that was not trained on them."""
    rng = np.random.default_rng([seed, 7])
    for kind, draw in GENERATED.items():
        for i in range(per_kind):
            yield kind, draw(rng, i)
    for img in photo_crops(rng, per_kind):
        yield "photo", img
    if not trained_on_sample:
        from cleanmessy import sample

        for i in range(per_kind * 2):
            yield "sample", sample.render(sample.CLASSES[i % 2], 10_000 + i, SIDE, seed)
