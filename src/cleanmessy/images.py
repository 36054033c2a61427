"""Open, validate and convert one image. The single place images are decoded: ingest, the training
input pipeline, evaluation, the predict CLI and the app all go through `to_model_input`, so what
the model sees in training is what it sees in serving."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Modes PIL can turn into 8-bit RGB without guessing; 16-bit and float images are refused.
SUPPORTED_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
DEFAULT_MAX_PIXELS = 40_000_000
# The file suffix of an image kept in its decoded format (ingest's data/images, the app's feedback).
FORMAT_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif"}

# PIL warns (and decodes) between ~89 and ~179 megapixels, and raises above. Every decode here
# refuses both, whatever max_pixels says. Set once for the process, not per call: decoding runs
# on threads, and warnings.catch_warnings is not thread-safe (threads restore each other's filters).
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


class ImageError(ValueError):
    """An input that is not a usable image; `reason` is a short stable code for reports."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str  # as PIL names it: PNG, JPEG, ...
    mode: str


# A JPEG's segments before its image data (EXIF, ICC, XMP, thumbnails, tables): a photo has a few,
# a few hundred KB at most. Pillow's cost grows faster than linearly with them (24 MB of APP1
# segments took 1.6 s, 63 MB up to a minute), so they are counted from the bytes before decoding.
MAX_JPEG_SEGMENTS = 256
MAX_JPEG_METADATA = 4 * 1024 * 1024


def check_jpeg_metadata(stream: io.BufferedIOBase | io.BytesIO) -> None:
    """ImageError `too_much_metadata` for a JPEG with more than MAX_JPEG_SEGMENTS segments or
    MAX_JPEG_METADATA bytes of them before its image data; anything else passes (the decoder
    judges it). Reads only the segments' headers; leaves `stream` at its start."""
    try:
        if stream.read(2) != b"\xff\xd8":
            return
        segments = size = 0
        while True:
            byte = stream.read(1)
            while byte == b"\xff":  # fill bytes before a marker
                byte = stream.read(1)
            if not byte or byte in (b"\xda", b"\xd9"):  # the image data (SOS), the end, or cut short
                return
            if b"\xd0" <= byte <= b"\xd7" or byte == b"\x01":  # markers without a length
                continue
            length = int.from_bytes(stream.read(2), "big")
            if length < 2:
                return
            segments, size = segments + 1, size + length
            if segments > MAX_JPEG_SEGMENTS or size > MAX_JPEG_METADATA:
                raise ImageError("too_much_metadata", f"more than {MAX_JPEG_SEGMENTS} segments or "
                                 f"{MAX_JPEG_METADATA // (1024 * 1024)} MB of metadata before the image data")
            stream.seek(length - 2, io.SEEK_CUR)
            if stream.read(1) != b"\xff":  # not a marker where one belongs: the decoder will say why
                return
    finally:
        stream.seek(0)


def _as_stream(source: Path | bytes) -> io.BytesIO | Path:
    return io.BytesIO(source) if isinstance(source, bytes | bytearray) else Path(source)


def open_rgb(
    source: Path | bytes | Image.Image,
    *,
    min_side: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[Image.Image, ImageInfo]:
    """Decode an image fully into 8-bit RGB, EXIF orientation applied, or raise `ImageError`.

    The pixel budget is checked from the header, before any pixel is decoded.
    """
    if isinstance(source, Image.Image):
        img = source
        fmt = img.format or "IN-MEMORY"
    else:
        if isinstance(source, Path) and source.stat().st_size == 0:
            raise ImageError("empty", "file is empty (0 bytes)")
        if isinstance(source, bytes | bytearray) and len(source) == 0:
            raise ImageError("empty", "file is empty (0 bytes)")
        try:
            if isinstance(source, bytes | bytearray):
                check_jpeg_metadata(io.BytesIO(source))
            else:
                with open(source, "rb") as header:
                    check_jpeg_metadata(header)
            img = Image.open(_as_stream(source))
        except ImageError:
            raise
        except UnidentifiedImageError:
            raise ImageError("not_an_image", "not an image PIL can read") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            # PIL's own guard (~89 MP) fires before our budget can be read from the header.
            raise ImageError("too_large", f"over the decoder's pixel limit ({exc})") from None
        except OSError as exc:
            if isinstance(source, Path) and not source.is_file():
                raise  # missing or unreadable file: the caller reports it as such
            raise ImageError("corrupt", f"cannot decode the header ({type(exc).__name__}: {exc})") from None
        except Exception as exc:  # noqa: BLE001 - a decoder may raise anything on hostile bytes
            # e.g. ValueError for a PNG text chunk that inflates past MAX_TEXT_CHUNK
            raise ImageError("corrupt", f"cannot decode the header ({type(exc).__name__}: {exc})") from None
        fmt = img.format or "UNKNOWN"
    mode = img.mode
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(
            "too_large", f"{width}x{height} is {width * height:,} pixels, over the budget of {max_pixels:,}"
        )
    if img.mode not in SUPPORTED_MODES:
        raise ImageError("unsupported_mode", f"unsupported image mode {img.mode!r} (16-bit or float)")
    if min(width, height) < min_side:
        raise ImageError("too_small", f"{width}x{height} is smaller than {min_side} px on a side")
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:  # PIL reports truncation as OSError
        raise ImageError("truncated", f"image data is truncated or corrupt ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - as above: any decoder failure is this file's reason
        raise ImageError("corrupt", f"cannot decode the pixels ({type(exc).__name__}: {exc})") from None
    try:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            # Transparent areas become white (as a browser shows them), not black.
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, rgba)
        img = img.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - bad EXIF or palette data
        raise ImageError("corrupt", f"cannot convert to RGB ({type(exc).__name__}: {exc})") from None
    # The upright size (after the EXIF rotation): what a person sees and what the model gets.
    info = ImageInfo(width=img.width, height=img.height, format=fmt, mode=mode)
    return img, info


def to_model_input(img: Image.Image, size: int) -> np.ndarray:
    """Squash an RGB image to `size`x`size` uint8 — the model's input. Squash, not crop: clutter
    at the edges of a room counts too. PIL's bilinear filter antialiases when shrinking."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def load_for_model(source: Path | bytes | Image.Image, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Any image source to the model's uint8 input; raises `ImageError` for unusable input."""
    img, _ = open_rgb(source, max_pixels=max_pixels)
    return to_model_input(img, size)


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES
