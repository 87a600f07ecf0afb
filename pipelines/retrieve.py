"""`fashionbert retrieve` as a Beam pipeline: the same tables as fashionbert/rank/retrieve.py, computed by workers.

    fashionbert retrieve --features DIR --model DIR --out DIR [--top-k 50 --recall-k 100] --runner X [Beam options]

    seed --Plan--> chunks of texts and images --RunInference(EmbedHandler)--> vectors --Gather--> all vectors
      (side input) --Recall (faiss, query chunks)--> candidates by image, both directions --GroupByKey-->
      PairBlocks (each distinct pair once) --RunInference(KeyedModelHandler(CrossEncoderHandler))-->
      ranking-score logits --TopK--> per-query top-K (image queries at once; text queries by chunk of texts)
      --WriteTables (one worker)--> text_to_image.parquet, image_to_text.parquet + a handoff file

The driver reads nothing but options: workers open the model and the features by path (pipelines/rerank.py). The
tables are written into a staging folder next to --out; the driver then writes `_run.json` from the handoff and
publishes the folder atomically, as the single-process stage does. With the same model and features the tables
equal the single-process ones (ids and ranks; scores to float rounding of the batches they were computed in).
"""
from __future__ import annotations

import json
import time

import apache_beam as beam
import numpy as np

from fashionbert.data import storage
from fashionbert.errors import UserError
from fashionbert.rank import retrieve as single
from fashionbert.rank.hubness import augmented_database, augmented_queries
from fashionbert.rank.neighbours import NeighbourIndex, choose_kind

from .execution import check_paths_reach_workers, execution, take_shared_filesystem
from .rerank import (I2T, T2I, CatalogBiases, Chunk, ContextDoFn, Embed, PairBlock, Plan, ScoreBlocks, ScoringSpec,
                     check_beam_args, check_model, spec_for, worker_paths)

CHUNK = 2048  # texts or images per embedding / search / top-K task
HANDOFF = "_beam_run.json"  # the writer's facts for the driver's _run.json; removed before publishing


class Recall(ContextDoFn):
    """A query chunk -> its top-`recall_k` candidates, as fragments keyed by image: (image, (direction, texts,
    cosines, offsets)). Each worker builds the index of the other side's vectors once. When the model's fusion
    reads the hubness-corrected cosine, recall ranks by it (the index holds the augmented vectors of
    fashionbert/rank/hubness.py), the fragments' cosines stay the cosines and `offsets` carry each pair's correction;
    else `offsets` is None."""

    def __init__(self, spec: ScoringSpec, recall_k: int, index: str, exact_max: int):
        super().__init__(spec)
        self.recall_k, self.index, self.exact_max = recall_k, index, exact_max
        self.indexes: dict[str, NeighbourIndex] = {}
        self.biases = CatalogBiases(index, exact_max)

    def process(self, chunk: Chunk, vectors: dict):
        database = "image" if chunk.kind == "text" else "text"
        hub = self.biases.get(self.ctx, vectors)
        bias = None if hub is None else (hub.image if database == "image" else hub.text)
        if database not in self.indexes:
            held = vectors[database] if bias is None else augmented_database(vectors[database], bias)
            self.indexes[database] = NeighbourIndex(held, self.recall_k, self.index, self.exact_max,
                                                    device=self.ctx.runtime.device.type)
        queries = vectors[chunk.kind][chunk.start:chunk.stop]
        found = self.indexes[database].search(queries if bias is None else augmented_queries(queries), chunk.start)
        score = found.score if bias is None else (found.score + bias[found.candidate]).astype(np.float32)
        if chunk.kind == "text":
            direction, image, text = T2I, found.candidate, found.query
        else:
            direction, image, text = I2T, found.query, found.candidate
        order = np.argsort(image, kind="stable")
        image, text, cosine = image[order], text[order], score[order]
        offsets = None if hub is None else hub.offsets(text, image)
        starts = np.flatnonzero(np.r_[True, image[1:] != image[:-1]]) if len(image) else np.zeros(0, np.int64)
        for lo, hi in zip(starts, np.r_[starts[1:], len(image)].astype(np.int64)):
            yield int(image[lo]), (direction, text[lo:hi], cosine[lo:hi], None if offsets is None else offsets[lo:hi])


def merge_block(element) -> tuple[int, PairBlock]:
    """An image's candidate fragments from both directions -> one block with each distinct text once."""
    image, fragments = element
    fragments = list(fragments)
    texts, inverse = np.unique(np.concatenate([f[1] for f in fragments]), return_inverse=True)
    cosines = np.full((len(texts), 2), np.nan, dtype=np.float32)
    offsets = None if fragments[0][3] is None else np.zeros(len(texts), dtype=np.float32)
    start = 0
    for direction, text, cosine, offset in fragments:
        cosines[inverse[start:start + len(text)], direction] = cosine
        if offsets is not None:  # a pair's correction is the same in both directions
            offsets[inverse[start:start + len(text)]] = offset
        start += len(text)
    return image, PairBlock(image, texts, cosines, offsets)


class TopK(beam.DoFn):
    """A scored block -> its image query's top-K (main output, ranked) and its pairs' rows for their text queries,
    keyed by chunk of texts (output "t2i", unranked), plus the block's pair count (output "pairs")."""

    def __init__(self, top_k: int, chunk: int):
        self.top_k, self.chunk = top_k, chunk

    def process(self, element):
        image, result = element
        block, logit = result.example, result.inference
        yield beam.pvalue.TaggedOutput("pairs", len(block.texts))
        mine = ~np.isnan(block.cosines[:, I2T])
        yield single.rank_rows(np.full(int(mine.sum()), image, dtype=np.int64), block.texts[mine],
                               block.cosines[mine, I2T], logit[mine, I2T]).top(self.top_k)
        theirs = ~np.isnan(block.cosines[:, T2I])
        text = block.texts[theirs]
        rows = single.Ranked(text, np.full(len(text), image, dtype=np.int64), block.cosines[theirs, T2I],
                             logit[theirs, T2I])
        for key in np.unique(text // self.chunk):
            part = (text // self.chunk) == key
            yield beam.pvalue.TaggedOutput("t2i", (int(key), single.Ranked(
                rows.query[part], rows.candidate[part], rows.recall_score[part], rows.logit[part])))


def top_of_chunk(element, top_k: int) -> single.Ranked:
    _, parts = element
    return rank_all(list(parts)).top(top_k)


def rank_all(parts) -> single.Ranked:
    r = single.Ranked.concat(parts)
    return single.rank_rows(r.query, r.candidate, r.recall_score, r.logit)


class WriteTables(ContextDoFn):
    """One worker: every query's top-K rows -> the two RETRIEVAL tables in the staging folder, and the facts the
    driver's `_run.json` needs (HANDOFF)."""

    def __init__(self, spec: ScoringSpec, config: single.RetrieveConfig, staging: str):
        super().__init__(spec)
        self.config, self.staging = config, staging

    def process(self, _, t2i_parts, i2t_parts, pairs):
        ctx, cfg = self.ctx, self.config
        product_ids, image_ids = ctx.catalog.texts.product_ids, ctx.catalog.index.image_ids
        run_id = self.spec.run_id
        stage = single.rows_stage(ctx.loaded.fusion)
        t2i = single.retrieval_table(rank_all(t2i_parts), product_ids, image_ids, "text", cfg.top_k, ctx.version,
                                     run_id, stage)
        i2t = single.retrieval_table(rank_all(i2t_parts), image_ids, product_ids, "image", cfg.top_k, ctx.version,
                                     run_id, stage)
        pairs = pairs if ctx.loaded.fusion.uses_tia else 0  # candidate pairs; none went through the cross-encoder
        for table, name in ((t2i, single.TEXT_TO_IMAGE), (i2t, single.IMAGE_TO_TEXT)):
            single.write_table(table, storage.join(self.staging, name))
        index_used = choose_kind(len(image_ids), cfg.index, cfg.exact_max)
        facts = single.run_facts(ctx.loaded, ctx.catalog, ctx.runtime, ctx.dual, index_used, t2i.num_rows,
                                 i2t.num_rows, pairs)
        n_items = len(product_ids) + len(image_ids)
        facts["counts"].update(pairs_scored=pairs, pairs_reused=0, embeddings_computed=n_items, embeddings_reused=0)
        storage.write_text(storage.join(self.staging, HANDOFF), json.dumps(facts))


def build_pipeline(p: beam.Pipeline, spec: ScoringSpec, config: single.RetrieveConfig, staging: str,
                   chunk: int = CHUNK) -> None:
    seed = p | "Seed" >> beam.Create([None])
    chunks = seed | "Plan" >> beam.ParDo(Plan(spec, chunk)) | "Spread" >> beam.Reshuffle()
    vectors = chunks | "Embed" >> Embed(spec)
    scored = (
        chunks
        | "Recall" >> beam.ParDo(Recall(spec, config.recall_k, config.index, config.exact_max),
                                 beam.pvalue.AsSingleton(vectors))
        | "ByImage" >> beam.GroupByKey()
        | "Blocks" >> beam.Map(merge_block)
        | "Score" >> ScoreBlocks(spec)
        | "TopK" >> beam.ParDo(TopK(config.top_k, chunk)).with_outputs("t2i", "pairs", main="i2t")
    )
    t2i = (scored.t2i | "ByTextChunk" >> beam.GroupByKey()
           | "TextTopK" >> beam.Map(top_of_chunk, config.top_k))
    pairs = scored.pairs | "CountPairs" >> beam.CombineGlobally(sum)
    _ = seed | "Write" >> beam.ParDo(WriteTables(spec, config, staging), beam.pvalue.AsList(t2i),
                                     beam.pvalue.AsList(scored.i2t), beam.pvalue.AsSingleton(pairs))


def run(config: single.RetrieveConfig, beam_args: list[str], chunk: int = CHUNK) -> dict:
    t_start = time.time()
    run_id = single.check_config(config)
    check_beam_args(beam_args, "retrieve")
    shared_filesystem, beam_args = take_shared_filesystem(beam_args)
    if config.score_cache or config.save_scores:
        raise UserError("--score-cache and --save-scores work in the single-process retrieve only (run it without "
                        "Beam options); with a Beam runner every pair is scored")
    check_model(config.model)
    out = storage.resolve(config.out, "--out")
    storage.check_target(out, config.overwrite)
    where = execution(beam_args)
    check_paths_reach_workers(where, worker_paths(config, out=out), shared_filesystem)
    spec = spec_for(config, run_id, where.torch_threads)
    storage.clean_stale_staging(out)
    staging = storage.staging_path(out, run_id)
    storage.make_folder(staging)
    t0 = time.perf_counter()
    with beam.Pipeline(options=where.options) as p:
        build_pipeline(p, spec, config, staging, chunk)
    seconds = {"pipeline": time.perf_counter() - t0}
    handoff = storage.join(staging, HANDOFF)
    with storage.open_read(handoff) as fh:
        facts = json.loads(fh.read())
    storage.delete(handoff)
    summary = single.run_summary(run_id, config, out, facts, seconds, t_start, beam_options=list(beam_args))
    storage.write_text(storage.join(staging, single.RUN_JSON), json.dumps(summary, indent=2))
    storage.publish_folder(staging, out)
    return summary
