"""The ranking score: the fusion of the TIA margin and itc cosine (the ranking direction recovered and calibrated,
a head that ranks backwards dropped, too little data falls back to TIA), its file (round trip, damaged or negative weights refused), the
cross-fitted validation Rank@1, and the model version that changes with the fusion."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fashionbert.errors import UserError
from fashionbert.evaluation.quick_validation import cross_fitted_logits, rank1
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


def test_fit_recovers_the_ranking_direction_and_calibrates_on_a_balanced_prior():
    margin, cosine, label, group = _ranking_data(20_000, tia=1.5, itc=6.0)
    f = fusion.fit(margin, cosine, label, group, {"source": "test"})
    assert f.itc / f.tia == pytest.approx(4.0, rel=0.05)
    # Scale and bias are the class-balanced logistic fit on the fused sum: refitting them changes nothing.
    z = margin + (f.itc / f.tia) * cosine
    (scale,), bias = fusion._logistic(z[:, None], label)
    assert f.tia == pytest.approx(scale, rel=1e-6) and f.bias == pytest.approx(bias, rel=1e-6)
    assert f.fitted == {"source": "test", "positives": 20_000, "negatives": 380_000}
    assert f.uses_itc and "itc cosine" in f.describe()
    np.testing.assert_allclose(f.logit(margin[:3], cosine[:3]), f.tia * margin[:3] + f.itc * cosine[:3] + f.bias)
    # balanced prior: the mean P(aligned) over positives and over negatives straddle 0.5
    p = 1 / (1 + np.exp(-f.logit(margin, cosine)))
    assert p[label].mean() > 0.5 > p[~label].mean()


def test_a_head_that_ranks_backwards_is_dropped_and_too_few_pairs_keep_tia():
    margin, cosine, label, group = _ranking_data(2000, tia=1.0, itc=-4.0, seed=1)  # the "itc head" prefers wrong pairs
    f = fusion.fit(margin, cosine, label, group)
    assert f.itc == 0.0 and f.tia > 0 and f.fitted["dropped"] == ["itc"] and not f.uses_itc
    few = fusion.fit(margin[:100], cosine[:100], label[:100], group[:100])  # 5 queries: 5 positives
    assert (few.tia, few.itc, few.bias) == (1.0, 0.0, 0.0) and "too few" in few.fitted["note"]
    # No cosine at all (a model without an itc head): a TIA-only fit.
    assert fusion.fit(margin, None, label, group).itc == 0.0


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


def test_rank1_and_cross_fitting_use_no_query_s_own_pairs():
    # two queries of 3 candidates: the first's true candidate wins, the second's ties (ties count as a miss)
    assert rank1(np.array([3.0, 1.0, 2.0, 5.0, 5.0, 1.0]), np.array([3, 3])) == 0.5
    margin, cosine, label, group = _ranking_data(200, tia=1.0, itc=4.0, seed=2)
    fold = group % 2
    out = cross_fitted_logits(margin, cosine, label, group, fold)
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
