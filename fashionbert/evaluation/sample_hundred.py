"""The sample-100 protocol's query and candidate sets, for training's quick validation, `fashionbert fuse` and
`fashionbert evaluate`.

The pool holds one image per held-out product (`first_image_per_product`). Each query product gets its true
candidate first, then `candidates` others: a seeded sample of its sub-category when that has enough products,
else all of them and random other products to fill (a product without a sub-category only gets the fill).

Validation and evaluate drew differently before they shared this module, and each keeps its own draws, so
that no figure measured before changes: validation draws once, from one seeded generator that also thins the
pool to `max_pool`, and keeps a short sub-category in pool order; evaluate draws several times, each from its
own generator, and shuffles a short sub-category (`shuffle_short`). The order matters: both report TIA
accuracy on each query's first candidate.

Evaluate can also draw by product id (`draw_by_product`, `--draw-by product-id`): every choice is a product's rank
under a seeded hash of its id (of the query's and the candidate's ids, for candidates), so a query keeps its
candidates, and the queries stay the queries, when other products enter or leave the catalog. Nightly evaluates
that way: its quality gate compares the same queries night after night, and its score cache finds their pairs.

Imports numpy and pyarrow only (no torch).
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import numpy as np

from fashionbert.data.features import FeatureReader, ImageIndex, TextTable


@dataclasses.dataclass
class Draw:
    """One draw of queries and their candidates over a pool of products (positions into the pool)."""

    queries: np.ndarray  # int64 (N,), ascending
    candidates: list[np.ndarray]  # per query: the query's own position first, then the others


@dataclasses.dataclass
class SampleHundred:
    """Held-out sample-100 queries with their pool's features in memory: each text query's true image + up to
    `candidates` others, from the same sub-category first and random held-out products when it has too few."""

    query_products: np.ndarray  # product index per query
    candidates: list[np.ndarray]  # per query, indices into `pool_products`; the true one first
    pool_products: np.ndarray
    pool_features: np.ndarray  # (n, P, D) float16, one image per held-out product
    texts: list[np.ndarray]  # per query, token ids
    pool_texts: list[np.ndarray] | None = None  # per pool product, token ids (the catalog a hubness bias is over)

    def __len__(self) -> int:
        return len(self.query_products)


def first_image_per_product(index: ImageIndex, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pool of `rows` (image rows of `index`): its products, ascending, and each one's image, the first by
    image_id (an id, unlike a row number, does not move when the shards are rewritten)."""
    first: dict[int, int] = {}
    for r in sorted(np.asarray(rows).tolist(), key=lambda r: index.image_ids[r]):
        first.setdefault(int(index.product[r]), r)
    products = np.asarray(sorted(first), dtype=np.int64)
    return products, np.asarray([first[int(p)] for p in products], dtype=np.int64)


def draw(subcategory: Sequence[str], n_queries: int, n_candidates: int, rng: np.random.Generator,
         shuffle_short: bool) -> Draw:
    """min(n_queries, pool) queries from a pool with these sub-categories, and their candidates."""
    sub = np.asarray(subcategory, dtype=object)
    n = len(sub)
    queries = np.sort(rng.choice(n, size=min(n_queries, n), replace=False)).astype(np.int64)
    candidates = []
    for q in queries:
        others = np.delete(np.arange(n), q)
        same = others[sub[others] == sub[q]] if sub[q] else others[:0]
        if len(same) >= n_candidates:
            chosen = rng.choice(same, size=n_candidates, replace=False)
        else:
            rest = np.setdiff1d(others, same)
            fill = rng.choice(rest, size=min(len(rest), n_candidates - len(same)), replace=False)
            chosen = np.concatenate([rng.permutation(same) if shuffle_short else same, fill])
        candidates.append(np.concatenate([[q], chosen]).astype(np.int64))
    return Draw(queries, candidates)


def draw_candidates(subcategory: Sequence[str], n_queries: int, n_candidates: int, draws: int, seed: int,
                    product_ids: Sequence[str] | None = None) -> list[Draw]:
    """Evaluate's `draws` independent draws: draw d from a generator seeded by (seed, d); with `product_ids`, by
    product id (`draw_by_product`) salted with (seed, d)."""
    if product_ids is not None:
        return [draw_by_product(product_ids, subcategory, n_queries, n_candidates, f"{seed}:{d}") for d in range(draws)]
    return [draw(subcategory, n_queries, n_candidates, np.random.default_rng([seed, d, 0x100]), shuffle_short=True)
            for d in range(draws)]


def id_hashes(ids: Sequence[str], salt: str) -> np.ndarray:
    """A uint64 per id from a salted blake2b: the same on every run and machine."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(f"{salt}\x00{i}".encode(), digest_size=8).digest(), "little")
                        for i in ids), dtype=np.uint64, count=len(ids))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: scrambles a uint64 so that keys of related pairs are unrelated."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def draw_by_product(product_ids: Sequence[str], subcategory: Sequence[str], n_queries: int, n_candidates: int,
                    salt: str) -> Draw:
    """`draw`'s protocol with every random choice made by product id: the queries are the products of lowest
    hash; a query's candidates are its sub-category's products of lowest pair hash (query id, candidate id), then
    the others' (a short sub-category is filled). Adding or removing products moves a query's candidates only
    where a newcomer ranks among them or one of them left."""
    sub = np.asarray(subcategory, dtype=object)
    h = id_hashes(product_ids, salt)
    n = len(sub)
    queries = np.sort(np.argsort(h, kind="stable")[:min(n_queries, n)]).astype(np.int64)
    candidates = []
    for q in queries:
        others = np.delete(np.arange(n), q)
        ordered = others[np.argsort(_mix(h[others] ^ _mix(h[q])), kind="stable")]
        same = ordered[sub[ordered] == sub[q]] if sub[q] else ordered[:0]
        rest = ordered[sub[ordered] != sub[q]] if sub[q] else ordered
        chosen = same[:n_candidates] if len(same) >= n_candidates else np.concatenate(
            [same, rest[:n_candidates - len(same)]])
        candidates.append(np.concatenate([[q], chosen]).astype(np.int64))
    return Draw(queries, candidates)


def build_sample_hundred(texts: TextTable, index: ImageIndex, val_rows: np.ndarray, reader: FeatureReader,
                         queries: int = 100, candidates: int = 100, max_pool: int = 1000,
                         seed: int = 0) -> SampleHundred | None:
    """Validation's one draw over the held-out images `val_rows`, with the pool's features read; `max_pool`
    bounds them in memory (a seeded sample of the products). None when fewer than 2 products have an image."""
    rng = np.random.default_rng([seed, 0x100])
    products, rows = first_image_per_product(index, val_rows)
    if len(products) < 2:
        return None
    if len(products) > max_pool:
        keep = np.isin(products, rng.choice(products, size=max_pool, replace=False))
        products, rows = products[keep], rows[keep]
    feats = reader.read(index.shard[rows], index.row_group[rows], index.row[rows])
    d = draw([texts.subcategory[p] for p in products], queries, candidates, rng, shuffle_short=False)
    pool_texts = [texts.input_ids[int(p)][0] for p in products]
    return SampleHundred(products[d.queries], d.candidates, products, feats, [pool_texts[q] for q in d.queries],
                         pool_texts)
