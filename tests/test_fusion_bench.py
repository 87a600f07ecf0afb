"""bench/fusion.py's comparison: fitted on some queries, ranked on the others, the fit with the TIA check keeps a
misleading TIA head out (and level with the cosine) where the listwise fit alone loses to the cosine, and keeps a
TIA head that adds to the cosine."""
from __future__ import annotations

import numpy as np

from bench.fusion import compare
from tests.test_fusion import _ranking_data, misleading_tia


def _sizes(group: np.ndarray) -> np.ndarray:
    return np.bincount(group)


def test_the_check_keeps_a_misleading_tia_head_out_on_unseen_queries():
    margin, cosine, label, group = misleading_tia(300, seed=5)
    r = compare(margin, cosine, _sizes(group), fit_queries=100, repeats=3, seed=0)
    assert set(r) == {"itc", "tia", "listwise", "fit", "kept_tia"} and all(len(v) == 3 for v in r.values())
    assert not r["kept_tia"].any()
    np.testing.assert_array_equal(r["fit"], r["itc"])  # the calibrated cosine ranks as the cosine
    assert (r["listwise"] < r["itc"]).all()


def test_a_tia_head_that_adds_to_the_cosine_is_kept():
    margin, cosine, label, group = _ranking_data(300, tia=1.5, itc=6.0, seed=6)
    assert (label.reshape(300, -1).argmax(axis=1) != 0).any()  # here the true candidate is not always first...
    order = np.lexsort((~label, group))  # ...and compare() reads each query's true candidate first
    r = compare(margin[order], cosine[order], _sizes(group), fit_queries=100, repeats=3, seed=0)
    assert r["kept_tia"].all() and (r["fit"] > r["itc"]).all()
