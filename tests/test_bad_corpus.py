"""The bad-input corpus says what it promises: each decode-level fault is refused by decode_image with
that reason, each valid image decodes and squares, and rows meant to fail for a pipeline-level reason
carry no second, image-level fault that would make the expected reason ambiguous."""
from __future__ import annotations

import csv
import pathlib

import numpy as np
import pytest

from pipelines.decode import decode_image, fit_square
from pipelines.rejects import RejectError

try:
    from tests.bad_corpus import BAD_TEXT_BYTES, DECODE_REASONS, MANIFEST_COLUMNS, PIPELINE_REASONS, make_bad_corpus
except ImportError:  # tests/ is on sys.path instead of the repo root (plain `pytest`, no __init__.py)
    from bad_corpus import BAD_TEXT_BYTES, DECODE_REASONS, MANIFEST_COLUMNS, PIPELINE_REASONS, make_bad_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    manifest, expectations = make_bad_corpus(tmp_path_factory.mktemp("bad"))
    raw = manifest.read_bytes()
    # surrogateescape keeps the one non-UTF-8 row readable here without hiding it (see test below).
    reader = csv.DictReader(raw.decode("utf-8", errors="surrogateescape").splitlines())
    assert tuple(reader.fieldnames) == MANIFEST_COLUMNS
    rows, seen = {}, set()
    for row in reader:
        key = row["image_id"] + ("#dup" if row["image_id"] in seen else "")
        seen.add(row["image_id"])
        rows[key] = row
    return manifest, expectations, rows, raw


def _path(manifest: pathlib.Path, row: dict) -> pathlib.Path:
    return manifest.parent / row["image"]


def _cases(kind):
    # Collected at import time from a throwaway corpus, so each row is its own test id.
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        _, expectations = make_bad_corpus(pathlib.Path(d))
    if kind == "decode":
        return sorted(k for k, v in expectations.items() if v in DECODE_REASONS)
    if kind == "valid":
        return sorted(k for k, v in expectations.items() if v is None)
    return sorted(k for k, v in expectations.items() if v in PIPELINE_REASONS)


def test_every_row_has_one_expectation(corpus):
    _, expectations, rows, _ = corpus
    assert set(rows) == set(expectations)
    assert set(expectations.values()) <= DECODE_REASONS | PIPELINE_REASONS | {None}
    # Every reason in the policy is represented at least once.
    assert DECODE_REASONS | PIPELINE_REASONS <= set(expectations.values())
    assert sum(v is None for v in expectations.values()) >= 3


@pytest.mark.parametrize("key", _cases("decode"))
def test_decode_level_faults_are_rejected_with_their_reason(corpus, key):
    manifest, expectations, rows, _ = corpus
    with pytest.raises(RejectError) as info:
        decode_image(_path(manifest, rows[key]).read_bytes())
    assert info.value.reason == expectations[key]


@pytest.mark.parametrize("key", _cases("valid"))
def test_valid_images_decode_and_square(corpus, key):
    manifest, _, rows, _ = corpus
    img = decode_image(_path(manifest, rows[key]).read_bytes())
    assert img.mode == "RGB"
    square = fit_square(img, 256)
    assert square.shape == (256, 256, 3) and square.dtype == np.uint8


@pytest.mark.parametrize("key", _cases("pipeline"))
def test_pipeline_level_rows_have_no_image_fault(corpus, key):
    manifest, expectations, rows, _ = corpus
    row, reason = rows[key], expectations[key]
    catalog = manifest.parent.resolve()
    path = (manifest.parent / row["image"]).resolve()
    if reason == "missing-file":
        assert path.is_relative_to(catalog) and not path.exists()
    elif reason == "path-outside-catalog":
        assert not path.is_relative_to(catalog)
    else:
        assert fit_square(decode_image(path.read_bytes()), 256).shape == (256, 256, 3)


def test_text_faults(corpus):
    _, expectations, rows, raw = corpus
    empty = [k for k, v in expectations.items() if v == "empty-text"]
    assert empty and all(rows[k]["title"] == "" and rows[k]["description"] == "" for k in empty)
    assert raw.count(BAD_TEXT_BYTES) == 1
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    bad = [k for k, v in expectations.items() if v == "bad-text-encoding"]
    assert len(bad) == 1
    # Only that row's line is undecodable: the rest of the manifest is clean UTF-8.
    lines = raw.split(b"\n")
    undecodable = [ln for ln in lines if _not_utf8(ln)]
    assert len(undecodable) == 1 and bad[0].encode() in undecodable[0]


def test_duplicate_points_at_another_valid_image(corpus):
    manifest, expectations, rows, _ = corpus
    dups = [k for k, v in expectations.items() if v == "duplicate-image-id"]
    assert len(dups) == 1 and dups[0].endswith("#dup")
    original = dups[0].removesuffix("#dup")
    assert expectations[original] is None
    assert rows[dups[0]]["image"] != rows[original]["image"]
    assert rows[dups[0]]["product_id"] != rows[original]["product_id"]


def test_corpus_is_tiny(corpus):
    manifest, _, _, _ = corpus
    sizes = [p.stat().st_size for p in manifest.parent.rglob("*") if p.is_file()]
    assert sum(sizes) < 1_000_000


def _not_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False
