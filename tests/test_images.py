"""Image loading: junk is refused with the file named; odd modes and orientations are normalised."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from geoagent.errors import InputError
from geoagent.exif import read_exif
from geoagent.images import PILLOW_MAX_PIXELS, PixelLimitError, downscale, load_image, open_image, set_pixel_limit


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), "red")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert open_image(path).size == (20, 40)


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "LA", "L", "I;16"])
def test_odd_modes_become_rgb(tmp_path, mode):
    path = tmp_path / f"odd.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    if mode == "I;16":
        Image.fromarray(np.arange(0, 60000, 100, dtype=np.uint16).reshape(20, 30)).save(path)
    else:
        Image.new(mode, (30, 20)).save(path)
    assert open_image(path).mode == "RGB"


def test_downscale_keeps_panorama_aspect():
    panorama = Image.new("RGB", (4096, 2048))
    assert downscale(panorama, 768).size == (768, 384)


def test_encoding_is_bounded_and_hash_is_content_based(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (2000, 1000), "blue").save(path)
    first, second = load_image(path, 768), load_image(path, 768)
    assert (first.width, first.height) == (768, 384)
    assert first.sha256 == second.sha256 and first.data_url.startswith("data:image/jpeg;base64,")


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty file"), (b"not an image at all", "not an image"), (None, "truncated")],
)
def test_junk_is_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "junk.jpg"
    if content is None:
        Image.new("RGB", (200, 200), "green").save(path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(content)
    with pytest.raises(InputError) as info:
        open_image(path)
    assert str(path) in str(info.value)
    assert message in str(info.value) or "unreadable" in str(info.value)


@pytest.fixture
def small_pixel_limit() -> Iterator[int]:
    """images.max_pixels at 100x100 for one test, then back to Pillow's default."""
    set_pixel_limit(100 * 100)
    try:
        yield 100 * 100
    finally:
        set_pixel_limit(PILLOW_MAX_PIXELS)


@pytest.mark.parametrize("side", [120, 400])  # past Pillow's warning limit only, and past its error limit
def test_decompression_bombs_are_refused(tmp_path, small_pixel_limit, side):
    """Over the pixel limit: PixelLimitError (an InputError) naming the file, whichever of Pillow's bands."""
    path = tmp_path / "bomb.png"
    Image.new("L", (side, side)).save(path)
    with pytest.raises(PixelLimitError, match="decompression bomb") as info:
        open_image(path)
    assert str(path) in str(info.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        open_image(tmp_path / "nope.jpg")


def test_a_fifo_or_folder_is_refused_at_once_not_read(tmp_path):
    """Opening a FIFO as an image would block forever; a folder is named as one."""
    import os

    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(InputError, match="pipe.jpg: not a regular file"):
        open_image(tmp_path / "pipe.jpg")
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(InputError, match="dir.jpg: is a directory"):
        open_image(tmp_path / "dir.jpg")


def test_opening_photos_in_many_threads_leaves_the_process_warning_filters_alone(tmp_path):
    """Photos and their EXIF are read in worker threads at once; warnings.catch_warnings there is not
    thread-safe, and overlapping ones once left "ignore every warning" installed, which silenced the CLI's own
    warnings (the missing [plot] extra) for the rest of the run."""
    import threading
    import warnings

    path = tmp_path / "photo.jpg"
    image = Image.new("RGB", (32, 32), "green")
    exif = image.getexif()
    exif[0x0112] = 3
    image.save(path, exif=exif)
    before = list(warnings.filters)

    def work() -> None:
        for _ in range(30):
            open_image(path)
            read_exif(path)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert warnings.filters == before
