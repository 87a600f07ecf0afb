"""fashionbert score-pairs: the model's ranking score, P(aligned), for given (product text, image) pairs.

    fashionbert score-pairs --features DIR --model DIR --pairs FILE --out FILE

`--pairs` is Parquet or CSV with columns `product_id` (whose text) and `image_id`, plus any others. The
output (Parquet or CSV, by --out's extension) keeps the input's columns and row order and adds `score`
(float32 P(aligned), the same ranking score as the retrieval tables' `score`: see fashionbert/model/score_fusion.py;
when the model's fusion reads the hubness-corrected cosine, the biases are over every text and image of --features,
so every item is embedded once, as retrieve embeds them). A
row whose id is missing or unknown to --features is not scored: it goes to the rejects file
(schemas.PAIR_REJECTS: 0-based input row, ids, reason), so input rows = output rows + rejects. Both files are
written to a temporary name and renamed into place (on an object store, each is one object write). Every path may be
a URI (gs://...; fashionbert/data/storage.py).

Given Beam options (`--runner X`, ...), `fashionbert score-pairs` runs as a Beam pipeline instead
(pipelines/score_pairs.py): a worker reads --pairs, workers score through RunInference; same output.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import numpy as np

from fashionbert.data import storage
from fashionbert.data.feature_catalog import Catalog, IndexedImages, open_catalog
from fashionbert.data.model_store import load_model
from fashionbert.errors import UserError
from fashionbert.model.loading import LoadedModel
from fashionbert.rank.cross_encoder import (BatchingOptions, CrossEncoderScorer, PairScorer, add_batching_arguments,
                                            probability)
from fashionbert.rank.hubness import fusion_hubness, hubness_biases
from fashionbert.rank.retrieve import dual_encoder_for, embed_all
from fashionbert.runtime import RuntimeOptions, add_runtime_arguments, resolve_runtime, stage_config

ID_COLUMNS = ("product_id", "image_id")
SCORE = "score"


@dataclasses.dataclass(frozen=True)
class ScorePairsConfig(BatchingOptions, RuntimeOptions):
    features: list[str] = dataclasses.field(default_factory=list)  # featurize output folders
    model: str = ""
    pairs: str = ""
    out: str = ""
    rejects: str | None = None  # default: OUT's name with '.rejects.parquet'


def config_from_args(args: argparse.Namespace) -> ScorePairsConfig:
    return stage_config(ScorePairsConfig, args)


def add_pair_inputs(parser: argparse.ArgumentParser, pairs_note: str = "") -> argparse._ArgumentGroup:
    """--features, --model and --pairs, in an "inputs and outputs" group (returned): the inputs of a stage that reads a
    pairs file (score-pairs, explain)."""
    g = parser.add_argument_group("inputs and outputs")
    g.add_argument("--features", action="append", required=True, metavar="DIR",
                   help="featurize output folder(s) holding the texts and images the pairs name")
    g.add_argument("--model", required=True, metavar="DIR", help="model folder: OUT/model of `fashionbert train`")
    g.add_argument("--pairs", required=True, metavar="FILE",
                   help="Parquet (.parquet/.pq) or CSV (.csv) file with columns product_id and image_id" + pairs_note)
    return g


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ScorePairsConfig()
    g = add_pair_inputs(parser, "; other columns are carried to the output unchanged")
    g.add_argument("--out", required=True, metavar="FILE",
                   help="scored pairs, .parquet or .csv: the input rows in input order plus a float32 'score' column "
                        "(replaced atomically if it exists)")
    g.add_argument("--rejects", metavar="FILE", default=d.rejects,
                   help="Parquet file for rows that could not be scored, with the reason (default: OUT's name with "
                        "'.rejects.parquet')")
    add_batching_arguments(add_runtime_arguments(parser))


def _format(path: str, option: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".csv":
        return "csv"
    raise UserError(f"{option} {path}: unknown file type {suffix or '(none)'}; use a .parquet or .csv file")


def check_pairs(path: str) -> str:
    """--pairs' format, and that the file is there, before any work -> the format."""
    fmt = _format(path, "--pairs")
    storage.resolve(path, "--pairs")
    if not (storage.exists(path) if storage.is_remote(path) else os.path.isfile(path)):
        raise UserError(f"--pairs {path}: no such file")
    return fmt


def read_pairs(path: str):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    fmt = check_pairs(path)
    try:
        with storage.arrow_input(path) as source:
            if fmt == "parquet":
                table = pq.read_table(source)
            else:
                # Ids stay strings even when they look like numbers (H&M article ids do), so they match the features.
                table = pcsv.read_csv(source, convert_options=pcsv.ConvertOptions(
                    column_types={c: pa.string() for c in ID_COLUMNS}))
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"--pairs {path}: cannot read it as {fmt} ({exc})") from exc
    missing = [c for c in ID_COLUMNS if c not in table.column_names]
    if missing:
        raise UserError(f"--pairs {path}: column(s) {missing} not found; the file has {table.column_names}. Rename the "
                        f"columns to product_id (the product whose text is scored) and image_id")
    if SCORE in table.column_names:
        raise UserError(f"--pairs {path}: already has a '{SCORE}' column, which the output adds; rename or drop it")
    return table


def _ids(table, column: str) -> list[str | None]:
    import pyarrow as pa

    col = table.column(column)
    if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
        col = col.cast(pa.string())
    return col.to_pylist()


def _write(table, path: str, fmt: str) -> None:
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    storage.write_file(path, lambda fh: pq.write_table(table, fh) if fmt == "parquet" else pcsv.write_csv(table, fh))


@dataclasses.dataclass
class ResolvedPairs:
    """A pairs table's rows resolved against a feature catalog."""

    keep: list[int]  # the input rows whose ids are known, in input order
    pairs: np.ndarray  # (len(keep), 2) int64: (text index, image index) of each kept row
    rejects: dict[str, list]  # the other rows, as schemas.PAIR_REJECTS columns

    def reject_reasons(self) -> dict[str, int]:
        reasons: dict[str, int] = {}
        for r in self.rejects["reason"]:
            reasons[r] = reasons.get(r, 0) + 1
        return reasons


def resolve_pairs(table, catalog: Catalog) -> ResolvedPairs:
    """Each row's product_id and image_id -> the catalog's text and image index; a row with a missing or unknown id
    goes to the rejects with its reason."""
    product_ids, image_ids = _ids(table, "product_id"), _ids(table, "image_id")
    text_of = catalog.texts.index
    image_of = {iid: i for i, iid in enumerate(catalog.index.image_ids)}
    keep, pairs, rejects = [], [], {"row": [], "product_id": [], "image_id": [], "reason": []}
    for row, (pid, iid) in enumerate(zip(product_ids, image_ids)):
        reason = None
        if pid is None or pid == "":
            reason = "missing_product_id"
        elif iid is None or iid == "":
            reason = "missing_image_id"
        elif pid not in text_of:
            reason = "unknown_product_id"
        elif iid not in image_of:
            reason = "unknown_image_id"
        if reason:
            for key, value in (("row", row), ("product_id", pid), ("image_id", iid), ("reason", reason)):
                rejects[key].append(value)
            continue
        keep.append(row)
        pairs.append((text_of[pid], image_of[iid]))
    return ResolvedPairs(keep, np.asarray(pairs, dtype=np.int64).reshape(-1, 2), rejects)


def write_rejects(rejects: dict[str, list], path: str) -> None:
    import pyarrow as pa

    from schemas import PAIR_REJECTS

    _write(pa.Table.from_pydict(rejects, schema=PAIR_REJECTS), path, "parquet")


def ranking_scores(scorer: CrossEncoderScorer, loaded: LoadedModel, catalog: Catalog, pairs: np.ndarray) -> np.ndarray:
    """The ranking score P(aligned), float32, of (text index, image index) pairs; a pair listed twice is scored once."""
    unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
    images = IndexedImages(catalog.index, catalog.reader)
    offsets = vectors = None
    hubness = fusion_hubness(loaded.fusion)
    if hubness.enabled and len(unique):
        # The biases are over the whole catalog, as retrieve takes them; the pairs' cosines come from those vectors.
        vectors = embed_all(dual_encoder_for(scorer), catalog.text_ids, images, scorer.token_budget)
        biases = hubness_biases(*vectors, hubness, device=scorer.runtime.device.type, image_text=catalog.index.product)
        offsets = biases.offsets(unique[:, 0], unique[:, 1])
    logits = PairScorer(scorer, loaded.fusion).score(catalog.text_ids, images, unique, offsets=offsets,
                                                     vectors=vectors).logit
    return probability(logits[inverse.reshape(-1)]) if len(pairs) else np.zeros(0, dtype=np.float32)


@dataclasses.dataclass
class ScoredPairs:
    table: object  # the pairs file as read (pyarrow.Table)
    loaded: LoadedModel
    catalog: Catalog
    resolved: ResolvedPairs
    scorer: CrossEncoderScorer
    scores: np.ndarray  # float32 P(aligned) of each kept row (resolved.keep)


def score_pairs_file(config) -> ScoredPairs:
    """A stage config's pairs file (`pairs`) read, its model (`model`) loaded on its runtime, its features (`features`)
    opened, the rows resolved and the known ones scored (the config's batching options)."""
    table = read_pairs(config.pairs)
    rt = resolve_runtime(config.device, config.precision, config.num_threads)
    loaded = load_model(config.model, rt)
    catalog = open_catalog(config.features, loaded)
    resolved = resolve_pairs(table, catalog)
    scorer = CrossEncoderScorer(loaded.model, rt, config.batch_tokens, config.block_images, progress=config.progress)
    scores = ranking_scores(scorer, loaded, catalog, resolved.pairs)
    return ScoredPairs(table, loaded, catalog, resolved, scorer, scores)


@dataclasses.dataclass(frozen=True)
class Outputs:
    """Where score-pairs writes, checked before any work: the scored pairs (Parquet or CSV) and the rejects."""

    out: str
    fmt: str
    rejects: str


def check_outputs(config: ScorePairsConfig) -> Outputs:
    fmt = _format(config.out, "--out")
    out = storage.check_out_file(config.out, "--out")
    rejects = storage.check_out_file(config.rejects or os.path.splitext(out)[0] + ".rejects.parquet", "--rejects")
    return Outputs(out, fmt, rejects)


def write_outputs(table, resolved: ResolvedPairs, scores: np.ndarray, outputs: Outputs) -> None:
    """The kept rows in input order with every input column plus `score`, and the rejects, each written atomically."""
    import pyarrow as pa

    scored = table.take(pa.array(resolved.keep, pa.int64())).append_column(pa.field(SCORE, pa.float32()),
                                                                            pa.array(scores, pa.float32()))
    _write(scored, outputs.out, outputs.fmt)
    write_rejects(resolved.rejects, outputs.rejects)


def summary(input_rows: int, resolved: ResolvedPairs, distinct_pairs: int, outputs: Outputs, loaded: LoadedModel,
            runtime, t_start: float) -> dict:
    return {
        "pairs": input_rows, "scored": len(resolved.keep), "rejected": len(resolved.rejects["row"]),
        "reject_reasons": resolved.reject_reasons(), "distinct_pairs_scored": int(distinct_pairs),
        "out": outputs.out, "rejects": outputs.rejects, "model_version": loaded.version,
        "ranking_score": loaded.fusion.describe(), "device": str(runtime.device),
        "precision": runtime.precision, "seconds": round(time.time() - t_start, 3),
    }


def run(config: ScorePairsConfig) -> dict:
    t_start = time.time()
    outputs = check_outputs(config)
    scored = score_pairs_file(config)
    write_outputs(scored.table, scored.resolved, scored.scores, outputs)
    return summary(scored.table.num_rows, scored.resolved, len(np.unique(scored.resolved.pairs, axis=0)), outputs,
                   scored.loaded, scored.scorer.runtime, t_start)
