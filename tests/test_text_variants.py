"""`featurize --text-variants`: more texts per product, for training only. A catalog row's variants are its named
columns joined as --text-columns are, distinct, non-empty and never its own text; a bad byte in one rejects the row as
any text's does; a missing column or a catalog without columns is one clear error. Featurize writes them to
text_variants-*.parquet (the texts files unchanged) and carries them over with --previous. The reader puts a
product's variants after its own texts (what scoring and validation use stays first) and only when asked; training
draws them unless --no-text-variants, records the choice, and --resume refuses a mismatch."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas
from fashionbert.data import synth
from fashionbert.data.features import load_texts, open_feature_folder
from fashionbert.errors import UserError
from fashionbert.model.backbone import load_tokenizer
from fashionbert.train import checkpoint as ckpt
from fashionbert.train.trainer import run
from pipelines import config as fcfg
from pipelines.catalog import inspect_catalog, row_from_record
from tests.featurize_helpers import featurize, read_kind, read_manifest, run_info, write_manifest
from tests.test_train import FEATURE_DIM, _train_records, make_args, resumed_copy
from tests.fake_features import write_fake_features

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = (("subcategory", "title"), ("category", "description"))


def _cfg(**kw) -> fcfg.FeaturizeConfig:
    return fcfg.FeaturizeConfig(catalog="cat.csv", out="out", text_columns=("title", "description"), **kw)


def test_a_rows_variants_are_distinct_non_empty_and_never_its_own_text():
    cfg = _cfg(text_variants=(("colour", "title"), ("title", "description"), ("blank",), ("colour", "title"),
                              ("description",)))
    rec = {"product_id": "p1", "image": "a.jpg", "title": "Shirt", "description": "Cotton.", "colour": "Red",
           "blank": " "}
    row = row_from_record(cfg, "/cat", 0, rec)
    assert row.problem is None and row.text == "Shirt. Cotton."
    assert row.variant_texts == ("Red. Shirt", "Cotton.")  # the main text, the empty one and the repeat are not kept
    assert row_from_record(_cfg(), "/cat", 0, rec).variant_texts == ()
    bad = row_from_record(cfg, "/cat", 0, {**rec, "colour": "R\udce9d"})  # a byte that was not UTF-8
    assert bad.problem[0] == "bad-text-encoding" and bad.variant_texts == ()


def test_options_parse_and_refuse_an_empty_variant():
    assert fcfg.parse_variants("a, b; c") == (("a", "b"), ("c",))
    assert fcfg.parse_variants(" ") == ()
    parser = argparse.ArgumentParser()
    fcfg.add_arguments(parser)
    args = parser.parse_args(["--catalog", "c.csv", "--out", "o", "--text-variants", "type,colour;colour,title"])
    cfg = fcfg.config_from_args(args)
    assert cfg.text_variants == (("type", "colour"), ("colour", "title"))
    with pytest.raises(UserError, match="--text-variants 'a;' has an empty variant"):
        _cfg(text_variants=fcfg.parse_variants("a;")).check()
    from fashionbert.train import distill  # distill draws its pairs as train does, with the same switch

    parser = argparse.ArgumentParser()
    distill.add_arguments(parser)
    args = parser.parse_args(["--teacher", "t", "--layers", "1", "--out", "o", "--no-text-variants"])
    assert distill.config_from_args(args).text_variants is False


def test_a_missing_variant_column_or_a_catalog_without_columns_is_one_clear_error(tmp_path):
    manifest = synth.write_catalog(tmp_path / "cat", 2, seed=1)
    cfg = fcfg.FeaturizeConfig(catalog=manifest, out=str(tmp_path / "o"), text_variants=(("title", "colour"),))
    with pytest.raises(UserError, match=r"column\(s\) \['colour'\] not found.*--text-variants"):
        inspect_catalog(cfg)
    with pytest.raises(UserError, match="synthetic catalog, whose texts are fixed.*drop --text-variants"):
        inspect_catalog(fcfg.FeaturizeConfig(catalog="synthetic:4", out="o", text_variants=(("title",),)))


def test_featurize_writes_variants_beside_unchanged_texts_and_carries_them_over(tmp_path):
    manifest = synth.write_catalog(tmp_path / "cat", 6, seed=3)
    rows = read_manifest(manifest)
    plain = tmp_path / "plain"
    featurize(manifest, plain)
    assert not list(plain.glob("text_variants-*"))
    first = tmp_path / "first"
    proc = subprocess.run([sys.executable, "-m", "fashionbert.commands.cli", "featurize", "--catalog", manifest, "--out",
                           str(first), "--text-variants", "subcategory,title; category,description", "--no-progress",
                           "--runner=FnApiRunner"], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    assert "6 images, 6 texts (+12 training variants)," in proc.stdout
    summary = run_info(first)
    assert read_kind(first, "texts").to_pylist() == read_kind(plain, "texts").to_pylist()
    table = read_kind(first, "text_variants")
    assert schemas.schema_name(table.schema) == "text_variants"
    got = {(r["product_id"], r["text"]) for r in table.to_pylist()}
    want = {(r["product_id"], f"{r[a]}. {r[b]}") for r in rows for a, b in VARIANTS}
    assert got == want and len(got) == 12
    tokenizer = load_tokenizer(None)
    for r in table.to_pylist():
        assert r["input_ids"] == tokenizer(r["text"], truncation=True, max_length=64)["input_ids"]
    assert summary["counts"]["text_variants"] == 12
    assert summary["counts"]["text_variant_rows"] == {"computed": 12, "carried": 0, "deleted": 0}
    assert run_info(first)["options"]["text_variants"] == [list(v) for v in VARIANTS]

    rows[0]["description"] += " Now in linen."
    write_manifest(manifest, rows)
    second = tmp_path / "second"
    summary = featurize(manifest, second, previous=str(first), text_variants=VARIANTS)
    assert summary["counts"]["text_variant_rows"] == {"computed": 1, "carried": 11, "deleted": 1}
    featurize(manifest, tmp_path / "full", text_variants=VARIANTS)
    assert read_kind(second, "text_variants").to_pylist() == read_kind(tmp_path / "full", "text_variants").to_pylist()


def _with_variants(features, out):
    """A copy of a fake features folder with two variant texts per product (one of them repeating its text, which the
    reader skips) and one for a product that has no texts row."""
    shutil.copytree(features, out)
    texts = pq.read_table(features / "texts-00000-of-00001.parquet").to_pylist()
    tokenizer = load_tokenizer(None)
    rows = []
    for t in texts:
        for text in (f"a {t['subcategory']} in {t['text'].split()[0]}", t["text"]):
            rows.append({**t, "text": text, "content_hash": f"h:{text}",
                         "input_ids": tokenizer(text, truncation=True, max_length=64)["input_ids"]})
        rows[-1]["content_hash"] = t["content_hash"]  # the product's own text again
    rows.append({**texts[0], "product_id": "nobody", "content_hash": "h:nobody"})
    pq.write_table(pa.Table.from_pylist(rows, schema=schemas.TEXT_VARIANTS), out / "text_variants-00000-of-00001.parquet")
    return out, texts


@pytest.fixture(scope="module")
def variant_features(tmp_path_factory):
    plain = write_fake_features(tmp_path_factory.mktemp("features"), n_products=40, images_per_product=2,
                                feature_dim=FEATURE_DIM, n_image_shards=2, row_group_size=8)
    return _with_variants(plain, tmp_path_factory.mktemp("variants") / "features")


def test_the_reader_puts_variants_after_a_products_own_texts_and_only_when_asked(variant_features):
    features, texts = variant_features
    folder = open_feature_folder(features)
    assert [p.rsplit("/", 1)[-1] for p in folder.variant_shards] == ["text_variants-00000-of-00001.parquet"]
    plain, with_variants = load_texts([folder]), load_texts([folder], variants=True)
    assert plain.variant_texts == 0 and all(len(ids) == 1 for ids in plain.input_ids)
    assert with_variants.variant_texts == len(texts) and "nobody" not in with_variants.index
    for p in range(len(texts)):
        assert len(with_variants.input_ids[p]) == 2
        assert list(with_variants.input_ids[p][0]) == list(plain.input_ids[p][0])  # scoring's and validation's text
        assert with_variants.content_hash[p][1].startswith("h:a ")


def test_training_draws_variants_unless_told_not_to_and_resume_must_match(tmp_path, variant_features, tiny_backbone):
    features, _ = variant_features
    args = ("--steps", 4, "--checkpoint-every", 2, "--val-every", 0, "--matching-only")
    out = tmp_path / "variants"
    run(make_args(features, out, tiny_backbone, *args))
    assert json.loads((ckpt.latest_checkpoint(out) / ckpt.STATE_JSON).read_text())["options"]["text_variants"] is True
    without = tmp_path / "without"
    run(make_args(features, without, tiny_backbone, *args, "--no-text-variants"))
    assert [r["loss"] for r in _train_records(without)] != [r["loss"] for r in _train_records(out)]
    resumed = resumed_copy(out, tmp_path / "resumed", features, tiny_backbone, args)
    assert [r["loss"] for r in _train_records(resumed)] == [r["loss"] for r in _train_records(out)]
    with pytest.raises(UserError, match=r"--text-variants False \(checkpoint: True\)"):
        run(make_args(features, resumed, tiny_backbone, *args, "--no-text-variants", "--steps", 6, "--resume"))
