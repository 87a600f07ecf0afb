"""The sample-100 query and candidate sets that training's validation, `fashionbert fuse` and `fashionbert evaluate`
share: the pool rule (one image per product, its first by image_id), and both callers' draws pinned to the values
they gave before they shared one builder (commit 7c0cff2), so that no reported figure moves."""
from __future__ import annotations

import numpy as np
import pytest

from fashionbert.data.features import FeatureReader, index_images, load_texts, open_feature_folders
from fashionbert.evaluation.sample_hundred import (build_sample_hundred, draw, draw_by_product, draw_candidates,
                                                  first_image_per_product)
from tests.fake_features import write_fake_features

# a: 6 products (enough for 4 candidates), b: 3 (too few: all of them, then random fill), "": unknown
SUBCATEGORIES = ["a"] * 6 + ["b"] * 3 + [""] * 2


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    folder = write_fake_features(tmp_path_factory.mktemp("features"), n_products=12, images_per_product=2,
                                 feature_dim=8, n_image_shards=2, row_group_size=4, subcategories=["shirts", "bags"])
    folders = open_feature_folders([str(folder)])
    texts = load_texts(folders)
    index = index_images(folders, texts)
    return texts, index, FeatureReader(index.shards, folders[0].num_patches, folders[0].feature_dim)


def test_evaluate_draws_are_pinned():
    draws = draw_candidates(SUBCATEGORIES, n_queries=5, n_candidates=4, draws=2, seed=5)
    assert [d.queries.tolist() for d in draws] == [[1, 2, 5, 6, 7], [2, 3, 5, 7, 9]]
    assert [[c.tolist() for c in d.candidates] for d in draws] == [
        [[1, 5, 3, 4, 0], [2, 4, 5, 0, 1], [5, 3, 4, 2, 1], [6, 8, 7, 9, 5], [7, 6, 8, 1, 10]],
        [[2, 5, 3, 4, 0], [3, 1, 2, 0, 5], [5, 2, 4, 1, 3], [7, 6, 8, 5, 0], [9, 3, 2, 6, 5]],
    ]
    assert all(d.queries.dtype == np.int64 and all(c.dtype == np.int64 for c in d.candidates) for d in draws)


def test_validation_draw_is_pinned(catalog):
    texts, index, reader = catalog
    s100 = build_sample_hundred(texts, index, np.arange(len(index)), reader, queries=4, candidates=6, max_pool=9,
                                seed=3)
    assert s100.pool_products.tolist() == [0, 2, 3, 4, 5, 6, 7, 9, 11]  # 12 products thinned to max_pool
    assert s100.query_products.tolist() == [0, 3, 6, 7]
    # a short sub-category stays in pool order (pool positions 0, 1, 3, 5 are shirts), then the random fill
    assert [c.tolist() for c in s100.candidates] == [
        [0, 1, 3, 5, 4, 6, 7], [2, 4, 6, 7, 8, 5, 0], [5, 0, 1, 3, 2, 7, 4], [6, 2, 4, 7, 8, 3, 0]]
    assert len(s100) == 4
    assert all(np.array_equal(t, texts.input_ids[p][0]) for t, p in zip(s100.texts, s100.query_products))
    _, rows = first_image_per_product(index, np.arange(len(index)))
    keep = rows[s100.pool_products]  # every product has images here, so `rows` is indexed by product
    assert np.array_equal(s100.pool_features, reader.read(index.shard[keep], index.row_group[keep], index.row[keep]))


def test_the_two_draws_part_at_the_first_short_subcategory():
    """Same generator state: same queries and candidates up to the first query whose sub-category is too small;
    there evaluate's draw shuffles that sub-category (one more draw from the generator), validation's does not."""
    for seed in range(5):
        kept = draw(SUBCATEGORIES, 11, 4, np.random.default_rng(seed), shuffle_short=False)
        shuffled = draw(SUBCATEGORIES, 11, 4, np.random.default_rng(seed), shuffle_short=True)
        assert np.array_equal(kept.queries, shuffled.queries)
        short = kept.queries.tolist().index(6)  # all 11 are queries; 6 is the first "b"
        for a, b in zip(kept.candidates[:short], shuffled.candidates[:short]):
            assert np.array_equal(a, b)
        a, b = kept.candidates[short], shuffled.candidates[short]
        assert a[1:3].tolist() == [7, 8] and sorted(b[1:3].tolist()) == [7, 8]  # the other b's first
        assert np.array_equal(a[3:], b[3:])  # then the same random fill


def test_pool_is_the_first_image_of_each_product_by_image_id(catalog):
    _, index, _ = catalog
    rows = np.random.default_rng(0).permutation(len(index))[:20]  # any order, some products with one image left
    products, images = first_image_per_product(index, rows)
    expected = {}
    for r in rows:
        p = int(index.product[r])
        if p not in expected or index.image_ids[r] < index.image_ids[expected[p]]:
            expected[p] = int(r)
    assert products.tolist() == sorted(expected) and images.tolist() == [expected[p] for p in sorted(expected)]
    assert products.dtype == images.dtype == np.int64


def test_fewer_than_two_products_give_no_validation_set(catalog):
    texts, index, reader = catalog
    one_product = np.flatnonzero(index.product == 0)
    assert build_sample_hundred(texts, index, one_product, reader) is None


def _by_id(ids, subs, n_queries=5, n_candidates=4, salt="0:0"):
    d = draw_by_product(ids, subs, n_queries, n_candidates, salt)
    return {ids[q]: [ids[c] for c in cands] for q, cands in zip(d.queries, d.candidates)}, d


def test_draw_by_product_keeps_the_protocol():
    ids = [f"p{i:02d}" for i in range(len(SUBCATEGORIES))]
    drawn, d = _by_id(ids, SUBCATEGORIES)
    assert len(drawn) == 5 and d.queries.tolist() == sorted(d.queries.tolist())
    sub = dict(zip(ids, SUBCATEGORIES))
    for query, cands in drawn.items():
        assert cands[0] == query and len(cands) == 5 and len(set(cands)) == 5
        same = [c for c in ids if c != query and sub[c] == sub[query]] if sub[query] else []
        if len(same) >= 4:
            assert all(sub[c] == sub[query] for c in cands[1:])
        else:  # a short sub-category: all of it first, then the fill
            assert set(cands[1:1 + len(same)]) == set(same)
    assert _by_id(ids, SUBCATEGORIES)[0] == drawn  # deterministic
    assert _by_id(ids, SUBCATEGORIES, salt="0:1")[0] != drawn  # another draw is another sample
    assert draw_candidates(SUBCATEGORIES, 5, 4, 1, seed=0, product_ids=ids)[0].candidates[0].tolist() == \
        d.candidates[0].tolist()


def test_draw_by_product_is_stable_when_other_products_come_and_go():
    rng = np.random.default_rng(0)
    ids = [f"p{i:03d}" for i in range(300)]
    subs = [f"s{k}" for k in rng.integers(0, 3, size=300)]
    before, _ = _by_id(ids, subs, n_queries=20, n_candidates=30)
    # Remove a product that is no query, add two: the queries stay, and a query's candidates change only where the
    # removed one was among them or a newcomer ranks among them.
    gone = next(p for p in ids if p not in before)
    kept = [(p, s) for p, s in zip(ids, subs) if p != gone] + [("new-1", "s0"), ("new-2", "s1")]
    after, _ = _by_id([p for p, _ in kept], [s for _, s in kept], n_queries=20, n_candidates=30)
    assert set(after) == set(before) or len(set(after) ^ set(before)) <= 4  # a newcomer may rank among the queries
    unchanged = [q for q in before if q in after and after[q] == before[q]]
    assert len(unchanged) >= len(before) // 2
    for q in set(before) & set(after):
        lost = set(before[q]) - set(after[q])
        assert lost <= {gone} | set(before[q][-2:])  # the removed one, or the last ones pushed out by newcomers
        assert set(after[q]) - set(before[q]) <= {"new-1", "new-2"} | ({p for p, _ in kept} if gone in before[q] else set())
