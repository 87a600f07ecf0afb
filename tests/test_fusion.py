"""The ranking score: the fusion of the TIA margin and itc cosine (the ranking direction recovered and calibrated,
a head that ranks backwards dropped, TIA dropped when it does not raise the cross-fitted Rank@1 by more than chance
(the sign test), too little data
falls back to TIA), its file (round trip, damaged or negative weights refused), the
cross-fitted validation Rank@1, and the model version that changes with the fusion."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fashionbert.errors import UserError
from fashionbert.evaluation.quick_validation import rank1
from fashionbert.rank.hubness import Hubness, fusion_hubness
from fashionbert.model import score_fusion as fusion
from fashionbert.model.loading import load_model
from fashionbert.runtime import resolve_runtime
from tests.fake_features import make_tiny_backbone, write_fake_features
from tests.test_scoring import train_tiny_model


def _ranking_data(queries: int, tia: float, itc: float, seed: int = 0, candidates: int = 20):
    """Groups of candidates whose true one is drawn from softmax(tia x margin + itc x cosine) over the group: the
    conditional-logit model the direction fit assumes, so its weights are recoverable."""
    rng = np.random.default_rng(seed)
    margin = rng.normal(0, 2, (queries, candidates))
    cosine = rng.normal(0, 0.3, (queries, candidates))
    s = tia * margin + itc * cosine
    p = np.exp(s - s.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    true = (rng.random((queries, 1)) < p.cumsum(axis=1)).argmax(axis=1)
    label = np.zeros((queries, candidates), dtype=bool)
    label[np.arange(queries), true] = True
    group = np.repeat(np.arange(queries), candidates)
    return margin.ravel(), cosine.ravel(), label.ravel(), group


def misleading_tia(queries: int, seed: int, candidates: int = 20):
    """What hm-dev showed: a TIA head that tells each query's true candidate (the first) from the easy negatives, so
    the listwise fit gives it weight, but puts the cosine's two hardest negatives above it, so it costs Rank@1."""
    rng = np.random.default_rng(seed)
    cosine = rng.normal(0, 1, (queries, candidates))
    cosine[:, 0] += 1.5
    label = np.zeros((queries, candidates), dtype=bool)
    label[:, 0] = True
    hardest = np.argsort(-np.where(label, -np.inf, cosine), axis=1)[:, :2]
    hard = np.zeros_like(label)
    hard[np.arange(queries)[:, None], hardest] = True
    margin = 2.0 * label + 2.5 * hard + rng.normal(0, 0.5, label.shape)
    return margin.ravel(), cosine.ravel(), label.ravel(), np.repeat(np.arange(queries), candidates)


def test_fit_recovers_the_ranking_direction_and_calibrates_on_a_balanced_prior():
    margin, cosine, label, group = _ranking_data(20_000, tia=1.5, itc=6.0)
    f = fusion.fit(margin, cosine, label, group, {"source": "test"})
    assert f.itc / f.tia == pytest.approx(4.0, rel=0.05)
    # Scale and bias are the class-balanced logistic fit on the fused sum: refitting them changes nothing.
    z = margin + (f.itc / f.tia) * cosine
    (scale,), bias = fusion._logistic(z[:, None], label)
    assert f.tia == pytest.approx(scale, rel=1e-6) and f.bias == pytest.approx(bias, rel=1e-6)
    check = f.fitted.pop("tia_check")
    assert f.fitted == {"source": "test", "positives": 20_000, "negatives": 380_000}
    assert check["folds"] == 2 and check["rank1_fused"] > check["rank1_itc"]  # TIA earns its weight here
    assert check["kept"] and check["p_value"] <= check["alpha"] == fusion.TIA_ALPHA
    assert f.uses_itc and "itc cosine" in f.describe()
    np.testing.assert_allclose(f.logit(margin[:3], cosine[:3]), f.tia * margin[:3] + f.itc * cosine[:3] + f.bias)
    # balanced prior: the mean P(aligned) over positives and over negatives straddle 0.5
    p = 1 / (1 + np.exp(-f.logit(margin, cosine)))
    assert p[label].mean() > 0.5 > p[~label].mean()


def saturated_tia(queries: int, seed: int, candidates: int = 101):
    """What a confident [CLS] head gave on hm-dev: most negatives pinned near the margin's floor (-9), a few hard ones
    spread around 0, the true candidates (the first) spread widely. The full Newton step from 0 overshoots here."""
    rng = np.random.default_rng(seed)
    margin = -9 + 0.2 * rng.standard_normal((queries, candidates))
    hard = rng.random(margin.shape) < 0.05
    margin[hard] = rng.normal(0, 3, hard.sum())
    margin[:, 0] = rng.normal(0, 4, queries)
    label = np.zeros(margin.shape, dtype=bool)
    label[:, 0] = True
    return margin.ravel(), label.ravel(), np.repeat(np.arange(queries), candidates)


def test_the_fit_converges_where_full_newton_steps_run_off():
    margin, label, group = saturated_tia(200, seed=0)
    (w,) = fusion._listwise(margin[:, None], label, group)
    assert w > 0  # before the damping: -7,382, and the fit dropped a head that ranks 25% of the queries first

    def loss(v: float) -> float:  # the penalised listwise loss on the raw margin (the ridge is on standardised ones)
        s = (v * margin).reshape(200, -1)
        top = s.max(axis=1)
        return float(np.mean(top + np.log(np.exp(s - top[:, None]).sum(axis=1)) - s[:, 0])
                     + 0.5 * fusion.RIDGE * (v * margin.std()) ** 2)

    grid = np.linspace(0.01, 2.0, 400)
    assert w == pytest.approx(grid[np.argmin([loss(v) for v in grid])], abs=0.01)  # the minimum, not a stray iterate
    cosine = np.random.default_rng(10).normal(0, 0.1, len(margin)) + 0.3 * label
    f = fusion.fit(margin, cosine, label, group, tia_check=False)
    assert f.tia > 0 and f.itc > 0 and "dropped" not in f.fitted


def test_a_head_that_ranks_backwards_is_dropped_and_too_few_pairs_keep_tia():
    margin, cosine, label, group = _ranking_data(2000, tia=1.0, itc=-4.0, seed=1)  # the "itc head" prefers wrong pairs
    f = fusion.fit(margin, cosine, label, group)
    assert f.itc == 0.0 and f.tia > 0 and f.fitted["dropped"] == ["itc"] and not f.uses_itc
    few = fusion.fit(margin[:100], cosine[:100], label[:100], group[:100])  # 5 queries: 5 positives
    assert (few.tia, few.itc, few.bias) == (1.0, 0.0, 0.0) and "too few" in few.fitted["note"]
    # No cosine at all (a model without an itc head): a TIA-only fit.
    assert fusion.fit(margin, None, label, group).itc == 0.0


def test_tia_keeps_a_weight_only_if_it_raises_the_cross_fitted_rank1_over_the_cosine():
    margin, cosine, label, group = misleading_tia(400, seed=3)
    both = fusion.fit(margin, cosine, label, group, tia_check=False)
    assert both.tia > 0 and both.itc > 0
    assert fusion.group_rank1(both.logit(margin, cosine), label, group) < fusion.group_rank1(cosine, label, group)
    f = fusion.fit(margin, cosine, label, group, {"source": "test"})
    assert f.tia == 0.0 and f.itc > 0 and f.fitted["dropped"] == ["tia"] and "itc alone" in f.fitted["note"]
    check = f.fitted["tia_check"]
    assert check["rank1_fused"] <= check["rank1_itc"]
    assert check["rank1_itc"] == fusion.group_rank1(cosine, label, group)
    # The cosine alone, calibrated: it ranks exactly as the cosine does, P(aligned) on a balanced prior.
    np.testing.assert_allclose(f.logit(margin, cosine), f.itc * cosine + f.bias)
    p = 1 / (1 + np.exp(-f.logit(margin, cosine)))
    assert p[label].mean() > 0.5 > p[~label].mean()


def test_the_sign_test_counts_the_queries_one_ranking_wins_and_computes_the_exact_tail():
    # 6 queries of 3 candidates, the true one first: fused wins queries 0-3, the cosine query 4, both query 5.
    label = np.tile([True, False, False], 6)
    group = np.repeat(np.arange(6), 3)
    fused = np.tile([1.0, 0.0, 0.0], 6)
    cosine = np.tile([0.0, 1.0, 0.0], 6)
    fused[12:15] = [0.0, 1.0, 0.0]  # query 4: the fused score misses
    cosine[12:15] = cosine[15:18] = [1.0, 0.0, 0.0]
    check = fusion.tia_check_result(fused, cosine, label, group, alpha=0.1)
    assert (check["fused_only"], check["itc_only"], check["queries"]) == (4, 1, 6)
    assert check["p_value"] == pytest.approx((1 + 5) / 2 ** 5)  # P(Binomial(5, 1/2) >= 4) = 6 / 32
    assert check["rank1_fused"] == pytest.approx(5 / 6) and check["rank1_itc"] == pytest.approx(2 / 6)
    assert not check["kept"]  # 0.1875 > 0.1
    assert fusion.tia_check_result(fused, cosine, label, group, alpha=0.2)["kept"]
    fused[12:15], cosine[12:15] = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]  # now 5 wins to 0: p = 1/32
    assert fusion.tia_check_result(fused, cosine, label, group, alpha=0.05)["p_value"] == pytest.approx(1 / 32)
    assert fusion.tia_check_result(fused, cosine, label, group, alpha=0.05)["kept"]
    # no query told apart: p = 1, never kept
    same = fusion.tia_check_result(cosine, cosine, label, group, alpha=1.0)
    assert (same["fused_only"], same["itc_only"], same["p_value"], same["kept"]) == (0, 0, 1.0, False)


def test_a_narrow_cross_fitted_win_does_not_buy_the_cross_encoder_pass():
    """What hm-dev showed: TIA kept a weight on one query more of 200 than the cosine, and every ranking then paid a
    cross-encoder pass for nothing. A weak TIA head here wins 7 queries to 5 cross-fitted: chance."""
    margin, cosine, label, group = _ranking_data(200, tia=0.05, itc=6.0, seed=1)
    any_win = fusion.fit(margin, cosine, label, group, tia_alpha=1.0)
    assert any_win.uses_tia  # the check before the sign test kept it
    f = fusion.fit(margin, cosine, label, group)
    check = f.fitted["tia_check"]
    assert check["fused_only"] > check["itc_only"] and check["p_value"] > fusion.TIA_ALPHA and not check["kept"]
    assert not f.uses_tia and f.uses_itc and f.fitted["dropped"] == ["tia"]
    assert "no more than chance" in f.fitted["note"] and "no cross-encoder pass" in f.describe()
    # A TIA head that clearly helps keeps its weight (the 20,000-query fit of the first test passes with p ~ 0).
    margin, cosine, label, group = _ranking_data(2000, tia=1.5, itc=6.0, seed=2)
    strong = fusion.fit(margin, cosine, label, group)
    assert strong.uses_tia and strong.fitted["tia_check"]["kept"] and strong.fitted["tia_check"]["p_value"] < 1e-6


def test_group_rank1_counts_ties_as_misses_and_skips_groups_without_one_true_pair():
    score = np.array([3.0, 1.0, 2.0, 5.0, 5.0, 1.0, 0.0, 9.0, 1.0, 2.0])
    label = np.array([1, 0, 0, 1, 0, 0, 0, 0, 0, 1], dtype=bool)
    group = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3, 4])  # group 2: no true pair; group 4: nothing to rank against
    assert fusion.group_rank1(score, label, group) == pytest.approx(0.5)  # group 0 wins, group 1 ties
    perm = np.random.default_rng(0).permutation(len(score))  # order does not matter
    assert fusion.group_rank1(score[perm], label[perm], group[perm]) == pytest.approx(0.5)


def test_fusion_file_round_trip_and_refusals(tmp_path):
    assert fusion.load(tmp_path) is fusion.TIA_ONLY and fusion.file_digest(tmp_path) is None
    f = fusion.ScoreFusion(0.5, 7.0, -3.0, {"source": "test"})
    f.save(tmp_path)
    assert fusion.load(tmp_path) == f and len(fusion.file_digest(tmp_path)) == 64
    assert not list(tmp_path.glob(".*tmp*"))
    (tmp_path / fusion.FUSION_NAME).write_text("{not json")
    with pytest.raises(UserError, match=r"score_fusion.json.*fashionbert fuse"):
        fusion.load(tmp_path)
    (tmp_path / fusion.FUSION_NAME).write_text(json.dumps({"tia": 1.0, "itc": -2.0, "bias": 0.0}))
    with pytest.raises(UserError, match=r">= 0"):
        fusion.load(tmp_path)
    # the hubness correction's settings round-trip; a file without them reads the raw cosine
    hub = fusion.ScoreFusion(0.5, 7.0, -3.0, {"source": "test"}, {"temperature": 0.05, "k": 4})
    hub.save(tmp_path)
    assert fusion.load(tmp_path) == hub and fusion_hubness(fusion.load(tmp_path)) == Hubness(0.05, 4, rounds=1,
                                                                                              marginals="uniform")
    assert not f.reads_corrected_cosine and "less hubness (T 0.05, k 4, 1 round(s)" in hub.describe()
    rounds = fusion.ScoreFusion(0.5, 7.0, -3.0, {"source": "test"}, Hubness(0.05, 4, rounds=5).describe())
    rounds.save(tmp_path)
    assert fusion_hubness(fusion.load(tmp_path)) == Hubness(0.05, 4, rounds=5) and "5 round(s)" in rounds.describe()
    assert not fusion.ScoreFusion(1.0, 0.0, 0.0, None, {"temperature": 0.05}).reads_corrected_cosine  # no cosine read
    (tmp_path / fusion.FUSION_NAME).write_text(json.dumps({"tia": 1.0, "itc": 2.0, "bias": 0.0,
                                                           "hubness": {"temperature": -1}}))
    with pytest.raises(UserError, match=r"score_fusion.json: not a readable score fusion.*the temperature must be >= 0"):
        fusion.load(tmp_path)


def test_rank1_and_cross_fitting_use_no_query_s_own_pairs():
    # two queries of 3 candidates: the first's true candidate wins, the second's ties (ties count as a miss)
    assert rank1(np.array([3.0, 1.0, 2.0, 5.0, 5.0, 1.0]), np.array([3, 3])) == 0.5
    margin, cosine, label, group = _ranking_data(200, tia=1.0, itc=4.0, seed=2)
    fold = group % 2
    out = fusion.cross_fitted_logits(margin, cosine, label, group, fold)
    for f in (0, 1):
        other = fusion.fit(margin[fold != f], cosine[fold != f], label[fold != f], group[fold != f])
        np.testing.assert_allclose(out[fold == f], other.logit(margin[fold == f], cosine[fold == f]))


def test_model_version_changes_with_the_fusion_and_a_fusion_needs_an_itc_head(tmp_path):
    features = write_fake_features(tmp_path / "f", n_products=12, images_per_product=1, feature_dim=8)
    model = train_tiny_model(tmp_path, features, make_tiny_backbone(tmp_path / "bert"), steps=2)
    rt = resolve_runtime("cpu", "fp32")
    plain = load_model(model, rt)
    assert plain.fusion is fusion.TIA_ONLY and not (model / fusion.FUSION_NAME).exists()
    assert plain.version.count("-") == 1  # <weights sha>-step2
    fusion.ScoreFusion(2.0, 0.0, 0.5, {"source": "test"}).save(model)
    tia_only = load_model(model, rt)
    weights_sha = plain.version.split("-")[0]
    assert tia_only.version == f"{weights_sha}-s{fusion.file_digest(model)[:6]}-step2" and tia_only.fusion.tia == 2.0
    fusion.ScoreFusion(1.0, 3.0, 0.0).save(model)
    with pytest.raises(UserError, match=r"itc cosine, but the model has no itc head"):
        load_model(model, rt)


def test_a_fusion_without_tia_weight_needs_no_margin():
    cosine = np.array([[0.1, 0.3], [0.5, -0.2]])
    alone = fusion.ScoreFusion(0.0, 4.0, -1.0)
    assert not alone.uses_tia and alone.uses_itc
    np.testing.assert_allclose(alone.logit(None, cosine), 4.0 * cosine - 1.0)  # any shape, as the Beam blocks pass
    np.testing.assert_allclose(alone.logit(np.ones(2), cosine[0]), 4.0 * cosine[0] - 1.0)  # a margin is ignored
    with pytest.raises(ValueError, match="TIA margin"):
        fusion.ScoreFusion(0.5, 4.0, -1.0).logit(None, cosine)
    with pytest.raises(ValueError, match="itc cosine"):
        alone.logit(None, None)
