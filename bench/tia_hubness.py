"""TIA hubness benchmark: does a hubness correction of the cross-encoder's margins make the re-rank pay? Prints
figures; asserts nothing.

    python bench/tia_hubness.py --features DIR --model DIR [--recall-k 32] [--ks 10,32] [--temperatures 1,2]
                                [--scores FILE]

The recall cosine gains 4-5 Rank@1 points on hm-dev from its hubness correction (fashionbert/rank/hubness.py): each
candidate's cosine less T log mean exp(cos / T) over its K nearest queries of the catalog. The TIA margin cannot
have that correction for free: a candidate close to many queries is close to them in the joint pass too, but the
margins of those other queries are not computed. This bench computes them: every held-out product's text and first
image (the training run's split) are embedded, each text's top --recall-k images and each image's top --recall-k
texts by the raw cosine are the re-rank pairs (the full held-out gallery, both ways), and each candidate's K nearest
queries by the cosine are scored with the cross-encoder too, for its TIA bias T log mean exp(margin / T). Then each
query's re-rank pairs are ranked (a miss where the true candidate is outside its top --recall-k) by:
- the raw cosine, and the corrected cosine (T 0.03 over the K 10 nearest, one round: the correction as it was when
  this bench was written; its later rounds, rank.hubness, are measured by bench/hubness.py);
- the TIA margin alone, and the margin less its candidate's TIA bias at each K and T;
- each TIA ranking fused with the corrected cosine: `score_fusion.fit` without its TIA check, cross-fitted over two
  halves of the queries (what the fit can get from the pair); and whether the fit with the check (the sign test,
  fitted on all queries) keeps TIA, i.e. pays for the pass.
The bias's pairs cost one more cross-encoder pass of about K x (texts + images) pairs beside the re-rank's
recall-k x (texts + images).

Scoring is the slow part (~3.3 min for hm-dev's 1,662 held-out products at --recall-k 32 on the 2-core Xeon, bf16):
--scores FILE keeps each query's candidate lists with their cosines and margins (an .npz), and a rerun with the same
file and model whose --recall-k and --ks are no longer than the kept lists reads them instead.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fashionbert.data.feature_catalog import IndexedImages, open_catalog  # noqa: E402
from fashionbert.errors import UserError  # noqa: E402
from fashionbert.evaluation.evaluate import SplitOptions, held_out_products  # noqa: E402
from fashionbert.evaluation.sample_hundred import first_image_per_product  # noqa: E402
from fashionbert.model import score_fusion  # noqa: E402
from fashionbert.model.loading import load_model  # noqa: E402
from fashionbert.rank.cross_encoder import CrossEncoderScorer  # noqa: E402
from fashionbert.rank.hubness import DEFAULT_K, DEFAULT_TEMPERATURE, neighbour_bias  # noqa: E402
from fashionbert.rank.neighbours import Neighbours, search  # noqa: E402
from fashionbert.rank.retrieve import dual_encoder_for, embed_all  # noqa: E402
from fashionbert.runtime import resolve_runtime  # noqa: E402

DIRECTIONS = ("t2i", "i2t")  # text -> image, image -> text


def score_gallery(features: list[str], model: str, recall_k: int, bank_k: int) -> dict:
    """Per direction, each query's top max(recall_k, bank_k) candidates by the raw cosine with their cosines and TIA
    margins (`<dir>_query`, `_candidate`, `_cosine`, `_margin`; queries ascending, cosines descending), over the
    held-out products' texts and first images (position = product, so query q's true candidate is q)."""
    rt = resolve_runtime("auto", "auto", 0)
    loaded = load_model(model, rt)
    if not loaded.has_itc_head:
        raise UserError(f"--model {loaded.folder}: no itc head (trained with --itc-dim 0), no cosine to recall by")
    catalog = open_catalog(features, loaded)
    held_out, _ = held_out_products(SplitOptions(), loaded, catalog.texts.group_id)
    products, rows = first_image_per_product(catalog.index, np.arange(len(catalog.index)))
    keep = held_out[products]
    if keep.sum() < 2:
        raise UserError(f"--features {features}: fewer than 2 held-out products with an image")
    texts = [catalog.text_ids[p] for p in products[keep]]
    images = IndexedImages(catalog.index, catalog.reader, rows[keep])
    scorer = CrossEncoderScorer(loaded.model, rt)
    text_vec, image_vec = embed_all(dual_encoder_for(scorer), texts, images, scorer.token_budget)
    k = min(max(recall_k, bank_k), len(texts))
    t2i, i2t = search(image_vec, text_vec, k, "torch"), search(text_vec, image_vec, k, "torch")
    pairs = np.concatenate([np.stack([t2i.query, t2i.candidate], 1), np.stack([i2t.candidate, i2t.query], 1)])
    unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
    print(f"scoring {len(unique)} pairs of {len(texts)} held-out products with the cross-encoder", file=sys.stderr)
    margins = scorer.score(texts, images, unique)[inverse.reshape(-1)]
    out = {"version": np.asarray(loaded.version), "k": np.asarray(k), "n": np.asarray(len(texts))}
    for name, found, m in (("t2i", t2i, margins[:len(t2i)]), ("i2t", i2t, margins[len(t2i):])):
        out |= {f"{name}_query": found.query, f"{name}_candidate": found.candidate, f"{name}_cosine": found.score,
                f"{name}_margin": m}
    return out


def load_or_score(a: argparse.Namespace, bank_k: int) -> dict:
    if a.scores and Path(a.scores).is_file():
        kept = dict(np.load(a.scores))
        version = str(load_model(a.model, resolve_runtime("cpu", "fp32", 0)).version)
        if str(kept["version"]) == version and int(kept["k"]) >= min(max(a.recall_k, bank_k), int(kept["n"])):
            print(f"scores: read from {a.scores}", file=sys.stderr)
            return kept
        print(f"scores: {a.scores} holds another model or fewer neighbours; scoring again", file=sys.stderr)
    scores = score_gallery(a.features, a.model, a.recall_k, bank_k)
    if a.scores:
        np.savez(a.scores, **scores)
    return scores


def lists(s: dict, name: str, value: str = "cosine") -> Neighbours:
    """Direction `name`'s lists with `value` (cosine or margin) as their score."""
    return Neighbours(s[f"{name}_query"], s[f"{name}_candidate"], s[f"{name}_{value}"].astype(np.float64), "exact")


def candidate_bias(bank: Neighbours, n: int, k: int, temperature: float) -> np.ndarray:
    """Per candidate of the other direction: T log mean exp(score / T) over the first `k` rows of its list in
    `bank` (the lists of the direction whose queries are those candidates)."""
    return neighbour_bias(bank.first(k), n, temperature)


def rankings(s: dict, name: str, recall_k: int, ks: list[int], temperatures: list[float]) -> dict:
    """Direction `name`'s re-rank pairs ranked every way (the module docstring), as {ranking: (hits per query,
    whether the sign test kept TIA or None)}."""
    other = "i2t" if name == "t2i" else "t2i"
    n = int(s["n"])
    pairs = lists(s, name).first(recall_k)
    margin = lists(s, name, "margin").first(recall_k).score
    query, candidate, cosine = pairs.query, pairs.candidate, pairs.score
    label = query == candidate
    corrected = cosine - candidate_bias(lists(s, other), n, DEFAULT_K, DEFAULT_TEMPERATURE)[candidate]
    tia = {"the TIA margin": margin}
    for k in ks:
        for t in temperatures:
            bias = candidate_bias(lists(s, other, "margin"), n, k, t)
            tia[f"the TIA margin less its TIA bias (K {k}, T {t:g})"] = margin - bias[candidate]
    out = {"the raw cosine": (cosine, None),
           f"the corrected cosine (T {DEFAULT_TEMPERATURE:g}, K {DEFAULT_K}, one round)": (corrected, None)}
    fold = query % 2
    listwise = functools.partial(score_fusion.fit, tia_check=False)
    for what, m in tia.items():
        out[what] = (m, None)
        fused = score_fusion.cross_fitted_logits(m, corrected, label, query, fold, listwise)
        kept = score_fusion.fit(m, corrected, label, query).uses_tia
        out[f"{what}, fused with the corrected cosine"] = (fused, kept)
    return {what: (hits(score, label, query, n), kept) for what, (score, kept) in out.items()}


def hits(score: np.ndarray, label: np.ndarray, query: np.ndarray, n: int) -> np.ndarray:
    """Per query 0..n-1: whether its true candidate is in its list and scores strictly above every other."""
    best_other = np.full(n, -np.inf)
    np.maximum.at(best_other, query[~label], score[~label])
    true = np.full(n, np.nan)  # a query whose true candidate was not recalled: nan, never above
    true[query[label]] = score[label]
    return true > best_other


def _numbers(text: str, kind, flag: str) -> list:
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"bench/tia_hubness.py: {flag} {text!r}: comma-separated numbers, e.g. 10,32")
    if any(v <= 0 for v in values):
        raise SystemExit(f"bench/tia_hubness.py: {flag} {text!r}: every value must be > 0")
    return values


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", action="append", required=True, metavar="DIR",
                   help="the featurize folder(s) the model trained on (repeat for several)")
    p.add_argument("--model", required=True, metavar="DIR", help="model folder (OUT/model of fashionbert train)")
    p.add_argument("--recall-k", type=int, default=32, help="candidates re-ranked per query (default 32)")
    p.add_argument("--ks", default="10,32", help="comma-separated neighbour counts K of the TIA bias (default 10,32)")
    p.add_argument("--temperatures", default="1,2", help="comma-separated temperatures T of the TIA bias, in margin "
                                                         "units (default 1,2)")
    p.add_argument("--scores", metavar="FILE", help="an .npz to keep the scores in and read them back from")
    a = p.parse_args(argv)
    ks, temperatures = _numbers(a.ks, int, "--ks"), _numbers(a.temperatures, float, "--temperatures")
    if a.recall_k < 1:
        raise SystemExit("bench/tia_hubness.py: --recall-k must be >= 1")
    try:
        s = load_or_score(a, max(ks + [DEFAULT_K]))
    except UserError as exc:
        raise SystemExit(f"bench/tia_hubness.py: {exc}")
    n = int(s["n"])
    found = {name: rankings(s, name, a.recall_k, ks, temperatures) for name in DIRECTIONS}
    recall = {}
    for name in DIRECTIONS:
        pairs = lists(s, name).first(a.recall_k)
        recall[name] = 100 * len(np.unique(pairs.query[pairs.query == pairs.candidate])) / n
    print(f"model {a.model} ({s['version']}): the full gallery of {n} held-out products, each query's top "
          f"{a.recall_k} by the raw cosine re-ranked (true candidate among them: {recall['t2i']:.1f}% / "
          f"{recall['i2t']:.1f}%). Rank@1 (%), text -> image / image -> text; fused rows cross-fitted over two "
          f"halves of the queries, and whether the fit with the sign test keeps TIA:\n")
    print("| ranked by | Rank@1 | minus the corrected cosine's | sign test keeps TIA |\n| --- | --- | --- | --- |")
    base = next(w for w in found["t2i"] if w.startswith("the corrected cosine"))
    for what in found["t2i"]:
        r = [100 * found[d][what][0].mean() for d in DIRECTIONS]
        b = [100 * found[d][base][0].mean() for d in DIRECTIONS]
        kept = [found[d][what][1] for d in DIRECTIONS]
        keeps = "" if kept[0] is None else " / ".join("yes" if k else "no" for k in kept)
        print(f"| {what} | {r[0]:.1f} / {r[1]:.1f} | {r[0] - b[0]:+.1f} / {r[1] - b[1]:+.1f} | {keeps} |")


if __name__ == "__main__":
    main()
