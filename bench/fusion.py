"""Fusion benchmark: does the ranking score's fit rank unseen queries better than the itc cosine alone? Prints
figures; asserts nothing.

    python bench/fusion.py --features DIR --model DIR [--queries 1000] [--fit-queries 200] [--repeats 10]
                           [--scores FILE] [--training-products] [--hubness-temperature T] [--hubness-rounds N]

Scores --queries held-out text queries (the training run's split) against their image and 100 same-sub-category
others with both heads (training's validation protocol, `quick_validation.validation_scores`), the cosine
hubness-corrected over the scored pool as the fit reads it (--hubness-temperature 0: the raw cosine). Then,
--repeats times, it fits the fusion on a random --fit-queries of them (what training's validation fits on: 200 with
the README recipe) and ranks the others by each of:
- the itc cosine alone (raw, and corrected) and the TIA margin alone;
- the listwise fit without its TIA check (`score_fusion.fit(..., tia_check=False)`: the fit before the check);
- the fit keeping TIA on any cross-fitted win over the cosine (`tia_alpha=1`: the check before the sign test);
- `score_fusion.fit` as training and `fashionbert fuse` run it (TIA kept only where its cross-fitted win over the
  cosine passes the sign test at `score_fusion.TIA_ALPHA`);
and prints text -> image Rank@1 (%) of each, mean over the repeats, with the mean and spread of its difference to the
cosine the fit reads on the same queries, and how often each check kept TIA (each kept TIA is a cross-encoder pass
paid for every ranking).

`--training-products` scores products the model trained on instead (each query against 100 same-sub-category
training products): beside a held-out run it shows how much each head memorised, i.e. how differently it ranks the
pairs its training saw from the unseen ones it must rank in production.

Scoring is the slow part (~9 min for 1,000 queries on 2 cores): --scores FILE keeps the scores (an .npz), and a rerun
with the same file, model and --queries reads them instead.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fashionbert.data.feature_catalog import open_catalog  # noqa: E402
from fashionbert.errors import UserError  # noqa: E402
from fashionbert.evaluation.evaluate import SplitOptions, held_out_products  # noqa: E402
from fashionbert.evaluation.quick_validation import validation_scores  # noqa: E402
from fashionbert.evaluation.sample_hundred import build_sample_hundred  # noqa: E402
from fashionbert.model import score_fusion  # noqa: E402
from fashionbert.model.loading import load_model  # noqa: E402
from fashionbert.rank.hubness import Hubness, add_hubness_arguments  # noqa: E402
from fashionbert.runtime import resolve_runtime  # noqa: E402

RANKINGS = ("raw", "itc", "tia", "listwise", "any_win", "fit")


def score_queries(features: list[str], model: str, queries: int, seed: int, training_products: bool = False,
                  hubness: Hubness = Hubness()) -> dict:
    """Both heads' scores of every (query, candidate) pair, queries in order, each query's true candidate first, and
    each pair's hubness offset over the pool (zeros when the correction is off); the queries and candidates are
    held-out products, or with `training_products` the products the model trained on."""
    rt = resolve_runtime("auto", "auto", 0)
    loaded = load_model(model, rt)
    if not loaded.has_itc_head:
        raise UserError(f"--model {loaded.folder}: no itc head (trained with --itc-dim 0), nothing to fuse")
    catalog = open_catalog(features, loaded)
    held_out, _ = held_out_products(SplitOptions(), loaded, catalog.texts.group_id)
    side = ~held_out if training_products else held_out
    rows = np.flatnonzero(side[catalog.index.product])
    s100 = build_sample_hundred(catalog.texts, catalog.index, rows, catalog.reader, queries=queries,
                                candidates=100, max_pool=len(rows), seed=seed)
    if s100 is None:
        raise UserError(f"--features {features}: fewer than 2 {'training' if training_products else 'held-out'} "
                        f"products with an image")
    scores = validation_scores(loaded.model, s100, loaded.config, rt, hubness)
    offsets = scores.offsets if scores.offsets is not None else np.zeros_like(scores.cosines)
    return {"margin": scores.margins, "cosine": scores.cosines, "offsets": offsets,
            "sizes": np.asarray([len(c) for c in s100.candidates]), "version": np.asarray(loaded.version),
            "queries": np.asarray(queries), "seed": np.asarray(seed), "training_products": np.asarray(training_products),
            "hubness": np.asarray([hubness.temperature, hubness.k, hubness.rounds])}


def _hubness(a: argparse.Namespace) -> Hubness:
    """The correction the options ask for (a file kept before --hubness-rounds holds (T, K) only: scored again)."""
    return Hubness(a.hubness_temperature, a.hubness_k, a.hubness_rounds)


def load_or_score(a: argparse.Namespace) -> dict:
    if a.scores and Path(a.scores).is_file():
        saved = dict(np.load(a.scores))
        version = load_model(a.model, resolve_runtime("cpu", "fp32", 0)).version
        hubness = _hubness(a)
        key = (str(saved["version"]), int(saved["queries"]), int(saved["seed"]),
               bool(saved.get("training_products", False)), tuple(saved.get("hubness", (0.0, 0))))
        if key == (version, a.queries, a.seed, a.training_products,
                   (hubness.temperature, hubness.k, hubness.rounds)):
            print(f"scores: read from {a.scores}")
            return saved
        print(f"scores: {a.scores} holds another model, --queries, --seed, --training-products or hubness "
              f"correction; scoring again")
    scores = score_queries(a.features, a.model, a.queries, a.seed, a.training_products, _hubness(a))
    if a.scores:
        np.savez(a.scores, **scores)
    return scores


def compare(margin: np.ndarray, raw: np.ndarray, cosine: np.ndarray, sizes: np.ndarray, fit_queries: int,
            repeats: int, seed: int) -> dict:
    """Per ranking, Rank@1 on the queries not fitted on, per repeat; and per repeat whether each check kept TIA.
    `cosine` is what the fits read (the corrected cosine, or `raw`)."""
    group = np.repeat(np.arange(len(sizes)), sizes)
    label = np.zeros(len(margin), dtype=bool)
    label[np.r_[0, np.cumsum(sizes)[:-1]]] = True
    rng = np.random.default_rng(seed)
    out = {name: [] for name in RANKINGS} | {"kept_any_win": [], "kept_tia": []}
    for _ in range(repeats):
        fitted = np.isin(group, rng.permutation(len(sizes))[:fit_queries])
        ranked = ~fitted
        args = (margin[fitted], cosine[fitted], label[fitted], group[fitted])
        listwise, any_win = score_fusion.fit(*args, tia_check=False), score_fusion.fit(*args, tia_alpha=1.0)
        checked = score_fusion.fit(*args)
        scores = {"raw": raw, "itc": cosine, "tia": margin, "listwise": listwise.logit(margin, cosine),
                  "any_win": any_win.logit(margin, cosine), "fit": checked.logit(margin, cosine)}
        for name, s in scores.items():
            out[name].append(100 * score_fusion.group_rank1(s[ranked], label[ranked], group[ranked]))
        out["kept_any_win"].append(any_win.tia > 0)
        out["kept_tia"].append(checked.tia > 0)
    return {k: np.asarray(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", action="append", required=True, metavar="DIR",
                    help="featurize output the model trained on")
    ap.add_argument("--model", required=True, metavar="DIR", help="model folder (train's OUT/model)")
    ap.add_argument("--queries", type=int, default=1000, help="held-out queries scored (default 1000)")
    ap.add_argument("--fit-queries", type=int, default=200, help="of them, fitted on in each repeat (default 200)")
    ap.add_argument("--repeats", type=int, default=10, help="random fit / rank splits (default 10)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the query draw and the splits (default 0)")
    ap.add_argument("--scores", metavar="FILE", help="an .npz keeping the scores between runs")
    ap.add_argument("--training-products", action="store_true",
                    help="score products the model trained on instead of held-out ones (what each head memorised)")
    add_hubness_arguments(ap, fits=True)
    a = ap.parse_args()
    try:
        s = load_or_score(a)
        n = len(s["sizes"])
        if not 0 < a.fit_queries < n:
            raise UserError(f"--fit-queries {a.fit_queries}: must be between 1 and the {n} queries scored - 1")
    except UserError as exc:
        sys.exit(f"bench/fusion.py: {exc}")
    offsets = s.get("offsets", np.zeros_like(s["cosine"]))
    r = compare(s["margin"], s["cosine"], s["cosine"] - offsets, s["sizes"], a.fit_queries, a.repeats, a.seed)
    side = "training-product" if a.training_products else "held-out"
    print(f"model {a.model} ({s['version']}): {n} {side} queries, fit on {a.fit_queries}, ranked on the other "
          f"{n - a.fit_queries}, {a.repeats} repeats. Text -> image Rank@1 (%):")
    read = "the corrected cosine" if a.hubness_temperature > 0 else "the cosine"
    print(f"| ranked by | Rank@1 | minus {read}'s (mean +- sd) |\n| --- | --- | --- |")
    rows = (("raw", "the raw itc cosine alone"), ("itc", f"{read} alone (what the fits read)"),
            ("tia", "the TIA margin alone"), ("listwise", "the listwise fit, no TIA check"),
            ("any_win", "the fit keeping TIA on any cross-fitted win"),
            ("fit", f"the fit with the sign test (alpha {score_fusion.TIA_ALPHA:g})"))
    for name, what in rows if a.hubness_temperature > 0 else [r_ for r_ in rows if r_[0] != "raw"]:
        d = r[name] - r["itc"]
        print(f"| {what} | {r[name].mean():.1f} | {d.mean():+.2f} +- {d.std():.2f} |")
    print(f"TIA kept (a cross-encoder pass paid for): {int(r['kept_any_win'].sum())} of {a.repeats} fits on any win, "
          f"{int(r['kept_tia'].sum())} of {a.repeats} with the sign test.")


if __name__ == "__main__":
    main()
