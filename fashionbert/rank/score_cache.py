"""What a retrieve or evaluate run computed, kept for the next run of the same model: the cross-encoder's pair
margins and the dual encoder's embeddings, keyed by content hashes.

Why: a catalog changes by a few percent a night, yet every run re-scores each (query, candidate) pair and
re-embeds each text and image. A pair's TIA margin depends only on the model, the text's token ids and the image's
patch features, and featurize already fingerprints those two (`content_hash` of the texts shards: text +
tokenizer settings; of the images shards: image bytes + CNN settings). So (text hash, image hash) -> margin and
(kind, hash) -> vector carry over between runs of one model, and a run computes only what is new to it.

A file holds the scores of one model_version at one precision (its Parquet key-value metadata): another model's
scores, or bf16 scores in an fp32 run, differ from what this run would compute, so such a file is never used.
A cache only saves time and the results never depend on it: a file that is missing (the first night has none),
unreadable, truncated or of another shape is ignored with a warning, and its entries are computed again.

Format: one Parquet file, schema `schemas.SCORE_CACHE`, rows sorted by (kind, hash): kind "pair" (text_hash,
image_hash, margin), "text" (text_hash, vector) and "image" (image_hash, vector). `save` writes what the run
used, computed or reused, so entries of products that left the catalog drop out instead of piling up.

Imports numpy and pyarrow only (no torch, no faiss, no Beam).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fashionbert.data import storage
from fashionbert.errors import UserError
from schemas import META_MODEL_VERSION, META_PRECISION, SCORE_CACHE, validate_schema

log = logging.getLogger(__name__)

VECTOR_KINDS = ("text", "image")
ROW_GROUP_ROWS = 100_000


@dataclasses.dataclass(frozen=True)
class ItemKeys:
    """The content hashes of one scoring call's items: text index t is keyed by `text[t]`, image index i by
    `image[i]` (object arrays of str, in the call's own index space)."""

    text: np.ndarray
    image: np.ndarray


class _Unusable(Exception):
    """Why a --score-cache file cannot be used (a warning, never an error)."""


class ScoreCache:
    """Pair margins and embeddings loaded from earlier runs' files, served by content hash; with `keep`, also
    what this run used, for `save`. `counts` says how much was computed and how much reused."""

    def __init__(self, model_version: str, precision: str, keep: bool = False):
        self.model_version = model_version
        self.precision = precision
        self.keep = keep
        self.inputs: list[dict] = []  # per --score-cache file: path, used, and why not or what it held
        self.counts = {"pairs_scored": 0, "pairs_reused": 0, "embeddings_computed": 0, "embeddings_reused": 0}
        # Loaded pairs: a hash -> id vocabulary per side, and sorted text_id * len(image vocab) + image_id keys.
        self._text_ids: dict[str, int] = {}
        self._image_ids: dict[str, int] = {}
        self._pair_keys = np.zeros(0, dtype=np.int64)
        self._pair_margins = np.zeros(0, dtype=np.float32)
        self._vectors: dict[str, tuple[dict[str, int], np.ndarray]] = {
            k: ({}, np.zeros((0, 0), dtype=np.float32)) for k in VECTOR_KINDS}
        self._used_pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._used_vectors: dict[str, dict[str, np.ndarray]] = {k: {} for k in VECTOR_KINDS}

    # ------------------------------------------------------------------------------------------ load
    def load(self, paths: Sequence[str]) -> None:
        """Read --score-cache files; where several hold a key, the first given wins."""
        pair_tables, vectors = [], []
        for path in paths:
            try:
                pairs, vecs = _read(path, self.model_version, self.precision)
            except _Unusable as exc:
                log.warning("--score-cache %s: %s; ignored, nothing is reused from it", path, exc)
                self.inputs.append({"path": str(path), "used": False, "reason": str(exc)})
                continue
            pair_tables.append(pairs)
            vectors.append(vecs)
            self.inputs.append({"path": str(path), "used": True, "pairs": pairs.num_rows,
                                "embeddings": sum(len(h) for h, _ in vecs.values())})
        if pair_tables:
            self._index_pairs(pa.concat_tables(pair_tables))
        for kind in VECTOR_KINDS:
            self._index_vectors(kind, [v[kind] for v in vectors])
        if paths:
            log.info("score cache: %d pairs, %d text and %d image embeddings from %d of %d file(s)",
                     len(self._pair_keys), len(self._vectors["text"][0]), len(self._vectors["image"][0]),
                     sum(i["used"] for i in self.inputs), len(paths))

    def _index_pairs(self, pairs: pa.Table) -> None:
        text = pc.dictionary_encode(pairs.column("text_hash").combine_chunks())
        image = pc.dictionary_encode(pairs.column("image_hash").combine_chunks())
        self._text_ids = {h: i for i, h in enumerate(text.dictionary.to_pylist())}
        self._image_ids = {h: i for i, h in enumerate(image.dictionary.to_pylist())}
        keys = text.indices.to_numpy().astype(np.int64) * len(self._image_ids) + image.indices.to_numpy()
        self._pair_keys, first = np.unique(keys, return_index=True)  # first: the earliest file's entry
        self._pair_margins = pairs.column("margin").to_numpy().astype(np.float32)[first]

    def _index_vectors(self, kind: str, parts: list[tuple[list[str], np.ndarray]]) -> None:
        index: dict[str, int] = {}
        rows: list[np.ndarray] = []
        for hashes, matrix in parts:
            if not len(hashes):
                continue
            if rows and matrix.shape[1] != rows[0].shape[1]:
                log.warning("--score-cache: %s embeddings of %d and %d dimensions for one model; using the first",
                            kind, rows[0].shape[1], matrix.shape[1])
                continue
            take = []
            for i, h in enumerate(hashes):
                if h not in index:
                    index[h] = len(index)
                    take.append(i)
            rows.append(matrix[take])
        self._vectors[kind] = (index, np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32))

    # ------------------------------------------------------------------------------------------ look up
    def margins(self, keys: ItemKeys, pairs: np.ndarray, compute: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """(n,) float32 margins of (text index, image index) `pairs`: from the cache where it holds the pair's
        hashes, else `compute(the other pairs)` (the cross-encoder)."""
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        out = np.empty(len(pairs), dtype=np.float32)
        hit = np.zeros(len(pairs), dtype=bool)
        if len(self._pair_keys) and len(pairs):
            t = _vocab_ids(self._text_ids, keys.text, pairs[:, 0])
            i = _vocab_ids(self._image_ids, keys.image, pairs[:, 1])
            known = np.flatnonzero((t >= 0) & (i >= 0))
            wanted = t[known] * len(self._image_ids) + i[known]
            pos = np.minimum(np.searchsorted(self._pair_keys, wanted), len(self._pair_keys) - 1)
            found = self._pair_keys[pos] == wanted
            hit[known[found]] = True
            out[known[found]] = self._pair_margins[pos[found]]
        miss = np.flatnonzero(~hit)
        if len(miss):
            out[miss] = compute(pairs[miss])
        self.counts["pairs_scored"] += len(miss)
        self.counts["pairs_reused"] += len(pairs) - len(miss)
        if self.keep:
            self._used_pairs.append((keys.text[pairs[:, 0]], keys.image[pairs[:, 1]], out.copy()))
        return out

    def vectors(self, kind: str, hashes: np.ndarray, dim: int,
                compute: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """(n, dim) float32 embeddings of the items with these hashes (`kind` "text" or "image"): from the cache
        where it holds them, else `compute(positions in hashes)` (the dual encoder)."""
        index, matrix = self._vectors[kind]
        if index and matrix.shape[1] != dim:
            log.warning("--score-cache: its %s embeddings have %d dimensions, the model's %d; not used",
                        kind, matrix.shape[1], dim)
            index, matrix = self._vectors[kind] = ({}, np.zeros((0, dim), dtype=np.float32))
        rows = np.fromiter((index.get(h, -1) for h in hashes), dtype=np.int64, count=len(hashes))
        out = np.empty((len(hashes), dim), dtype=np.float32)
        hit = rows >= 0
        if hit.any():
            out[hit] = matrix[rows[hit]]
        miss = np.flatnonzero(~hit)
        if len(miss):
            out[miss] = compute(miss)
        self.counts["embeddings_computed"] += len(miss)
        self.counts["embeddings_reused"] += len(hashes) - len(miss)
        if self.keep:
            used = self._used_vectors[kind]
            for h, v in zip(hashes, out):
                used.setdefault(h, v)
        return out

    # ------------------------------------------------------------------------------------------ save
    def save(self, path: str) -> int:
        """Write every pair and embedding this run used to `path` (a local temporary file + rename, or one object
        write); returns the rows."""
        tables = [self._pair_table()] + [self._vector_table(kind) for kind in VECTOR_KINDS]
        meta = {**SCORE_CACHE.metadata, META_MODEL_VERSION: self.model_version.encode(),
                META_PRECISION: self.precision.encode()}
        table = pa.concat_tables(tables).replace_schema_metadata(meta)
        try:
            storage.write_file(path, lambda fh: pq.write_table(table, fh, row_group_size=ROW_GROUP_ROWS))
        except OSError as exc:
            raise UserError(f"--save-scores {path}: cannot write it ({exc}); free space or choose another "
                            f"path") from exc
        return table.num_rows

    def _pair_table(self) -> pa.Table:
        if not self._used_pairs:
            return _rows("pair", 0)
        text = pa.array(np.concatenate([u[0] for u in self._used_pairs]), pa.string())
        image = pa.array(np.concatenate([u[1] for u in self._used_pairs]), pa.string())
        margin = np.concatenate([u[2] for u in self._used_pairs])
        # One row per distinct pair, sorted by (text_hash, image_hash): a rank per distinct hash, then a key.
        t, i = pc.dictionary_encode(text), pc.dictionary_encode(image)
        t_rank, i_rank = _sorted_ranks(t.dictionary), _sorted_ranks(i.dictionary)
        keys = t_rank[t.indices.to_numpy()] * len(i_rank) + i_rank[i.indices.to_numpy()]
        _, first = np.unique(keys, return_index=True)
        take = pa.array(first)
        return _rows("pair", len(first), text_hash=text.take(take), image_hash=image.take(take),
                     margin=pa.array(margin[first], pa.float32()))

    def _vector_table(self, kind: str) -> pa.Table:
        used = self._used_vectors[kind]
        hashes = sorted(used)
        if not hashes:
            return _rows(kind, 0)
        matrix = np.stack([used[h] for h in hashes]).astype(np.float32)
        offsets = pa.array(np.arange(len(hashes) + 1, dtype=np.int32) * matrix.shape[1])
        vector = pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1), pa.float32()))
        return _rows(kind, len(hashes), vector=vector, **{f"{kind}_hash": pa.array(hashes, pa.string())})

    def describe(self, saved: str | None = None) -> dict:
        """For a run's summary: the counts, each input file and whether it was used, and where it saved."""
        return {**self.counts, "inputs": self.inputs, "saved": saved}


def _vocab_ids(vocab: dict[str, int], hashes: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The cache's id of each `hashes[index]`, -1 where it has none (one dict look-up per distinct item)."""
    items, inverse = np.unique(index, return_inverse=True)
    ids = np.fromiter((vocab.get(h, -1) for h in hashes[items]), dtype=np.int64, count=len(items))
    return ids[inverse]


def _sorted_ranks(values: pa.Array) -> np.ndarray:
    ranks = np.empty(len(values), dtype=np.int64)
    ranks[pc.sort_indices(values).to_numpy()] = np.arange(len(values))
    return ranks


def _rows(kind: str, n: int, **columns: pa.Array) -> pa.Table:
    """`n` SCORE_CACHE rows of one kind; the columns not given are null."""
    arrays = [pa.array([kind] * n, pa.string())]
    arrays += [columns.get(f.name, pa.nulls(n, f.type)) for f in SCORE_CACHE][1:]
    return pa.Table.from_arrays(arrays, schema=SCORE_CACHE)


# ============================================================================================ reading
# What a damaged file can raise while pyarrow reads it (SchemaError is a ValueError). A cache only saves time,
# so any of these means "compute again", never a failed run.
_READ_ERRORS = (OSError, ValueError, TypeError, KeyError, IndexError, pa.ArrowException)


def _read(path: str, model_version: str, precision: str) -> tuple[pa.Table, dict[str, tuple[list[str], np.ndarray]]]:
    """The file's pair rows and its embeddings per kind (hashes, (n, d) matrix), or _Unusable saying why not."""
    try:
        if not storage.exists(path):
            raise _Unusable("no such file (normal on a first run)")
        if not storage.is_remote(path) and not os.path.isfile(path):
            raise _Unusable("not a file")
        with storage.arrow_input(path) as source:
            pf = pq.ParquetFile(source)
            schema = pf.schema_arrow
            validate_schema(schema, "score_cache", path)
            meta = schema.metadata or {}
            written = meta.get(META_MODEL_VERSION, b"").decode(), meta.get(META_PRECISION, b"").decode()
            if written[0] != model_version:
                raise _Unusable(f"written for model_version {written[0]!r}, this run scores with {model_version!r}")
            if written[1] != precision:
                raise _Unusable(f"written by a {written[1]} run, this run is {precision}: its scores would differ by "
                                f"rounding")
            table = pf.read()
        kind = table.column("kind")
        pairs = table.filter(pc.equal(kind, "pair")).select(["text_hash", "image_hash", "margin"])
        vectors = {k: _vectors_of(table.filter(pc.equal(kind, k)), k) for k in VECTOR_KINDS}
        if pairs.num_rows + sum(len(h) for h, _ in vectors.values()) != table.num_rows:
            raise _Unusable("rows of a kind other than pair, text or image")
        if any(pairs.column(c).null_count for c in pairs.column_names):
            raise _Unusable("pair rows with a null hash or margin")
    except _READ_ERRORS as exc:
        raise _Unusable(f"not a readable score cache ({exc})") from exc
    return pairs, vectors


def _vectors_of(rows: pa.Table, kind: str) -> tuple[list[str], np.ndarray]:
    hashes, vector = rows.column(f"{kind}_hash"), rows.column("vector").combine_chunks()
    if hashes.null_count or vector.null_count:
        raise _Unusable(f"{kind} rows with a null hash or vector")
    lengths = pc.list_value_length(vector).to_numpy()
    if len(set(lengths.tolist())) > 1:
        raise _Unusable(f"{kind} embeddings of different lengths")
    dim = int(lengths[0]) if len(lengths) else 0
    return hashes.to_pylist(), vector.flatten().to_numpy().astype(np.float32).reshape(len(lengths), dim)


# ============================================================================================ options
@dataclasses.dataclass(frozen=True)
class CacheOptions:
    """The fields of `add_cache_arguments`' options, for the configs of retrieve and evaluate."""

    score_cache: list[str] = dataclasses.field(default_factory=list)
    save_scores: str | None = None


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("score cache (runs of one model compute only what changed)")
    g.add_argument("--score-cache", action="append", default=[], metavar="FILE",
                   help="a file an earlier run's --save-scores wrote (read only): pair margins and embeddings it holds "
                        "for this model_version and precision, keyed by the featurize content hashes of the text and "
                        "the image, are reused instead of computed. Repeat for several (the first holding a key "
                        "wins). A missing, damaged or other-model file is ignored with a warning")
    g.add_argument("--save-scores", metavar="FILE",
                   help="write every pair margin and embedding this run computed or reused to FILE (Parquet, schema "
                        "score_cache; replaced atomically), for the next run's --score-cache; the same path as "
                        "--score-cache is fine")


def open_cache(options: CacheOptions, model_version: str, precision: str) -> ScoreCache:
    cache = ScoreCache(model_version, precision, keep=options.save_scores is not None)
    cache.load(options.score_cache)
    return cache


def save_path(given: str | None, out: str) -> str | None:
    """--save-scores resolved and checked before any work, so a typo does not cost a whole run. `out`: the
    stage's --out, which the file must neither be nor lie in (a published --out folder replaces its contents)."""
    if given is None:
        return None
    path = storage.resolve(given, "--save-scores")
    sep = "/" if storage.is_remote(path) else os.sep
    if path == out or path.startswith(out.rstrip(sep) + sep):
        raise UserError(f"--save-scores {given}: is --out or inside it, which this run replaces; write it beside "
                        f"--out")
    if storage.is_remote(path):
        return path
    if os.path.isdir(path):
        raise UserError(f"--save-scores {given}: is a folder; name a file in it, e.g. "
                        f"{os.path.join(path, 'scores.parquet')}")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise UserError(f"--save-scores {given}: folder {parent} does not exist; create it or choose another path")
    return path
