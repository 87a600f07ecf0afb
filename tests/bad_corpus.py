"""Generator of the bad-input test corpus: a tiny catalog with one fault per row.

The design's bad input policy promises that every kind of bad row (corrupt, truncated, empty, huge or
oddly-moded image, missing file, empty or non-UTF-8 text, duplicate id, a path escaping the catalog)
becomes a reject with a stable reason and that the run goes on. Tests at every level (decode unit tests,
the featurize pipeline, the CLI) need the same catalog to check that promise against, so it is generated
here, in memory and deterministically, rather than checked in as binary fixtures: each file is built to
carry exactly one fault and the whole corpus stays a few tens of kilobytes, the 20000x20000 "bomb"
included (a real tiny PNG whose header is rewritten to declare the huge size).

This is a helper module for tests, not a test file.
"""
from __future__ import annotations

import csv
import io
import pathlib
import struct
import zlib

import numpy as np
from PIL import Image

# Reason codes a decode step must produce by itself; the others come from the pipeline (manifest
# parsing, path resolution, text checks, id de-duplication).
DECODE_REASONS = frozenset({"corrupt-image", "empty-file", "not-an-image", "too-many-pixels"})
PIPELINE_REASONS = frozenset(
    {"missing-file", "empty-text", "bad-text-encoding", "duplicate-image-id", "path-outside-catalog"}
)

MANIFEST_COLUMNS = ("product_id", "image_id", "image", "title", "description", "category", "subcategory")

# Raw bytes that are not UTF-8 (a UTF-16 BOM then Latin-1 "café"): what a spreadsheet export in the
# wrong encoding leaves behind.
BAD_TEXT_BYTES = b"\xff\xfe caf\xe9"
_BAD_TEXT_PLACEHOLDER = "@@NON_UTF8_BYTES@@"


def png_declaring(width: int, height: int) -> bytes:
    """A valid-looking PNG of a few dozen bytes whose header declares width x height.

    The pixel data is that of a 1x1 image, so only a decoder that trusts the header and allocates before
    reading would notice anything; the IHDR CRC is recomputed so the header itself is well-formed.
    """
    buf = io.BytesIO()
    Image.new("1", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    # Signature (8) + IHDR length (4) + b"IHDR" (4), then width, height as big-endian uint32.
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_bytes(img: Image.Image, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85, **save_kwargs)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def product_photo(width: int = 300, height: int = 400, seed: int = 0) -> Image.Image:
    """A plain light background with a coloured 'garment' in the middle, like a catalog photo.

    Smooth shapes compress to a few KB as JPEG, which keeps the corpus small, while the texture stripes
    make sure the entropy-coded scan is long enough to cut in the middle.
    """
    rng = np.random.default_rng(seed)
    a = np.full((height, width, 3), 240, dtype=np.uint8)
    colour = rng.integers(30, 200, size=3, dtype=np.uint8)
    y0, y1, x0, x1 = height // 6, height - height // 6, width // 4, width - width // 4
    a[y0:y1, x0:x1] = colour
    a[y0:y1:8, x0:x1] = colour // 2
    return Image.fromarray(a)


def truncated_jpeg() -> bytes:
    data = jpeg_bytes(product_photo(seed=99))
    return data[: len(data) * 6 // 10]


def rgba_png() -> bytes:
    a = np.zeros((120, 90, 4), dtype=np.uint8)
    a[20:100, 20:70] = (200, 30, 30, 255)  # opaque garment; the rest is transparent black
    return png_bytes(Image.fromarray(a))


def palette_gif() -> bytes:
    img = product_photo(90, 120, seed=3).quantize(colors=16)
    buf = io.BytesIO()
    img.save(buf, "GIF")
    return buf.getvalue()


def animated_gif() -> bytes:
    frames = [product_photo(60, 80, seed=s).quantize(colors=8) for s in (4, 5, 6)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def cmyk_jpeg() -> bytes:
    img = Image.new("CMYK", (90, 120), (0, 0, 0, 10))
    img.paste((255, 0, 0, 0), (20, 20, 70, 100))  # cyan garment
    return jpeg_bytes(img)


def png16() -> bytes:
    a = np.linspace(0, 65535, 90 * 120).reshape(120, 90).astype(np.uint16)
    img = Image.fromarray(a)
    assert img.mode == "I;16"
    return png_bytes(img)


def exif_rotated_jpeg() -> bytes:
    img = product_photo(400, 300, seed=7)  # stored landscape, displayed portrait
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    return jpeg_bytes(img, exif=exif)


def make_bad_corpus(root: pathlib.Path) -> tuple[pathlib.Path, dict[str, str | None]]:
    """Write the corpus under root/catalog and return (manifest path, expectations).

    Layout: root/catalog/manifest.csv with columns product_id,image_id,image,title,description,category,
    subcategory, and the images under root/catalog/images/. The `image` column is relative to the
    manifest's folder.

    expectations maps each row to the reject reason it must produce, or None when the row must be
    featurized successfully. Rows are keyed by image_id, except the one row that reuses an earlier row's
    image_id: that second occurrence is keyed f"{image_id}#dup" (the first occurrence in manifest order
    is the one kept, the later one is the duplicate). So len(expectations) == number of manifest rows,
    and input = accepted + rejected can be checked against it.

    The manifest is written as bytes, UTF-8 except for one row whose description holds BAD_TEXT_BYTES
    (reason "bad-text-encoding"); a reader must reject that row, not the file.
    """
    catalog = pathlib.Path(root) / "catalog"
    images = catalog / "images"
    images.mkdir(parents=True, exist_ok=True)

    rows: list[dict[str, str]] = []
    expectations: dict[str, str | None] = {}

    def add(image_id: str, expected: str | None, *, data: bytes | None = None, image: str | None = None,
            title: str | None = None, description: str | None = None, product_id: str | None = None,
            key: str | None = None) -> None:
        if image is None:
            image = f"images/{image_id}.{_ext(data)}"
        if data is not None:
            (catalog / image).write_bytes(data)
        n = len(rows)
        rows.append({
            "product_id": product_id or f"p{n:03d}",
            "image_id": image_id,
            "image": image,
            "title": f"Product {n} {image_id}" if title is None else title,
            "description": (
                f"A test garment for the {image_id} case, cotton, regular fit." if description is None else description
            ),
            "category": "TOPS",
            "subcategory": "SHIRTS" if n % 2 else "SWEATERS",
        })
        key = key or image_id
        assert key not in expectations, key
        expectations[key] = expected

    for i in range(3):
        add(f"good-{i}", None, data=jpeg_bytes(product_photo(300, 400, seed=i)))
    add("good-landscape", None, data=jpeg_bytes(product_photo(400, 300, seed=10)))
    add("exif-rotated", None, data=exif_rotated_jpeg())
    add("gray-jpeg", None, data=jpeg_bytes(product_photo(90, 120, seed=11).convert("L")))
    add("rgba-png", None, data=rgba_png())
    add("palette-gif", None, data=palette_gif())
    add("animated-gif", None, data=animated_gif())
    add("cmyk-jpeg", None, data=cmyk_jpeg())
    add("png16", None, data=png16())
    add("la-png", None, data=png_bytes(Image.new("LA", (30, 40), (128, 200))))
    add("bilevel-png", None, data=png_bytes(product_photo(90, 120, seed=12).convert("1")))
    add("one-pixel", None, data=png_bytes(Image.new("RGB", (1, 1), (10, 20, 30))))

    add("truncated-jpeg", "corrupt-image", data=truncated_jpeg())
    add("zero-byte", "empty-file", data=b"", image="images/zero-byte.jpg")
    add("text-as-jpg", "not-an-image", data=b"This is a text file, not a JPEG.\n", image="images/text-as-jpg.jpg")
    add("bomb-20000", "too-many-pixels", data=png_declaring(20000, 20000))

    add("missing", "missing-file", image="images/missing.jpg")
    add("empty-text", "empty-text", data=jpeg_bytes(product_photo(seed=20)), title="", description="")
    add("bad-encoding", "bad-text-encoding", data=jpeg_bytes(product_photo(seed=21)),
        description=_BAD_TEXT_PLACEHOLDER)
    add("good-0", "duplicate-image-id", data=jpeg_bytes(product_photo(seed=22)), image="images/good-0-dup.jpg",
        key="good-0#dup")
    add("outside", "path-outside-catalog", image="../../etc/passwd")

    manifest = catalog / "manifest.csv"
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    raw = text.getvalue().encode("utf-8")
    assert raw.count(_BAD_TEXT_PLACEHOLDER.encode()) == 1
    # The placeholder needs no CSV quoting and neither do the raw bytes, so a byte swap keeps the CSV valid.
    manifest.write_bytes(raw.replace(_BAD_TEXT_PLACEHOLDER.encode(), BAD_TEXT_BYTES))
    return manifest, expectations


def _ext(data: bytes | None) -> str:
    if data is None:
        return "jpg"
    if data.startswith(b"\x89PNG"):
        return "png"
    if data.startswith(b"GIF8"):
        return "gif"
    return "jpg"
