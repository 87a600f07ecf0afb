"""The score cache: a second night on a changed catalog (one text changed, one image changed, a product added, one
removed) computes exactly the pairs and embeddings that involve a new or changed item, and its tables equal a run
without the cache; a cache of another model, another precision, or a damaged or missing file is never used and
warns; evaluate's metrics are the same with a cache; and --save-scores' user errors."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from fashionbert.data.feature_catalog import open_catalog
from fashionbert.data.features import features_to_numpy
from fashionbert.errors import UserError
from fashionbert.evaluation import evaluate
from fashionbert.model.backbone import load_tokenizer
from fashionbert.model.loading import load_model
from fashionbert.model.score_fusion import ScoreFusion
from fashionbert.rank import retrieve
from fashionbert.rank.cross_encoder import CrossEncoderScorer
from fashionbert.rank.embeddings import DualEncoder
from fashionbert.rank.score_cache import ItemKeys, ScoreCache
from fashionbert.runtime import resolve_runtime
from schemas import META_MODEL_VERSION, META_PRECISION, SCORE_CACHE, read_table
from tests.fake_features import make_tiny_backbone, write_fake_features
from tests.test_scoring import fit_itc_head, train_tiny_model

torch.set_num_threads(1)
N_PRODUCTS, FEATURE_DIM = 24, 16
DROPPED, CHANGED_TEXT, CHANGED_IMAGE, ADDED = "p00003", "p00005", "p00007-1", "p00024"
NEW_TEXTS = {CHANGED_TEXT, ADDED}  # product ids whose scored text is new on day 2
NEW_IMAGES = {CHANGED_IMAGE, f"{ADDED}-0", f"{ADDED}-1"}
CACHE_LOG = "fashionbert.rank.score_cache"


def _features(out: Path, n_products: int) -> Path:
    return write_fake_features(out, n_products=n_products, images_per_product=2, feature_dim=FEATURE_DIM,
                               n_image_shards=2, row_group_size=8)


def _day2(base: Path, out: Path) -> Path:
    """Day 2 of the catalog, written as featurize would: `base` (day 1 plus product ADDED) without DROPPED, with
    CHANGED_TEXT's text and CHANGED_IMAGE's features changed (and so their content hashes)."""
    shutil.copytree(base, out)
    [texts] = sorted(out.glob("texts-*.parquet"))
    table = pq.read_table(texts)
    d = table.to_pydict()
    keep = [i for i, p in enumerate(d["product_id"]) if p != DROPPED]
    d = {k: [v[i] for i in keep] for k, v in d.items()}
    i = d["product_id"].index(CHANGED_TEXT)
    d["text"][i] = "purple dotted velvet shirt, now with a longer description"
    d["input_ids"][i] = load_tokenizer(None)(d["text"][i])["input_ids"]
    d["content_hash"][i] = hashlib.sha256(d["text"][i].encode()).hexdigest()
    pq.write_table(pa.Table.from_pydict(d, schema=table.schema), texts)
    for shard in sorted(out.glob("images-*.parquet")):
        table = pq.read_table(shard)
        ids = table.column("image_id").to_pylist()
        table = table.filter(pa.array([not i.startswith(DROPPED + "-") for i in ids]))
        ids = table.column("image_id").to_pylist()
        if CHANGED_IMAGE in ids:
            j = ids.index(CHANGED_IMAGE)
            feats = features_to_numpy(table.column("features"), 64, FEATURE_DIM).copy()
            feats[j] = np.roll(feats[j], 5, axis=1)  # other channels lit: another photo
            hashes = table.column("content_hash").to_pylist()
            hashes[j] = "changed-" + hashes[j]
            for name, arr in (("features", pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)),
                                                                             64 * FEATURE_DIM)),
                              ("content_hash", pa.array(hashes, pa.string()))):
                at = table.schema.get_field_index(name)
                table = table.set_column(at, table.schema.field(at), arr)
        pq.write_table(table, shard, row_group_size=8)
    return out


@pytest.fixture(scope="module")
def catalogs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("catalogs")
    return _features(tmp / "day1", N_PRODUCTS), _day2(_features(tmp / "base", N_PRODUCTS + 1), tmp / "day2")


@pytest.fixture(scope="module")
def models(tmp_path_factory, catalogs):
    """(a model whose ranking score fuses TIA and the itc cosine, the same weights ranking by TIA alone: another
    model_version)."""
    tmp = tmp_path_factory.mktemp("model")
    itc = fit_itc_head(train_tiny_model(tmp, catalogs[0], make_tiny_backbone(tmp / "bert")), catalogs[0],
                       tmp / "itc", steps=20)
    fused = tmp / "fused"
    shutil.copytree(itc, fused)
    ScoreFusion(0.5, 4.0, -1.0, {"source": "test"}).save(fused)
    return fused, itc


def _retrieve(features, model, out, *extra) -> dict:
    parser = argparse.ArgumentParser()
    retrieve.add_arguments(parser)
    return retrieve.run(retrieve.config_from_args(parser.parse_args([
        "--features", str(features), "--model", str(model), "--out", str(out), "--device", "cpu", "--precision", "fp32",
        "--index", "flat", *map(str, extra)])))


def _tables(out: Path) -> dict:
    return {name: read_table(str(out / name), "retrieval").to_pydict()
            for name in (retrieve.TEXT_TO_IMAGE, retrieve.IMAGE_TO_TEXT)}


def _assert_same_tables(got: Path, expected: Path) -> None:
    for name, e in _tables(expected).items():
        g = _tables(got)[name]
        for column in ("query_id", "query_kind", "rank", "candidate_id", "stage", "model_version"):
            assert g[column] == e[column], (name, column)
        for column in ("score", "recall_score"):
            np.testing.assert_allclose(g[column], e[column], atol=1e-5, err_msg=f"{name} {column}")


def _table_pairs(out: Path) -> set[tuple[str, str]]:
    """(product_id, image_id) of every row of both tables: the re-rank's pairs when --top-k = --recall-k."""
    t = _tables(out)
    t2i, i2t = t[retrieve.TEXT_TO_IMAGE], t[retrieve.IMAGE_TO_TEXT]
    return set(zip(t2i["query_id"], t2i["candidate_id"])) | set(zip(i2t["candidate_id"], i2t["query_id"]))


def _hashes(features, model) -> tuple[dict, dict]:
    """product_id -> its scored text's content hash, image_id -> its content hash."""
    catalog = open_catalog([str(features)], load_model(model, resolve_runtime("cpu", "fp32")))
    return (dict(zip(catalog.texts.product_ids, catalog.text_hashes)),
            dict(zip(catalog.index.image_ids, catalog.image_hashes)))


@pytest.fixture
def spy(monkeypatch):
    """What the cross-encoder and the dual encoder actually computed: (product_id, image_id) pairs via the
    catalog passed in, and the number of texts and images embedded."""
    seen = {"pairs": [], "texts": 0, "images": 0}
    score, embed_texts, embed_images = CrossEncoderScorer._score, DualEncoder.embed_texts, DualEncoder.embed_images

    def _score(self, texts, images, pairs, cosines=None):
        seen["pairs"].append(np.array(pairs).reshape(-1, 2))
        return score(self, texts, images, pairs, cosines)

    def _embed_texts(self, texts, **kw):
        seen["texts"] += len(texts)
        return embed_texts(self, texts, **kw)

    def _embed_images(self, batches, **kw):
        batches = list(batches)
        seen["images"] += sum(len(b) for b in batches)
        return embed_images(self, batches, **kw)

    monkeypatch.setattr(CrossEncoderScorer, "_score", _score)
    monkeypatch.setattr(DualEncoder, "embed_texts", _embed_texts)
    monkeypatch.setattr(DualEncoder, "embed_images", _embed_images)

    def scored_ids(features, model) -> list[tuple[str, str]]:
        catalog = open_catalog([str(features)], load_model(model, resolve_runtime("cpu", "fp32")))
        pairs = np.concatenate(seen["pairs"]) if seen["pairs"] else np.zeros((0, 2), dtype=np.int64)
        return [(catalog.texts.product_ids[t], catalog.index.image_ids[i]) for t, i in pairs]

    seen["ids"] = scored_ids
    return seen


# ============================================================================================ retrieve
def test_second_night_scores_exactly_what_changed_and_equals_a_run_without_the_cache(tmp_path, catalogs, models,
                                                                                      spy):
    """--recall-k covers the catalog, so night 1 scored every pair: night 2 must score exactly the pairs that
    involve a new or changed text or image, and embed exactly the new or changed items."""
    day1, day2 = catalogs
    model = models[0]
    k = 2 * (N_PRODUCTS + 1)
    night1 = _retrieve(day1, model, tmp_path / "night1", "--top-k", k, "--recall-k", k,
                       "--save-scores", tmp_path / "night1.parquet")
    c1 = night1["counts"]
    assert c1["pairs_scored"] == c1["cross_encoder_pairs"] == N_PRODUCTS * 2 * N_PRODUCTS and c1["pairs_reused"] == 0
    assert c1["embeddings_computed"] == 3 * N_PRODUCTS and c1["embeddings_reused"] == 0
    scratch = _retrieve(day2, model, tmp_path / "scratch", "--top-k", k, "--recall-k", k)
    spy.update(pairs=[], texts=0, images=0)

    night2 = _retrieve(day2, model, tmp_path / "night2", "--top-k", k, "--recall-k", k,
                       "--score-cache", tmp_path / "night1.parquet", "--save-scores", tmp_path / "night2.parquet")
    _assert_same_tables(tmp_path / "night2", tmp_path / "scratch")
    pairs = _table_pairs(tmp_path / "night2")
    changed = {(p, i) for p, i in pairs if p in NEW_TEXTS or i in NEW_IMAGES}
    assert len(changed) == 2 * 48 + 3 * 22  # 2 texts x every image, 3 images x the 22 unchanged texts
    c2 = night2["counts"]
    assert c2["cross_encoder_pairs"] == scratch["counts"]["cross_encoder_pairs"] == len(pairs)
    assert c2["pairs_scored"] == len(changed) and c2["pairs_reused"] == len(pairs) - len(changed)
    scored = spy["ids"](day2, model)
    assert len(scored) == len(set(scored)) and set(scored) == changed  # the changed ones and nothing else
    assert (c2["embeddings_computed"], spy["texts"], spy["images"]) == (5, 2, 3)
    assert c2["embeddings_reused"] == 22 + 45
    assert night2["score_cache"]["inputs"][0]["used"] is True

    # The saved cache holds what night 2 used, computed or reused; what left the catalog is gone.
    saved = read_table(str(tmp_path / "night2.parquet"), "score_cache")
    kinds = saved.column("kind").to_pylist()
    assert (kinds.count("pair"), kinds.count("text"), kinds.count("image")) == (len(pairs), N_PRODUCTS, 48)
    text_hash, image_hash = _hashes(day2, model)
    assert set(h for h in saved.column("text_hash").to_pylist() if h) == set(text_hash.values())
    assert set(h for h in saved.column("image_hash").to_pylist() if h) == set(image_hash.values())
    meta = saved.schema.metadata
    assert meta[META_MODEL_VERSION].decode() == night2["model"]["version"] and meta[META_PRECISION] == b"fp32"


def test_with_a_narrow_recall_only_pairs_new_to_the_cache_are_scored(tmp_path, catalogs, models, spy):
    """--recall-k below the catalog: the tables equal a run without the cache, and the pairs scored are exactly
    those of night 2's re-rank whose (text hash, image hash) night 1 did not score."""
    day1, day2 = catalogs
    model = models[0]
    _retrieve(day1, model, tmp_path / "night1", "--top-k", 6, "--recall-k", 6, "--save-scores", tmp_path / "c.parquet")
    _retrieve(day2, model, tmp_path / "scratch", "--top-k", 6, "--recall-k", 6)
    spy.update(pairs=[], texts=0, images=0)
    night2 = _retrieve(day2, model, tmp_path / "night2", "--top-k", 6, "--recall-k", 6, "--score-cache",
                       tmp_path / "c.parquet")
    _assert_same_tables(tmp_path / "night2", tmp_path / "scratch")
    (t1, i1), (t2, i2) = _hashes(day1, model), _hashes(day2, model)
    before = {(t1[p], i1[i]) for p, i in _table_pairs(tmp_path / "night1")}
    now = {(p, i) for p, i in _table_pairs(tmp_path / "night2")}
    new = {(p, i) for p, i in now if (t2[p], i2[i]) not in before}
    assert {(p, i) for p, i in now if p in NEW_TEXTS or i in NEW_IMAGES} <= new
    assert night2["counts"]["pairs_scored"] == len(new) and set(spy["ids"](day2, model)) == new
    assert night2["counts"]["pairs_reused"] == len(now) - len(new) > 0
    assert (spy["texts"], spy["images"]) == (2, 3)


def test_a_cache_of_another_model_version_is_never_used(tmp_path, catalogs, models, caplog):
    day1, _ = catalogs
    fused, tia_only = models
    _retrieve(day1, fused, tmp_path / "a", "--top-k", 4, "--recall-k", 6, "--save-scores", tmp_path / "c.parquet")
    with caplog.at_level(logging.WARNING, logger=CACHE_LOG):
        other = _retrieve(day1, tia_only, tmp_path / "b", "--top-k", 4, "--recall-k", 6,
                          "--score-cache", tmp_path / "c.parquet")
    c = other["counts"]
    assert c["pairs_reused"] == c["embeddings_reused"] == 0
    assert c["pairs_scored"] == c["cross_encoder_pairs"] and c["embeddings_computed"] == 3 * N_PRODUCTS
    assert any("model_version" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert other["score_cache"]["inputs"][0]["used"] is False
    _retrieve(day1, tia_only, tmp_path / "scratch", "--top-k", 4, "--recall-k", 6)
    _assert_same_tables(tmp_path / "b", tmp_path / "scratch")


def _damaged_files(tmp_path: Path, good: Path, features: Path) -> dict[str, Path]:
    data = good.read_bytes()
    files = {"truncated": tmp_path / "truncated.parquet", "not parquet": tmp_path / "junk.parquet",
             "another schema": next(features.glob("texts-*.parquet")), "missing": tmp_path / "missing.parquet",
             "null margin": tmp_path / "null.parquet", "ragged vectors": tmp_path / "ragged.parquet"}
    files["truncated"].write_bytes(data[:len(data) // 2])
    files["not parquet"].write_bytes(b"PAR1 this is not a parquet file")
    table = read_table(str(good), "score_cache")
    pairs = table.filter(pc.equal(table.column("kind"), "pair")).slice(0, 3)
    at = table.schema.get_field_index("margin")
    pq.write_table(pairs.set_column(at, table.schema.field(at), pa.nulls(3, pa.float32())), files["null margin"])
    texts = table.filter(pc.equal(table.column("kind"), "text")).slice(0, 2)
    vec = pa.array([[0.5, 0.5], [0.1, 0.2, 0.3]], pa.list_(pa.float32()))
    at = table.schema.get_field_index("vector")
    pq.write_table(texts.set_column(at, table.schema.field(at), vec), files["ragged vectors"])
    return files


def test_a_damaged_or_missing_cache_is_ignored_with_a_warning(tmp_path, catalogs, models, caplog):
    day1, _ = catalogs
    model = models[0]
    first = _retrieve(day1, model, tmp_path / "a", "--top-k", 4, "--recall-k", 6, "--save-scores",
                      tmp_path / "good.parquet")
    files = _damaged_files(tmp_path, tmp_path / "good.parquet", day1)
    version = first["model"]["version"]
    for what, path in files.items():
        caplog.clear()
        cache = ScoreCache(version, "fp32")
        with caplog.at_level(logging.WARNING, logger=CACHE_LOG):
            cache.load([str(path)])
        assert cache.inputs[0]["used"] is False, what
        assert [r.levelno for r in caplog.records] == [logging.WARNING] and str(path) in caplog.text, what
        keys = ItemKeys(np.array(["t"], dtype=object), np.array(["i"], dtype=object))
        assert cache.margins(keys, np.array([[0, 0]]), lambda p: np.ones(len(p), np.float32)).tolist() == [1.0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=CACHE_LOG):
        again = _retrieve(day1, model, tmp_path / "b", "--top-k", 4, "--recall-k", 6,
                          *[a for p in files.values() for a in ("--score-cache", p)],
                          "--score-cache", tmp_path / "good.parquet")
    assert "no such file" in caplog.text and "not a readable score cache" in caplog.text
    assert [i["used"] for i in again["score_cache"]["inputs"]] == [False] * len(files) + [True]
    c = again["counts"]  # the good file, given last, still serves everything
    assert c["pairs_scored"] == c["embeddings_computed"] == 0 and c["pairs_reused"] == c["cross_encoder_pairs"]
    _assert_same_tables(tmp_path / "b", tmp_path / "a")


def test_a_cache_of_another_precision_is_never_used(tmp_path, catalogs, models, caplog):
    day1, _ = catalogs
    first = _retrieve(day1, models[0], tmp_path / "a", "--top-k", 2, "--recall-k", 3, "--save-scores",
                      tmp_path / "c.parquet")
    cache = ScoreCache(first["model"]["version"], "bf16")
    with caplog.at_level(logging.WARNING, logger=CACHE_LOG):
        cache.load([str(tmp_path / "c.parquet")])
    assert cache.inputs[0]["used"] is False and "fp32" in caplog.text


def test_save_scores_user_errors(tmp_path, catalogs, models):
    day1, _ = catalogs
    with pytest.raises(UserError, match=r"--save-scores .*no-such-folder.* does not exist; create it"):
        _retrieve(day1, models[0], tmp_path / "a", "--save-scores", tmp_path / "no-such-folder" / "s.parquet")
    with pytest.raises(UserError, match="--save-scores .*is a folder"):
        _retrieve(day1, models[0], tmp_path / "a", "--save-scores", tmp_path)
    with pytest.raises(UserError, match="--save-scores .*inside"):
        _retrieve(day1, models[0], tmp_path / "a", "--save-scores", tmp_path / "a" / "s.parquet")
    with pytest.raises(UserError, match="--save-scores .*does not exist"):
        evaluate.run(_evaluate_args(day1, models[0], tmp_path / "m.json", "--save-scores", tmp_path / "x" / "s"))
    assert not list(tmp_path.iterdir())  # refused before any work


# ============================================================================================ evaluate
def _evaluate_args(features, model, out, *extra) -> evaluate.EvaluateConfig:
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    return evaluate.config_from_args(parser.parse_args(list(map(str, [
        "--features", features, "--model", model, "--out", out, "--device", "cpu", "--precision", "fp32",
        "--split", "all", "--queries", 10, "--draws", 2, "--candidates", 8, "--recall-k", 6, "--gallery-max", 12,
        "--exhaustive", *extra]))))


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k not in ("seconds", "score_cache")}
    return obj


def test_evaluate_with_a_cache_gives_the_same_metrics_and_reports_reuse(tmp_path, catalogs, models):
    day1, _ = catalogs
    model = models[0]
    first = evaluate.run(_evaluate_args(day1, model, tmp_path / "m1.json", "--save-scores", tmp_path / "e.parquet"))
    c1 = first["score_cache"]
    assert c1["pairs_reused"] == c1["embeddings_reused"] == 0 and c1["pairs_scored"] > 0
    assert c1["saved"] == str(tmp_path / "e.parquet") and c1["inputs"] == []
    second = evaluate.run(_evaluate_args(day1, model, tmp_path / "m2.json", "--score-cache", tmp_path / "e.parquet"))
    c2 = second["score_cache"]
    assert c2["pairs_scored"] == c2["embeddings_computed"] == 0
    assert c2["pairs_reused"] == c1["pairs_scored"] and c2["embeddings_reused"] == c1["embeddings_computed"]
    assert json.loads((tmp_path / "m2.json").read_text())["score_cache"]["pairs_reused"] == c2["pairs_reused"]
    a, b = _without_timings(first), _without_timings(second)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    # A retrieve run of the same model reuses what evaluate computed (one cache format for both stages).
    night = _retrieve(day1, model, tmp_path / "r", "--top-k", 3, "--recall-k", 6, "--score-cache",
                      tmp_path / "e.parquet")
    assert night["counts"]["embeddings_reused"] > 0


# ============================================================================================ the cache alone
def test_several_files_merge_and_the_first_holding_a_key_wins(tmp_path):
    keys = ItemKeys(np.array(["t0", "t1"], dtype=object), np.array(["i0", "i1"], dtype=object))
    both = np.array([[0, 0], [1, 1]])
    for name, margin, with_vectors in (("a", 1.0, False), ("b", 2.0, True)):
        cache = ScoreCache("v", "fp32", keep=True)
        cache.margins(keys, both[:1] if name == "a" else both, lambda p: np.full(len(p), margin, np.float32))
        if with_vectors:
            cache.vectors("image", keys.image, 4, lambda rows: np.full((len(rows), 4), 3.0, np.float32))
        cache.save(str(tmp_path / f"{name}.parquet"))
    merged = ScoreCache("v", "fp32")
    merged.load([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")])
    assert merged.margins(keys, both, lambda p: pytest.fail("nothing to compute")).tolist() == [1.0, 2.0]
    got = merged.vectors("image", np.array(["i1", "new"], dtype=object), 4,
                         lambda rows: np.zeros((len(rows), 4), np.float32))
    assert got[:, 0].tolist() == [3.0, 0.0]
    assert merged.counts == {"pairs_scored": 0, "pairs_reused": 2, "embeddings_computed": 1, "embeddings_reused": 1}
    assert read_table(str(tmp_path / "b.parquet"), "score_cache").schema.remove_metadata().equals(
        SCORE_CACHE.remove_metadata())
