"""The hubness correction of the recall cosine: each item's bias is T log mean exp(cos / T) over its nearest items of
the other side, a hub that takes first place for texts not its own loses it, the corrected search ranks by cos - bias,
and sample-100 reports the corrected cosine beside the raw one."""
from __future__ import annotations

import numpy as np
import pytest

from fashionbert.errors import UserError
from fashionbert.evaluation.evaluate import sample_hundred
from fashionbert.evaluation.sample_hundred import draw_candidates
from fashionbert.model.score_fusion import ScoreFusion
from fashionbert.rank.cross_encoder import PairScores, fusion_cosine
from fashionbert.rank.hubness import (Hubness, augmented, corrected_search, hubness_biases, nearest_by_corrected,
                                      neighbour_bias)
from fashionbert.rank.neighbours import search


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _catalog(n: int = 6):
    """Text j leans towards a shared direction h; image j (j >= 1) is its own direction e_j, image 0 (the hub) mostly
    h. The raw cosine ranks the hub first for every text (0.71 against a text's own 0.55); only text 0 is its own."""
    eye = np.eye(n + 1, dtype=np.float32)
    h = eye[n]
    texts = _unit(eye[:n] + 1.5 * h)
    images = eye[:n].copy()
    images[0] = 0.6 * eye[0] + h
    return texts, _unit(images)


def test_the_bias_is_the_temperature_log_mean_exp_over_the_nearest_items():
    texts, images = _catalog()
    T = 0.05
    exact = hubness_biases(texts, images, Hubness(T, k=len(texts), rounds=1), index="torch")
    cos = texts @ images.T
    assert exact.image == pytest.approx(T * np.log(np.mean(np.exp(cos / T), axis=0)), rel=1e-5)
    assert exact.text == pytest.approx(T * np.log(np.mean(np.exp(cos / T), axis=1)), rel=1e-5)
    # over the top 2 only: the mean of the two largest terms
    top2 = hubness_biases(texts, images, Hubness(T, k=2, rounds=1), index="torch").image
    two = -np.sort(-cos, axis=0)[:2]
    assert top2 == pytest.approx(T * np.log(np.mean(np.exp(two / T), axis=0)), rel=1e-5)
    # large cosines over a small temperature do not overflow
    found = search(texts, images, 3, "torch")
    assert np.isfinite(neighbour_bias(found, len(images), 1e-4)).all()


def test_a_hub_loses_the_first_place_it_held_for_texts_not_its_own():
    texts, images = _catalog()
    cos = texts @ images.T
    assert (cos.argmax(1) == 0).all()  # the hub wins every text
    biases = hubness_biases(texts, images, Hubness(0.05, k=len(texts)), index="torch")
    assert biases.image.argmax() == 0
    corrected = corrected_search(texts, images, biases.image, k=len(images), index="torch")
    top = corrected.candidate[corrected.query != np.r_[-1, corrected.query[:-1]]]  # each query's first row
    assert (top == np.arange(len(texts))).all()
    # the search's scores are the corrected cosines, each query's best first
    expected = cos[corrected.query, corrected.candidate] - biases.image[corrected.candidate]
    assert corrected.score == pytest.approx(expected, abs=1e-5)
    q, d = augmented(texts, images, biases.image)
    assert q.shape[1] == d.shape[1] == texts.shape[1] + 1


def test_a_pair_has_one_corrected_cosine_that_ranks_as_each_direction_s_correction():
    """offsets(t, i) = (bias_image[i] - mean) + (bias_text[t] - mean): per text query the images rank as by
    cos - bias_image, per image query the texts as by cos - bias_text; the fusion reads cos - offsets and refuses to
    read the raw cosine in its place."""
    texts, images = _catalog()
    biases = hubness_biases(texts, images, Hubness(0.05, k=3), index="torch")
    t, i = np.meshgrid(np.arange(len(texts)), np.arange(len(images)), indexing="ij")
    offsets = biases.offsets(t.ravel(), i.ravel()).reshape(t.shape)
    assert offsets[2, 4] == pytest.approx(biases.image[4] - biases.image.mean() + biases.text[2] - biases.text.mean())
    cos = texts @ images.T
    pair = cos - offsets
    assert (np.argsort(-pair, axis=1) == np.argsort(-(cos - biases.image[None, :]), axis=1)).all()
    assert (np.argsort(-pair, axis=0) == np.argsort(-(cos - biases.text[:, None]), axis=0)).all()
    assert abs(pair.mean() - cos.mean()) < 0.05  # the means keep it on the cosine's scale
    fusion = ScoreFusion(0.0, 2.0, -1.0, None, {"temperature": 0.05, "k": 3})
    assert fusion_cosine(fusion, cos.ravel(), offsets.ravel()) == pytest.approx(pair.ravel(), abs=1e-6)
    with pytest.raises(ValueError, match="hubness-corrected cosine: pass the pairs' offsets"):
        fusion_cosine(fusion, cos.ravel(), None)
    raw = cos.ravel()
    assert fusion_cosine(ScoreFusion(0.0, 2.0, -1.0), raw, offsets.ravel()) is raw  # no correction: the cosine as is
    assert Hubness.from_dict(Hubness(0.05, 3).describe()) == Hubness(0.05, 3) and not Hubness.from_dict(None).enabled
    # a fusion fitted before rounds and marginals existed was fitted on one round and uniform marginals, and reads those
    assert Hubness.from_dict({"temperature": 0.05, "k": 3}) == Hubness(0.05, 3, rounds=1, marginals="uniform")


def _log_mean_exp(x: np.ndarray, axis: int, T: float) -> np.ndarray:
    top = x.max(axis=axis, keepdims=True)
    return T * np.squeeze(top / T + np.log(np.mean(np.exp((x - top) / T), axis=axis, keepdims=True)), axis=axis)


def _random_catalog(n: int = 12, seed: int = 0):
    """Texts and images of n products with hubs on both sides: a few items lean towards a shared direction."""
    rng = np.random.default_rng(seed)
    own = rng.normal(size=(n, 8))
    shared = rng.normal(size=8)
    texts = own + 0.3 * rng.normal(size=(n, 8)) + np.where(np.arange(n) < 3, 2.0, 0.0)[:, None] * shared
    images = own + 0.3 * rng.normal(size=(n, 8)) + np.where(np.arange(n) % 4 == 1, 2.0, 0.0)[:, None] * shared
    return _unit(texts), _unit(images)


def test_each_round_re_estimates_both_sides_from_the_other_side_s_corrected_cosines():
    """Over every item (k = n), round r's biases are T log mean exp((cos - the other side's round r-1 biases) / T),
    both sides from round r-1 (Sinkhorn's alternating normalisation in log space, neither direction first); round 1
    is the raw cosine's inverted softmax. The rounds converge: the biases approach the fixed point where each side's
    bias is that of the other's, up to one constant (a shift of one side that the other takes back: neither a
    ranking nor the score's offsets, each bias less its mean, see it)."""
    texts, images = _random_catalog()
    T, n = 0.05, len(texts)
    cos = texts.astype(np.float64) @ images.T.astype(np.float64)
    image_bias, text_bias = np.zeros(n), np.zeros(n)
    for rounds in range(1, 4):
        image_bias, text_bias = (_log_mean_exp(cos - text_bias[:, None], 0, T),
                                 _log_mean_exp(cos - image_bias[None, :], 1, T))
        got = hubness_biases(texts, images, Hubness(T, k=n, rounds=rounds), index="torch")
        assert got.image == pytest.approx(image_bias, abs=1e-5) and got.text == pytest.approx(text_bias, abs=1e-5)

    T = 0.2  # a smoother softmax converges in fewer rounds; at the default's 0.03 it takes hundreds

    def residual(b) -> float:  # each side's bias less the other side's corrected log-mean-exp, less a constant
        gaps = (b.image - _log_mean_exp(cos - b.text[:, None], 0, T),
                b.text - _log_mean_exp(cos - b.image[None, :], 1, T))
        return max(np.abs(g - g.mean()).max() for g in gaps)
    one, five, many = (residual(hubness_biases(texts, images, Hubness(T, k=n, rounds=r), index="torch"))
                       for r in (1, 5, 60))
    assert many < 1e-3 < five < 0.5 * one


def test_later_rounds_choose_each_item_s_k_nearest_by_the_corrected_cosine():
    """With k < n the later rounds take each item's k nearest by the corrected cosine of the round before, chosen
    among its 2k nearest by the raw cosine (no further search): here, equal to re-selecting among all items."""
    texts, images = _random_catalog(n=16, seed=3)
    T, k = 0.05, 3
    cos = texts.astype(np.float64) @ images.T.astype(np.float64)

    def top_k_bias(x: np.ndarray, axis: int) -> np.ndarray:
        return _log_mean_exp(-np.sort(-x, axis=axis).take(range(k), axis=axis), axis, T)
    image_bias, text_bias = np.zeros(len(images)), np.zeros(len(texts))
    for _ in range(2):
        image_bias, text_bias = top_k_bias(cos - text_bias[:, None], 0), top_k_bias(cos - image_bias[None, :], 1)
    got = hubness_biases(texts, images, Hubness(T, k=k, rounds=2), index="torch")
    assert got.image == pytest.approx(image_bias, abs=1e-5) and got.text == pytest.approx(text_bias, abs=1e-5)
    found = search(texts, images, 2 * k, "torch")
    again = nearest_by_corrected(found, np.zeros(len(texts)), k)  # no bias: the raw top k, in list order
    assert (np.bincount(again.query) == k).all()
    assert (again.candidate == search(texts, images, k, "torch").candidate).all()


def test_each_text_weighs_its_number_of_images():
    """Sinkhorn with marginals: a text with m images carries m images' mass, so every round takes T log m off its bias
    (a text without an image in the catalog weighs one); image biases read those text biases in the next round.
    Uniform marginals, or no image -> text map, is the plain correction; with one image per text the two agree."""
    texts, images = _random_catalog(n=6, seed=1)
    rng = np.random.default_rng(0)
    owner = np.asarray([0, 0, 0, 1, 2, 2, 3, 4, 4])  # text 5 has no image
    images = _unit(images[owner] + 0.3 * rng.normal(size=(len(owner), images.shape[1])))
    T, n = 0.05, len(owner)
    cos = texts.astype(np.float64) @ images.T.astype(np.float64)
    mass = T * np.log(np.maximum(np.bincount(owner, minlength=len(texts)), 1))
    image_bias, text_bias = np.zeros(len(images)), np.zeros(len(texts))
    for rounds in range(1, 4):
        image_bias, text_bias = (_log_mean_exp(cos - text_bias[:, None], 0, T),
                                 _log_mean_exp(cos - image_bias[None, :], 1, T) - mass)
        got = hubness_biases(texts, images, Hubness(T, k=n, rounds=rounds), index="torch", image_text=owner)
        assert got.image == pytest.approx(image_bias, abs=1e-5) and got.text == pytest.approx(text_bias, abs=1e-5)
    plain = hubness_biases(texts, images, Hubness(T, k=n, rounds=3), index="torch")
    uniform = hubness_biases(texts, images, Hubness(T, k=n, rounds=3, marginals="uniform"), index="torch",
                             image_text=owner)
    assert plain.text == pytest.approx(uniform.text) and np.abs(plain.text - got.text).max() > 0.01
    one_each = hubness_biases(texts[:5], images[[0, 3, 4, 6, 7]], Hubness(T, k=5, rounds=3), index="torch",
                              image_text=np.arange(5))
    assert one_each.text == pytest.approx(hubness_biases(texts[:5], images[[0, 3, 4, 6, 7]],
                                                         Hubness(T, k=5, rounds=3), index="torch").text)
    with pytest.raises(ValueError, match="image_text has 3 entries for 9 images"):
        hubness_biases(texts, images, Hubness(T, k=n), index="torch", image_text=owner[:3])


def test_images_marginals_keep_products_with_several_photos_first_for_their_photos():
    """A catalog where 40% of the products have 2-6 photos: each such text sits near its own photos, so the uniform
    correction raises its bias and pushes it down for exactly those photos' image -> text queries, below the raw
    cosine's Rank@1; weighing each text by its photos ranks above the raw cosine (hm-dev keyed by product_code
    shows the same, README "Several photos per product")."""
    rng = np.random.default_rng(1)
    n, dim = 120, 16
    own = rng.normal(size=(n, dim))
    owner = np.repeat(np.arange(n), np.where(rng.random(n) < 0.6, 1, rng.integers(2, 7, size=n)))
    texts = _unit(own + 0.8 * rng.normal(size=(n, dim)))
    images = _unit(own[owner] + 0.8 * rng.normal(size=(len(owner), dim)))
    cos = texts @ images.T

    def image_to_text_rank1(text_bias: np.ndarray) -> float:
        return float(((cos.T - text_bias[None, :]).argmax(1) == owner).mean())
    raw = image_to_text_rank1(np.zeros(n))
    uniform, weighed = (image_to_text_rank1(hubness_biases(texts, images, Hubness(0.05, 5, 3, marginals), "torch",
                                                           image_text=owner).text)
                        for marginals in ("uniform", "images"))
    assert uniform < raw - 0.05 and weighed > raw + 0.05


def test_temperature_zero_turns_it_off_and_bad_options_say_so():
    texts, images = _catalog()
    off = hubness_biases(texts, images, Hubness(0.0))
    assert not Hubness(0.0).enabled and (off.image == 0).all() and (off.text == 0).all()
    assert Hubness(0.0).describe() == {"temperature": 0.0}
    with pytest.raises(UserError, match="--hubness-temperature -1"):
        Hubness(-1.0)
    with pytest.raises(UserError, match="--hubness-k 0"):
        Hubness(0.03, k=0)
    with pytest.raises(UserError, match="--hubness-rounds 0"):
        Hubness(0.03, rounds=0)
    with pytest.raises(UserError, match="--hubness-marginals 'photos': must be one of images, uniform"):
        Hubness(0.03, marginals="photos")
    assert Hubness.from_dict(Hubness(0.03, marginals="uniform").describe()) == Hubness(0.03, marginals="uniform")


def test_sample_hundred_ranks_by_the_corrected_cosine_beside_the_raw_one():
    """itc = a perfect term + a large bonus for image 0 (a hub): the raw cosine ranks image 0 first for every
    text; a bias that takes the bonus back off image 0 makes itc_hub perfect text -> image. Image -> text is
    corrected by the texts' biases, here zero, so it stays the raw cosine's."""
    n = 21
    draws = draw_candidates(["shirts"] * n, n_queries=n, n_candidates=n - 1, draws=1, seed=0)

    def scores(pairs):
        itc = (pairs[:, 0] == pairs[:, 1]) + 2.0 * (pairs[:, 1] == 0)
        return PairScores(np.zeros(len(pairs), np.float32), itc.astype(np.float32), itc.astype(np.float64))
    image_bias = np.zeros(n)
    image_bias[0] = 2.0
    m = sample_hundred(draws, scores, hub=(image_bias, np.zeros(n)))
    assert m["by_head"]["itc"]["t2i"]["rank1"]["mean"] == pytest.approx(1 / n)
    assert m["by_head"]["itc_hub"]["t2i"]["rank1"]["mean"] == 1.0
    assert m["by_head"]["itc_hub"]["i2t"] == m["by_head"]["itc"]["i2t"]
    assert "itc_hub" not in sample_hundred(draws, scores)["by_head"]


def test_bench_embeds_both_sides_ranks_and_keeps_the_vectors(tmp_path, monkeypatch, capsys):
    """bench/hubness.py end to end on a tiny model: held-out and training products embedded apart (together every
    product), the sweep printed, and the kept vectors read back on a rerun."""
    import sys

    from bench import hubness as bench
    from fashionbert.data.feature_catalog import open_catalog
    from fashionbert.evaluation.evaluate import SplitOptions, held_out_products
    from fashionbert.model.loading import load_model
    from fashionbert.runtime import resolve_runtime
    from tests.fake_features import make_tiny_backbone, write_fake_features
    from tests.test_scoring import fit_itc_head, train_tiny_model

    features = write_fake_features(tmp_path / "features", n_products=40, images_per_product=(2, 1, 3),
                                   feature_dim=16)
    model = fit_itc_head(train_tiny_model(tmp_path, features, make_tiny_backbone(tmp_path / "bert")), features,
                         tmp_path / "model-itc", steps=4)
    loaded = load_model(model, resolve_runtime("cpu", "fp32"))
    held_out, _ = held_out_products(SplitOptions(), loaded, open_catalog([str(features)], loaded).texts.group_id)
    kept = tmp_path / "v.npz"
    argv = ["hubness.py", "--features", str(features), "--model", str(model), "--vectors", str(kept),
            "--bank", "training", "--temperatures", "0.05", "--ks", "3,0", "--rounds", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    out = capsys.readouterr()
    vectors = np.load(kept)
    assert len(vectors["held_text"]) == len(vectors["held_image"]) == int(held_out.sum())
    assert len(vectors["train_text"]) == 40 - int(held_out.sum())
    assert "| the cosine |" in out.out and "| corrected, T 0.05, K 3, 1 round |" in out.out and "K all" in out.out
    bench.main()
    assert "read from" in capsys.readouterr().err
    # over the catalog being ranked, later rounds too; a foreign bank takes one round only
    monkeypatch.setattr(sys, "argv", argv[:-8] + ["--temperatures", "0.05", "--ks", "3", "--rounds", "1,4"])
    bench.main()
    assert "| corrected, T 0.05, K 3, 4 rounds |" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", argv[:-2] + ["--rounds", "1,4"])
    with pytest.raises(SystemExit, match="--bank training takes --rounds 1"):
        bench.main()
    # every photo in the gallery, split by products with several and with one, under both marginals
    monkeypatch.setattr(sys, "argv", argv[:-8] + ["--temperatures", "0.05", "--ks", "3", "--rounds", "2",
                                                  "--images", "all", "--marginals", "images,uniform"])
    bench.main()
    out = capsys.readouterr().out
    vectors = np.load(kept)
    photos = np.bincount(vectors["held_owner"], minlength=len(vectors["held_text"]))
    assert len(vectors["held_all_image"]) == photos.sum() > len(vectors["held_text"]) and photos.min() >= 1
    assert "| full gallery: all | several photos | one photo |" in out
    assert "| corrected, T 0.05, K 3, 2 rounds, images marginals |" in out and "uniform marginals |" in out
    # only the products with several photos: no split left to show
    monkeypatch.setattr(sys, "argv", argv[:-8] + ["--temperatures", "0.05", "--ks", "3", "--rounds", "2",
                                                  "--images", "all", "--min-photos", "2"])
    bench.main()
    out = capsys.readouterr().out
    assert f"{int((photos >= 2).sum())} held-out products" in out and "| full gallery |" in out
    monkeypatch.setattr(sys, "argv", argv[:-8] + ["--min-photos", "2"])
    with pytest.raises(SystemExit, match="N > 1 needs --images all"):
        bench.main()
    monkeypatch.setattr(sys, "argv", argv[:-2] + ["--rounds", "1", "--images", "all"])
    with pytest.raises(SystemExit, match="--bank training takes --rounds 1 and --images first"):
        bench.main()
    monkeypatch.setattr(sys, "argv", argv[:-8] + ["--marginals", "photos"])
    with pytest.raises(SystemExit, match="--marginals 'photos': comma-separated, each one of images, uniform"):
        bench.main()
