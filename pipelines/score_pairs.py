"""`fashionbert score-pairs` as a Beam pipeline: the output of fashionbert/rank/score_pairs.py, scored by workers.

    fashionbert score-pairs --features DIR --model DIR --pairs FILE --out FILE --runner X [Beam options]

    seed --ReadPairs (a worker reads --pairs and matches its ids)--> blocks of one image's distinct texts, keyed by
      their input rows; unknown ids on the side --Reshuffle--> Offsets --> RunInference(KeyedModelHandler(
      CrossEncoderHandler)) --> scores by input row --Write (one worker: input order, every input column + score;
      the rejects)
    seed --Plan--> chunks of the catalog --RunInference(EmbedHandler)--> every vector (side input of Offsets): only
      when the model's fusion reads the hubness-corrected cosine, whose biases are over the whole catalog (as in
      the single-process stage); else Plan yields nothing and Offsets passes the blocks on.

The writing worker writes the output and the rejects file atomically (a temporary name renamed into place; on an
object store, one object write each), as the single-process stage does. Same rows, order, columns and rejects as the
single-process stage; scores to float rounding.
"""
from __future__ import annotations

import dataclasses
import json
import time

import apache_beam as beam
import numpy as np

from fashionbert.data import storage
from fashionbert.data.publish import new_run_id
from fashionbert.rank import score_pairs as single
from fashionbert.rank.cross_encoder import probability

from .execution import check_paths_reach_workers, execution, take_shared_filesystem
from .rerank import (CatalogBiases, ContextDoFn, Embed, PairBlock, Plan, ScoreBlocks, ScoringSpec, check_beam_args,
                     check_model, spec_for, worker_paths)

CHUNK = 2048  # texts or images per embedding task (when the hubness biases need every vector)


class ReadPairs(ContextDoFn):
    """The seed -> (input rows, each row's text within the block), PairBlock) per image; rejects on "rejects"."""

    def __init__(self, spec: ScoringSpec, pairs: str):
        super().__init__(spec)
        self.pairs = pairs

    def process(self, _):
        resolved = single.resolve_pairs(single.read_pairs(self.pairs), self.ctx.catalog)
        yield beam.pvalue.TaggedOutput("rejects", resolved.rejects)
        rows, pairs = np.asarray(resolved.keep, dtype=np.int64), resolved.pairs
        order = np.argsort(pairs[:, 1], kind="stable")
        rows, pairs = rows[order], pairs[order]
        starts = np.flatnonzero(np.r_[True, pairs[1:, 1] != pairs[:-1, 1]]) if len(rows) else []
        for lo, hi in zip(starts, np.r_[starts[1:], len(rows)].astype(np.int64)):
            # A pair listed twice is scored once: the block holds each distinct text of the image once.
            texts, text_of_row = np.unique(pairs[lo:hi, 0], return_inverse=True)
            yield (rows[lo:hi], text_of_row), PairBlock(int(pairs[lo, 1]), texts)


class Offsets(ContextDoFn):
    """A block -> the same block with each pair's hubness correction over the whole catalog (`offsets`) and its
    cosine from the catalog's vectors (`pair_cosines`: the handler embeds nothing again), when the model's fusion
    reads the corrected cosine."""

    def __init__(self, spec: ScoringSpec):
        super().__init__(spec)
        self.biases = CatalogBiases()

    def process(self, element, vectors: dict):
        key, block = element
        hub = self.biases.get(self.ctx, vectors)
        if hub is not None:
            images = np.full(len(block.texts), block.image, dtype=np.int64)
            cosines = vectors["text"][block.texts] @ vectors["image"][block.image]
            block = dataclasses.replace(block, offsets=hub.offsets(block.texts, images), pair_cosines=cosines)
        yield key, block


def scores_by_row(element) -> tuple[np.ndarray, np.ndarray, int]:
    """-> (input rows, their scores, the block's distinct pairs)."""
    (rows, text_of_row), result = element
    return rows, probability(result.inference)[text_of_row], len(result.example.texts)


class Write(ContextDoFn):
    """One worker: the scored rows in input order with every input column -> --out, the rejects -> --rejects (each
    written atomically, as the single-process stage writes them); the summary -> a handoff file for the driver."""

    def __init__(self, spec: ScoringSpec, pairs: str, outputs: single.Outputs, t_start: float):
        super().__init__(spec)
        self.pairs, self.outputs, self.t_start = pairs, outputs, t_start

    def process(self, _, scored, rejects):
        table = single.read_pairs(self.pairs)
        rows = np.concatenate([r for r, _, _ in scored] or [np.zeros(0, np.int64)])
        scores = np.concatenate([s for _, s, _ in scored] or [np.zeros(0, np.float32)])
        order = np.argsort(rows, kind="stable")
        resolved = single.ResolvedPairs(rows[order].tolist(), np.zeros((0, 2), np.int64), rejects)
        single.write_outputs(table, resolved, scores[order], self.outputs)
        summary = single.summary(table.num_rows, resolved, sum(n for _, _, n in scored), self.outputs, self.ctx.loaded,
                                 self.ctx.runtime, self.t_start)
        storage.write_text(handoff(self.outputs.out, self.spec.run_id), json.dumps(summary))


def handoff(out: str, run_id: str) -> str:
    return f"{out}.summary-{run_id}.json"


def build_pipeline(p: beam.Pipeline, spec: ScoringSpec, pairs: str, outputs: single.Outputs, t_start: float) -> None:
    seed = p | "Seed" >> beam.Create([None])
    read = seed | "ReadPairs" >> beam.ParDo(ReadPairs(spec, pairs)).with_outputs("rejects", main="blocks")
    chunks = seed | "Plan" >> beam.ParDo(Plan(spec, CHUNK, when_corrected=True)) | "SpreadChunks" >> beam.Reshuffle()
    vectors = chunks | "Embed" >> Embed(spec)
    scored = (
        read.blocks
        | "Spread" >> beam.Reshuffle()
        | "Offsets" >> beam.ParDo(Offsets(spec), beam.pvalue.AsSingleton(vectors))
        | "Score" >> ScoreBlocks(spec)
        | "ByRow" >> beam.Map(scores_by_row)
    )
    _ = seed | "Write" >> beam.ParDo(Write(spec, pairs, outputs, t_start), beam.pvalue.AsList(scored),
                                     beam.pvalue.AsSingleton(read.rejects))


def run(config: single.ScorePairsConfig, beam_args: list[str]) -> dict:
    t_start = time.time()
    check_beam_args(beam_args, "score-pairs")
    shared_filesystem, beam_args = take_shared_filesystem(beam_args)
    outputs = single.check_outputs(config)
    check_model(config.model)
    pairs = storage.resolve(config.pairs, "--pairs")
    single.check_pairs(pairs)
    where = execution(beam_args)
    check_paths_reach_workers(where, worker_paths(config, pairs=pairs, out=outputs.out, rejects=outputs.rejects),
                              shared_filesystem)
    spec = spec_for(config, new_run_id(), where.torch_threads)
    with beam.Pipeline(options=where.options) as p:
        build_pipeline(p, spec, pairs, outputs, t_start)
    summary = json.loads(storage.read_text(handoff(outputs.out, spec.run_id)))
    storage.delete(handoff(outputs.out, spec.run_id))
    return summary | {"seconds": round(time.time() - t_start, 3), "beam_options": list(beam_args)}
