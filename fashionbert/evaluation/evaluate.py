"""fashionbert evaluate: how good a model is, on products it did not train on.

    fashionbert evaluate --features DIR --model DIR --out metrics.json

Three protocols, all on held-out products (the training split: a hash of group_id, see
`features.validation_mask`; its fraction and seed are read from the training run that wrote the model):
1. sample-100 (FashionBERT / Fashion-Gen): N query products; each gets its true candidate plus 100 candidates
   of other products from the same sub-category (random products where the sub-category is too small).
   Text->image ranks the query text's image among 101 images; image->text ranks its text among 101 texts.
   Rank@1/5/10, as mean and spread over several seeded draws of queries and candidates, by the model's ranking
   score (fashionbert/model/score_fusion.py: what retrieve and score-pairs rank by) and, under `by_head`, by the TIA margin
   and the itc cosine alone. The score's three fusion weights were fitted on held-out pairs too (training's
   validation draw or `fashionbert fuse`), so its figure carries that small optimism; the per-head ones do not.
   `variants`: the share of queries with one of their own colour variants (a product of the same group) among
   the candidates, and per ranking and direction the share whose top candidate is such a variant.
2. TIA: accuracy of P(aligned) > 0.5 on balanced pairs (each true pair and one same-sub-category negative)
   and ROC AUC over every scored pair of the protocol.
3. full gallery: every held-out text against every held-out image through the two-stage retrieval of
   `fashionbert retrieve` (recall by dual embeddings, re-rank by the cross-encoder): Rank@1/5/10 of the final
   ranking (`two_stage`), of the embedding cosine alone (`recall_only`: what retrieval would return without the
   cross-encoder or the hubness correction, at no extra cost), of the hubness-corrected cosine (`recall_hub`),
   and `rerank_gain`, two-stage minus the Rank@1 of the recall order the re-rank started from (the corrected
   cosine's when the model's fusion reads it, `recall_ranked_by`), which says whether the re-rank pays for its
   compute; the recall stage's Recall@K, and the compute against the exhaustive cross-encoder (which
   `--exhaustive` also runs, for small galleries). Where some products have several photos and some one,
   `by_photos` gives each of those Rank@1s over the two kinds of product apart (the correction's marginals,
   rank.hubness, trade one for the other).

A rank counts ties against the true candidate (rank = 1 + candidates scoring >= it), so a constant model
scores the floor, not the ceiling.

`--score-cache FILE` / `--save-scores FILE` work as for `fashionbert retrieve` (fashionbert/rank/score_cache.py):
pair margins and embeddings an earlier run of the same model computed are reused, with the same metrics as
without; metrics.json's `score_cache` counts pairs_scored / pairs_reused and embeddings_computed /
embeddings_reused over all three protocols, and names the files read and written.

--features, --model, --out and the score-cache files may be URIs (gs://...; fashionbert/data/storage.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Callable, Sequence

import numpy as np

from fashionbert.data import storage
from fashionbert.data.feature_catalog import IndexedImages, open_catalog
from fashionbert.data.features import validation_mask
from fashionbert.data.model_store import load_model
from fashionbert.errors import UserError
from fashionbert.evaluation.quick_validation import roc_auc
from fashionbert.evaluation.sample_hundred import Draw, draw_candidates, first_image_per_product, id_hashes
from fashionbert.model.loading import training_options
from fashionbert.rank.cross_encoder import (BatchingOptions, CrossEncoderScorer, PairScorer, PairScores,
                                            add_batching_arguments)
from fashionbert.rank.hubness import (HubnessOptions, add_hubness_arguments, corrected_recall, fusion_hubness,
                                      hubness_biases)
from fashionbert.rank.neighbours import Neighbours, search
from fashionbert.rank.retrieve import (Ranked, RecallOptions, add_retrieval_arguments, dual_encoder_for, embed_all,
                                       exhaustive, two_stage)
from fashionbert.rank.score_cache import CacheOptions, ItemKeys, add_cache_arguments, open_cache, save_path
from fashionbert.runtime import RuntimeOptions, add_runtime_arguments, resolve_runtime, stage_config

RANK_KS = (1, 5, 10)
DRAW_BY = ("position", "product-id")
DEFAULT_VAL_FRACTION = 0.05


# ============================================================================================ sample-100
def _spread(values: Sequence[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "per_draw": [float(x) for x in v]}


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two heads' scores over one query's candidates; nan where either is constant (there is
    no order to compare)."""
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def rank_of_true(scores: np.ndarray) -> int:
    """`scores[0]` is the true candidate's; ties count against it."""
    return 1 + int((scores[1:] >= scores[0]).sum())


def sample_hundred(draws: Sequence[Draw], score: Callable[[np.ndarray], PairScores | np.ndarray],
                   groups: np.ndarray | None = None, hub: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Rank@K both ways and TIA accuracy/AUC per draw, then mean and spread.

    `score(pairs)`: (n, 2) (text pool position, image pool position) -> `scoring.PairScores` (ranks by its
    `logit`, the model's ranking score; TIA accuracy/AUC from its `margin`; Rank@K by each head under
    "by_head"), or a plain (n,) array of TIA margins that is both. Every distinct pair of every draw and
    direction is scored once (draws and directions share many pairs).

    With `groups` (a group code per pool position; a product's colour variants share one) "variants" says how
    much of the miss is the query's own variants: the share of queries with a variant among their candidates, and
    per ranking and direction the share of queries whose top candidate is a variant instead of the true one.

    With both heads, "heads" says whether re-ranking by TIA can add to the itc cosine at all: per direction the mean
    over queries of the Pearson correlation of the two heads' scores over the query's candidates (near 1: TIA
    orders the candidates as the cosine does, and no fusion of the two ranks better than either), and the share of
    queries that at least one head ranks first (Rank@1 of an oracle choosing the better head per query: what a
    fusion could reach at most, roughly).

    With `hub` (the pool's hubness biases, per image and per text position: `rank.hubness`) and the cosine,
    "by_head" also ranks by the hubness-corrected cosine, `itc_hub`: the cosine minus the candidate's bias."""
    t2i_pairs = [np.stack([np.full(len(c), q), c], axis=1) for d in draws for q, c in zip(d.queries, d.candidates)]
    i2t_pairs = [np.stack([c, np.full(len(c), q)], axis=1) for d in draws for q, c in zip(d.queries, d.candidates)]
    allpairs = np.concatenate(t2i_pairs + i2t_pairs).astype(np.int64)
    width = int(allpairs.max()) + 1
    unique, inverse = np.unique(allpairs[:, 0] * width + allpairs[:, 1], return_inverse=True)
    scored = score(np.stack([unique // width, unique % width], axis=1))
    split = len(np.concatenate(t2i_pairs)) if t2i_pairs else 0
    by = _rankings(scored, inverse, allpairs, split, hub)
    per_draw: dict[str, list[float]] = {}
    at = 0
    for d in draws:
        ranks = {(name, direction): [] for name in by for direction in ("t2i", "i2t")}
        pos, neg, correct = [], [], []
        variant_tops = {key: [] for key in ranks}
        with_variant = []
        correlations = {direction: [] for direction in ("t2i", "i2t")}
        for c in d.candidates:
            variant = groups[c] == groups[c[0]] if groups is not None else np.zeros(len(c), dtype=bool)
            variant[0] = False
            with_variant.append(bool(variant.any()))
            for name, (t2i_s, i2t_s) in by.items():
                for direction, s in (("t2i", t2i_s[at:at + len(c)]), ("i2t", i2t_s[at:at + len(c)])):
                    rank = rank_of_true(s)
                    ranks[name, direction].append(rank)
                    variant_tops[name, direction].append(rank > 1 and bool(variant[int(np.argmax(s))]))
            if "itc" in by:
                for direction, side in (("t2i", 0), ("i2t", 1)):
                    correlations[direction].append(_correlation(by["tia"][side][at:at + len(c)],
                                                                by["itc"][side][at:at + len(c)]))
            s_t, s_i = by["tia"][0][at:at + len(c)], by["tia"][1][at:at + len(c)]
            at += len(c)
            pos.append(s_t[0])  # the true pair (same in both directions)
            neg.extend(s_t[1:])
            neg.extend(s_i[1:])
            correct.append(s_t[0] > 0)
            if len(c) > 1:
                correct.append(s_t[1] <= 0)  # the first candidate: same sub-category where there is one
        for (name, direction), r in ranks.items():
            r = np.asarray(r)
            for k in RANK_KS:
                per_draw.setdefault(f"{name}/{direction}_rank{k}", []).append(float((r <= k).mean()))
            per_draw.setdefault(f"{name}/{direction}_mean_rank", []).append(float(r.mean()))
            per_draw.setdefault(f"{name}/{direction}_variant_top", []).append(float(np.mean(variant_tops[name, direction])))
        per_draw.setdefault("with_variant", []).append(float(np.mean(with_variant)))
        if "itc" in by:
            for direction in ("t2i", "i2t"):
                either = (np.asarray(ranks["tia", direction]) == 1) | (np.asarray(ranks["itc", direction]) == 1)
                per_draw.setdefault(f"either_head_rank1/{direction}", []).append(float(either.mean()))
                defined = [r for r in correlations[direction] if np.isfinite(r)]
                if defined:
                    per_draw.setdefault(f"heads_correlation/{direction}", []).append(float(np.mean(defined)))
        per_draw.setdefault("tia_accuracy", []).append(float(np.mean(correct)))
        per_draw.setdefault("tia_auc", []).append(roc_auc(np.asarray(pos), np.asarray(neg)))

    def ranks_of(name: str) -> dict:
        out = {}
        for direction in ("t2i", "i2t"):
            out[direction] = {f"rank{k}": _spread(per_draw[f"{name}/{direction}_rank{k}"]) for k in RANK_KS}
            out[direction]["mean_rank"] = _spread(per_draw[f"{name}/{direction}_mean_rank"])
        return out

    result: dict = ranks_of("score")
    result["by_head"] = {name: ranks_of(name) for name in by if name != "score"}
    result["tia"] = {"accuracy": _spread(per_draw["tia_accuracy"]), "auc": _spread(per_draw["tia_auc"])}
    result["pairs_scored"] = int(len(unique))
    if "itc" in by:
        # a draw whose every query had a constant head has no correlation to report (nor does the key, then)
        result["heads"] = {key: {d: _spread(per_draw[f"{key}/{d}"]) for d in ("t2i", "i2t")}
                           for key in ("heads_correlation", "either_head_rank1")
                           if all(len(per_draw.get(f"{key}/{d}", [])) == len(draws) for d in ("t2i", "i2t"))}
    if groups is not None:
        result["variants"] = {"queries_with_variant": _spread(per_draw["with_variant"]), **{
            name: {d: _spread(per_draw[f"{name}/{d}_variant_top"]) for d in ("t2i", "i2t")} for name in by}}
    return result


def _rankings(scored: PairScores | np.ndarray, inverse: np.ndarray, allpairs: np.ndarray, split: int,
              hub: tuple[np.ndarray, np.ndarray] | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each ranking's scores of `allpairs` (its first `split` rows text -> image, the rest image -> text), as
    (text -> image, image -> text) arrays, from the scores of the distinct pairs (`inverse` maps back)."""
    if isinstance(scored, np.ndarray):
        columns = {"score": scored, "tia": scored}
    else:
        columns = {"score": scored.logit, "tia": scored.margin}
        if scored.cosine is not None:
            columns["itc"] = scored.cosine
    by = {name: (v[:split], v[split:]) for name, v in
          ((name, np.asarray(col, dtype=np.float64)[inverse]) for name, col in columns.items())}
    if hub is not None and "itc" in by:  # each candidate's bias: its image's text -> image, its text's image -> text
        image_bias, text_bias = hub
        by["itc_hub"] = (by["itc"][0] - image_bias[allpairs[:split, 1]], by["itc"][1] - text_bias[allpairs[split:, 0]])
    return by


# ============================================================================================ full gallery
def first_true_rank(query: np.ndarray, true: np.ndarray, ranks: np.ndarray, n_queries: int) -> np.ndarray:
    """Per query, the best rank held by a true candidate (inf where none was retrieved)."""
    best = np.full(n_queries, np.inf)
    np.minimum.at(best, query[true], ranks[true].astype(np.float64))
    return best


def gallery_ranks(ranked: Ranked, is_true: Callable[[np.ndarray, np.ndarray], np.ndarray], queries: np.ndarray,
                  n_queries: int) -> dict:
    """Rank@K over `queries` (those that have a true match in the gallery)."""
    best = first_true_rank(ranked.query, is_true(ranked.query, ranked.candidate), ranked.ranks(), n_queries)[queries]
    out = {f"rank{k}": float((best <= k).mean()) if len(best) else float("nan") for k in RANK_KS}
    out["queries"] = int(len(queries))
    return out


def recall_order(neigh: Neighbours) -> Ranked:
    """The recall stage's own ranking: its lists as they come, best cosine first."""
    return Ranked(neigh.query, neigh.candidate, neigh.score, neigh.score)


def recall_at(neigh: Neighbours, is_true, queries: np.ndarray, n_queries: int, ks: Sequence[int]) -> dict:
    ranked = recall_order(neigh)
    best = first_true_rank(ranked.query, is_true(ranked.query, ranked.candidate), ranked.ranks(), n_queries)[queries]
    return {f"recall@{k}": float((best <= k).mean()) if len(best) else float("nan") for k in ks}


# ============================================================================================ command
@dataclasses.dataclass(frozen=True)
class SplitOptions:
    """The fields of `add_split_arguments`' options: which products are held out (None = the training run's)."""

    split: str = "validation"
    val_fraction: float | None = None
    split_seed: int | None = None


@dataclasses.dataclass(frozen=True)
class EvaluateConfig(CacheOptions, SplitOptions, HubnessOptions, RecallOptions, BatchingOptions, RuntimeOptions):
    features: list[str] = dataclasses.field(default_factory=list)  # featurize output folders
    model: str = ""
    out: str = ""
    # sample-100 protocol
    queries: int = 1000
    candidates: int = 100
    draws: int = 3
    seed: int = 0
    draw_by: str = "position"
    # full-gallery protocol
    gallery_max: int = 0
    gallery: bool = True
    exhaustive: bool = False


def config_from_args(args: argparse.Namespace) -> EvaluateConfig:
    return stage_config(EvaluateConfig, args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = EvaluateConfig()
    g = parser.add_argument_group("inputs and outputs")
    g.add_argument("--features", action="append", required=True, metavar="DIR",
                   help="featurize output folder (with _SUCCESS); repeat for several (the ones the model trained on, "
                        "so that the held-out split is the training run's)")
    g.add_argument("--model", required=True, metavar="DIR", help="model folder: OUT/model of `fashionbert train`")
    g.add_argument("--out", required=True, metavar="FILE", help="metrics JSON to write (replaced atomically)")

    add_split_arguments(parser)

    g = parser.add_argument_group("sample-100 protocol")
    g.add_argument("--queries", type=int, default=d.queries, help="query products per draw (default 1000)")
    g.add_argument("--candidates", type=int, default=d.candidates,
                   help="other products per query, same sub-category first (default 100)")
    g.add_argument("--draws", type=int, default=d.draws,
                   help="independent draws of queries and candidates; metrics report mean and spread. Each draw "
                        "costs up to 2 x queries x (candidates + 1) cross-encoder pairs (pairs shared between draws "
                        "are scored once) (default 3)")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the draws and of --gallery-max sampling (default 0)")
    g.add_argument("--draw-by", choices=DRAW_BY, default=d.draw_by,
                   help="position: seeded draws over the held-out pool (the protocol of the README's quality table); "
                        "product-id: every query, candidate and --gallery-max product chosen by a seeded hash of "
                        "product ids, so they stay the same when other products enter or leave the catalog "
                        "(nightly's: its quality gate compares like for like, its score cache finds the pairs) "
                        "(default position)")

    g = parser.add_argument_group("full-gallery protocol")
    g.add_argument("--gallery-max", type=int, default=d.gallery_max,
                   help="at most this many held-out products (seeded sample) in the full gallery; 0 = all (default)")
    g.add_argument("--no-gallery", dest="gallery", action="store_false", help="skip the full-gallery protocol")
    g.add_argument("--exhaustive", action="store_true",
                   help="also score every gallery text against every gallery image with the cross-encoder and report "
                        "its Rank@K beside two-stage's (texts x images pairs: small galleries only)")
    add_retrieval_arguments(parser, top_k=False)
    add_hubness_arguments(parser)
    add_cache_arguments(parser)
    add_batching_arguments(add_runtime_arguments(parser))


def add_split_arguments(parser: argparse.ArgumentParser) -> None:
    d = SplitOptions()
    g = parser.add_argument_group("held-out products")
    g.add_argument("--split", choices=("validation", "all"), default=d.split,
                   help="validation = the products training held out (default); all = every product (for a "
                        "catalog the model never saw)")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="held-out fraction of the split; default: the training run's (read from its "
                        f"training_state.json next to the model), else {DEFAULT_VAL_FRACTION}")
    g.add_argument("--split-seed", type=int, default=d.split_seed,
                   help="salt of the split hash; default: the training run's, else 0")


def held_out_products(args: SplitOptions, loaded, group_ids) -> tuple[np.ndarray, dict]:
    """Which products are held out (`args.split`, `args.val_fraction`, `args.split_seed`; defaults from the
    training run that wrote the model), and how that was decided."""
    if args.split == "all":
        return np.ones(len(group_ids), dtype=bool), {"kind": "all"}
    options, source = training_options(loaded.folder)
    fraction = args.val_fraction if args.val_fraction is not None else options.get("val_fraction", DEFAULT_VAL_FRACTION)
    seed = args.split_seed if args.split_seed is not None else options.get("split_seed", 0)
    info = {"kind": "validation", "val_fraction": float(fraction), "split_seed": int(seed),
            "from": ("command line" if args.val_fraction is not None
                     else _named(source, loaded) if source else "default")}
    if float(fraction) <= 0:
        raise UserError(f"--val-fraction {fraction}: the model held out no products, so there is nothing unseen to "
                        f"evaluate or fit on; pass --split all with features of products it did not train on")
    return validation_mask(group_ids, float(fraction), int(seed)), info


def _named(source, loaded) -> str:
    """A file of the model's training run as the user knows it: under the --model URI, not in its local copy."""
    if not loaded.uri:
        return str(source)
    return storage.parent(loaded.uri) + str(source)[len(str(loaded.folder.parent)):]


def run(args: EvaluateConfig) -> dict:
    t_start = time.time()
    for name in ("queries", "candidates", "draws", "recall_k"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    hubness = args.hubness  # checked before any work
    out = storage.check_out_file(args.out, "--out")
    save_to = save_path(args.save_scores, out)
    rt = resolve_runtime(args.device, args.precision, args.num_threads)
    loaded = load_model(args.model, rt)
    catalog = open_catalog(args.features, loaded)
    texts, index = catalog.texts, catalog.index
    held_out, split_info = held_out_products(args, loaded, texts.group_id)
    rows = np.flatnonzero(held_out[index.product])
    if len(rows) < 2:
        raise UserError(f"only {len(rows)} held-out image(s) in --features: nothing to rank; use --split all, a larger "
                        f"--val-fraction, or featurize more products")
    cache = open_cache(args, loaded.version, rt.precision)
    scorer = CrossEncoderScorer(loaded.model, rt, args.batch_tokens, args.block_images, cache=cache,
                                progress=args.progress)
    pair_scorer = PairScorer(scorer, loaded.fusion, cosines=loaded.has_itc_head, margins=True)
    text_ids = catalog.text_ids
    metrics: dict = {
        "model": {"path": loaded.location, "version": loaded.version, "step": loaded.step},
        "features": [f.location for f in catalog.folders],
        "split": split_info,
        "device": str(rt.device), "precision": rt.precision,
        "ranking_score": loaded.fusion.describe(),
        "score_fusion": loaded.fusion.to_dict(),
    }

    # ---- sample-100
    pool_products, pool_rows = first_image_per_product(index, rows)
    if len(pool_products) < 2:
        raise UserError(f"only {len(pool_products)} held-out product(s) with an image: a query needs other products to "
                        f"rank against; use --split all, a larger --val-fraction, or featurize more products")
    t0 = time.perf_counter()
    by_id = [texts.product_ids[p] for p in pool_products] if args.draw_by == "product-id" else None
    draws = draw_candidates([texts.subcategory[p] for p in pool_products], args.queries, args.candidates,
                            args.draws, args.seed, product_ids=by_id)
    pool_texts = [text_ids[p] for p in pool_products]
    pool_images = IndexedImages(index, catalog.reader, pool_rows)
    pool_keys = ItemKeys(catalog.text_hashes[pool_products], catalog.image_hashes[pool_rows])
    hub = pool_vec = offsets_of = None
    ranking_hubness = fusion_hubness(loaded.fusion)
    if loaded.has_itc_head and (hubness.enabled or ranking_hubness.enabled):
        # The pool is the catalog the queries rank in: each candidate's bias is over the pool's queries. Its
        # vectors give the pairs' cosines too, so nothing is embedded twice.
        pool_vec = embed_all(dual_encoder_for(scorer), pool_texts, pool_images, scorer.token_budget, cache, pool_keys)
        biases = {h: hubness_biases(*pool_vec, h, args.index, args.exact_max, rt.device.type)
                  for h in {hubness, ranking_hubness} if h.enabled}
        if hubness.enabled:
            hub = (biases[hubness].image, biases[hubness].text)
        if ranking_hubness.enabled:
            offsets_of = biases[ranking_hubness].offsets

    def score(pairs: np.ndarray) -> PairScores:
        offsets = offsets_of(pairs[:, 0], pairs[:, 1]) if offsets_of is not None else None
        return pair_scorer.score(pool_texts, pool_images, pairs, pool_keys, offsets, pool_vec)

    s100 = sample_hundred(draws, score, texts.group_codes()[pool_products], hub)
    metrics["sample100"] = {
        "pool_products": int(len(pool_products)), "queries": int(len(draws[0].queries)), "draws": args.draws,
        "candidates_mean": float(np.mean([len(c) - 1 for d in draws for c in d.candidates])),
        "seed": args.seed, "draw_by": args.draw_by, "chance": {f"rank{k}": min(1.0, k / (args.candidates + 1)) for k in RANK_KS},
        "t2i": s100["t2i"], "i2t": s100["i2t"], "by_head": s100["by_head"], "variants": s100["variants"],
        **({"heads": s100["heads"]} if "heads" in s100 else {}),
        "pairs_scored": s100["pairs_scored"],
        **({"hubness": hubness.describe()} if hub is not None else {}),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    metrics["tia"] = s100["tia"]

    # ---- full gallery
    if args.gallery:
        metrics["full_gallery"], metrics["recall_embedding"] = _full_gallery(args, catalog, scorer, held_out, rows,
                                                                             loaded.fusion)
    else:
        metrics["recall_embedding"] = dual_encoder_for(scorer).description
    if save_to is not None:
        cache.save(save_to)
    metrics["score_cache"] = cache.describe(save_to)
    metrics["seconds"] = round(time.time() - t_start, 3)
    storage.write_text(out, json.dumps(metrics, indent=2, sort_keys=False) + "\n")
    return metrics


def _full_gallery(args: EvaluateConfig, catalog, scorer, held_out, rows, fusion) -> tuple[dict, str]:
    index = catalog.index
    products = np.flatnonzero(held_out)
    if args.gallery_max and len(products) > args.gallery_max:
        if args.draw_by == "product-id":
            keys = id_hashes([catalog.texts.product_ids[p] for p in products], f"{args.seed}:gallery")
            products = np.sort(products[np.argsort(keys, kind="stable")[:args.gallery_max]])
        else:
            rng = np.random.default_rng([args.seed, 0x6A1])
            products = np.sort(rng.choice(products, size=args.gallery_max, replace=False))
        rows = rows[np.isin(index.product[rows], products)]
    position = {int(p): i for i, p in enumerate(products)}
    image_text = np.asarray([position[int(p)] for p in index.product[rows]], dtype=np.int64)  # image -> its text's position
    gallery_texts = [catalog.text_ids[p] for p in products]
    gallery_images = IndexedImages(index, catalog.reader, rows)
    keys = ItemKeys(catalog.text_hashes[products], catalog.image_hashes[rows])
    dual = dual_encoder_for(scorer)
    result = two_stage(scorer, dual, gallery_texts, gallery_images, args.recall_k, args.index, args.exact_max,
                       fusion=fusion, keys=keys, image_text=image_text)

    def t2i_true(q, c):
        return image_text[c] == q

    def i2t_true(q, c):
        return image_text[q] == c

    t2i_queries = np.unique(image_text)  # texts with at least one image in the gallery
    i2t_queries = np.arange(len(rows))
    ks = sorted({k for k in (1, 5, 10, 50, args.recall_k) if k <= args.recall_k})

    def ranks(t2i: Ranked, i2t: Ranked, texts: np.ndarray = t2i_queries, images: np.ndarray = i2t_queries) -> dict:
        return {"t2i": gallery_ranks(t2i, t2i_true, texts, len(products)),
                "i2t": gallery_ranks(i2t, i2t_true, images, len(rows))}

    device = scorer.runtime.device.type
    # The recall stage's own order: what the re-rank has to beat to earn its cost (by the corrected cosine when
    # the model's fusion reads it), and the same queries by the embedding cosine alone.
    orders = {"two_stage": (result.t2i, result.i2t),
              "recall": (recall_order(result.recall_t2i), recall_order(result.recall_i2t))}
    orders["recall_only"] = orders["recall"] if result.biases is None else tuple(recall_order(n) for n in (
        search(result.image_vectors, result.text_vectors, args.recall_k, args.index, args.exact_max, device=device),
        search(result.text_vectors, result.image_vectors, args.recall_k, args.index, args.exact_max, device=device)))
    if args.hubness.enabled and result.text_vectors.size:
        # Ranked by the corrected cosine instead: what the correction adds at no re-rank cost.
        orders["recall_hub"] = (orders["recall"] if result.biases is not None and args.hubness == fusion_hubness(fusion)
                                else tuple(recall_order(n) for n in corrected_recall(
                                    result.text_vectors, result.image_vectors, args.hubness, args.recall_k, args.index,
                                    args.exact_max, device, image_text)[:2]))
    two, recalled, alone = (ranks(*orders[k]) for k in ("two_stage", "recall", "recall_only"))
    if "recall_hub" in orders:
        hub = ranks(*orders["recall_hub"])
        hubness = {"recall_hub": hub, "hubness": {**args.hubness.describe(), "gain": {
            d: hub[d]["rank1"] - alone[d]["rank1"] for d in ("t2i", "i2t")}}}
    else:
        hubness = {}
    photos, by_photos = np.bincount(image_text, minlength=len(products)), {}
    if (photos > 1).any() and (photos == 1).any():
        # Several photos for some products: the same rankings over the products with several and those with one, as
        # the correction's marginals move the two apart (rank.hubness).
        for name, keep in (("several", photos > 1), ("one", photos == 1)):
            texts, images = np.flatnonzero(keep), np.flatnonzero(keep[image_text])
            rank1 = {}
            for order in ("two_stage", "recall_only", "recall_hub"):
                if order in orders:
                    r = ranks(*orders[order], texts, images)
                    rank1[order] = {d: r[d]["rank1"] for d in ("t2i", "i2t")}
            by_photos[name] = {"texts": int(len(texts)), "images": int(len(images)), "rank1": rank1}
    out = {
        "texts": int(len(products)), "images": int(len(rows)), "recall_k": args.recall_k,
        "index": result.index_kind,
        "two_stage": two,
        "recall_only": alone,
        "recall_ranked_by": "hubness-corrected cosine" if result.biases is not None else "cosine",
        "rerank_gain": {d: two[d]["rank1"] - recalled[d]["rank1"] for d in ("t2i", "i2t")},
        **hubness,
        **({"by_photos": by_photos} if by_photos else {}),
        "recall": {"t2i": recall_at(result.recall_t2i, t2i_true, t2i_queries, len(products), ks),
                   "i2t": recall_at(result.recall_i2t, i2t_true, i2t_queries, len(rows), ks)},
        "cost": {"cross_encoder_pairs": result.pairs_scored, "exhaustive_pairs": int(len(products) * len(rows)),
                 "embedded_items": int(len(products) + len(rows)),
                 "seconds": {k: round(v, 3) for k, v in result.seconds.items()}},
    }
    if args.exhaustive:
        t0 = time.perf_counter()
        ex_t2i, ex_i2t = exhaustive(scorer, gallery_texts, gallery_images, result.text_vectors, result.image_vectors,
                                    fusion, keys, result.biases)
        out["exhaustive"] = {"t2i": gallery_ranks(ex_t2i, t2i_true, t2i_queries, len(products)),
                             "i2t": gallery_ranks(ex_i2t, i2t_true, i2t_queries, len(rows)),
                             "seconds": round(time.perf_counter() - t0, 3)}
    return out, dual.description


def headline(metrics: dict) -> dict:
    """The figures a dashboard tracks, flat: sample-100 Rank@1/5/10 means both ways, TIA accuracy and AUC, and the
    full-gallery Rank@1, two-stage and recall-only, when that protocol ran; where the hubness correction ran, the
    Rank@1s by the corrected cosine (sample-100 and the gallery's recall stage)."""
    s100 = metrics.get("sample100", {})
    out = {f"sample100_{d}_rank{k}": s100.get(d, {}).get(f"rank{k}", {}).get("mean")
           for d in ("t2i", "i2t") for k in RANK_KS}
    out["sample100_queries"] = s100.get("queries")
    out["tia_accuracy"] = metrics.get("tia", {}).get("accuracy", {}).get("mean")
    out["tia_auc"] = metrics.get("tia", {}).get("auc", {}).get("mean")
    hub = s100.get("by_head", {}).get("itc_hub")
    if hub:
        for d in ("t2i", "i2t"):
            out[f"sample100_{d}_rank1_itc_hub"] = hub[d]["rank1"]["mean"]
    gallery = metrics.get("full_gallery")
    if gallery:
        for d in ("t2i", "i2t"):
            out[f"gallery_{d}_rank1"] = gallery["two_stage"][d]["rank1"]
            # .get: metrics files written before recall_only existed have no such entry
            out[f"gallery_{d}_recall_only_rank1"] = gallery.get("recall_only", {}).get(d, {}).get("rank1")
            if "recall_hub" in gallery:
                out[f"gallery_{d}_recall_hub_rank1"] = gallery["recall_hub"][d]["rank1"]
    return out
