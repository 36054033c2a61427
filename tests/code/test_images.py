"""images.open_rgb / to_model_input / load_for_model on real image files of every awkward kind."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cleanmessy.images import ImageError, load_for_model, open_rgb, to_model_input


def noise(size=(48, 40), seed=0) -> Image.Image:
    """A random RGB image of `size` (width, height)."""
    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def encode(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels but holds no pixel data."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def reason(source, **kw) -> str:
    with pytest.raises(ImageError) as exc:
        open_rgb(source, **kw)
    return exc.value.reason


def test_rgb_png_from_path(tmp_path):
    """An RGB PNG on disk decodes to the same pixels, with its header info."""
    src = noise((48, 40))
    path = tmp_path / "a.png"
    src.save(path)
    img, info = open_rgb(path)
    assert img.mode == "RGB" and img.size == (48, 40)
    assert (info.width, info.height, info.format, info.mode) == (48, 40, "PNG", "RGB")
    assert np.array_equal(np.asarray(img), np.asarray(src))


def test_rgba_transparent_becomes_white(tmp_path):
    """Fully transparent pixels come out white; opaque ones keep their colour."""
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    rgba.putpixel((5, 5), (200, 10, 20, 255))
    path = tmp_path / "a.png"
    rgba.save(path)
    img, info = open_rgb(path)
    assert info.mode == "RGBA"
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((5, 5)) == (200, 10, 20)


def test_grayscale_l(tmp_path):
    """A grayscale image becomes RGB with equal channels."""
    path = tmp_path / "g.png"
    Image.new("L", (40, 40), 77).save(path)
    img, info = open_rgb(path)
    assert info.mode == "L"
    assert img.mode == "RGB" and img.getpixel((3, 3)) == (77, 77, 77)


def test_palette_p(tmp_path):
    """A palette image becomes RGB with its palette colours."""
    p = Image.new("RGB", (40, 40), (10, 120, 230)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    path = tmp_path / "p.png"
    p.save(path)
    img, info = open_rgb(path)
    assert info.mode == "P"
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (10, 120, 230)


def test_exif_rotated_jpeg_is_transposed(tmp_path):
    """A JPEG with EXIF orientation 6 comes back rotated: width and height swap, in the image and
    in the size recorded (the manifest's width/height are the upright ones)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    path = tmp_path / "r.jpg"
    noise((80, 40)).save(path, format="JPEG", exif=exif.tobytes())
    img, info = open_rgb(path)
    assert (info.width, info.height, info.format) == (40, 80, "JPEG")
    assert img.size == (40, 80)


def test_jpeg_without_exif_keeps_size(tmp_path):
    """Without an orientation tag the JPEG is not rotated (control for the EXIF test)."""
    path = tmp_path / "n.jpg"
    noise((80, 40)).save(path, format="JPEG")
    img, _ = open_rgb(path)
    assert img.size == (80, 40)


def test_zero_size_file_is_empty(tmp_path):
    """A 0-byte file is rejected as "empty", as a path and as bytes."""
    path = tmp_path / "z.png"
    path.write_bytes(b"")
    assert reason(path) == "empty"
    assert reason(b"") == "empty"


def test_text_is_not_an_image(tmp_path):
    """Text bytes with an image suffix are "not_an_image"."""
    path = tmp_path / "fake.png"
    path.write_text("this is not a picture\n")
    assert reason(path) == "not_an_image"


def test_truncated_png(tmp_path):
    """The first half of a real PNG opens but fails to decode: "truncated"."""
    data = encode(noise((64, 64)))
    path = tmp_path / "t.png"
    path.write_bytes(data[: len(data) // 2])
    assert reason(path) == "truncated"


def test_16_bit_png_is_unsupported(tmp_path):
    """A 16-bit grayscale PNG (mode I;16) is refused rather than guessed at."""
    path = tmp_path / "16.png"
    Image.new("I;16", (40, 40)).save(path)
    assert Image.open(path).mode.startswith("I")
    assert reason(path) == "unsupported_mode"


def test_too_small(tmp_path):
    """An image narrower than min_side on either side is "too_small"; at min_side it passes."""
    path = tmp_path / "s.png"
    noise((31, 100)).save(path)
    assert reason(path, min_side=32) == "too_small"
    open_rgb(path, min_side=31)


def test_too_large(tmp_path):
    """An image over max_pixels is "too_large"; exactly at the budget it passes."""
    path = tmp_path / "l.png"
    noise((50, 40)).save(path)
    assert reason(path, max_pixels=1999) == "too_large"
    open_rgb(path, max_pixels=2000)


def test_too_large_checked_before_decoding():
    """The budget is checked from the header: a pixel-less 8000x6000 PNG is "too_large", not "truncated"."""
    assert reason(png_header_only(8000, 6000), max_pixels=40_000_000) == "too_large"


def test_very_large_image_is_too_large_not_unreadable():
    """A 10000x10000 header (over PIL's own bomb limit) is reported as "too_large"."""
    assert reason(png_header_only(10_000, 10_000)) == "too_large"


def test_to_model_input_shape_and_dtype():
    """to_model_input squashes any RGB image to a uint8 (size, size, 3) array."""
    arr = to_model_input(noise((80, 30)), 64)
    assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8


def test_to_model_input_same_size_is_unchanged():
    """An image already at the model size is passed through pixel for pixel."""
    img = noise((32, 32))
    assert np.array_equal(to_model_input(img, 32), np.asarray(img))


def test_load_for_model_bytes_path_and_image_agree(tmp_path):
    """bytes, a Path and a PIL Image of the same file give identical model inputs."""
    path = tmp_path / "a.png"
    noise((70, 50), seed=3).save(path)
    from_path = load_for_model(path, 32)
    from_bytes = load_for_model(path.read_bytes(), 32)
    from_image = load_for_model(Image.open(path), 32)
    assert from_path.shape == (32, 32, 3) and from_path.dtype == np.uint8
    assert np.array_equal(from_path, from_bytes)
    assert np.array_equal(from_path, from_image)


def test_load_for_model_raises_image_error_on_garbage():
    """load_for_model refuses unusable input with ImageError."""
    with pytest.raises(ImageError):
        load_for_model(b"hello", 32)


def test_png_text_chunk_bomb_is_this_files_reason():
    """A valid PNG whose 2 KB zTXt chunk inflates to 2 MB: PIL raises ValueError (not
    UnidentifiedImageError); it is the file's reason, never an exception out of open_rgb."""
    import zlib

    buf = io.BytesIO()
    noise((40, 40)).save(buf, format="PNG")
    png = buf.getvalue()
    body = b"Comment\x00\x00" + zlib.compress(b"A" * 2_000_000, 9)
    chunk = struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body) & 0xFFFFFFFF)
    bomb = png[:33] + chunk + png[33:]  # after the IHDR chunk
    assert len(bomb) < 10_000
    with pytest.raises(ImageError) as error:
        open_rgb(bomb)
    assert error.value.reason in ("corrupt", "truncated")


def test_fuzzed_png_and_jpeg_bytes_give_image_errors_only():
    """Seeded random corruptions of real PNG and JPEG bytes (flipped bytes, cut tails, spliced
    chunks): each decodes or raises ImageError with a reason; nothing else escapes, so one bad
    file never stops ingest, predict or the app (they all decode through open_rgb)."""
    import random

    rng = random.Random(20261127)
    originals = []
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        noise((48, 36)).save(buf, format=fmt)
        originals.append(buf.getvalue())
    outcomes = {"decoded": 0}
    for case in range(300):
        data = bytearray(rng.choice(originals))
        kind = case % 3
        if kind == 0:
            for _ in range(rng.randint(1, 12)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1:
            del data[rng.randrange(8, len(data)):]
        else:
            start = rng.randrange(8, len(data))
            data[start:start] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        try:
            img, _ = open_rgb(bytes(data))
            assert img.mode == "RGB"
            outcomes["decoded"] += 1
        except ImageError as exc:
            assert exc.reason and str(exc), case
            outcomes[exc.reason] = outcomes.get(exc.reason, 0) + 1
    assert sum(outcomes.values()) == 300 and len(outcomes) >= 3, outcomes


def test_the_bomb_warning_is_an_error_for_the_whole_process_once_images_is_imported():
    """Set once at import (decoding runs on threads; per-call catch_warnings is not thread-safe),
    as pytest's own filterwarnings repeats it for each test."""
    import subprocess
    import sys

    code = ("import warnings; from PIL import Image; import cleanmessy.images; "
            "print([f[0] for f in warnings.filters if f[2] is Image.DecompressionBombWarning][:1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['error']"


def exif_stuffed_jpeg(segments: int, size: int = 65_000) -> bytes:
    """A valid JPEG with `segments` extra APP1 (EXIF-marker) segments of `size` bytes each."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 80, 40)).save(buffer, "JPEG")
    data = buffer.getvalue()
    segment = b"\xff\xe1" + (size + 2).to_bytes(2, "big") + b"Exif\x00\x00" + b"\x00" * (size - 6)
    return data[:2] + segment * segments + data[2:]


def test_a_jpeg_stuffed_with_metadata_is_refused_before_decoding(tmp_path):
    """370 APP1 segments (24 MB, under the app's old upload cap) cost Pillow seconds: refused from
    the segment headers in milliseconds, as bytes and as a file; a few segments pass."""
    import time

    stuffed = exif_stuffed_jpeg(370)
    assert len(stuffed) > 24_000_000
    started = time.perf_counter()
    with pytest.raises(ImageError) as error:
        open_rgb(stuffed)
    assert error.value.reason == "too_much_metadata" and time.perf_counter() - started < 0.5
    (tmp_path / "stuffed.jpg").write_bytes(stuffed)
    with pytest.raises(ImageError, match="segments"):
        open_rgb(tmp_path / "stuffed.jpg")
    image, info = open_rgb(exif_stuffed_jpeg(3))
    assert image.size == (64, 48) and info.format == "JPEG"
