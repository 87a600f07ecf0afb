"""Evaluation: the sample-100 protocol on a fixture whose ranking is known (exact Rank@K, TIA accuracy and AUC),
its candidate draws, full-gallery Rank@K (two-stage and recall-only) and Recall@K on hand-made rankings, and
`fashionbert evaluate` end to end on a tiny trained model."""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from fashionbert.errors import UserError
from fashionbert.evaluation import evaluate
from fashionbert.evaluation import fit_fusion as fuse
from fashionbert.evaluation.evaluate import gallery_ranks, recall_at, recall_order, sample_hundred
from fashionbert.evaluation.sample_hundred import draw_candidates
from fashionbert.model.loading import load_model
from fashionbert.model.score_fusion import FUSION_NAME, ScoreFusion
from fashionbert.rank.cross_encoder import PairScores
from fashionbert.rank.neighbours import Neighbours
from fashionbert.rank.retrieve import rank_rows
from fashionbert.runtime import resolve_runtime
from tests.fake_features import make_tiny_backbone, write_fake_features
from tests.test_scoring import fit_itc_head, train_tiny_model

torch.set_num_threads(1)


# ============================================================================================ sample-100, known ranking
def _known_scorer(calls: list):
    """margin(text t, image i) = (t + 1.5) / 1000 for the true pair, (i + 1) / 1000 otherwise (all > 0). With
    every other product as a candidate: text t's true image beats exactly the images numbered below t -> rank
    101 - t; an image's own text beats all others (they all score (i + 1)/1000) -> rank 1."""
    def score(pairs):
        calls.append(pairs.copy())
        t, i = pairs[:, 0], pairs[:, 1]
        return np.where(t == i, (t + 1.5) / 1000, (i + 1) / 1000)
    return score


def test_sample_hundred_exact_rank_at_k_on_a_known_ranking():
    draws = draw_candidates(["shirts"] * 101, n_queries=101, n_candidates=100, draws=2, seed=0)
    calls: list = []
    m = sample_hundred(draws, _known_scorer(calls))
    for k in (1, 5, 10):
        assert m["t2i"][f"rank{k}"]["mean"] == pytest.approx(k / 101)
        assert m["t2i"][f"rank{k}"]["std"] == 0.0 and m["t2i"][f"rank{k}"]["per_draw"] == [pytest.approx(k / 101)] * 2
        assert m["i2t"][f"rank{k}"]["mean"] == 1.0
    assert m["t2i"]["mean_rank"]["mean"] == pytest.approx(51.0)
    # each distinct pair was scored once, in one call: both draws and both directions shared them
    assert len(calls) == 1
    keys = calls[0][:, 0] * 1000 + calls[0][:, 1]
    assert len(np.unique(keys)) == len(keys) == 101 * 101 == m["pairs_scored"]
    # TIA: every true pair has margin > 0 (accurate), every negative too (inaccurate): accuracy 1/2
    assert m["tia"]["accuracy"]["mean"] == pytest.approx(0.5)
    pos = (np.arange(101) + 1.5) / 1000
    neg = np.concatenate([(np.r_[np.arange(q), np.arange(q + 1, 101)] + 1) / 1000 for q in range(101)]  # t2i
                         + [np.full(100, (q + 1) / 1000) for q in range(101)])  # i2t: image q with the other texts
    auc = ((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())
    assert m["tia"]["auc"]["mean"] == pytest.approx(auc, abs=1e-9)


def test_sample_hundred_ranks_by_the_ranking_score_and_reports_each_head():
    """The ranking score (here a perfect "itc" head alone) decides Rank@K; TIA accuracy/AUC and by_head["tia"] stay
    the TIA margin's."""
    draws = draw_candidates(["shirts"] * 21, n_queries=21, n_candidates=20, draws=1, seed=0)
    known = _known_scorer([])
    tia_only = sample_hundred(draws, known)

    def both(pairs):
        perfect = (pairs[:, 0] == pairs[:, 1]).astype(np.float64)
        return PairScores(known(pairs), perfect.astype(np.float32), perfect)
    m = sample_hundred(draws, both)
    assert m["by_head"]["tia"]["t2i"] == tia_only["t2i"] and m["tia"] == tia_only["tia"]
    assert m["t2i"] == m["by_head"]["itc"]["t2i"] and m["t2i"]["rank1"]["mean"] == 1.0 > tia_only["t2i"]["rank1"]["mean"]
    assert tia_only["by_head"] == {"tia": {"t2i": tia_only["t2i"], "i2t": tia_only["i2t"]}}


def test_sample_hundred_says_how_alike_the_heads_rank_and_how_often_either_is_right():
    """TIA is the known ranking (every image's own text first; text t's image at rank 101 - t); "itc" is that ranking
    plus a perfect term for text->image. Both rank each image's text first; for text->image only itc is right, so
    the heads agree less there, and the oracle ("either head") is right everywhere."""
    draws = draw_candidates(["shirts"] * 21, n_queries=21, n_candidates=20, draws=1, seed=0)
    known = _known_scorer([])

    def scores(pairs, weight):
        tia = known(pairs)
        itc = tia + weight * (pairs[:, 0] == pairs[:, 1])
        return PairScores(tia, itc.astype(np.float32), itc)
    m = sample_hundred(draws, lambda pairs: scores(pairs, 1.0))
    corr, either = m["heads"]["heads_correlation"], m["heads"]["either_head_rank1"]
    assert either["t2i"]["mean"] == either["i2t"]["mean"] == 1.0
    assert m["by_head"]["tia"]["t2i"]["rank1"]["mean"] == pytest.approx(1 / 21)
    assert corr["i2t"]["mean"] > 0.99 and corr["t2i"]["mean"] < 0.5
    # the same ranking twice: correlation 1, and the oracle no better than either head
    same = sample_hundred(draws, lambda pairs: scores(pairs, 0.0))["heads"]
    assert same["heads_correlation"]["t2i"]["mean"] == pytest.approx(1.0)
    assert same["either_head_rank1"]["t2i"]["mean"] == pytest.approx(1 / 21)
    # one head alone: nothing to compare
    assert "heads" not in sample_hundred(draws, known)
    # a constant head has no order: no correlation is reported, the oracle still is
    flat = sample_hundred(draws, lambda pairs: PairScores(known(pairs), np.zeros(len(pairs), np.float32),
                                                          np.zeros(len(pairs))))["heads"]
    assert "heads_correlation" not in flat and "either_head_rank1" in flat


def test_ties_count_against_the_true_candidate():
    draws = draw_candidates(["a"] * 11, n_queries=11, n_candidates=10, draws=1, seed=0)
    m = sample_hundred(draws, lambda pairs: np.zeros(len(pairs)))  # a constant model
    assert m["t2i"]["rank1"]["mean"] == 0.0 and m["t2i"]["rank10"]["mean"] == 0.0
    assert m["t2i"]["mean_rank"]["mean"] == 11.0


def test_draws_take_the_same_subcategory_first_and_fill_randomly():
    sub = ["shirts"] * 150 + ["bags"] * 30 + [""] * 5
    draws = draw_candidates(sub, n_queries=60, n_candidates=100, draws=3, seed=7)
    again = draw_candidates(sub, n_queries=60, n_candidates=100, draws=3, seed=7)
    other = draw_candidates(sub, n_queries=60, n_candidates=100, draws=3, seed=8)
    assert all(np.array_equal(a.queries, b.queries) for a, b in zip(draws, again))
    assert all(np.array_equal(x, y) for a, b in zip(draws, again) for x, y in zip(a.candidates, b.candidates))
    assert not np.array_equal(draws[0].queries, other[0].queries)
    assert not np.array_equal(draws[0].queries, draws[1].queries)  # draws differ from each other
    sub = np.asarray(sub, dtype=object)
    for d in draws:
        assert len(d.queries) == 60 and len(set(d.queries.tolist())) == 60
        for q, c in zip(d.queries, d.candidates):
            assert c[0] == q and len(c) == 101 and len(set(c.tolist())) == 101
            others = sub[c[1:]]
            if sub[q] == "shirts":
                assert (others == "shirts").all()  # 149 others: all from the sub-category
            elif sub[q] == "bags":
                assert (others == "bags").sum() == 29  # all 29 others, then random fill
    small = draw_candidates(["x"] * 5, n_queries=10, n_candidates=100, draws=1, seed=0)
    assert len(small[0].queries) == 5 and all(len(c) == 5 for c in small[0].candidates)


# ============================================================================================ full gallery
def test_gallery_rank_and_recall_at_k_on_hand_made_rankings():
    # 4 text queries, each against images 0..11; query q's true image is image 3q (query 3's is not retrieved)
    query = np.repeat(np.arange(4), 12)
    candidate = np.tile(np.arange(12), 4)
    margin = np.zeros(48, dtype=np.float32)
    true_rank = {0: 1, 1: 5, 2: 11}
    for q, r in true_rank.items():
        rest = [c for c in range(12) if c != 3 * q]
        order = rest[:r - 1] + [3 * q] + rest[r - 1:]
        for pos, c in enumerate(order):
            margin[q * 12 + c] = 100 - pos
    ranked = rank_rows(query, candidate, np.zeros(48, dtype=np.float32), margin)
    ranked = type(ranked)(ranked.query, ranked.candidate, ranked.recall_score, ranked.logit)
    keep = ~((ranked.query == 3) & (ranked.candidate == 9))  # query 3's true image missed by recall
    ranked = type(ranked)(ranked.query[keep], ranked.candidate[keep], ranked.recall_score[keep], ranked.logit[keep])

    def is_true(q, c):
        return c == 3 * q

    m = gallery_ranks(ranked, is_true, np.arange(4), 4)
    assert (m["rank1"], m["rank5"], m["rank10"], m["queries"]) == (0.25, 0.5, 0.5, 4)
    # recall lists: query 0 finds its image first, query 1 third, query 2 never
    neigh = Neighbours(np.array([0, 0, 1, 1, 1, 2]), np.array([0, 5, 4, 7, 3, 1]), np.array([.9, .8, .9, .8, .7, .9],
                       dtype=np.float32), "flat")
    r = recall_at(neigh, is_true, np.arange(3), 3, ks=(1, 3))
    assert r == {"recall@1": pytest.approx(1 / 3), "recall@3": pytest.approx(2 / 3)}
    # ranked by the recall cosine alone, the same lists give Rank@K = Recall@K
    alone = gallery_ranks(recall_order(neigh), is_true, np.arange(3), 3)
    assert (alone["rank1"], alone["rank5"], alone["queries"]) == (pytest.approx(1 / 3), pytest.approx(2 / 3), 3)


# ============================================================================================ end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    features = write_fake_features(tmp / "features", n_products=40, images_per_product=2, feature_dim=16)
    model = train_tiny_model(tmp, features, make_tiny_backbone(tmp / "bert"))
    # Beside OUT/model, so that evaluate finds the training run's split in OUT/checkpoints.
    itc = fit_itc_head(model, features, model.parent / "model-itc", steps=10)
    return features, model, itc


def _args(features, model, out, *extra) -> evaluate.EvaluateConfig:
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    return evaluate.config_from_args(parser.parse_args([
        "--features", str(features), "--model", str(model), "--out", str(out), "--device", "cpu", "--precision", "fp32",
        *map(str, extra)]))


def test_evaluate_writes_all_three_protocols(tmp_path, trained):
    features, model, itc = trained
    out = tmp_path / "metrics.json"
    returned = evaluate.run(_args(features, itc, out, "--queries", 50, "--draws", 2, "--recall-k", 200,
                                  "--exhaustive"))
    metrics = json.loads(out.read_text())
    assert metrics == json.loads(json.dumps(returned))
    split = metrics["split"]
    assert split["kind"] == "validation" and split["val_fraction"] == 0.2 and "training_state.json" in split["from"]
    s = metrics["sample100"]
    assert s["draws"] == 2 and s["queries"] == s["pool_products"] < 40
    for d in ("t2i", "i2t"):
        ranks = [s[d][f"rank{k}"]["mean"] for k in (1, 5, 10)]
        assert ranks == sorted(ranks) and all(0 <= r <= 1 for r in ranks)
        assert len(s[d]["rank1"]["per_draw"]) == 2
    assert 0 <= metrics["tia"]["auc"]["mean"] <= 1 and 0 <= metrics["tia"]["accuracy"]["mean"] <= 1
    g = metrics["full_gallery"]
    assert g["texts"] == s["pool_products"] and g["images"] == 2 * g["texts"] and "by_photos" not in g
    # recall-k covers the gallery: two-stage is the exhaustive ranking, and recall finds every true match
    for d in ("t2i", "i2t"):
        assert g["two_stage"][d] == g["exhaustive"][d]
        assert g["recall"][d]["recall@50"] == 1.0
    assert g["cost"]["cross_encoder_pairs"] == g["cost"]["exhaustive_pairs"] == g["texts"] * g["images"]
    _check_recall_only(metrics)
    _check_hubness(metrics)
    assert "itc_head" in metrics["recall_embedding"]
    assert metrics["model"]["version"] == load_model(itc, resolve_runtime("cpu", "fp32")).version


def test_the_gallery_splits_products_with_several_photos_from_those_with_one(tmp_path, trained):
    """Where some products have several photos, full_gallery.by_photos ranks the same orders over the products with
    several and those with one (text -> image over their texts, image -> text over their photos): the two add up to the
    whole gallery. A gallery of one photo per product, or of several for every product, has no split."""
    _, _, itc = trained
    varied = write_fake_features(tmp_path / "varied", n_products=40, images_per_product=(2, 3, 1), feature_dim=16)
    m = evaluate.run(_args(varied, itc, tmp_path / "m.json", "--split", "all", "--queries", 10, "--draws", 1))
    g = m["full_gallery"]
    split = g["by_photos"]
    assert {n: (split[n]["texts"], split[n]["images"]) for n in split} == {"several": (27, 67), "one": (13, 13)}
    for order in ("two_stage", "recall_only", "recall_hub"):
        for d, count in (("t2i", "texts"), ("i2t", "images")):
            whole = sum(split[n]["rank1"][order][d] * split[n][count] for n in split) / g[count]
            assert whole == pytest.approx(g[order][d]["rank1"])
    assert g["hubness"]["marginals"] == "images"


def _check_recall_only(metrics: dict) -> None:
    """recall_only is the recall stage's own order over two-stage's queries: its Rank@1 is Recall@1, and the re-rank's
    gain is the difference of the two Rank@1; headline carries both."""
    g = metrics["full_gallery"]
    flat = evaluate.headline(metrics)
    for d in ("t2i", "i2t"):
        alone = g["recall_only"][d]
        assert set(alone) == {"rank1", "rank5", "rank10", "queries"} == set(g["two_stage"][d])
        assert alone["queries"] == g["two_stage"][d]["queries"]
        assert alone["rank1"] == g["recall"][d]["recall@1"]
        assert alone["rank1"] <= alone["rank5"] <= alone["rank10"] <= 1
        assert g["rerank_gain"][d] == pytest.approx(g["two_stage"][d]["rank1"] - alone["rank1"])
        assert flat[f"gallery_{d}_recall_only_rank1"] == alone["rank1"]
        assert flat[f"gallery_{d}_rank1"] == g["two_stage"][d]["rank1"]


def _check_hubness(metrics: dict) -> None:
    """The hubness-corrected cosine (on by default) ranks sample-100 beside the raw one and the full gallery's recall
    stage beside recall_only, over the same queries."""
    s, g = metrics["sample100"], metrics["full_gallery"]
    assert s["hubness"] == {"temperature": 0.03, "k": 10, "rounds": 5, "marginals": "images"}
    assert g["hubness"]["temperature"] == 0.03 and g["hubness"]["marginals"] == "images"
    assert set(s["by_head"]["itc_hub"]) == {"t2i", "i2t"}
    for d in ("t2i", "i2t"):
        hub, alone = g["recall_hub"][d], g["recall_only"][d]
        assert set(hub) == set(alone) and hub["queries"] == alone["queries"]
        assert hub["rank1"] <= hub["rank5"] <= hub["rank10"] <= 1
        assert g["hubness"]["gain"][d] == pytest.approx(hub["rank1"] - alone["rank1"])
        flat = evaluate.headline(metrics)
        assert flat[f"gallery_{d}_recall_hub_rank1"] == hub["rank1"]
        assert flat[f"sample100_{d}_rank1_itc_hub"] == s["by_head"]["itc_hub"][d]["rank1"]["mean"]


def test_evaluate_split_all_and_errors(tmp_path, trained):
    features, model, _ = trained
    m = evaluate.run(_args(features, model, tmp_path / "m.json", "--split", "all", "--queries", 10, "--draws", 1,
                           "--candidates", 5, "--recall-k", 5, "--gallery-max", 12, "--hubness-temperature", 0))
    assert m["sample100"]["pool_products"] == 40 and m["sample100"]["candidates_mean"] == 5
    assert m["full_gallery"]["texts"] == 12 and m["full_gallery"]["images"] == 24
    assert "fallback" in m["recall_embedding"]
    assert "hubness" not in m["sample100"] and "recall_hub" not in m["full_gallery"]  # turned off
    _check_recall_only(m)  # recall-k 5 < 10: Rank@10 counts a true match recall missed as not found, both ways
    with pytest.raises(UserError, match="--val-fraction 0.0"):
        evaluate.run(_args(features, model, tmp_path / "m.json", "--val-fraction", 0))
    # the parser refuses a bad value; a config made in code (bench/quality.py) is checked before any work
    with pytest.raises(SystemExit):
        _args(features, model, tmp_path / "m.json", "--hubness-temperature", -0.5)
    with pytest.raises(UserError, match="--hubness-temperature -0.5"):
        evaluate.run(dataclasses.replace(_args(features, model, tmp_path / "m.json"), hubness_temperature=-0.5))
    with pytest.raises(UserError, match="--draws 0"):
        evaluate.run(_args(features, model, tmp_path / "m.json", "--draws", 0))
    with pytest.raises(UserError, match="does not exist"):
        evaluate.run(_args(features, model, tmp_path / "no" / "m.json", "--queries", 5, "--draws", 1, "--no-gallery"))


def test_fuse_fits_the_ranking_score_and_evaluate_ranks_by_it(tmp_path, trained):
    features, model, itc = trained
    run_dir = tmp_path / "run"  # a copy of the training output, so the module's fixture stays unfused
    shutil.copytree(model.parent, run_dir)
    itc = run_dir / itc.name
    summary = fuse.run(_fuse_args(features, itc, "--split", "all", "--queries", 30, "--candidates", 20))
    assert (itc / FUSION_NAME).is_file() and summary["version"] != summary["version_before"]
    assert summary["version"] == load_model(itc, resolve_runtime("cpu", "fp32")).version
    assert summary["fusion"]["fitted"]["source"] == "fashionbert fuse" and summary["fusion"]["fitted"]["positives"] == 30
    assert summary["fusion"]["fitted"]["split"]["kind"] == "all"
    assert {"rank1_t2i", "rank1_t2i_tia", "rank1_t2i_itc", "rank1_t2i_itc_hub"} <= set(summary["validation"])
    # The correction is on by default: fitted on the corrected cosine when that ranks at least as well.
    check = summary["fusion"]["fitted"]["hubness_check"]
    assert check["rank1_itc"] == summary["validation"]["rank1_t2i_itc"]
    assert check["rank1_itc_hub"] == summary["validation"]["rank1_t2i_itc_hub"]
    keeps = check["rank1_itc_hub"] >= check["rank1_itc"] and summary["fusion"]["itc"] > 0
    assert summary["fusion"]["hubness"] == ({"temperature": 0.03, "k": 10, "rounds": 5, "marginals": "images"}
                                            if keeps else None)
    off = fuse.run(_fuse_args(features, itc, "--split", "all", "--queries", 30, "--candidates", 20,
                              "--hubness-temperature", 0))
    assert off["fusion"]["hubness"] is None and "hubness_check" not in off["fusion"]["fitted"]
    assert "rank1_t2i_itc_hub" not in off["validation"]

    # The cosine alone, hubness-corrected: evaluate's score ranks as its itc_hub row (the same biases over the pool).
    ScoreFusion(0.0, 1.0, 0.0, {"source": "test"}, {"temperature": 0.03, "k": 10, "rounds": 5}).save(itc)
    m = evaluate.run(_args(features, itc, tmp_path / "m.json", "--split", "all", "--queries", 20, "--draws", 1,
                           "--no-gallery"))
    for d in ("t2i", "i2t"):
        assert m["sample100"][d] == m["sample100"]["by_head"]["itc_hub"][d]

    # A fusion that is the itc cosine alone: evaluate's ranks are then exactly the itc head's.
    ScoreFusion(0.0, 1.0, 0.0, {"source": "test"}).save(itc)
    m = evaluate.run(_args(features, itc, tmp_path / "m.json", "--split", "all", "--queries", 20, "--draws", 1,
                           "--no-gallery"))
    s = m["sample100"]
    assert m["score_fusion"]["itc"] == 1.0 and "itc cosine" in m["ranking_score"]
    assert set(s["by_head"]) == {"tia", "itc", "itc_hub"}
    for d in ("t2i", "i2t"):
        assert s[d] == s["by_head"]["itc"][d]
    with pytest.raises(UserError, match="no itc head"):
        fuse.run(_fuse_args(features, model, "--split", "all"))


def _fuse_args(features, model, *extra) -> fuse.FuseConfig:
    parser = argparse.ArgumentParser()
    fuse.add_arguments(parser)
    return fuse.config_from_args(parser.parse_args(["--features", str(features), "--model", str(model), "--device",
                                                    "cpu", "--precision", "fp32", *map(str, extra)]))


def test_help_explains_the_options():
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    text = parser.format_help()
    for opt in ("--features", "--model", "--out", "--split", "--val-fraction", "--queries", "--candidates", "--draws", "--seed", "--gallery-max", "--exhaustive", "--recall-k", "--index"):
        assert opt in text


def test_sample_hundred_says_how_often_the_top_candidate_is_the_querys_colour_variant():
    """groups (products (1,2), (3,4), ..., (19,20) share one; 0 is alone): text 19's own image scores .0205, image
    20 -- its variant -- .021, so that query's miss is a variant's; every other text's top image is 20 too, but
    that is no variant of theirs, and every image ranks its own text first."""
    draws = draw_candidates(["shirts"] * 21, n_queries=21, n_candidates=20, draws=1, seed=0)
    m = sample_hundred(draws, _known_scorer([]), groups=(np.arange(21) + 1) // 2)
    v = m["variants"]
    assert v["queries_with_variant"]["mean"] == pytest.approx(20 / 21)
    assert v["score"]["t2i"]["mean"] == v["tia"]["t2i"]["mean"] == pytest.approx(1 / 21)
    assert v["score"]["i2t"]["mean"] == 0.0
    assert "variants" not in sample_hundred(draws, _known_scorer([]))
