"""Image decoding and squaring for featurize: bytes (or an HDF5 array) in, an 8-bit RGB square out.

These are pure functions with no Beam import, so they can be unit-tested without a runner and reused by
the Beam DoFn, the Fashion-Gen HDF5 reader and ad-hoc tools alike. They follow the design's bad input
policy: anything they refuse raises `RejectError` with a stable reason code, never a bare Pillow
traceback, so the DoFn can route the row to `rejects` and the run goes on.

Reason codes raised here: "empty-file", "not-an-image", "corrupt-image", "too-many-pixels",
"unsupported-mode", "bad-array".
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageCms, ImageOps

from pipelines.rejects import RejectError

# 40 MP admits any product photo short of a 45+ MP camera original (those should be downscaled before
# upload; the model sees 256 px anyway) while capping one decode at ~120 MB of RGB: on a worker decoding
# in several threads at once, a few crafted or accidental giants must not take the whole machine down.
# It is also well below Pillow's own limits (~89 MP warning, ~179 MP error), so our check, which names
# the size and the limit, is the one that normally fires.
DEFAULT_MAX_PIXELS = 40_000_000

FITS = ("pad", "crop")

_WHITE = 255


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image file bytes to an RGB image, upright per its EXIF orientation.

    The pixel-count limit is checked from the header before any pixel is decoded, so a decompression
    bomb (a few hundred bytes declaring 20000x20000) costs nothing. Truncation is detected by fully
    decoding the image (and, for JPEG and PNG, by checking the end marker ourselves, because Pillow's
    truncation check can be switched off process-wide by any library setting
    `ImageFile.LOAD_TRUNCATED_IMAGES`, which we neither rely on nor touch). Multi-frame files (animated
    GIF, MPO, multi-page TIFF) yield their first frame.

    A max_pixels above Pillow's `Image.MAX_IMAGE_PIXELS` limits has no effect past them: Pillow still
    refuses (reported as "too-many-pixels"), and we deliberately leave its process-wide setting alone.
    """
    if not data:
        raise RejectError("empty-file", "zero bytes")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        # Pillow's own message names the BytesIO's address: different on every run, and useless to a reader.
        raise RejectError("not-an-image", f"no image format Pillow reads; the file starts {data[:16]!r}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own check runs inside Image.open for very large headers; its Warning is an exception
        # only when warnings are configured as errors (e.g. pytest -W error), but either way it's a bomb.
        detail = f"Pillow refused the header: {exc} (max_pixels={max_pixels})"
        raise RejectError("too-many-pixels", detail) from None
    except Exception as exc:  # noqa: BLE001 - any parser failure is a bad file, not a crashed run
        raise RejectError("corrupt-image", f"{type(exc).__name__}: {exc}") from None
    with im:
        w, h = im.size
        if w <= 0 or h <= 0:
            raise RejectError("corrupt-image", f"header declares {w}x{h}")
        if w * h > max_pixels:
            detail = f"header declares {w}x{h} = {w * h} pixels > max_pixels={max_pixels}"
            raise RejectError("too-many-pixels", detail)
        fmt = im.format
        try:
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise RejectError("too-many-pixels", str(exc)) from None
        except Exception as exc:  # noqa: BLE001
            raise RejectError("corrupt-image", f"{type(exc).__name__}: {exc}") from None
        _check_complete(fmt, data)
        try:
            out = _to_rgb(_upright(im))
        except RejectError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise RejectError("corrupt-image", f"{type(exc).__name__}: {exc}") from None
        if out is im:
            # Detach from the file object the context manager is about to close.
            out = im.copy()
    return out


def decode_array(arr: np.ndarray) -> Image.Image:
    """Wrap an (H, W, 3) uint8 array (a Fashion-Gen HDF5 row) as an RGB image.

    HDF5 rows arrive already decoded, so the only failure is a malformed row; refusing anything that is
    not exactly (H, W, 3) uint8 keeps a float or channel-first array from being silently reinterpreted.
    """
    if not isinstance(arr, np.ndarray):
        raise RejectError("bad-array", f"expected numpy.ndarray, got {type(arr).__name__}")
    if arr.dtype != np.uint8:
        raise RejectError("bad-array", f"expected dtype uint8, got {arr.dtype}")
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise RejectError("bad-array", f"expected shape (H, W, 3) with H, W > 0, got {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr))


def fit_square(img: Image.Image, size: int, fit: str = "pad") -> np.ndarray:
    """Resize an image into a (size, size, 3) uint8 square.

    fit="pad" (default) scales the long side to `size` and pads the short side, centred, with the
    per-channel median colour of the image's border pixels. Padding rather than centre-cropping because
    a centre crop of a portrait product photo cuts off hems, collars and shoes, exactly the details the
    text describes; and padding with the border colour (product photos have plain backgrounds) adds no
    fake edges for the patch CNN to describe. Tiny images (even 1x1) are upscaled the same way.

    fit="crop" scales the short side to `size` and centre-crops, for catalogs whose framing is known to
    be safe to crop.
    """
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    if not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if img.mode != "RGB":
        img = _to_rgb(img)
    w, h = img.size
    if fit == "pad":
        pad = _border_median(img)
        scale = size / max(w, h)
        nw, nh = min(size, max(1, round(w * scale))), min(size, max(1, round(h * scale)))
    else:
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        # reducing_gap makes big downscales fast (JPEG-draft-like box reduction first) at no visible cost.
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
    arr = np.asarray(img, dtype=np.uint8)
    if fit == "crop":
        top, left = (nh - size) // 2, (nw - size) // 2
        return np.ascontiguousarray(arr[top : top + size, left : left + size])
    out = np.empty((size, size, 3), dtype=np.uint8)
    out[:] = pad
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = arr
    return out


def _border_median(img: Image.Image) -> np.ndarray:
    # Taken from the original, not the resized image: a downscale blends the outermost background pixels
    # with the subject, while the original border is the background itself. Cropping four 1-px strips
    # avoids converting a possibly huge image to an array.
    w, h = img.size
    strips = [img.crop(box) for box in ((0, 0, w, 1), (0, h - 1, w, h), (0, 0, 1, h), (w - 1, 0, w, h))]
    border = np.concatenate([np.asarray(s, dtype=np.uint8).reshape(-1, 3) for s in strips], axis=0)
    return np.median(border, axis=0).round().astype(np.uint8)


def _check_complete(fmt: str | None, data: bytes) -> None:
    # Entropy-coded JPEG data can't contain an EOI (FFD9) or SOS (FFDA) marker, so a file whose last
    # scan starts after its last EOI was cut off; trailing junk some cameras append after EOI is fine.
    if fmt == "JPEG":
        if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
            raise RejectError("corrupt-image", "JPEG has no end-of-image marker after its last scan (truncated)")
    elif fmt == "PNG":
        # IEND is the mandatory last chunk; compressed data coinciding with the 4 ASCII bytes is negligible.
        if data.rfind(b"IEND") < data.rfind(b"IDAT"):
            raise RejectError("corrupt-image", "PNG has no IEND chunk (truncated)")


def _upright(im: Image.Image) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001
        # A mangled EXIF block says nothing about the pixels, which decoded fine: keep them as stored
        # rather than losing the product's image over metadata.
        return im
    return im if out is None else out


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in ("L", "RGB", "P", "1") and "transparency" in im.info:
        # A tRNS colour key / palette alpha is transparency all the same: composite like an alpha channel.
        return _over_white(im.convert("RGBA"))
    if mode == "La":
        # Premultiplied; Pillow only un-premultiplies La via LA.
        im, mode = im.convert("LA"), "LA"
    if mode in ("RGBA", "LA", "PA", "RGBa"):
        return _over_white(im.convert("RGBA"))
    if mode == "CMYK":
        return _cmyk_to_rgb(im)
    if mode.startswith("I;16"):
        # 16-bit samples: the top byte is the 8-bit value (65535 -> 255, 32768 -> 128); clipping would
        # turn almost every pixel white.
        a = np.asarray(im).astype(np.uint16) >> 8
        return Image.fromarray(a.astype(np.uint8)).convert("RGB")
    if mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(im))).convert("RGB")
    try:
        return im.convert("RGB")
    except Exception as exc:  # noqa: BLE001
        raise RejectError("unsupported-mode", f"cannot convert mode {mode!r} to RGB: {exc}") from None


def _over_white(rgba: Image.Image) -> Image.Image:
    # Product cut-outs are transparent around the garment; Pillow's plain convert("RGB") drops alpha and
    # reveals whatever (often black) colour the transparent pixels happen to store.
    a = np.asarray(rgba, dtype=np.uint16)
    alpha = a[..., 3:4]
    rgb = (a[..., :3] * alpha + _WHITE * (255 - alpha) + 127) // 255
    return Image.fromarray(rgb.astype(np.uint8))


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    # Pillow already undoes Adobe's inverted CMYK on load. With an embedded ICC profile (print-workflow
    # photos usually have one) a colour-managed transform gives the colours the photographer saw; the
    # naive (1-C)(1-K) formula is the fallback and is what other decoders do without a profile.
    icc = im.info.get("icc_profile")
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(im, src, dst, outputMode="RGB")
        except Exception:  # noqa: BLE001
            pass
    return im.convert("RGB")


def _scale_to_uint8(a: np.ndarray) -> np.ndarray:
    # Mode I / F carry no bit depth, so infer it from the values: integer data that fits 8 or 16 bits is
    # scaled by that range (a 16-bit TIFF read as "I" must not be contrast-stretched per image, or two
    # photos of the same garment would come out differently bright); floats in [0, 1] are normalised;
    # anything else (negative, wider than 16 bits) is stretched min..max as the only sane option.
    is_float = a.dtype.kind == "f"
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if is_float and lo >= 0 and hi <= 1.0:
        out = a * 255.0
    elif lo >= 0 and hi <= 255:
        out = a
    elif lo >= 0 and hi <= 65535:
        out = np.floor(a / 256.0)
    else:
        out = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
