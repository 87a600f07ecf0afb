"""`fashionbert score-pairs` as a Beam pipeline: the output of fashionbert/rank/score_pairs.py, scored by workers.

    fashionbert score-pairs --features DIR --model DIR --pairs FILE --out FILE --runner X [Beam options]

    seed --ReadPairs (a worker reads --pairs and matches its ids)--> blocks of one image's distinct texts, keyed by
      their input rows; unknown ids on the side --Reshuffle--> RunInference(KeyedModelHandler(CrossEncoderHandler))
      --> scores by input row --Write (one worker: input order, every input column + score; the rejects)

The output and the rejects file are written under temporary names beside their targets; the driver renames them
into place. Same rows, order, columns and rejects as the single-process stage; scores to float rounding.
"""
from __future__ import annotations

import json
import os
import time

import apache_beam as beam
import numpy as np

from fashionbert.rank import score_pairs as single
from fashionbert.rank.cross_encoder import probability

from . import storage
from .rerank import (ContextDoFn, PairBlock, ScoreBlocks, ScoringSpec, check_beam_args, check_model, pipeline_options,
                     spec_for)


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


def scores_by_row(element) -> tuple[np.ndarray, np.ndarray, int]:
    """-> (input rows, their scores, the block's distinct pairs)."""
    (rows, text_of_row), result = element
    return rows, probability(result.inference)[text_of_row], len(result.example.texts)


class Write(ContextDoFn):
    """One worker: the scored rows in input order with every input column -> OUT's temporary file; the rejects ->
    theirs; what the summary needs -> a handoff file for the driver."""

    def __init__(self, spec: ScoringSpec, pairs: str, outputs: single.Outputs, t_start: float):
        super().__init__(spec)
        self.pairs, self.outputs, self.t_start = pairs, outputs, t_start

    def process(self, _, scored, rejects):
        table = single.read_pairs(self.pairs)
        rows = np.concatenate([r for r, _, _ in scored] or [np.zeros(0, np.int64)])
        scores = np.concatenate([s for _, s, _ in scored] or [np.zeros(0, np.float32)])
        order = np.argsort(rows, kind="stable")
        with storage.create(temporary(self.outputs.out, self.spec.run_id)) as fh:
            single.write_file(single.scored_table(table, rows[order].tolist(), scores[order]), fh, self.outputs.fmt)
        with storage.create(temporary(self.outputs.rejects, self.spec.run_id)) as fh:
            single.write_file(single.rejects_table(rejects), fh, "parquet")
        resolved = single.Resolved(rows[order].tolist(), np.zeros((0, 2), np.int64), rejects)
        ctx = self.ctx
        summary = single.summary(table.num_rows, resolved, sum(n for _, _, n in scored), self.outputs,
                                 ctx.version, ctx.loaded.fusion.describe(), str(ctx.runtime.device),
                                 ctx.runtime.precision, self.t_start)
        storage.write_text(handoff(self.outputs.out, self.spec.run_id), json.dumps(summary))


def temporary(path: str, run_id: str) -> str:
    return f"{path}.tmp-{run_id}"


def handoff(out: str, run_id: str) -> str:
    return f"{out}.tmp-{run_id}.json"


def build_pipeline(p: beam.Pipeline, spec: ScoringSpec, pairs: str, outputs: single.Outputs, t_start: float) -> None:
    seed = p | "Seed" >> beam.Create([None])
    read = seed | "ReadPairs" >> beam.ParDo(ReadPairs(spec, pairs)).with_outputs("rejects", main="blocks")
    scored = (
        read.blocks
        | "Spread" >> beam.Reshuffle()
        | "Score" >> ScoreBlocks(spec)
        | "ByRow" >> beam.Map(scores_by_row)
    )
    _ = seed | "Write" >> beam.ParDo(Write(spec, pairs, outputs, t_start), beam.pvalue.AsList(scored),
                                     beam.pvalue.AsSingleton(read.rejects))


def run(config: single.ScorePairsConfig, beam_args: list[str]) -> dict:
    t_start = time.time()
    check_beam_args(beam_args, "score-pairs")
    outputs = single.check_outputs(config)
    check_model(config.model)
    pairs = config.pairs if "://" in config.pairs else os.path.abspath(os.path.expanduser(config.pairs))
    single.check_pairs(pairs)
    options, threads = pipeline_options(beam_args)
    from fashionbert.data.publish import new_run_id

    spec = spec_for(config, new_run_id(), threads)
    with beam.Pipeline(options=options) as p:
        build_pipeline(p, spec, pairs, outputs, t_start)
    with storage.open_read(handoff(outputs.out, spec.run_id)) as fh:
        summary = json.loads(fh.read())
    storage.delete(handoff(outputs.out, spec.run_id))
    for path in (outputs.out, outputs.rejects):
        storage.rename(temporary(path, spec.run_id), path)
    return summary | {"seconds": round(time.time() - t_start, 3), "beam_options": list(beam_args)}
