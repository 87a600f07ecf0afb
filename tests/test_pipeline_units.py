"""Unit tests of each featurize DoFn and pure function, without running a whole pipeline."""
from __future__ import annotations

import dataclasses

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from apache_beam.pvalue import TaggedOutput
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

import schemas
from fashionbert.data import synth
from fashionbert.model.patch_cnn import FEATURE_DIM
from pipelines import catalog, images, shards, texts
from pipelines.config import FeaturizeConfig
from tests.bad_corpus import BAD_TEXT_BYTES, png_declaring

CFG = FeaturizeConfig(catalog="/data/cat/manifest.csv", out="/tmp/unused", progress=False, precision="fp32")


def _split(outputs):
    main, tagged = [], []
    for o in outputs:
        (tagged if isinstance(o, TaggedOutput) else main).append(o.value if isinstance(o, TaggedOutput) else o)
    return main, tagged


def _row(**kw) -> catalog.CatalogRow:
    base = dict(row=0, source="images/a.png", image_id="a", product_id="p", group_id="p", text="Red dress")
    return catalog.CatalogRow(**{**base, **kw})


# ------------------------------------------------------------------ catalog parsing

def test_row_from_record_maps_columns_and_falls_back_to_path_as_image_id():
    cfg = dataclasses.replace(CFG, image_id_column="image_id", group_column="code")
    rec = {"product_id": " 42 ", "image": "img/1.jpg", "title": "Dress", "description": "", "category": "Full",
           "subcategory": "Dress", "code": "G1"}
    row = catalog.row_from_record(cfg, "/data/cat", 3, rec)
    assert (row.product_id, row.image_id, row.group_id, row.text) == ("42", "img/1.jpg", "G1", "Dress")
    assert row.image_uri == "/data/cat/img/1.jpg" and row.problem is None and row.row == 3


@pytest.mark.parametrize("ref, uri, reason", [
    ("/abs/x.jpg", "/abs/x.jpg", None),
    ("gs://bucket/x.jpg", "gs://bucket/x.jpg", None),
    ("sub/../x.jpg", "/data/cat/x.jpg", None),
    ("../../etc/passwd", None, "path-outside-catalog"),
    ("", None, "missing-image-path"),
])
def test_resolve_image(ref, uri, reason):
    got, problem = catalog.resolve_image("/data/cat", ref)
    assert got == uri and (problem[0] if problem else None) == reason


def test_csv_with_bom_and_one_non_utf8_row_rejects_only_that_row():
    data = ("\ufeffproduct_id,image_id,image,title,description\n1,a,a.jpg,Dress,Nice\n").encode() + \
        b"2,b,b.jpg,Skirt," + BAD_TEXT_BYTES + b"\n3,c,c.jpg,,\n"
    rows = list(catalog.read_text_manifest(CFG, data, "csv"))
    assert [r.problem[0] if r.problem else None for r in rows] == [None, "bad-text-encoding", "empty-text"]
    assert "\ufffd" in rows[1].text  # what the reject shows is printable


def test_jsonl_bad_line_becomes_a_reject():
    data = b'{"product_id": "1", "image_id": "a", "image": "a.jpg", "title": "T", "description": "D"}\n[1, 2]\n'
    rows = list(catalog.read_text_manifest(CFG, data, "jsonl"))
    assert rows[0].problem is None and rows[1].problem[0] == "bad-manifest-row"


# ------------------------------------------------------------------ image DoFns

def _hash(row):
    fn = images.HashImages(CFG)
    fn.setup()
    return _split(fn.process(row))


def test_hash_images_hashes_synthetic_and_rejects_problems(tmp_path):
    good, rejects = _hash(_row(synth_ref=(0, 1)))
    assert not rejects and len(good[0].content_sha256) == 64
    _, rejects = _hash(_row(problem=("empty-text", "no text")))
    assert rejects[0].reason == "empty-text" and rejects[0].stage == "catalog"
    _, rejects = _hash(_row(image_uri=str(tmp_path / "nope.jpg")))
    assert rejects[0].reason == "missing-file" and rejects[0].stage == "read"
    (tmp_path / "empty.jpg").write_bytes(b"")
    _, rejects = _hash(_row(image_uri=str(tmp_path / "empty.jpg")))
    assert rejects[0].reason == "empty-file"


def test_reconcile_images_dedupes_carries_and_detects_changes():
    fn = images.ReconcileImages(CFG)
    a, b = _row(row=5, content_sha256="s1"), _row(row=2, content_sha256="s1", source="images/b.png")
    chash = images.content_hash("s1", CFG.image_fingerprint())
    plans, rejects = _split(fn.process(("a", {"current": [a, b], "previous": []})))
    assert plans[0].row.row == 2 and plans[0].previous is None  # earliest catalog row wins
    assert rejects[0].reason == "duplicate-image-id" and rejects[0].row == 5
    prev = images.PreviousImage(chash, "old.parquet", 7)
    plans, _ = _split(fn.process(("a", {"current": [a], "previous": [prev]})))
    assert plans[0].previous == prev
    plans, _ = _split(fn.process(("a", {"current": [a], "previous": [images.PreviousImage("other", "f", 0)]})))
    assert plans[0].previous is None
    assert _split(fn.process(("a", {"current": [], "previous": [prev]}))) == ([], [])


def test_decode_images_squares_computes_and_passes_carried_rows(tmp_path):
    fn = images.DecodeImages(CFG)
    fn.setup()
    plan = images.PlannedImage(_row(synth_ref=(0, 3)), "h")
    (out,), _ = _split(fn.process(shards.Sharded(0, 1, 1, plan)))
    element, square, size = out
    assert square.shape == (256, 256, 3) and square.dtype == np.uint8 and size == (
        synth.render_product(0, 3).width, synth.render_product(0, 3).height)
    carried = images.PlannedImage(_row(), "h", images.PreviousImage("h", "f", 0))
    (out,), _ = _split(fn.process(shards.Sharded(0, 1, 1, carried)))
    assert out[1] is None
    (tmp_path / "bomb.png").write_bytes(png_declaring(20000, 20000))
    _, rejects = _split(fn.process(shards.Sharded(0, 1, 1, images.PlannedImage(
        _row(image_uri=str(tmp_path / "bomb.png")), "h"))))
    assert rejects[0].reason == "too-many-pixels" and rejects[0].stage == "decode"


def test_colour_statistics_per_cell():
    """The 6 colour numbers after the CNN's channels: per-cell opponent mean (row-major cells) and spread."""
    import torch

    from fashionbert.model.patch_cnn import _OPPONENT, COLOUR_DIM, colour_statistics

    img = np.zeros((1, 64, 64, 3), dtype=np.float32)
    img[:, :, :32] = (25 / 255, 35 / 255, 95 / 255)  # navy on the left half
    img[:, :, 32:] = (28 / 255, 28 / 255, 30 / 255)  # black on the right half
    stats = colour_statistics(torch.from_numpy(img).permute(0, 3, 1, 2), grid=4)[0].numpy()
    assert stats.shape == (16, COLOUR_DIM)
    left, right = stats[np.arange(16) % 4 < 2], stats[np.arange(16) % 4 >= 2]
    np.testing.assert_allclose(left[:, :3], np.tile(_OPPONENT.numpy() @ img[0, 0, 0], (8, 1)), atol=1e-5)
    np.testing.assert_allclose(stats[:, 3:], 0.0, atol=1e-3)  # flat cells have no spread
    assert np.abs(left[:, :3] - right[:, :3]).max() > 0.3  # navy and black: close for the CNN, far apart here
    striped = np.zeros((1, 8, 8, 3), dtype=np.float32)
    striped[:, ::2] = 1.0
    assert colour_statistics(torch.from_numpy(striped).permute(0, 3, 1, 2), grid=1)[0, 0, 3] > 1.0


class _PixelsCNN(torch.nn.Module):
    """Stands in for EfficientNet: its feature map is the image itself, so a cell's CNN features are its mean colour."""

    def extract_features(self, x):
        return x


@pytest.mark.parametrize("mode", ["grid", "patch"])
def test_patch_order_is_row_major(monkeypatch, mode):
    """Feature i is the cell at row i // grid, column i % grid: the order the model's learned patch position table
    assumes, so it must never change. Checked through the DoFn featurize runs, in both patch modes."""
    from fashionbert.model import patch_cnn

    monkeypatch.setattr(patch_cnn, "load_backbone_cnn", lambda name, image_size: _PixelsCNN())
    grid, p = 4, 8
    colours = np.arange(grid * grid * 3, dtype=np.uint8).reshape(grid, grid, 3) * 5
    square = np.kron(colours, np.ones((p, p, 1), dtype=np.uint8))  # cell (r, c) filled with colours[r, c]
    cfg = dataclasses.replace(CFG, grid=grid, image_size=grid * p, patch_size=p, patch_mode=mode, precision="fp32")
    fn = images.EmbedPatches(cfg, torch_threads=1)
    fn.setup()
    element = shards.Sharded(0, 1, 1, images.PlannedImage(_row(), "h"))
    (row,) = [e.item for e in fn.process([(element, square, (grid * p, grid * p))])]
    features = row["features"].astype(np.float32).reshape(grid * grid, 3 + patch_cnn.COLOUR_DIM)
    rgb = colours.reshape(grid * grid, 3) / 255.0  # row-major cells
    np.testing.assert_allclose(features[:, :3], (rgb - 0.5) / 0.5, atol=2e-3)
    np.testing.assert_allclose(features[:, 3:6], rgb @ patch_cnn._OPPONENT.numpy().T, atol=1e-2)


def test_grid_must_divide_the_image_size():
    from fashionbert.errors import UserError
    from fashionbert.model.patch_cnn import PatchCNN

    with pytest.raises(UserError, match="--image-size 256 is not divisible by --grid 7"):
        PatchCNN(grid=7, image_size=256)


def test_embed_patches_rows_and_carried_features_from_previous_file(tmp_path):
    cfg = dataclasses.replace(CFG, batch_size=2)
    fn = images.EmbedPatches(cfg, torch_threads=1)
    fn.setup()
    squares = np.random.default_rng(0).integers(0, 255, (2, 256, 256, 3), dtype=np.uint8)
    batch = [(shards.Sharded(0, 1, 2, images.PlannedImage(_row(image_id=f"i{k}", content_sha256="s"), f"h{k}")),
              squares[k], (300, 400)) for k in range(2)]
    rows = [e.item for e in fn.process(batch)]
    assert [r["image_id"] for r in rows] == ["i0", "i1"] and rows[0]["content_hash"] == "h0"
    assert rows[0]["features"].dtype == np.float16 and rows[0]["features"].shape == (64 * FEATURE_DIM,)
    table = shards.rows_to_table(rows, schemas.images_schema(8, FEATURE_DIM))
    pq.write_table(table, tmp_path / "prev.parquet", row_group_size=1)  # carried row lives in row group 1
    carried = images.PlannedImage(_row(image_id="i1", content_sha256="s"), "h1",
                                  images.PreviousImage("h1", str(tmp_path / "prev.parquet"), 1))
    (row,) = [e.item for e in fn.process([(shards.Sharded(0, 1, 1, carried), None, None)])]
    assert np.array_equal(row["features"], rows[1]["features"]) and row["width"] == 300


# ------------------------------------------------------------------ text DoFns

def test_reconcile_and_tokenize_texts():
    fp = CFG.text_fingerprint()
    a, b = _row(row=3, category="C"), _row(row=1, category="C0")
    key = texts.text_key(a, fp)
    (plan,) = texts.ReconcileTexts().process((key, {"current": [a, b], "previous": []}))
    assert plan.category == "C0" and plan.previous_row is None  # first catalog row's fields
    prev = {"product_id": "p", "text": "Red dress", "input_ids": [101, 9, 102], "category": "old",
            "subcategory": None, "group_id": "p", "content_hash": key[1]}
    (carried,) = texts.ReconcileTexts().process((key, {"current": [a], "previous": [prev]}))
    assert carried.previous_row["input_ids"] == [101, 9, 102] and carried.previous_row["category"] == "C"
    fn = texts.TokenizeTexts(dataclasses.replace(CFG, max_text_len=5))
    fn.setup()
    out = [e.item for e in fn.process([shards.Sharded(0, 1, 2, plan), shards.Sharded(0, 1, 2, carried)])]
    ids = out[0]["input_ids"]
    assert ids[0] == 101 and ids[-1] == 102 and len(ids) <= 5
    assert out[1]["input_ids"] == [101, 9, 102]


# ------------------------------------------------------------------ shards

def test_assign_shards_balances_and_sorts():
    with TestPipeline(runner="FnApiRunner") as p:
        got = (
            p
            | beam.Create(["g", "c", "a", "f", "b", "e", "d"])
            | shards.AssignShards(lambda x: x, rows_per_shard=3)
            | beam.Map(lambda s: (s.shard, s.num_shards, s.total, s.item))
        )
        assert_that(got, equal_to([(0, 3, 7, "a"), (0, 3, 7, "b"), (0, 3, 7, "c"), (1, 3, 7, "d"), (1, 3, 7, "e"),
                                   (2, 3, 7, "f"), (2, 3, 7, "g")]))


def test_write_shard_rows_streams_row_groups(tmp_path):
    fn = shards.WriteShardRows(str(tmp_path), "rejects", schemas.REJECTS, row_group_rows=2)
    fn.start_bundle()
    for shard in (0, 1):
        for i in range(3):
            fn.process(shards.Sharded(shard, 2, 6, {"source": f"s{shard}{i}", "row": i, "image_id": None,
                                                    "product_id": None, "stage": "read", "reason": "x",
                                                    "detail": "d"}))
    fn.finish_bundle()
    f0 = pq.ParquetFile(tmp_path / "rejects-00000-of-00002.parquet")
    assert f0.metadata.num_rows == 3 and f0.metadata.num_row_groups == 2
    assert schemas.read_table(str(tmp_path / "rejects-00001-of-00002.parquet"), "rejects").column(
        "source").to_pylist() == ["s10", "s11", "s12"]


def test_schema_validation_refuses_other_tables(tmp_path):
    pq.write_table(schemas.TEXTS.empty_table(), tmp_path / "t.parquet")
    with pytest.raises(schemas.SchemaError, match="expected a fashionbert 'images' table"):
        schemas.read_table(str(tmp_path / "t.parquet"), "images")
    import pyarrow as pa

    pq.write_table(pa.table({"x": [1]}), tmp_path / "plain.parquet")
    with pytest.raises(schemas.SchemaError, match="schema name None"):
        schemas.read_table(str(tmp_path / "plain.parquet"), "texts")
