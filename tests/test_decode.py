"""Unit tests for pipelines.decode: every image mode lands as correct RGB, bad bytes become RejectErrors
with the right reason, and squaring / patching keep the geometry the model relies on."""
from __future__ import annotations

import io
import time
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipelines.decode import DEFAULT_MAX_PIXELS, decode_array, decode_image, fit_square
from pipelines.rejects import RejectError

try:
    from tests.bad_corpus import jpeg_bytes, png_bytes, png_declaring, product_photo, truncated_jpeg
except ImportError:  # tests/ is on sys.path instead of the repo root (plain `pytest`, no __init__.py)
    from bad_corpus import jpeg_bytes, png_bytes, png_declaring, product_photo, truncated_jpeg


def _reason(data: bytes, **kw) -> str:
    with pytest.raises(RejectError) as info:
        decode_image(data, **kw)
    return info.value.reason


def _px(img: Image.Image, xy=(0, 0)) -> tuple:
    return tuple(img.getpixel(xy))


# --- mode conversion ---------------------------------------------------------------------------------

def test_rgb_jpeg_round_trip():
    out = decode_image(jpeg_bytes(Image.new("RGB", (30, 20), (200, 10, 10))))
    assert out.mode == "RGB" and out.size == (30, 20)
    assert np.allclose(_px(out), (200, 10, 10), atol=4)


def test_rgba_transparent_area_becomes_white_not_black():
    a = np.zeros((10, 20, 4), dtype=np.uint8)  # transparent black everywhere ...
    a[:, 10:] = (0, 0, 255, 255)  # ... except an opaque blue right half
    a[0, 0] = (255, 0, 0, 128)  # half-transparent red -> pink
    out = decode_image(png_bytes(Image.fromarray(a)))
    assert out.mode == "RGB"
    assert _px(out, (5, 5)) == (255, 255, 255)
    assert _px(out, (15, 5)) == (0, 0, 255)
    assert _px(out, (0, 0)) == (255, 127, 127)


def test_la_composited_on_white():
    out = decode_image(png_bytes(Image.new("LA", (4, 4), (0, 0))))
    assert _px(out) == (255, 255, 255)
    out = decode_image(png_bytes(Image.new("LA", (4, 4), (50, 255))))
    assert _px(out) == (50, 50, 50)


def test_palette_gif():
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    buf = io.BytesIO()
    img.save(buf, "GIF")
    out = decode_image(buf.getvalue())
    assert out.mode == "RGB" and _px(out) == (10, 200, 30)


def test_palette_transparency_treated_as_alpha():
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.putpixel((7, 7), 1)
    buf = io.BytesIO()
    img.save(buf, "GIF", transparency=0)  # index 0 (black) is transparent
    out = decode_image(buf.getvalue())
    assert _px(out) == (255, 255, 255)
    assert _px(out, (7, 7)) == (10, 200, 30)


def test_animated_gif_gives_first_frame():
    frames = []
    for colour in ((255, 0, 0), (0, 255, 0)):
        frames.append(Image.new("RGB", (8, 8), colour).quantize(colors=2))
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    out = decode_image(buf.getvalue())
    assert np.allclose(_px(out), (255, 0, 0), atol=2)


def test_cmyk_jpeg():
    img = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan
    img.paste((0, 0, 0, 0), (0, 0, 8, 16))  # left half paper white
    out = decode_image(jpeg_bytes(img, subsampling=0))
    assert out.mode == "RGB"
    assert np.allclose(_px(out, (2, 8)), (255, 255, 255), atol=6)
    assert np.allclose(_px(out, (13, 8)), (0, 255, 255), atol=6)


def test_16bit_png_scaled_by_bit_range_not_clipped():
    a = np.array([[65535, 32768, 256, 0]], dtype=np.uint16)
    img = Image.fromarray(a)
    assert img.mode == "I;16"
    out = decode_image(png_bytes(img))
    assert [_px(out, (x, 0)) for x in range(4)] == [(255,) * 3, (128,) * 3, (1,) * 3, (0,) * 3]


def test_16bit_big_endian_via_tiff():
    img = Image.frombytes("I;16B", (2, 1), b"\xff\xff\x80\x00")
    buf = io.BytesIO()
    img.save(buf, "TIFF")
    out = decode_image(buf.getvalue())
    assert [_px(out, (x, 0)) for x in range(2)] == [(255,) * 3, (128,) * 3]


def test_mode_i_and_f_via_tiff():
    buf = io.BytesIO()
    Image.fromarray(np.array([[0, 40000]], dtype=np.int32)).save(buf, "TIFF")
    out = decode_image(buf.getvalue())
    assert [_px(out, (x, 0))[0] for x in range(2)] == [0, 156]  # 40000 >> 8
    buf = io.BytesIO()
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(buf, "TIFF")
    out = decode_image(buf.getvalue())
    assert [_px(out, (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_bilevel():
    img = Image.new("1", (8, 8), 0)
    img.putpixel((1, 1), 1)
    out = decode_image(png_bytes(img))
    assert _px(out) == (0, 0, 0) and _px(out, (1, 1)) == (255, 255, 255)


def test_grayscale():
    out = decode_image(png_bytes(Image.new("L", (4, 4), 77)))
    assert _px(out) == (77, 77, 77)


def test_exif_orientation_applied():
    # Stored 40x20 with a red left half; Orientation=6 means "rotate 90 degrees clockwise to display",
    # so the upright image is 20x40 with red on top.
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(jpeg_bytes(img, exif=exif))
    assert out.size == (20, 40)
    assert np.allclose(_px(out, (10, 5)), (255, 0, 0), atol=12)
    assert np.allclose(_px(out, (10, 35)), (0, 0, 255), atol=12)


# --- bad bytes ---------------------------------------------------------------------------------------

def test_zero_bytes():
    assert _reason(b"") == "empty-file"


def test_text_named_jpg():
    assert _reason(b"This is a text file, not a JPEG.\n") == "not-an-image"


def test_truncated_jpeg():
    assert _reason(truncated_jpeg()) == "corrupt-image"


def _half_png() -> bytes:
    data = png_bytes(product_photo(90, 120, seed=1))
    return data[: len(data) // 2]


@pytest.mark.parametrize("make", [truncated_jpeg, _half_png], ids=["jpeg", "png"])
def test_truncation_detected_even_if_pillow_told_to_load_truncated(monkeypatch, make):
    # Any library in the worker may flip this process-wide switch (Pillow then fills the missing part
    # with grey and reports success); decode must not depend on it.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert _reason(make()) == "corrupt-image"


def test_truncated_png():
    assert _reason(_half_png()) == "corrupt-image"


def test_corrupt_jpeg_body():
    data = bytearray(jpeg_bytes(product_photo(seed=2)))
    data[len(data) // 3 : len(data) // 3 + 200] = b"\xff" * 200
    try:
        decode_image(bytes(data))  # libjpeg may conceal damage; that's allowed ...
    except RejectError as exc:  # ... but a failure must be a reject, never a raw Pillow error
        assert exc.reason == "corrupt-image"


def test_decode_does_not_change_pillow_globals():
    before = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS)
    _reason(truncated_jpeg())
    _reason(png_declaring(20000, 20000))
    assert (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS) == before


# --- decompression bombs -----------------------------------------------------------------------------

@pytest.fixture
def load_calls(monkeypatch):
    """Counts pixel decodes, to prove the size check happens before any."""
    calls = []
    original = ImageFile.ImageFile.load

    def spy(self):
        calls.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


def test_bomb_rejected_from_header_without_decoding(load_calls):
    data = png_declaring(20000, 20000)
    assert len(data) < 500
    start = time.perf_counter()
    with pytest.raises(RejectError) as info:
        decode_image(data)
    assert time.perf_counter() - start < 1.0
    assert info.value.reason == "too-many-pixels"
    assert load_calls == []


def test_over_our_limit_but_under_pillows(load_calls):
    # 8000x8000 = 64 MP: over DEFAULT_MAX_PIXELS, under Pillow's own limits, so our check must catch it.
    assert 8000 * 8000 > DEFAULT_MAX_PIXELS
    with pytest.raises(RejectError) as info:
        decode_image(png_declaring(8000, 8000))
    assert info.value.reason == "too-many-pixels"
    assert "8000x8000" in info.value.detail and "max_pixels" in info.value.detail
    assert load_calls == []


def test_pillow_bomb_warning_as_error_is_still_a_reject():
    # 10000x10000 trips Pillow's DecompressionBombWarning inside Image.open. Normally it is only a
    # warning and our own check rejects; with warnings as errors (pytest -W error, a strict worker) it is
    # raised from Image.open and must still come out as the same reject.
    data = png_declaring(10000, 10000)
    with pytest.warns(Image.DecompressionBombWarning):
        assert _reason(data) == "too-many-pixels"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert _reason(data) == "too-many-pixels"


def test_max_pixels_is_configurable():
    data = png_bytes(Image.new("RGB", (100, 100)))
    assert _reason(data, max_pixels=9_999) == "too-many-pixels"
    assert decode_image(data, max_pixels=10_000).size == (100, 100)


# --- decode_array ------------------------------------------------------------------------------------

def test_decode_array_ok():
    a = np.zeros((4, 6, 3), dtype=np.uint8)
    a[..., 1] = 9
    out = decode_array(a)
    assert out.mode == "RGB" and out.size == (6, 4) and _px(out) == (0, 9, 0)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 6, 3), dtype=np.float32),
        np.zeros((3, 4, 6), dtype=np.int64),
        np.zeros((4, 6), dtype=np.uint8),
        np.zeros((4, 6, 4), dtype=np.uint8),
        np.zeros((0, 6, 3), dtype=np.uint8),
        [[1, 2, 3]],
    ],
)
def test_decode_array_rejects_bad_rows(bad):
    with pytest.raises(RejectError) as info:
        decode_array(bad)
    assert info.value.reason == "bad-array"


# --- fit_square --------------------------------------------------------------------------------------

def test_one_pixel_image():
    out = fit_square(Image.new("RGB", (1, 1), (10, 20, 30)), 256)
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    assert (out == (10, 20, 30)).all()


def _framed(width: int, height: int, bg=(240, 240, 240), fg=(200, 0, 0)) -> Image.Image:
    """A solid 'garment' filling the image except a 1-px background frame."""
    img = Image.new("RGB", (width, height), bg)
    img.paste(fg, (1, 1, width - 1, height - 1))
    return img


def test_pad_portrait_keeps_aspect_and_pads_with_background():
    out = fit_square(_framed(300, 600), 256)  # -> 128 x 256 content, 64 px pad each side
    assert out.shape == (256, 256, 3)
    assert (out[:, :60] == (240, 240, 240)).all() and (out[:, -60:] == (240, 240, 240)).all()
    assert np.allclose(out[128, 70:186], (200, 0, 0), atol=3)  # full height kept: nothing cropped
    assert np.allclose(out[3:253, 128], (200, 0, 0), atol=3)


def test_pad_landscape():
    out = fit_square(_framed(600, 300), 256)
    assert (out[:60] == (240, 240, 240)).all() and (out[-60:] == (240, 240, 240)).all()
    assert np.allclose(out[70:186, 128], (200, 0, 0), atol=3)
    assert np.allclose(out[128, 3:253], (200, 0, 0), atol=3)


def test_pad_colour_is_the_border_median_not_black():
    img = Image.new("RGB", (100, 200), (250, 248, 245))
    img.paste((0, 0, 0), (0, 0, 3, 3))  # a dark corner speck must not win over the background
    out = fit_square(img, 64)
    assert tuple(out[0, 0]) == (250, 248, 245)


def test_square_input_unpadded():
    out = fit_square(Image.new("RGB", (512, 512), (1, 2, 3)), 256)
    assert (out == (1, 2, 3)).all()


def test_crop_mode_centre_crops_short_side():
    img = Image.new("RGB", (200, 600), (0, 0, 255))
    img.paste((255, 0, 0), (0, 200, 200, 400))  # middle third red
    out = fit_square(img, 64, fit="crop")
    assert out.shape == (64, 64, 3)
    assert np.allclose(out[2:62, 2:62], (255, 0, 0), atol=3)


def test_crop_mode_landscape():
    img = Image.new("RGB", (600, 200), (0, 0, 255))
    img.paste((255, 0, 0), (200, 0, 400, 200))
    out = fit_square(img, 64, fit="crop")
    assert np.allclose(out[2:62, 2:62], (255, 0, 0), atol=3)


def test_unknown_fit_names_allowed_values():
    with pytest.raises(ValueError, match="pad.*crop"):
        fit_square(Image.new("RGB", (4, 4)), 8, fit="stretch")


def test_fit_square_accepts_non_rgb_input():
    out = fit_square(Image.new("L", (10, 10), 5), 16)
    assert out.shape == (16, 16, 3) and (out == 5).all()
