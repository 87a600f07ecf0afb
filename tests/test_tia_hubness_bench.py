"""bench/tia_hubness.py: each candidate's TIA bias is T log mean exp(margin / T) over its first K neighbours; a query
whose true candidate was not recalled, or ties with another, is a miss; the bias takes off a per-candidate term the
margins carry (a hub's), which then no longer ranks first; and on a tiny trained model the whole command scores the
held-out gallery both ways, keeps its scores and reads them back."""
from __future__ import annotations

import numpy as np

from bench import tia_hubness
from bench.tia_hubness import candidate_bias, hits, rankings
from fashionbert.rank.neighbours import Neighbours
from tests.fake_features import make_tiny_backbone, write_fake_features
from tests.test_scoring import fit_itc_head, train_tiny_model


def test_candidate_bias_is_the_log_mean_exp_over_its_first_k_neighbours():
    bank = Neighbours(np.array([0, 0, 0, 1, 1]), np.array([3, 1, 2, 0, 2]), np.array([4.0, 2.0, -1.0, 1.0, 0.5]),
                      "exact")
    t = 2.0
    got = candidate_bias(bank, 3, k=2, temperature=t)
    np.testing.assert_allclose(got[0], t * np.log(np.mean(np.exp(np.array([4.0, 2.0]) / t))))
    np.testing.assert_allclose(got[1], t * np.log(np.mean(np.exp(np.array([1.0, 0.5]) / t))))
    assert got[2] == 0.0  # an item with no neighbours has no bias


def test_a_true_candidate_not_recalled_or_tied_is_a_miss():
    query = np.array([0, 0, 1, 1, 2, 2])
    candidate = np.array([0, 5, 3, 1, 2, 4])  # query 1's true candidate (1) is there, query 3 has no list
    score = np.array([0.9, 0.1, 0.2, 0.8, 0.5, 0.5])
    got = hits(score, candidate == query, query, 4)
    np.testing.assert_array_equal(got, [True, True, False, False])  # query 2: a tie


def _gallery_with_a_hub(n: int = 60, seed: int = 0) -> dict:
    """Texts and images of n products whose cosine ranks the true pair first for most queries, and TIA margins that
    follow the cosine plus a large per-image (and per-text) term: a few hubs that TIA puts first for every query."""
    rng = np.random.default_rng(seed)
    vec = rng.normal(size=(n, 16))
    text = vec + 0.6 * rng.normal(size=(n, 16))
    image = vec + 0.6 * rng.normal(size=(n, 16))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    cos = text @ image.T
    hub_image, hub_text = np.zeros(n), np.zeros(n)
    hub_image[:3] = 8.0
    hub_text[:3] = 8.0
    s = {"n": np.asarray(n), "k": np.asarray(n), "version": np.asarray("test")}
    for name, sim, hub in (("t2i", cos, hub_image), ("i2t", cos.T, hub_text)):
        order = np.argsort(-sim, axis=1, kind="stable")
        query = np.repeat(np.arange(n), n)
        candidate = order.reshape(-1)
        c = sim[query, candidate]
        s |= {f"{name}_query": query, f"{name}_candidate": candidate, f"{name}_cosine": c.astype(np.float32),
              f"{name}_margin": (10 * c + hub[candidate]).astype(np.float32)}
    return s


def test_the_tia_bias_takes_a_hubs_term_off_the_margins():
    s = _gallery_with_a_hub()
    for name in ("t2i", "i2t"):
        r = rankings(s, name, recall_k=20, ks=[10], temperatures=[1.0])
        tia = r["the TIA margin"][0].mean()
        corrected = r["the TIA margin less its TIA bias (K 10, T 1)"][0].mean()
        raw = r["the raw cosine"][0].mean()
        assert tia < raw - 0.1  # the hubs take first place from most true pairs...
        assert corrected > tia + 0.1  # ...and the bias gives much of it back
        fused, kept = r["the TIA margin less its TIA bias (K 10, T 1), fused with the corrected cosine"]
        assert fused.shape == (60,) and kept in (True, False)
        assert r["the raw cosine"][1] is None  # no fit, nothing kept


def test_scores_the_held_out_gallery_keeps_it_and_reads_it_back(tmp_path, capsys):
    features = write_fake_features(tmp_path / "features", n_products=40, images_per_product=2, feature_dim=16)
    model = train_tiny_model(tmp_path, features, make_tiny_backbone(tmp_path / "bert"))
    itc = fit_itc_head(model, features, model.parent / "model-itc", steps=4)
    kept = tmp_path / "scores.npz"
    argv = ["--features", str(features), "--model", str(itc), "--recall-k", "4", "--ks", "3", "--temperatures", "1",
            "--scores", str(kept)]
    tia_hubness.main(argv)
    first = capsys.readouterr()
    s = np.load(kept)
    n = int(s["n"])
    assert 2 <= n < 40 and int(s["k"]) == min(10, n)  # the cosine's default K 10 is scored for its correction
    for name in ("t2i", "i2t"):
        assert len(s[f"{name}_query"]) == n * int(s["k"]) and np.isfinite(s[f"{name}_margin"]).all()
    assert "| the TIA margin less its TIA bias (K 3, T 1), fused with the corrected cosine |" in first.out
    tia_hubness.main(argv)
    again = capsys.readouterr()
    assert "scores: read from" in again.err and again.out == first.out
