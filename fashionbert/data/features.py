"""Reading featurize output folders for training and scoring (pyarrow + numpy only).

A folder is usable once featurize wrote `_SUCCESS`; every shard is checked against `schemas/` before a row
is read. Texts (small: ids and a few strings per product) are loaded whole; image patch features (about
160 KB a row at 8x8x1280 fp16) never are: the image index keeps only ids and (shard, row group, row)
coordinates, and features are read on demand in record batches.

An incremental featurize run hard-links the previous run's image files into its folder instead of copying
their rows; `_dead_image_rows.parquet` then lists the rows of those files that are no longer live (deleted,
changed or re-owned images). Every reader here skips them, so such a folder reads exactly like one whose live
rows were copied: the same image ids, product ids and features, indexed in image_id order.

A folder is a local path or a URI (gs://, s3://, ...): shards are listed and opened through `storage`, and pyarrow
reads the row groups it needs from the open files, so a remote folder is never copied whole.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fashionbert.data import storage
from fashionbert.errors import UserError
from schemas import META_FEATURE_DIM, META_GRID, SchemaError, read_schema, read_table

SUCCESS = "_SUCCESS"
RUN_JSON = "_run.json"
DEAD_IMAGE_ROWS = "_dead_image_rows.parquet"
READ_BATCH_ROWS = 256


@dataclasses.dataclass
class FeatureFolder:
    path: str  # a local path or a URI
    image_shards: list[str]
    text_shards: list[str]
    grid: int
    feature_dim: int
    options: dict
    dead_rows: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # image file name -> dead rows
    variant_shards: list[str] = dataclasses.field(default_factory=list)  # text_variants-*.parquet (training only)

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def location(self) -> str:
        """The folder for run summaries: the URI, or the absolute local path."""
        return self.path if storage.is_remote(self.path) else str(Path(self.path).resolve())

    def live_mask(self, shard: str, num_rows: int) -> np.ndarray | None:
        """Which rows of one of the folder's image files are live; None when all are."""
        dead = self.dead_rows.get(storage.basename(shard))
        if dead is None or not len(dead):
            return None
        mask = np.ones(num_rows, dtype=bool)
        mask[dead[dead < num_rows]] = False
        return mask


def read_dead_rows(source, where: str | None = None) -> dict[str, np.ndarray]:
    """A `_dead_image_rows.parquet` (a path or an open file) -> image file name -> sorted dead row indexes."""
    table = read_table(source, "dead_image_rows", where=where)
    if not table.num_rows:
        return {}
    files = table.column("file").combine_chunks().dictionary_encode()
    codes = files.indices.to_numpy(zero_copy_only=False)
    rows = table.column("row").to_numpy()
    order = np.argsort(codes, kind="stable")
    codes, rows = codes[order], rows[order]
    bounds = np.searchsorted(codes, np.arange(len(files.dictionary) + 1))
    return {name: np.sort(rows[bounds[k]:bounds[k + 1]]) for k, name in enumerate(files.dictionary.to_pylist())}


def _fix(path: str) -> str:
    return f"run `fashionbert featurize --catalog SRC --out {path}` to completion, or point --features at a finished featurize output folder"


def open_feature_folder(path: str | os.PathLike) -> FeatureFolder:
    """Validate one featurize output folder (a local path or a URI); every problem is a UserError naming the folder
    and the fix."""
    path = str(path).rstrip("/") if storage.is_remote(path) else str(Path(path).expanduser())
    storage.resolve(path, "--features")
    if not storage.is_folder(path):
        raise UserError(f"--features {path}: no such folder; {_fix(path)}")
    if not storage.is_complete(path):
        raise UserError(f"--features {path}: no {SUCCESS} marker, so featurize did not finish writing it; {_fix(path)}")
    images = storage.glob(path, "images-*.parquet")
    texts = storage.glob(path, "texts-*.parquet")
    variants = storage.glob(path, "text_variants-*.parquet")
    if not images or not texts:
        missing = "images-*.parquet" if not images else "texts-*.parquet"
        raise UserError(f"--features {path}: has {SUCCESS} but no {missing} shards; {_fix(path)}")
    options: dict = {}
    run_json = storage.join(path, RUN_JSON)
    if storage.exists(run_json):
        try:
            options = dict(json.loads(storage.read_text(run_json)).get("options") or {})
        except (json.JSONDecodeError, AttributeError) as exc:
            raise UserError(f"--features {path}: {RUN_JSON} is not valid JSON ({exc}); {_fix(path)}") from exc
    shapes = set()
    dead_file = storage.join(path, DEAD_IMAGE_ROWS)
    try:
        for shard in images:
            with storage.arrow_input(shard) as source:
                meta = read_schema(source, "images", where=shard).metadata
            shapes.add((int(meta[META_GRID]), int(meta[META_FEATURE_DIM])))
        for kind, shards in (("texts", texts), ("text_variants", variants)):
            for shard in shards:
                with storage.arrow_input(shard) as source:
                    read_schema(source, kind, where=shard)
        dead_rows = {}
        if storage.exists(dead_file):
            with storage.arrow_input(dead_file) as source:
                dead_rows = read_dead_rows(source, where=dead_file)
    except SchemaError as exc:
        raise UserError(f"--features {path}: {exc}") from exc
    unknown = sorted(set(dead_rows) - {storage.basename(p) for p in images})
    if unknown:
        raise UserError(f"--features {path}: {DEAD_IMAGE_ROWS} names image files the folder lacks ({unknown[:3]}); "
                        f"{_fix(path)}")
    if len(shapes) != 1:
        raise UserError(f"--features {path}: image shards disagree on (grid, feature_dim): {sorted(shapes)}; {_fix(path)}")
    grid, feature_dim = shapes.pop()
    return FeatureFolder(path=path, image_shards=images, text_shards=texts, grid=grid, feature_dim=feature_dim,
                         options=options, dead_rows=dead_rows, variant_shards=variants)


def open_feature_folders(paths: Sequence[str | os.PathLike]) -> list[FeatureFolder]:
    if not paths:
        raise UserError("--features: give at least one featurize output folder")
    folders = [open_feature_folder(p) for p in paths]
    shapes = {(f.grid, f.feature_dim, f.options.get("cnn")) for f in folders}
    if len({(g, d) for g, d, _ in shapes}) != 1:
        detail = ", ".join(f"{f.path}: grid {f.grid}, feature_dim {f.feature_dim}" for f in folders)
        raise UserError(f"--features folders were made with different patch grids or CNNs ({detail}); "
                        f"featurize them all with the same --grid/--cnn")
    return folders


# ------------------------------------------------------------------------------------------- texts
@dataclasses.dataclass
class TextTable:
    """All product texts, indexed by product position (`index[product_id]`)."""

    product_ids: list[str]
    index: dict[str, int]
    input_ids: list[list[np.ndarray]]  # per product, one or more token id arrays ([CLS] ... [SEP])
    subcategory: list[str]  # subcategory, else category, else "" (unknown: treated as a too-small group)
    group_id: list[str]
    content_hash: list[list[str]]  # per product, the content_hash of each of its texts, parallel to input_ids
    variant_texts: int = 0  # how many of those texts came from text_variants files (always after the product's texts)

    def __len__(self) -> int:
        return len(self.product_ids)

    def max_token_id(self) -> int:
        return max((int(a.max()) for ids in self.input_ids for a in ids if a.size), default=0)

    def group_codes(self) -> np.ndarray:
        """(products,) int64, equal for the products of one group (a product's colour variants); a product without a
        group_id is a group of its own."""
        return _codes(self.group_id)

    def subcategory_codes(self) -> np.ndarray:
        """(products,) int64, equal for the products of one sub-category; a product with none is one of its own."""
        return _codes(self.subcategory)


def _codes(labels: Sequence[str]) -> np.ndarray:
    """An int64 code per product, equal for equal labels; an empty label makes the product a code of its own."""
    named = [label or f"\0product {p}" for p, label in enumerate(labels)]
    return np.unique(np.asarray(named, dtype=str), return_inverse=True)[1].astype(np.int64)


def truncate_ids(ids: np.ndarray, max_len: int, sep_id: int) -> np.ndarray:
    """Keep [CLS] ... and end with [SEP] within max_len tokens."""
    if len(ids) <= max_len:
        return ids
    out = ids[:max_len].copy()
    out[-1] = sep_id
    return out


def load_texts(folders: Iterable[FeatureFolder], variants: bool = False) -> TextTable:
    """Every product's texts from the folders' texts files. With `variants`, each product's training-only texts
    from text_variants files follow its own (so `input_ids[p][0]` is always a texts row, the one scoring and
    validation use); a variant of a product without a texts row is dropped, as it has no images to pair with."""
    folders = list(folders)
    product_ids: list[str] = []
    index: dict[str, int] = {}
    input_ids: list[list[np.ndarray]] = []
    subcategory: list[str] = []
    group_id: list[str] = []
    content_hash: list[list[str]] = []
    seen_hashes: set[tuple[str, str]] = set()
    for d in _text_rows(folders, "texts"):
        for pid, ids, cat, sub, grp, chash in zip(d["product_id"], d["input_ids"], d["category"], d["subcategory"],
                                                   d["group_id"], d["content_hash"]):
            if (pid, chash) in seen_hashes:
                continue  # the same text listed twice (e.g. two folders of one catalog)
            seen_hashes.add((pid, chash))
            arr = np.asarray(ids, dtype=np.int64)
            if pid in index:
                input_ids[index[pid]].append(arr)
                content_hash[index[pid]].append(chash)
                continue
            index[pid] = len(product_ids)
            product_ids.append(pid)
            input_ids.append([arr])
            content_hash.append([chash])
            subcategory.append(sub or cat or "")
            group_id.append(grp)
    if not product_ids:
        raise UserError("--features: the texts shards hold no rows; featurize accepted no product texts")
    added = 0
    for d in (_text_rows(folders, "text_variants") if variants else ()):
        for pid, ids, chash in zip(d["product_id"], d["input_ids"], d["content_hash"]):
            if pid not in index or (pid, chash) in seen_hashes:
                continue
            seen_hashes.add((pid, chash))
            input_ids[index[pid]].append(np.asarray(ids, dtype=np.int64))
            content_hash[index[pid]].append(chash)
            added += 1
    return TextTable(product_ids, index, input_ids, subcategory, group_id, content_hash, added)


def _text_rows(folders: list[FeatureFolder], kind: str):
    """The columns (as lists) of each texts (or text_variants) file of the folders, in order."""
    cols = ["product_id", "input_ids", "category", "subcategory", "group_id", "content_hash"]
    for folder in folders:
        for shard in folder.text_shards if kind == "texts" else folder.variant_shards:
            try:
                with storage.arrow_input(shard) as source:
                    table = read_table(source, kind, columns=cols, where=shard)
            except SchemaError as exc:
                raise UserError(f"--features {folder.path}: {exc}") from exc
            yield table.to_pydict()


# ------------------------------------------------------------------------------------------- split
def validation_mask(group_ids: Sequence[str], fraction: float, seed: int = 0) -> np.ndarray:
    """True for products held out for validation: a hash of (seed, group_id) below `fraction`.

    Deterministic across runs, machines and Python versions (sha256, not hash()), independent of row order,
    and products sharing a group_id always land on the same side.
    """
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"--val-fraction {fraction}: must be in [0, 1)")
    out = np.zeros(len(group_ids), dtype=bool)
    for i, g in enumerate(group_ids):
        h = hashlib.sha256(f"fashionbert-split:{seed}:{g}".encode()).digest()
        out[i] = int.from_bytes(h[:8], "big") / 2.0**64 < fraction
    return out


# ------------------------------------------------------------------------------------------- images
@dataclasses.dataclass
class ImageIndex:
    """One entry per image row with a product text: where it lives and whose it is; no features."""

    shards: list[str]
    shard: np.ndarray  # int32, index into shards
    row_group: np.ndarray  # int32
    row: np.ndarray  # int64, row within the row group
    product: np.ndarray  # int64, index into the TextTable
    image_ids: list[str]
    content_hash: list[str]  # the images shards' content_hash (image bytes + CNN settings) per entry
    skipped_no_text: int
    skipped_duplicate: int

    def __len__(self) -> int:
        return len(self.image_ids)


def _live_image_rows(folder: FeatureFolder, first_shard: int) -> list[tuple[str, str, str, int, int, int]]:
    """(image_id, product_id, content_hash, shard, row group, row) of a folder's live image rows, in image_id order: the order a
    featurize run writes them, also when some of the folder's files were linked from an earlier run."""
    rows = []
    for s, path in enumerate(folder.image_shards, start=first_shard):
        with storage.arrow_input(path) as source:
            pf = pq.ParquetFile(source)
            live = folder.live_mask(path, pf.metadata.num_rows)
            start = 0
            for rg in range(pf.num_row_groups):
                t = pf.read_row_group(rg, columns=["image_id", "product_id", "content_hash"])
                for r, (iid, pid, chash) in enumerate(zip(t.column("image_id").to_pylist(),
                                                          t.column("product_id").to_pylist(),
                                                          t.column("content_hash").to_pylist())):
                    if live is None or live[start + r]:
                        rows.append((iid, pid, chash, s, rg, r))
                start += t.num_rows
    rows.sort(key=lambda x: x[0])  # stable: of two rows with one id, the first in file order stays first
    return rows


def index_images(folders: Iterable[FeatureFolder], texts: TextTable) -> ImageIndex:
    shards: list[str] = []
    shard_col, rg_col, row_col, prod_col, image_ids, hashes = [], [], [], [], [], []
    seen: set[str] = set()
    no_text = dup = 0
    for folder in folders:
        rows = _live_image_rows(folder, len(shards))
        shards.extend(folder.image_shards)
        for iid, pid, chash, s, rg, r in rows:
            p = texts.index.get(pid)
            if p is None:
                no_text += 1
                continue
            if iid in seen:
                dup += 1
                continue
            seen.add(iid)
            shard_col.append(s)
            rg_col.append(rg)
            row_col.append(r)
            prod_col.append(p)
            image_ids.append(iid)
            hashes.append(chash)
    return ImageIndex(
        shards=shards,
        shard=np.asarray(shard_col, dtype=np.int32),
        row_group=np.asarray(rg_col, dtype=np.int32),
        row=np.asarray(row_col, dtype=np.int64),
        product=np.asarray(prod_col, dtype=np.int64),
        image_ids=image_ids,
        content_hash=hashes,
        skipped_no_text=no_text,
        skipped_duplicate=dup,
    )


def features_to_numpy(column: pa.Array, num_patches: int, feature_dim: int) -> np.ndarray:
    """A fixed_size_list<float16> column -> (n, num_patches, feature_dim) float16, one copy at most."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(column), num_patches, feature_dim)


class FeatureReader:
    """Reads patch features of chosen rows, one record batch at a time (memory: the rows asked for + one batch).

    One reader may serve several threads (a Beam worker's threads share its scoring context): a pyarrow ParquetFile
    is not safe to read from two threads at once (four threads reading one reader crashed the process: a double free,
    a mutex assertion, or a hang), so `read` holds the reader's lock; the model work around it still runs in
    parallel."""

    def __init__(self, shards: Sequence[str | os.PathLike], num_patches: int, feature_dim: int,
                 batch_rows: int = READ_BATCH_ROWS):
        self.shards = [str(s) for s in shards]
        self.num_patches = num_patches
        self.feature_dim = feature_dim
        self.batch_rows = batch_rows
        self._files: dict[int, pq.ParquetFile] = {}
        self._lock = threading.Lock()

    def _file(self, shard: int) -> pq.ParquetFile:
        f = self._files.get(shard)
        if f is None:
            # A remote shard's file stays open with its ParquetFile: each read fetches only the row groups asked for.
            f = self._files[shard] = pq.ParquetFile(storage.arrow_source(self.shards[shard]))
        return f

    def _iter_row_group(self, shard: int, row_group: int, columns: Sequence[str] = ("features",)) -> Iterator[tuple[int, pa.RecordBatch]]:
        """(first row, record batch) pairs covering one row group; only `read` calls it, under the lock."""
        start = 0
        for batch in self._file(shard).iter_batches(batch_size=self.batch_rows, row_groups=[row_group], columns=list(columns)):
            yield start, batch
            start += batch.num_rows

    def read(self, shard: np.ndarray, row_group: np.ndarray, row: np.ndarray) -> np.ndarray:
        """Features of the given rows, in the given order: (n, num_patches, feature_dim) float16."""
        n = len(row)
        out = np.empty((n, self.num_patches, self.feature_dim), dtype=np.float16)
        if n == 0:
            return out
        keys = shard.astype(np.int64) * (1 << 32) + row_group.astype(np.int64)
        with self._lock:
            self._read_into(out, keys, row)
        return out

    def _read_into(self, out: np.ndarray, keys: np.ndarray, row: np.ndarray) -> None:
        for key in np.unique(keys):
            sel = np.nonzero(keys == key)[0]
            s, g = int(key >> 32), int(key & 0xFFFFFFFF)
            wanted = row[sel]
            order = np.argsort(wanted, kind="stable")
            wanted_sorted, dest = wanted[order], sel[order]
            for start, batch in self._iter_row_group(s, g):
                lo = np.searchsorted(wanted_sorted, start)
                hi = np.searchsorted(wanted_sorted, start + batch.num_rows)
                if hi > lo:
                    take = pa.array(wanted_sorted[lo:hi] - start)
                    feats = features_to_numpy(batch.column(0).take(take), self.num_patches, self.feature_dim)
                    out[dest[lo:hi]] = feats
                if hi == len(wanted_sorted):
                    break
