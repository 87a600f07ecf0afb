"""fashionbert score-pairs: the model's ranking score, P(aligned), for given (product text, image) pairs.

    fashionbert score-pairs --features DIR --model DIR --pairs FILE --out FILE

`--pairs` is Parquet or CSV with columns `product_id` (whose text) and `image_id`, plus any others. The
output (Parquet or CSV, by --out's extension) keeps the input's columns and row order and adds `score`
(float32 P(aligned), the same ranking score as the retrieval tables' `score`: see fashionbert/model/score_fusion.py). A
row whose id is missing or unknown to --features is not scored: it goes to the rejects file
(schemas.PAIR_REJECTS: 0-based input row, ids, reason), so input rows = output rows + rejects. Both files are
written to a temporary name and renamed into place.

Given Beam options (`--runner X`, ...), `fashionbert score-pairs` runs as a Beam pipeline instead
(pipelines/score_pairs.py): a worker reads --pairs, workers score through RunInference; same output.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from fashionbert.data.feature_catalog import IndexedImages, open_catalog
from fashionbert.errors import UserError
from fashionbert.model.loading import load_model
from fashionbert.rank.cross_encoder import (BatchingOptions, CrossEncoderScorer, PairScorer, add_batching_arguments,
                                            probability)
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ScorePairsConfig()
    g = parser.add_argument_group("inputs and outputs")
    g.add_argument("--features", action="append", required=True, metavar="DIR",
                   help="featurize output folder(s) holding the texts and images the pairs name")
    g.add_argument("--model", required=True, metavar="DIR", help="model folder: OUT/model of `fashionbert train`")
    g.add_argument("--pairs", required=True, metavar="FILE",
                   help="Parquet (.parquet/.pq) or CSV (.csv) file with columns product_id and image_id; other "
                        "columns are carried to the output unchanged")
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
    """--pairs' format, and that it exists, before any work."""
    fmt = _format(path, "--pairs")
    if not os.path.isfile(path):
        raise UserError(f"--pairs {path}: no such file")
    return fmt


def read_pairs(path: str):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    fmt = check_pairs(path)
    try:
        if fmt == "parquet":
            table = pq.read_table(path)
        else:
            # Ids stay strings even when they look like numbers (H&M article ids do), so they match the features.
            table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(
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


def _out_path(path: str, option: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(os.path.dirname(path)):
        raise UserError(f"{option} {path}: folder {os.path.dirname(path)} does not exist; create it or choose another path")
    return path


def write_file(table, fh, fmt: str) -> None:
    """`table` into an open binary file, as Parquet or CSV."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    if fmt == "parquet":
        pq.write_table(table, fh)
    else:
        pcsv.write_csv(table, fh)


def _write(table, path: str, fmt: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        write_file(table, fh, fmt)
    os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class Outputs:
    """Where score-pairs writes, checked before any work: the scored pairs (Parquet or CSV) and the rejects."""

    out: str
    fmt: str
    rejects: str


def check_outputs(config: ScorePairsConfig) -> Outputs:
    fmt = _format(config.out, "--out")
    out = _out_path(config.out, "--out")
    rejects = _out_path(config.rejects or str(Path(out).with_suffix("")) + ".rejects.parquet", "--rejects")
    return Outputs(out, fmt, rejects)


@dataclasses.dataclass
class Resolved:
    """The pairs file's rows matched against the features: `keep` (ascending input rows) are scored as `pairs`
    (text index, image index); the others are `rejects` (schemas.PAIR_REJECTS columns)."""

    keep: list[int]
    pairs: np.ndarray  # (len(keep), 2) int64
    rejects: dict[str, list]


def resolve_pairs(table, catalog) -> Resolved:
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
    return Resolved(keep, np.asarray(pairs, dtype=np.int64).reshape(-1, 2), rejects)


def scored_table(table, keep: Sequence[int], scores: np.ndarray):
    """The kept input rows, in input order with every input column, plus `score`."""
    import pyarrow as pa

    return table.take(pa.array(keep, pa.int64())).append_column(pa.field(SCORE, pa.float32()),
                                                                pa.array(scores, pa.float32()))


def rejects_table(rejects: dict[str, list]):
    import pyarrow as pa

    from schemas import PAIR_REJECTS

    return pa.Table.from_pydict(rejects, schema=PAIR_REJECTS)


def summary(input_rows: int, resolved: Resolved, distinct_pairs: int, outputs: Outputs, loaded_version: str,
            ranking_score: str, device: str, precision: str, t_start: float) -> dict:
    reasons: dict[str, int] = {}
    for r in resolved.rejects["reason"]:
        reasons[r] = reasons.get(r, 0) + 1
    return {
        "pairs": input_rows, "scored": len(resolved.keep), "rejected": len(resolved.rejects["row"]),
        "reject_reasons": reasons, "distinct_pairs_scored": int(distinct_pairs), "out": outputs.out,
        "rejects": outputs.rejects, "model_version": loaded_version, "ranking_score": ranking_score, "device": device,
        "precision": precision, "seconds": round(time.time() - t_start, 3),
    }


def run(config: ScorePairsConfig) -> dict:
    t_start = time.time()
    outputs = check_outputs(config)
    table = read_pairs(config.pairs)
    rt = resolve_runtime(config.device, config.precision, config.num_threads)
    loaded = load_model(config.model, rt)
    catalog = open_catalog(config.features, loaded)
    resolved = resolve_pairs(table, catalog)

    scorer = CrossEncoderScorer(loaded.model, rt, config.batch_tokens, config.block_images, progress=config.progress)
    # Repeated pairs (the same pair listed twice) are scored once.
    unique, inverse = np.unique(resolved.pairs, axis=0, return_inverse=True)
    logits = PairScorer(scorer, loaded.fusion).score(catalog.text_ids, IndexedImages(catalog.index, catalog.reader),
                                                     unique).logit
    scores = probability(logits[inverse.reshape(-1)]) if len(resolved.pairs) else np.zeros(0, dtype=np.float32)

    _write(scored_table(table, resolved.keep, scores), outputs.out, outputs.fmt)
    _write(rejects_table(resolved.rejects), outputs.rejects, "parquet")
    return summary(table.num_rows, resolved, len(unique), outputs, loaded.version, loaded.fusion.describe(),
                   str(rt.device), rt.precision, t_start)
