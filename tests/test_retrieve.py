"""Retrieval tables: schema, sortedness, K rows per query, atomic publication, read by pyarrow.dataset as a
downstream system would; two-stage equals exhaustive when recall-k covers the catalog; the recall stage's
index choice, faiss's -1 padding and the order of tied neighbours."""
from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pyarrow.csv as pcsv
import pyarrow.dataset as ds
import pytest
import torch

from fashionbert.data.feature_catalog import IndexedImages, open_catalog
from fashionbert.errors import UserError
from fashionbert.model.loading import load_model
from fashionbert.model.score_fusion import ScoreFusion
from fashionbert.rank import neighbours as recall
from fashionbert.rank import retrieve, score_pairs
from fashionbert.rank.cross_encoder import CrossEncoderScorer
from fashionbert.rank.hubness import Hubness, hubness_biases
from fashionbert.runtime import resolve_runtime
from schemas import RETRIEVAL, read_table
from tests.fake_features import make_tiny_backbone, write_fake_features
from tests.test_scoring import fit_itc_head, train_tiny_model

torch.set_num_threads(1)
N_PRODUCTS, IMAGES_PER_PRODUCT = 24, 2


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return write_fake_features(tmp_path_factory.mktemp("features"), n_products=N_PRODUCTS,
                               images_per_product=IMAGES_PER_PRODUCT, feature_dim=16, n_image_shards=2, row_group_size=8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, features):
    tmp = tmp_path_factory.mktemp("model")
    return train_tiny_model(tmp, features, make_tiny_backbone(tmp / "bert"))


@pytest.fixture(scope="module")
def itc_model_dir(tmp_path_factory, features, model_dir):
    return fit_itc_head(model_dir, features, tmp_path_factory.mktemp("itc") / "model", steps=20)


def _args(features, model, out, *extra) -> retrieve.RetrieveConfig:
    parser = argparse.ArgumentParser()
    retrieve.add_arguments(parser)
    return retrieve.config_from_args(parser.parse_args([
        "--features", str(features), "--model", str(model), "--out", str(out), "--device", "cpu", "--precision", "fp32",
        *map(str, extra)]))


def test_tables_schema_sorted_k_rows_and_published(tmp_path, features, itc_model_dir):
    out = tmp_path / "retrieval"
    summary = retrieve.run(_args(features, itc_model_dir, out, "--top-k", 5, "--recall-k", 10))
    assert (out / "_SUCCESS").is_file() and not list(tmp_path.glob("*.staging-*"))
    run_info = json.loads((out / "_run.json").read_text())
    version = load_model(itc_model_dir, resolve_runtime("cpu", "fp32")).version
    assert run_info["model"]["version"] == version and "itc_head" in run_info["recall_embedding"]
    assert run_info["index_used"] == "flat"
    folders = open_catalog([str(features)], load_model(itc_model_dir, resolve_runtime("cpu", "fp32")))
    image_ids, product_ids = set(folders.index.image_ids), set(folders.texts.product_ids)
    for name, kind, n_queries, candidates in (("text_to_image.parquet", "text", N_PRODUCTS, image_ids),
                                              ("image_to_text.parquet", "image", N_PRODUCTS * IMAGES_PER_PRODUCT, product_ids)):
        table = read_table(str(out / name), "retrieval")  # validates the schema contract
        assert table.schema.remove_metadata().equals(RETRIEVAL.remove_metadata())
        d = table.to_pydict()
        keys = list(zip(d["query_id"], d["rank"]))
        assert keys == sorted(keys)
        assert table.num_rows == 5 * n_queries
        for q in set(d["query_id"]):
            rows = [i for i, x in enumerate(d["query_id"]) if x == q]
            assert [d["rank"][i] for i in rows] == [1, 2, 3, 4, 5]
            scores = [d["score"][i] for i in rows]
            assert scores == sorted(scores, reverse=True)
            assert len({d["candidate_id"][i] for i in rows}) == 5
        assert set(d["candidate_id"]) <= candidates
        assert set(d["query_kind"]) == {kind} and set(d["stage"]) == {"rerank"}
        assert set(d["model_version"]) == {version} and set(d["run_id"]) == {run_info["run_id"]}
        assert all(0.0 < s < 1.0 for s in d["score"]) and all(-1.0 <= s <= 1.0 + 1e-6 for s in d["recall_score"])
    assert summary["counts"]["cross_encoder_pairs"] < summary["counts"]["exhaustive_pairs"]


def test_pyarrow_dataset_reads_the_tables_as_downstream_would(tmp_path, features, itc_model_dir):
    out = tmp_path / "retrieval"
    retrieve.run(_args(features, itc_model_dir, out, "--top-k", 3, "--recall-k", 6))
    # The whole folder is one dataset (pyarrow skips _SUCCESS and _run.json): filter and project like a ranker.
    dataset = ds.dataset(str(out), format="parquet")
    assert dataset.schema.remove_metadata().equals(RETRIEVAL.remove_metadata())
    top1 = dataset.to_table(columns=["query_id", "candidate_id", "score"],
                            filter=(ds.field("query_kind") == "text") & (ds.field("rank") == 1))
    assert top1.num_rows == N_PRODUCTS
    one = dataset.to_table(filter=ds.field("query_id") == "p00007-1")
    assert one.column("rank").to_pylist() == [1, 2, 3] and set(one.column("query_kind").to_pylist()) == {"image"}
    assert dataset.count_rows() == 3 * (N_PRODUCTS + N_PRODUCTS * IMAGES_PER_PRODUCT)


def _every_margin(model, features):
    """The loaded model, its catalog, and the TIA margin of every (text, image) pair as a texts x images matrix."""
    rt = resolve_runtime("cpu", "fp32")
    loaded = load_model(model, rt)
    catalog = open_catalog([str(features)], loaded)
    texts, n_images = catalog.text_ids, len(catalog.index)
    pairs = np.stack(np.meshgrid(np.arange(len(texts)), np.arange(n_images), indexing="ij"), -1).reshape(-1, 2)
    margin = CrossEncoderScorer(loaded.model, rt).score(texts, IndexedImages(catalog.index, catalog.reader), pairs)
    return loaded, catalog, margin.reshape(len(texts), n_images)


def test_two_stage_equals_exhaustive_when_recall_covers_the_catalog(tmp_path, features, model_dir):
    """recall-k >= catalog size: every pair reaches the re-rank, so the tables are the exhaustive cross-encoder
    ranking. Uses the model without an itc head (the backbone-fallback recall), which must work too."""
    out = tmp_path / "retrieval"
    n_images = N_PRODUCTS * IMAGES_PER_PRODUCT
    retrieve.run(_args(features, model_dir, out, "--top-k", n_images, "--recall-k", n_images, "--index", "flat"))
    assert "fallback" in json.loads((out / "_run.json").read_text())["recall_embedding"]
    _, catalog, m = _every_margin(model_dir, features)
    t2i = read_table(str(out / "text_to_image.parquet"), "retrieval").to_pydict()
    i2t = read_table(str(out / "image_to_text.parquet"), "retrieval").to_pydict()
    assert len(t2i["query_id"]) == N_PRODUCTS * n_images and len(i2t["query_id"]) == n_images * N_PRODUCTS
    for t, pid in enumerate(catalog.texts.product_ids):
        rows = [i for i, q in enumerate(t2i["query_id"]) if q == pid]
        got = [t2i["candidate_id"][i] for i in rows]
        got_m = m[t, [catalog.index.image_ids.index(c) for c in got]]
        assert np.all(np.diff(got_m) <= 0)  # the table's order is the exhaustive score order
        assert sorted(got) == sorted(catalog.index.image_ids)
        p = 1 / (1 + np.exp(-got_m.astype(np.float64)))
        np.testing.assert_allclose([t2i["score"][i] for i in rows], p, atol=1e-6)
    for i, iid in enumerate(catalog.index.image_ids):
        rows = [r for r, q in enumerate(i2t["query_id"]) if q == iid]
        got_m = m[[catalog.texts.index[c] for c in (i2t["candidate_id"][r] for r in rows)], i]
        assert len(rows) == N_PRODUCTS and np.all(np.diff(got_m) <= 0)


def test_tables_rank_by_the_fused_score_of_the_model_folder(tmp_path, features, itc_model_dir):
    """With a score_fusion.json, `score` = sigmoid(a x TIA margin + b x recall cosine + c), rows ranked by it, and
    the model version names the fusion."""
    model = tmp_path / "model"
    shutil.copytree(itc_model_dir, model)
    fused = ScoreFusion(0.5, 4.0, -1.0, {"source": "test"})
    fused.save(model)
    out = tmp_path / "retrieval"
    n_images = N_PRODUCTS * IMAGES_PER_PRODUCT
    summary = retrieve.run(_args(features, model, out, "--top-k", n_images, "--recall-k", n_images, "--index", "flat"))
    assert "itc cosine" in summary["ranking_score"] and "-s" in summary["model"]["version"]
    loaded, catalog, margin = _every_margin(model, features)
    assert loaded.fusion == fused and loaded.version == summary["model"]["version"]
    t2i = read_table(str(out / "text_to_image.parquet"), "retrieval").to_pydict()
    tia_order_differs = False
    for t, pid in enumerate(catalog.texts.product_ids):
        rows = [i for i, q in enumerate(t2i["query_id"]) if q == pid]
        images = [catalog.index.image_ids.index(t2i["candidate_id"][i]) for i in rows]
        cos = np.asarray([t2i["recall_score"][i] for i in rows], dtype=np.float64)
        expected = 1 / (1 + np.exp(-(0.5 * margin[t, images] + 4.0 * cos - 1.0)))
        np.testing.assert_allclose([t2i["score"][i] for i in rows], expected, atol=2e-5)
        assert np.all(np.diff([t2i["score"][i] for i in rows]) <= 0)
        tia_order_differs |= bool(np.any(np.diff(margin[t, images]) > 0))
    assert tia_order_differs  # the cosine changed the order somewhere: the test would notice TIA-only ranking


def test_a_fusion_fitted_on_the_corrected_cosine_recalls_and_ranks_by_it(tmp_path, itc_model_dir):
    """A score_fusion.json with a hubness correction: the fusion reads cos - (bias_image - its mean) - (bias_text -
    its mean) (biases as rank.hubness computes them over the catalog, each text weighing its number of images), rows
    ranked by that score, recall_score the cosine itself, one pair has one score in both tables and in score-pairs,
    and _run.json says what ran. The catalog has 1, 2 or 3 photos per product, so the marginals change the scores."""
    features = write_fake_features(tmp_path / "features", n_products=N_PRODUCTS, images_per_product=(2, 3, 1),
                                   feature_dim=16, n_image_shards=2, row_group_size=8)
    model = tmp_path / "model"
    shutil.copytree(itc_model_dir, model)
    hubness = Hubness(0.05, 5, rounds=3)
    ScoreFusion(0.5, 4.0, -1.0, {"source": "test"}, hubness.describe()).save(model)
    out = tmp_path / "retrieval"
    loaded, catalog, margin = _every_margin(model, features)
    n_images = len(catalog.index)
    summary = retrieve.run(_args(features, model, out, "--top-k", n_images, "--recall-k", n_images, "--index", "flat"))
    scorer = CrossEncoderScorer(loaded.model, resolve_runtime("cpu", "fp32"))
    text_vec, image_vec = retrieve.embed_all(retrieve.dual_encoder_for(scorer), catalog.text_ids,
                                             IndexedImages(catalog.index, catalog.reader), scorer.token_budget)
    biases = hubness_biases(text_vec, image_vec, hubness, "flat", image_text=catalog.index.product)
    uniform = hubness_biases(text_vec, image_vec, Hubness(0.05, 5, rounds=3, marginals="uniform"), "flat")
    assert np.abs((biases.text - biases.text.mean()) - (uniform.text - uniform.text.mean())).max() > 0.01
    assert summary["hubness"] == {**hubness.describe(), "mean_bias": {
        "image": pytest.approx(biases.image.mean(), abs=1e-5), "text": pytest.approx(biases.text.mean(), abs=1e-5)}}
    assert "itc cosine less hubness (T 0.05, k 5, 3 round(s), images marginals" in summary["ranking_score"]
    t2i = read_table(str(out / "text_to_image.parquet"), "retrieval").to_pydict()
    i2t = read_table(str(out / "image_to_text.parquet"), "retrieval").to_pydict()
    i2t_score = {(q, c): s for q, c, s in zip(i2t["query_id"], i2t["candidate_id"], i2t["score"])}
    pairs = []
    for t, pid in enumerate(catalog.texts.product_ids[:6]):
        rows = [i for i, q in enumerate(t2i["query_id"]) if q == pid]
        images = np.asarray([catalog.index.image_ids.index(t2i["candidate_id"][i]) for i in rows])
        cos = text_vec[t] @ image_vec[images].T
        np.testing.assert_allclose([t2i["recall_score"][i] for i in rows], cos, atol=2e-5)
        corrected = cos - (biases.image[images] - biases.image.mean()) - (biases.text[t] - biases.text.mean())
        expected = 1 / (1 + np.exp(-(0.5 * margin[t, images] + 4.0 * corrected - 1.0)))
        np.testing.assert_allclose([t2i["score"][i] for i in rows], expected, atol=2e-5)
        assert np.all(np.diff(expected) <= 1e-6)
        # the same pair, ranked the other way, has the same score
        np.testing.assert_allclose([i2t_score[(t2i["candidate_id"][i], pid)] for i in rows], expected, atol=2e-5)
        pairs += [(pid, t2i["candidate_id"][i], t2i["score"][i]) for i in rows[:3]]
    # score-pairs takes the biases over the same catalog: the same scores
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"product_id": [p for p, _, _ in pairs], "image_id": [i for _, i, _ in pairs]}),
                   tmp_path / "pairs.parquet")
    parser = argparse.ArgumentParser()
    score_pairs.add_arguments(parser)
    score_pairs.run(score_pairs.config_from_args(parser.parse_args([
        "--features", str(features), "--model", str(model), "--pairs", str(tmp_path / "pairs.parquet"), "--out",
        str(tmp_path / "scored.parquet"), "--device", "cpu", "--precision", "fp32"])))
    np.testing.assert_allclose(pq.read_table(tmp_path / "scored.parquet").column("score").to_numpy(),
                               [s for _, _, s in pairs], atol=2e-5)


def test_retrieve_user_errors(tmp_path, features, model_dir):
    with pytest.raises(UserError, match="--recall-k 5 is below --top-k 10"):
        retrieve.run(_args(features, model_dir, tmp_path / "a", "--top-k", 10, "--recall-k", 5))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    with pytest.raises(UserError, match="already exists"):
        retrieve.run(_args(features, model_dir, busy, "--top-k", 2, "--recall-k", 4))
    retrieve.run(_args(features, model_dir, busy, "--top-k", 2, "--recall-k", 4, "--overwrite"))
    assert (busy / "_SUCCESS").is_file() and not (busy / "x").exists()
    with pytest.raises(UserError, match="--run-id '../x'"):
        retrieve.run(_args(features, model_dir, tmp_path / "b", "--top-k", 2, "--recall-k", 4, "--run-id", "../x"))


def test_run_id_option_names_the_tables_run(tmp_path, features, model_dir):
    out = tmp_path / "retrieval"
    summary = retrieve.run(_args(features, model_dir, out, "--top-k", 2, "--recall-k", 4, "--run-id", "nightly-7"))
    assert summary["run_id"] == "nightly-7"
    for name in ("text_to_image.parquet", "image_to_text.parquet"):
        assert set(read_table(str(out / name), "retrieval").column("run_id").to_pylist()) == {"nightly-7"}


# ============================================================================================ recall stage
def _unit(rng, n, d=16):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_faiss_padding_never_leaves_the_recall_stage():
    """An IVF index probing one list returns fewer than k neighbours, padded with id -1 by faiss."""
    rng = np.random.default_rng(0)
    centre_a, centre_b = np.eye(16, dtype=np.float32)[0], -np.eye(16, dtype=np.float32)[0]
    db = np.concatenate([centre_a + 0.05 * _unit(rng, 200), centre_b + 0.05 * _unit(rng, 200)])
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    queries = db[:3]
    raw = recall._build_faiss(db, "ivf", 1, None, 300)
    _, raw_ids = raw.search(queries, 300)
    assert (raw_ids == -1).any()  # the situation exists
    got = recall.search(db, queries, 300, kind="ivf", nprobe=1)
    assert (got.candidate >= 0).all() and len(got) == int((raw_ids >= 0).sum())
    assert np.all(np.bincount(got.query, minlength=3) < 300)
    for q in range(3):
        s = got.score[got.query == q]
        assert np.all(np.diff(s) <= 1e-6)
    # and k above the database size is clipped, not padded
    small = recall.search(db[:4], queries, 10, kind="flat")
    assert np.array_equal(np.bincount(small.query, minlength=3), [4, 4, 4])


def test_index_choice_and_exact_backends_agree():
    assert recall.choose_kind(10, "auto", exact_max=100) == "flat"
    assert recall.choose_kind(1000, "auto", exact_max=100) == "hnsw"
    assert recall.choose_kind(10, "ivf") == "ivf"
    with pytest.raises(UserError, match="--index"):
        recall.choose_kind(10, "annoy")
    rng = np.random.default_rng(1)
    db, q = _unit(rng, 500), _unit(rng, 20)
    flat = recall.search(db, q, 10, kind="flat")
    exact = recall.search(db, q, 10, kind="torch")
    assert np.array_equal(flat.candidate, exact.candidate)
    np.testing.assert_allclose(flat.score, exact.score, atol=1e-5)
    auto = recall.search(db, q, 10, kind="auto", exact_max=100)
    assert auto.kind == "hnsw"
    overlap = np.mean([len(set(auto.candidate[auto.query == i]) & set(flat.candidate[flat.query == i])) / 10
                       for i in range(20)])
    assert overlap >= 0.9
    ivf = recall.search(db, q, 10, kind="ivf")
    assert ivf.kind == "ivf" and (ivf.candidate >= 0).all()


@pytest.mark.parametrize("kind", ["flat", "torch"])
def test_tied_neighbours_come_in_candidate_order_as_the_rerank_orders_them(kind):
    """Catalogs repeat texts (a product's colour variants share one description): their cosines tie exactly. The
    recall lists put ties in candidate order, the order retrieve.rank_rows gives them, so a ranking by the recall
    score itself (a fusion without TIA weight) returns the recall order and Rank@1 does not move."""
    rng = np.random.default_rng(3)
    base = _unit(rng, 40)
    db = np.concatenate([base, base[:10]])  # rows 40..49 repeat rows 0..9, so every repeated pair ties
    db = db[rng.permutation(len(db))]  # and the twins sit at arbitrary indices
    found = recall.search(db, base[:10], 6, kind=kind)
    for q in range(10):
        mine = found.query == q
        cand, score = found.candidate[mine], found.score[mine]
        assert np.array_equal(db[cand[0]], db[cand[1]]) and score[0] == score[1]  # the situation exists
        assert cand[0] < cand[1]
        order = np.lexsort((cand, -score))
        assert np.array_equal(order, np.arange(len(cand)))
    ranked = retrieve.rank_rows(found.query, found.candidate, found.score, found.score.astype(np.float64))
    assert np.array_equal(ranked.candidate, found.candidate)


def test_help_explains_the_options():
    parser = argparse.ArgumentParser()
    retrieve.add_arguments(parser)
    text = parser.format_help()
    for opt in ("--features", "--model", "--out", "--overwrite", "--top-k", "--recall-k", "--index", "--exact-max",
                "--device", "--precision"):
        assert opt in text


def test_a_fusion_without_tia_weight_ranks_by_the_cosine_with_no_cross_encoder_pass(tmp_path, features,
                                                                                     itc_model_dir, monkeypatch):
    """The fit gave TIA no weight (fashionbert/model/score_fusion.py's check): the score is the calibrated cosine,
    retrieve and score-pairs never run the cross-encoder, and the rows say they were ranked by recall."""
    model = tmp_path / "model"
    shutil.copytree(itc_model_dir, model)
    ScoreFusion(0.0, 5.0, -1.0, {"source": "test", "dropped": ["tia"]}).save(model)

    def no_cross_encoder(*args, **kwargs):
        raise AssertionError("the cross-encoder ran for a fusion without TIA weight")

    monkeypatch.setattr(CrossEncoderScorer, "score", no_cross_encoder)
    summary = retrieve.run(_args(features, model, tmp_path / "out", "--top-k", 6, "--recall-k", 8, "--index", "flat"))
    assert summary["counts"]["cross_encoder_pairs"] == 0 and "0 x TIA margin" in summary["ranking_score"]
    for name in (retrieve.TEXT_TO_IMAGE, retrieve.IMAGE_TO_TEXT):
        table = read_table(str(tmp_path / "out" / name), "retrieval").to_pydict()
        assert set(table["stage"]) == {"recall"}
        cos = np.asarray(table["recall_score"], dtype=np.float64)
        np.testing.assert_allclose(table["score"], 1 / (1 + np.exp(-(5.0 * cos - 1.0))), atol=2e-6)
        for q in set(table["query_id"]):  # each query's rows in recall order
            mine = [i for i, x in enumerate(table["query_id"]) if x == q]
            assert [table["rank"][i] for i in mine] == list(range(1, len(mine) + 1))
            assert np.all(np.diff(cos[mine]) <= 0)

    t2i = read_table(str(tmp_path / "out" / retrieve.TEXT_TO_IMAGE), "retrieval").to_pydict()
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("product_id,image_id\n" + "".join(f"{p},{i}\n" for p, i in zip(t2i["query_id"][:10],
                                                                                   t2i["candidate_id"][:10])))
    parser = argparse.ArgumentParser()
    score_pairs.add_arguments(parser)
    score_pairs.run(score_pairs.config_from_args(parser.parse_args([
        "--features", str(features), "--model", str(model), "--pairs", str(pairs), "--out", str(tmp_path / "s.csv"),
        "--device", "cpu", "--precision", "fp32", "--no-progress"])))
    scored = pcsv.read_csv(tmp_path / "s.csv").column("score").to_numpy()
    np.testing.assert_allclose(scored, t2i["score"][:10], atol=2e-5)
