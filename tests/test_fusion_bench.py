"""bench/fusion.py's comparison: fitted on some queries, ranked on the others, the fit with the TIA check keeps a
misleading TIA head out (and level with the cosine) where the listwise fit alone loses to the cosine, and keeps a
TIA head that adds to the cosine; its scoring reads held-out or, with --training-products, training products, with
each pair's hubness offset, and a kept .npz is read only for the same settings."""
from __future__ import annotations

import argparse

import numpy as np

from bench.fusion import compare, load_or_score, score_queries
from fashionbert.data.feature_catalog import open_catalog
from fashionbert.evaluation.evaluate import SplitOptions, held_out_products
from fashionbert.model.loading import load_model
from fashionbert.rank.hubness import Hubness
from fashionbert.runtime import resolve_runtime
from tests.fake_features import make_tiny_backbone, write_fake_features
from tests.test_fusion import _ranking_data, misleading_tia
from tests.test_scoring import fit_itc_head, train_tiny_model


def _sizes(group: np.ndarray) -> np.ndarray:
    return np.bincount(group)


def test_the_check_keeps_a_misleading_tia_head_out_on_unseen_queries():
    margin, cosine, label, group = misleading_tia(300, seed=5)
    r = compare(margin, cosine - 1.0, cosine, _sizes(group), fit_queries=100, repeats=3, seed=0)
    assert set(r) == {"raw", "itc", "tia", "listwise", "any_win", "fit", "kept_any_win", "kept_tia"}
    assert all(len(v) == 3 for v in r.values())
    assert not r["kept_tia"].any() and not r["kept_any_win"].any()
    np.testing.assert_array_equal(r["fit"], r["itc"])  # the calibrated cosine ranks as the cosine
    np.testing.assert_array_equal(r["raw"], r["itc"])  # a constant offset ranks as the cosine
    assert (r["listwise"] < r["itc"]).all()


def test_a_tia_head_that_adds_to_the_cosine_is_kept():
    margin, cosine, label, group = _ranking_data(300, tia=1.5, itc=6.0, seed=6)
    assert (label.reshape(300, -1).argmax(axis=1) != 0).any()  # here the true candidate is not always first...
    order = np.lexsort((~label, group))  # ...and compare() reads each query's true candidate first
    r = compare(margin[order], cosine[order], cosine[order], _sizes(group), fit_queries=100, repeats=3, seed=0)
    assert r["kept_tia"].all() and r["kept_any_win"].all() and (r["fit"] > r["itc"]).all()


def test_scores_held_out_or_training_products_and_keeps_them_apart(tmp_path, capsys):
    """--training-products scores the products the model trained on: the two sides draw from disjoint product sets
    (together every product with an image), and a kept .npz of one side is not read for the other."""
    features = write_fake_features(tmp_path / "features", n_products=40, images_per_product=2, feature_dim=16)
    model = train_tiny_model(tmp_path, features, make_tiny_backbone(tmp_path / "bert"))
    itc = fit_itc_head(model, features, model.parent / "model-itc", steps=4)
    loaded = load_model(itc, resolve_runtime("cpu", "fp32"))
    held_out, _ = held_out_products(SplitOptions(), loaded, open_catalog([str(features)], loaded).texts.group_id)
    n_held_out = int(held_out.sum())
    assert 2 <= n_held_out < 40

    unseen = score_queries([str(features)], str(itc), queries=1000, seed=0)
    seen = score_queries([str(features)], str(itc), queries=1000, seed=0, training_products=True)
    assert len(unseen["sizes"]) == n_held_out and len(seen["sizes"]) == 40 - n_held_out  # every product a query
    assert not bool(unseen["training_products"]) and bool(seen["training_products"])
    assert unseen["offsets"].shape == unseen["cosine"].shape and np.abs(unseen["offsets"]).max() > 0
    raw = score_queries([str(features)], str(itc), queries=1000, seed=0, hubness=Hubness(0.0))
    np.testing.assert_allclose(raw["cosine"], unseen["cosine"], atol=1e-5)  # the same pairs, no correction
    assert not raw["offsets"].any()

    kept = tmp_path / "scores.npz"
    args = argparse.Namespace(features=[str(features)], model=str(itc), queries=1000, seed=0, scores=str(kept),
                              training_products=False, hubness_temperature=0.03, hubness_k=10, hubness_rounds=5)
    load_or_score(args)
    np.testing.assert_array_equal(load_or_score(args)["offsets"], np.load(kept)["offsets"])  # read back
    assert "read from" in capsys.readouterr().out
    args.hubness_rounds = 1
    load_or_score(args)  # another round count: scored again, not read
    assert "scoring again" in capsys.readouterr().out
    args.hubness_temperature = 0.0
    assert not load_or_score(args)["offsets"].any()  # another correction: scored again, not read
    args.training_products = True
    np.testing.assert_array_equal(load_or_score(args)["sizes"], seen["sizes"])  # scored again, not read
