"""fashionbert retrieve: the ranked tables downstream systems read, by two-stage retrieval.

    fashionbert retrieve --features DIR --model DIR --out DIR [--top-k 50 --recall-k 100]

A cross-encoder cannot score every text against every image of a real catalog (100k x 100k pairs), so:
1. recall: every text and every image gets a dual embedding (a text-only and an image-only pass through the
   model's backbone, see fashionbert/model/contrastive.py); a faiss index returns each query's top --recall-k candidates by
   cosine;
2. re-rank: the FashionBERT cross-encoder scores those candidates (the TIA head's logit margin); the final rank
   is by the model's ranking score, P(aligned) from the TIA margin fused with the recall cosine per the model's
   score_fusion.json (fashionbert/model/score_fusion.py; the TIA margin alone for a model folder without one). The table's
   `score` is that P(aligned), `recall_score` the cosine.
The two directions' candidate pairs overlap (mutual neighbours), so each distinct (text, image) pair is
scored once. A model whose score_fusion.json was fitted on the hubness-corrected cosine (the default since
training's validation fits it so: fashionbert/rank/hubness.py) recalls by the cosine less each candidate's
closeness to the catalog's other queries, and its fusion reads each pair's corrected cosine; `recall_score` stays
the cosine itself.

Nightly runs cost what changed: `--score-cache FILE` (an earlier run's `--save-scores FILE`, same model_version
and precision) serves every pair margin and every embedding whose (text content hash, image content hash) it holds,
so only new or changed texts and images are embedded and only pairs new to the cache run through the cross-encoder;
recall itself is searched again in full (cheap). The tables equal those of a run without the cache. See
fashionbert/rank/score_cache.py; `_run.json` counts pairs_scored / pairs_reused and embeddings_computed /
embeddings_reused.

Writes, published atomically (staging folder + rename, `_SUCCESS` last):
  OUT/text_to_image.parquet   each product text -> its top-K images (query_kind "text", candidate = image_id)
  OUT/image_to_text.parquet   each image -> its top-K product texts (query_kind "image", candidate = product_id)
  OUT/_run.json               run id, model version, options, counts, timings
--features, --model, --out and the score-cache files may be URIs (gs://...; fashionbert/data/storage.py): on an object
store the files are staged beside --out and moved into it one by one, `_SUCCESS` last.
Tables follow `schemas.RETRIEVAL`, sorted by (query_id, rank); a query has min(K, catalog size) rows.

This module runs the stage in one process (the GPU box, nightly, evaluate). Given Beam options (`--runner X`, ...),
`fashionbert retrieve` runs the same stage as a Beam pipeline instead (pipelines/retrieve.py): workers embed,
recall, score through RunInference and write the same tables; --score-cache/--save-scores stay single-process.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from typing import Sequence

import numpy as np

from fashionbert.data import publish, storage
from fashionbert.data.feature_catalog import ImageSource, IndexedImages, open_catalog
from fashionbert.data.model_store import load_model
from fashionbert.errors import UserError
from fashionbert.model.score_fusion import TIA_ONLY, ScoreFusion
from fashionbert.rank.cross_encoder import (BatchingOptions, CrossEncoderScorer, add_batching_arguments, fusion_cosine,
                                           probability)
from fashionbert.rank.embeddings import DualEncoder, embed_items
from fashionbert.rank.hubness import HubnessBiases, corrected_recall, fusion_hubness
from fashionbert.rank.neighbours import DEFAULT_EXACT_MAX, KINDS, Neighbours, search
from fashionbert.rank.score_cache import (CacheOptions, ItemKeys, ScoreCache, add_cache_arguments, open_cache,
                                          save_path)
from fashionbert.runtime import RuntimeOptions, add_runtime_arguments, resolve_runtime, stage_config

TEXT_TO_IMAGE = "text_to_image.parquet"
IMAGE_TO_TEXT = "image_to_text.parquet"
RUN_JSON = "_run.json"
ROW_GROUP_ROWS = 100_000


# ============================================================================================ engine
@dataclasses.dataclass
class Ranked:
    """One direction's candidates, flattened: rows of a query contiguous (queries ascending), best first.
    `logit` is the ranking score's logit (P(aligned) = sigmoid(logit); it does not saturate into ties)."""

    query: np.ndarray  # int64
    candidate: np.ndarray  # int64
    recall_score: np.ndarray  # float32
    logit: np.ndarray  # float64

    def __len__(self) -> int:
        return len(self.query)

    def ranks(self) -> np.ndarray:
        """1-based rank of each row within its query."""
        if not len(self.query):
            return np.zeros(0, dtype=np.int64)
        starts = np.flatnonzero(np.r_[True, self.query[1:] != self.query[:-1]])
        first = np.repeat(starts, np.diff(np.r_[starts, len(self.query)]))
        return np.arange(len(self.query), dtype=np.int64) - first + 1

    def top(self, k: int) -> "Ranked":
        """The rows ranked 1..k of each query."""
        keep = self.ranks() <= k
        return Ranked(self.query[keep], self.candidate[keep], self.recall_score[keep], self.logit[keep])

    @staticmethod
    def concat(parts: Sequence["Ranked"]) -> "Ranked":
        """Rows of several parts, unordered (rank_rows orders them)."""
        def cat(name: str, dtype) -> np.ndarray:
            return np.concatenate([getattr(p, name) for p in parts] or [np.zeros(0, dtype)]).astype(dtype, copy=False)

        return Ranked(cat("query", np.int64), cat("candidate", np.int64), cat("recall_score", np.float32),
                      cat("logit", np.float64))


def rank_rows(query: np.ndarray, candidate: np.ndarray, recall_score: np.ndarray, logit: np.ndarray) -> Ranked:
    # Ties fall back to the recall score, then the candidate index, so the order is total.
    order = np.lexsort((candidate, -recall_score, -logit, query))
    return Ranked(query[order], candidate[order], recall_score[order], np.asarray(logit, dtype=np.float64)[order])


@dataclasses.dataclass
class TwoStage:
    t2i: Ranked  # query = text index, candidate = image index
    i2t: Ranked  # query = image index, candidate = text index
    recall_t2i: Neighbours
    recall_i2t: Neighbours
    text_vectors: np.ndarray
    image_vectors: np.ndarray
    index_kind: str
    pairs_scored: int
    seconds: dict
    hubness: dict | None = None  # with a hubness correction: its settings and the catalog's mean biases
    biases: HubnessBiases | None = None  # with a hubness correction: every text's and image's bias


def dual_encoder_for(scorer: CrossEncoderScorer) -> DualEncoder:
    """Recall embeddings from the scorer's copy of the model: in bf16 mode that is its bf16 copy, so both stages
    run the same arithmetic and neither pays autocast's casts."""
    return DualEncoder(scorer.model, scorer.runtime.device, progress=scorer.progress)


def embed_all(dual: DualEncoder, texts: Sequence[np.ndarray], images: ImageSource, token_budget: int,
              cache: ScoreCache | None = None, keys: ItemKeys | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every text's and image's vector; with a cache and the items' content hashes, those it holds come from it."""
    return embed_items(dual, texts, images, np.arange(len(texts)), np.arange(len(images)), token_budget, cache, keys)


def two_stage(scorer: CrossEncoderScorer, dual: DualEncoder, texts: Sequence[np.ndarray], images: ImageSource,
              recall_k: int, index: str = "auto", exact_max: int = DEFAULT_EXACT_MAX,
              vectors: tuple[np.ndarray, np.ndarray] | None = None, fusion: ScoreFusion = TIA_ONLY,
              keys: ItemKeys | None = None, image_text: np.ndarray | None = None) -> TwoStage:
    """Recall top-`recall_k` by dual-embedding cosine in both directions, then re-rank by the ranking score
    (`fusion` of the cross-encoder's margin and the recall cosine). `keys`: the texts' and images' content
    hashes, with which the scorer's cache serves the embeddings and margins it holds. A fusion without TIA weight
    (`fusion.uses_tia` false) ranks by the calibrated cosine, the recall order: no pair goes through the
    cross-encoder (`pairs_scored` 0).

    When the fusion reads the hubness-corrected cosine (`fusion_hubness`, fashionbert/rank/hubness.py), the
    biases are taken over this catalog, recall ranks by the corrected cosine and the fusion reads each pair's
    corrected cosine (`HubnessBiases.offsets`); the rows' recall_score stays the cosine itself. `image_text`: each
    image's text position, from which the correction counts each text's images (rank.hubness; None: one each)."""
    seconds = {}
    t0 = time.perf_counter()
    text_vec, image_vec = vectors if vectors is not None else embed_all(dual, texts, images, scorer.token_budget,
                                                                        scorer.cache, keys)
    seconds["embed"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    device = scorer.runtime.device.type
    hubness = fusion_hubness(fusion)
    if hubness.enabled:
        t2i, i2t, biases = corrected_recall(text_vec, image_vec, hubness, recall_k, index, exact_max, device,
                                            image_text)
        # the rows' recall_score: the cosine again
        t2i = dataclasses.replace(t2i, score=(t2i.score + biases.image[t2i.candidate]).astype(np.float32))
        i2t = dataclasses.replace(i2t, score=(i2t.score + biases.text[i2t.candidate]).astype(np.float32))
        t2i_offsets, i2t_offsets = biases.offsets(t2i.query, t2i.candidate), biases.offsets(i2t.candidate, i2t.query)
        means = biases.means()
        hub = {**hubness.describe(), "mean_bias": {"image": round(means[0], 6), "text": round(means[1], 6)}}
    else:
        t2i = search(image_vec, text_vec, recall_k, index, exact_max, device=device)
        i2t = search(text_vec, image_vec, recall_k, index, exact_max, device=device)
        t2i_offsets = i2t_offsets = hub = biases = None
    seconds["recall"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # Both directions as (text, image) pairs; each distinct pair is scored once.
    n_images = max(1, len(images))
    flat = np.concatenate([t2i.query * n_images + t2i.candidate, i2t.candidate * n_images + i2t.query])
    unique, inverse = np.unique(flat, return_inverse=True)
    n = len(t2i)
    if fusion.uses_tia:
        pairs = np.stack([unique // n_images, unique % n_images], axis=1)
        # a residual TIA head adds the recall cosine (CrossEncoderScorer.dual): hand over the one recall computed
        cosines = (np.einsum("nd,nd->n", text_vec[pairs[:, 0]], image_vec[pairs[:, 1]]).astype(np.float32)
                   if scorer.dual is not None else None)
        margins = scorer.score(texts, images, pairs, keys, cosines)[inverse]
        t2i_margins, i2t_margins, pairs_scored = margins[:n], margins[n:], len(unique)
    else:
        t2i_margins = i2t_margins = None
        pairs_scored = 0
    seconds["rerank"] = time.perf_counter() - t0
    t2i_logit = fusion.logit(t2i_margins, fusion_cosine(fusion, t2i.score, t2i_offsets))
    i2t_logit = fusion.logit(i2t_margins, fusion_cosine(fusion, i2t.score, i2t_offsets))
    return TwoStage(
        t2i=rank_rows(t2i.query, t2i.candidate, t2i.score, t2i_logit),
        i2t=rank_rows(i2t.query, i2t.candidate, i2t.score, i2t_logit),
        recall_t2i=t2i, recall_i2t=i2t, text_vectors=text_vec, image_vectors=image_vec, index_kind=t2i.kind,
        pairs_scored=pairs_scored, seconds=seconds, hubness=hub, biases=biases)


def exhaustive(scorer: CrossEncoderScorer, texts: Sequence[np.ndarray], images: ImageSource,
               text_vec: np.ndarray, image_vec: np.ndarray, fusion: ScoreFusion = TIA_ONLY,
               keys: ItemKeys | None = None, biases: HubnessBiases | None = None) -> tuple[Ranked, Ranked]:
    """Every text against every image with the cross-encoder (the reference two-stage retrieval approximates;
    affordable on small galleries only). `biases`: the catalog's hubness biases (`TwoStage.biases`), which a fusion
    reading the corrected cosine needs."""
    n_t, n_i = len(texts), len(images)
    t = np.repeat(np.arange(n_t, dtype=np.int64), n_i)
    i = np.tile(np.arange(n_i, dtype=np.int64), n_t)
    cos = (text_vec @ image_vec.T).astype(np.float32).reshape(-1)
    margins = scorer.score(texts, images, np.stack([t, i], axis=1), keys, cos)
    hubness = fusion_hubness(fusion)
    if hubness.enabled and biases is None:  # two_stage computed them over the same catalog
        raise ValueError("exhaustive: pass the catalog's biases (TwoStage.biases) when the fusion reads the corrected "
                         "cosine")
    offsets = biases.offsets(t, i) if hubness.enabled else None
    logits = fusion.logit(margins, fusion_cosine(fusion, cos, offsets))
    return rank_rows(t, i, cos, logits), rank_rows(i, t, cos, logits)


# ============================================================================================ tables
def retrieval_table(ranked: Ranked, query_ids: Sequence[str], candidate_ids: Sequence[str], query_kind: str,
                    top_k: int, model_version: str, run_id: str, stage: str = "rerank"):
    """The top-`top_k` rows per query as a `schemas.RETRIEVAL` table sorted by (query_id, rank); `stage` names what
    ranked them (`rows_stage`)."""
    import pyarrow as pa

    from schemas import RETRIEVAL

    ranked = ranked.top(top_k)
    q, c, r = ranked.query, ranked.candidate, ranked.ranks()
    qids = np.asarray(query_ids, dtype=object)
    position = np.empty(len(qids), dtype=np.int64)
    position[np.argsort(qids, kind="stable")] = np.arange(len(qids))  # Python str order = UTF-8 byte order
    order = np.lexsort((r, position[q]))
    q, c, r = q[order], c[order], r[order]
    n = len(q)
    arrays = [
        pa.array(qids[q].tolist() if n else [], pa.string()),
        pa.array(np.full(n, query_kind, dtype=object).tolist(), pa.string()),
        pa.array(r.astype(np.int32), pa.int32()),
        pa.array(np.asarray(candidate_ids, dtype=object)[c].tolist() if n else [], pa.string()),
        pa.array(probability(ranked.logit[order]), pa.float32()),
        pa.array(ranked.recall_score[order].astype(np.float32), pa.float32()),
        pa.array(np.full(n, stage, dtype=object).tolist(), pa.string()),
        pa.array(np.full(n, model_version, dtype=object).tolist(), pa.string()),
        pa.array(np.full(n, run_id, dtype=object).tolist(), pa.string()),
    ]
    return pa.Table.from_arrays(arrays, schema=RETRIEVAL)


def write_table(table, path: str) -> None:
    import pyarrow.parquet as pq

    with storage.create(path) as fh:
        pq.write_table(table, fh, row_group_size=ROW_GROUP_ROWS)


# ============================================================================================ command
@dataclasses.dataclass(frozen=True)
class RecallOptions:
    """The fields of `add_retrieval_arguments`' options that evaluate shares."""

    recall_k: int = 100
    index: str = "auto"
    exact_max: int = DEFAULT_EXACT_MAX


@dataclasses.dataclass(frozen=True)
class RetrieveConfig(CacheOptions, RecallOptions, BatchingOptions, RuntimeOptions):
    features: list[str] = dataclasses.field(default_factory=list)  # featurize output folders
    model: str = ""
    out: str = ""
    overwrite: bool = False
    run_id: str | None = None
    top_k: int = 50


def config_from_args(args: argparse.Namespace) -> RetrieveConfig:
    return stage_config(RetrieveConfig, args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = RetrieveConfig()
    g = parser.add_argument_group("inputs and outputs")
    g.add_argument("--features", action="append", required=True, metavar="DIR",
                   help="featurize output folder (with _SUCCESS); repeat for several. Every product text and every "
                        "image in them is a query and a candidate")
    g.add_argument("--model", required=True, metavar="DIR", help="model folder: OUT/model of `fashionbert train`")
    g.add_argument("--out", required=True, metavar="DIR",
                   help=f"output folder: {TEXT_TO_IMAGE}, {IMAGE_TO_TEXT}, {RUN_JSON}; written to a staging folder "
                        f"and renamed into place with _SUCCESS, so readers never see a partial output")
    g.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out (atomically)")
    g.add_argument("--run-id", metavar="ID", default=d.run_id,
                   help="the tables' run_id column and _run.json's run id (letters, digits, '.', '_', '-'); default: "
                        "a new id. An orchestrator (`fashionbert nightly`) passes its own run's id so that the tables "
                        "join to its run")
    add_retrieval_arguments(parser)
    add_cache_arguments(parser)
    add_batching_arguments(add_runtime_arguments(parser))


def add_retrieval_arguments(parser: argparse.ArgumentParser, top_k: bool = True) -> None:
    d = RetrieveConfig()
    g = parser.add_argument_group("two-stage retrieval")
    if top_k:
        g.add_argument("--top-k", type=int, default=d.top_k,
                       help="rows per query in the tables (fewer when the catalog is smaller) (default 50)")
    g.add_argument("--recall-k", type=int, default=d.recall_k,
                   help="candidates per query from the dual-embedding recall stage that the cross-encoder "
                        "re-ranks; cost grows linearly with it (default 100)")
    g.add_argument("--index", choices=KINDS, default=d.index,
                   help="nearest-neighbour index of the recall stage: flat = exact faiss IndexFlatIP; hnsw / ivf = "
                        "approximate faiss indexes for large catalogs; torch = exact search without faiss; auto = "
                        "flat up to --exact-max vectors, hnsw above (torch when faiss is not installed) "
                        "(default auto)")
    g.add_argument("--exact-max", type=int, default=d.exact_max,
                   help="largest index searched exactly when --index auto (default %(default)s)")


_RUN_ID = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


def _run_id(given: str | None) -> str:
    """The id names the staging folder too, so it must be a plain file-name component."""
    if given is None:
        return publish.new_run_id()
    if not _RUN_ID.match(given) or given in (".", ".."):
        raise UserError(f"--run-id {given!r}: use 1-100 letters, digits, '.', '_' or '-'")
    return given


def check_config(config: RetrieveConfig) -> str:
    """The options' own errors, before any work -> the run id."""
    if config.top_k < 1:
        raise UserError(f"--top-k {config.top_k}: must be >= 1")
    if config.recall_k < config.top_k:
        raise UserError(f"--recall-k {config.recall_k} is below --top-k {config.top_k}: the re-rank stage can only "
                        f"order the candidates recall found; raise --recall-k to at least --top-k")
    return _run_id(config.run_id)


def rows_stage(fusion: ScoreFusion) -> str:
    """The tables' `stage`: "rerank" when the cross-encoder scored the rows, "recall" when the model's fusion gives it
    no weight and the rows are ranked by the calibrated recall cosine alone."""
    return "rerank" if fusion.uses_tia else "recall"


def run_facts(loaded, catalog, runtime, dual: DualEncoder, index_used: str, t2i_rows: int, i2t_rows: int,
              pairs: int) -> dict:
    """What `_run.json` says about the model, the features and the counts of a run (either way it ran)."""
    return {
        "model": {"path": loaded.location, "version": loaded.version, "step": loaded.step},
        "features": [f.location for f in catalog.folders],
        "index_used": index_used,
        "recall_embedding": dual.description,
        "ranking_score": loaded.fusion.describe(),
        "hubness": fusion_hubness(loaded.fusion).describe(),
        "device": str(runtime.device), "precision": runtime.precision,
        "counts": {
            "text_queries": len(catalog.texts), "image_queries": len(catalog.index),
            "text_to_image_rows": t2i_rows, "image_to_text_rows": i2t_rows,
            "cross_encoder_pairs": pairs, "exhaustive_pairs": len(catalog.texts) * len(catalog.index),
        },
    }


def run_summary(run_id: str, config: RetrieveConfig, out: str, facts: dict, seconds: dict, t_start: float,
                **extra) -> dict:
    return {
        "run_id": run_id,
        **{k: facts[k] for k in ("model", "features")},
        "options": {"top_k": config.top_k, "recall_k": config.recall_k, "index": config.index,
                    "exact_max": config.exact_max},
        **{k: v for k, v in facts.items() if k not in ("model", "features")},
        **extra,
        "seconds": {k: round(v, 3) for k, v in seconds.items()} | {"total": round(time.time() - t_start, 3)},
        "outputs": {"text_to_image": storage.join(out, TEXT_TO_IMAGE),
                    "image_to_text": storage.join(out, IMAGE_TO_TEXT)},
    }


def run(config: RetrieveConfig) -> dict:
    t_start = time.time()
    run_id = check_config(config)
    out = storage.resolve(config.out, "--out")
    storage.check_target(out, config.overwrite)
    save_to = save_path(config.save_scores, out)
    rt = resolve_runtime(config.device, config.precision, config.num_threads)
    loaded = load_model(config.model, rt)
    catalog = open_catalog(config.features, loaded)
    cache = open_cache(config, loaded.version, rt.precision)
    scorer = CrossEncoderScorer(loaded.model, rt, config.batch_tokens, config.block_images, cache=cache,
                                progress=config.progress)
    dual = dual_encoder_for(scorer)
    texts = catalog.text_ids
    result = two_stage(scorer, dual, texts, IndexedImages(catalog.index, catalog.reader), config.recall_k,
                       config.index, config.exact_max, fusion=loaded.fusion,
                       keys=ItemKeys(catalog.text_hashes, catalog.image_hashes), image_text=catalog.index.product)
    if save_to is not None:
        t0 = time.perf_counter()
        cache.save(save_to)
        result.seconds["save_scores"] = time.perf_counter() - t0

    storage.clean_stale_staging(out)
    staging = storage.staging_path(out, run_id)
    storage.make_folder(staging)
    t0 = time.perf_counter()
    product_ids, image_ids = catalog.texts.product_ids, catalog.index.image_ids
    stage = rows_stage(loaded.fusion)
    t2i = retrieval_table(result.t2i, product_ids, image_ids, "text", config.top_k, loaded.version, run_id, stage)
    i2t = retrieval_table(result.i2t, image_ids, product_ids, "image", config.top_k, loaded.version, run_id, stage)
    write_table(t2i, storage.join(staging, TEXT_TO_IMAGE))
    write_table(i2t, storage.join(staging, IMAGE_TO_TEXT))
    result.seconds["write"] = time.perf_counter() - t0
    facts = run_facts(loaded, catalog, rt, dual, result.index_kind, t2i.num_rows, i2t.num_rows, result.pairs_scored)
    facts["counts"].update(cache.counts)  # pairs_scored + pairs_reused = cross_encoder_pairs
    if result.hubness is not None:
        facts["hubness"] = result.hubness
    summary = run_summary(run_id, config, out, facts, result.seconds, t_start,
                          score_cache={"inputs": cache.inputs, "saved": save_to})
    storage.write_text(storage.join(staging, RUN_JSON), json.dumps(summary, indent=2))
    storage.publish_folder(staging, out)
    return summary
