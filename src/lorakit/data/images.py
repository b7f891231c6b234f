"""Image files: which extensions count, the pre-flight header scan, and loading pixels and alpha masks.

Unlike sd-scripts, EXIF orientation is applied: a portrait photo stored as landscape pixels with orientation 6
is bucketed and trained as the portrait it is shown as.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from PIL import Image, ImageOps, UnidentifiedImageError, features

from lorakit.errors import LorakitError

BASE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # rotated by 90 or 270 degrees: width and height swap
PREFLIGHT_SHOWN = 20


def _plugin_extensions() -> tuple[str, ...]:
    """.avif and .jxl when Pillow can read them (built in, or through the plug-ins sd-scripts also looks for)."""
    extensions = []
    for module in ("pillow_avif", "pillow_jxl", "jxlpy"):
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)  # importing registers the decoder with Pillow
    if features.check("avif") or ".avif" in Image.registered_extensions():
        extensions.append(".avif")
    if ".jxl" in Image.registered_extensions():
        extensions.append(".jxl")
    return tuple(extensions)


IMAGE_EXTENSIONS = BASE_EXTENSIONS + _plugin_extensions()


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: Path) -> list[Path]:
    """Images directly inside `folder` (not in subfolders), any letter case of the extension, sorted by path."""
    return sorted((path for path in folder.iterdir() if is_image_file(path)), key=str)


@dataclass(frozen=True)
class ImageHeader:
    """What the pre-flight scan learnt from one file without decoding its pixels."""

    path: Path
    size: tuple[int, int]  # (width, height) as displayed, EXIF orientation applied
    stored_size: tuple[int, int]  # (width, height) of the stored pixels (what sd-scripts uses)
    format: str
    has_alpha: bool


def read_header(path: Path) -> ImageHeader:
    """Open `path`, read its size and orientation, and check the whole file decodes: JPEG at 1/8 scale (DCT
    scaling still reads every coded block), other formats fully, after a PNG's chunks and CRCs are verified.
    A file whose pixel data ends early is found here, not in the middle of caching or training.

    Raises OSError / ValueError / SyntaxError (Pillow's exceptions) for a file that is not a readable image.
    """
    with Image.open(path) as image:
        stored = image.size
        orientation = _orientation(image)
        has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
        image_format = image.format or "?"
        if image_format == "JPEG":
            image.draft("RGB", (max(1, stored[0] // 8), max(1, stored[1] // 8)))
            image.load()
        else:
            image.verify()  # chunk structure and CRCs, which decoding does not check
    if image_format != "JPEG":
        with Image.open(path) as image:  # verify() leaves the image unusable
            image.load()
    size = (stored[1], stored[0]) if orientation in TRANSPOSED_ORIENTATIONS else stored
    return ImageHeader(path=path, size=size, stored_size=stored, format=image_format, has_alpha=has_alpha)


def _orientation(image: Image.Image) -> int:
    if image.format == "PNG":
        # Pillow's PNG getexif() decodes the whole image to find an eXIf chunk after the pixels; the chunk is
        # specified to come before them, which is where `info` picks it up at open time.
        raw = image.info.get("exif")
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
        return int(exif.get(EXIF_ORIENTATION, 1))
    return int(image.getexif().get(EXIF_ORIENTATION, 1))


def preflight(paths: Iterable[Path], workers: int | None = None) -> dict[Path, ImageHeader]:
    """Read the header of every image; if any cannot be read, raise one error listing them all with reasons.

    Files are checked on a thread pool (Pillow's decoders release the GIL), in the order given.
    """
    paths = list(paths)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(_check, paths))
    failures = [result for result in results if isinstance(result, str)]
    if failures:
        shown = "; ".join(failures[:PREFLIGHT_SHOWN])
        more = f"; and {len(failures) - PREFLIGHT_SHOWN} more" if len(failures) > PREFLIGHT_SHOWN else ""
        raise LorakitError(
            f"{len(failures)} image file(s) cannot be read; fix or remove them before training: {shown}{more}"
        )
    return {header.path: header for header in results}


def _check(path: Path) -> ImageHeader | str:
    """The header, or "path: reason" for a file that cannot be read."""
    try:
        return read_header(path)
    except FileNotFoundError:
        return f"{path}: file not found"
    except UnidentifiedImageError:
        return f"{path}: not an image Pillow can read (wrong extension or not an image file)"
    except Image.DecompressionBombError as error:
        return f"{path}: too large for Pillow's decompression-bomb limit ({error})"
    except (OSError, ValueError, SyntaxError) as error:
        return f"{path}: corrupt or truncated ({error})"


def load_image(path: Path, with_alpha: bool = False) -> tuple[Image.Image, Image.Image | None]:
    """The image as RGB with EXIF orientation applied, and its alpha channel as an "L" mask when asked for
    (fully opaque, i.e. all 255, when the image has no alpha). A file that no longer decodes (changed since the
    scan) is a LorakitError naming it."""
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise LorakitError(f"{path}: cannot read the image any more ({error}); was it changed during the run?") \
            from None
    alpha = None
    if with_alpha:
        has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
        alpha = image.convert("RGBA").getchannel("A") if has_alpha else Image.new("L", image.size, 255)
    return image.convert("RGB"), alpha


def load_mask(path: Path) -> Image.Image:
    """A masked-loss mask as an "L" image (sd-scripts weighs the loss by the mask's red channel)."""
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            return image.convert("RGB").getchannel("R")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise LorakitError(f"{path}: cannot read the mask any more ({error}); was it changed during the run?") \
            from None
