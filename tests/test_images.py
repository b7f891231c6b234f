"""Image files: extensions, the pre-flight scan that lists every unreadable file, EXIF orientation, alpha masks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, features

from lorakit.data.images import IMAGE_EXTENSIONS, list_images, load_image, load_mask, preflight, read_header
from lorakit.errors import LorakitError

ORIENTATION = 0x0112


def _marked(path, orientation=None, size=(4, 2), **save):
    """A black image whose stored top-left pixel is red, saved with an EXIF orientation."""
    image = Image.new("RGB", size)
    image.putpixel((0, 0), (255, 0, 0))
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        save["exif"] = exif
    image.save(path, **save)
    return path


def test_extensions():
    assert {".png", ".jpg", ".jpeg", ".webp", ".bmp"} <= set(IMAGE_EXTENSIONS)
    assert (".avif" in IMAGE_EXTENSIONS) == (features.check("avif") or ".avif" in Image.registered_extensions())


def test_list_images_non_recursive_any_case_sorted(tmp_path):
    for name in ("b.PNG", "a.jpeg", "c.Webp", "d.bmp"):
        Image.new("RGB", (8, 8)).save(tmp_path / name, format={"PNG": "PNG", "jpeg": "JPEG", "Webp": "WEBP",
                                                               "bmp": "BMP"}[name.split(".")[1]])
    (tmp_path / "e.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "f.png")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpeg", "b.PNG", "c.Webp", "d.bmp"]


def test_preflight_lists_every_bad_file_with_a_reason(tmp_path):
    good = _marked(tmp_path / "good.png")
    truncated = tmp_path / "truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    cut_jpeg = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(cut_jpeg)
    cut_jpeg.write_bytes(cut_jpeg.read_bytes()[: cut_jpeg.stat().st_size // 2])
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a JPEG")
    empty = tmp_path / "empty.webp"
    empty.write_bytes(b"")
    gone = tmp_path / "gone.png"
    with pytest.raises(LorakitError) as caught:
        preflight([good, truncated, cut_jpeg, text, empty, gone])
    message = str(caught.value)
    assert message.startswith("5 image file(s) cannot be read") and "\n" not in message
    assert f"{truncated}: corrupt or truncated" in message
    assert f"{cut_jpeg}: corrupt or truncated" in message
    assert f"{text}: not an image Pillow can read" in message
    assert f"{empty}: not an image Pillow can read" in message
    assert f"{gone}: file not found" in message
    assert str(good) not in message


def test_preflight_shows_twenty_and_counts_the_rest(tmp_path):
    paths = []
    for number in range(25):
        paths.append(tmp_path / f"bad{number:02d}.png")
        paths[-1].write_text("nope")
    with pytest.raises(LorakitError) as caught:
        preflight(paths)
    message = str(caught.value)
    assert message.startswith("25 image file(s)") and "bad19.png" in message and "bad20.png" not in message
    assert message.endswith("and 5 more")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation, size, red_at", [
    (1, (4, 2), (0, 0)),
    (6, (2, 4), (1, 0)),  # "rotate 90 clockwise to display": the stored top-left goes to the top-right
    (8, (2, 4), (0, 3)),  # "rotate 90 counter-clockwise": it goes to the bottom-left
    (3, (4, 2), (3, 1)),  # 180 degrees
])
def test_exif_orientation_for_size_and_pixels(tmp_path, fmt, orientation, size, red_at):
    extra = {"quality": 100, "subsampling": 0} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    path = _marked(tmp_path / f"image.{fmt.lower()}", orientation, format=fmt, **extra)
    header = preflight([path])[path]
    assert (header.size, header.stored_size, header.format) == (size, (4, 2), fmt)
    image, alpha = load_image(path)
    assert image.mode == "RGB" and image.size == size and alpha is None
    red = np.asarray(image)[..., 0] > 128
    assert red.sum() == 1 and red[red_at[1], red_at[0]]


def test_alpha_mask(tmp_path):
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 255, 0, 128), (0, 0, 255, 255)])
    rgba.save(tmp_path / "rgba.png")
    image, alpha = load_image(tmp_path / "rgba.png", with_alpha=True)
    assert np.asarray(alpha).ravel().tolist() == [0, 128, 255] and image.mode == "RGB"
    assert read_header(tmp_path / "rgba.png").has_alpha
    Image.new("RGB", (3, 1)).save(tmp_path / "rgb.png")
    _, alpha = load_image(tmp_path / "rgb.png", with_alpha=True)
    assert np.asarray(alpha).ravel().tolist() == [255, 255, 255] and not read_header(tmp_path / "rgb.png").has_alpha
    palette = Image.new("P", (2, 1))
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "palette.png", transparency=0)
    _, alpha = load_image(tmp_path / "palette.png", with_alpha=True)
    assert np.asarray(alpha).ravel().tolist() == [0, 255]


def test_mask_is_the_red_channel(tmp_path):
    Image.new("RGB", (2, 2), (200, 50, 10)).save(tmp_path / "mask.png")
    mask = load_mask(tmp_path / "mask.png")
    assert mask.mode == "L" and set(np.asarray(mask).ravel().tolist()) == {200}
