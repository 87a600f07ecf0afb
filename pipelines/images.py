"""Image stages: read + hash, reconcile with the previous run, decode to squares, run the patch CNN.

The pure work lives in `decode.py` and `fashionbert.model.patch_cnn`; these DoFns only move elements, count
them (Beam metrics) and turn `RejectError`s into reject rows on a tagged output.
"""
from __future__ import annotations

import dataclasses
import hashlib
import threading

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from . import storage
from .catalog import CatalogRow
from .config import FeaturizeConfig
from .decode import decode_array, decode_image, fit_square
from .rejects import Reject, RejectError
from .shards import Sharded

REJECTS = "rejects"
NS = "featurize"


def reject_of(row: CatalogRow, stage: str, reason: str, detail: str) -> Reject:
    Metrics.counter(NS, f"rejected_{reason}").inc()
    return Reject(source=row.source, stage=stage, reason=reason, detail=detail, row=row.row,
                  image_id=row.image_id or None, product_id=row.product_id or None)


class ImageReader:
    """Encoded bytes (files, synthetic PNGs) or a uint8 array (Fashion-Gen HDF5 pixels) for a row.

    Keeps the last HDF5 file open: rows arrive grouped by shard and sorted, so re-opening the file for
    every image (costly on remote storage) is avoided.
    """

    def __init__(self):
        self._h5_path = None
        self._h5 = None

    def read(self, row: CatalogRow):
        if row.synth_ref is not None:
            from fashionbert.data import synth

            return synth.render_product(*row.synth_ref).image_bytes
        if row.h5_ref is not None:
            return self._h5_pixels(*row.h5_ref)
        try:
            with FileSystems.open(row.image_uri) as fh:
                return fh.read()
        except (OSError, IOError) as exc:
            raise RejectError("missing-file", f"{row.image_uri}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - every FileSystems backend raises its own types
            raise RejectError("unreadable-file", f"{row.image_uri}: {type(exc).__name__}: {exc}") from exc

    def _h5_pixels(self, path: str, index: int) -> np.ndarray:
        import h5py

        if self._h5_path != path:
            self.close()
            self._fh = FileSystems.open(path)
            self._h5 = h5py.File(self._fh, "r")
            self._h5_path = path
        return np.asarray(self._h5["input_image"][index])

    def close(self):
        if self._h5 is not None:
            self._h5.close()
            self._fh.close()
        self._h5_path = self._h5 = None


def content_sha256(data) -> str:
    raw = data.tobytes() if isinstance(data, np.ndarray) else data
    return hashlib.sha256(raw).hexdigest()


def content_hash(sha: str, fingerprint: str) -> str:
    return hashlib.sha256(f"{sha}:{fingerprint}".encode()).hexdigest()


class _ReadsImages(beam.DoFn):
    """A DoFn holding one ImageReader per worker (its open HDF5 handle is reused across elements)."""

    def __init__(self, cfg: FeaturizeConfig):
        self.cfg = cfg

    def setup(self):
        self.reader = ImageReader()

    def teardown(self):
        self.reader.close()


class HashImages(_ReadsImages):
    """Rows with a catalog problem -> rejects; readable images get their content sha256.

    Bytes are read here and again in DecodeImages: re-reading a 30 KB JPEG costs far less than carrying
    every image's bytes through the shuffle, and lets unchanged rows skip decoding entirely.
    """

    def process(self, row: CatalogRow):
        Metrics.counter(NS, "catalog_rows").inc()
        if row.problem:
            yield beam.pvalue.TaggedOutput(REJECTS, reject_of(row, "catalog", *row.problem))
            return
        try:
            data = self.reader.read(row)
        except RejectError as err:
            yield beam.pvalue.TaggedOutput(REJECTS, reject_of(row, "read", err.reason, err.detail))
            return
        if len(data) == 0:
            yield beam.pvalue.TaggedOutput(REJECTS, reject_of(row, "read", "empty-file", "the file has 0 bytes"))
            return
        row = dataclasses.replace(row, content_sha256=content_sha256(data))
        yield row


@dataclasses.dataclass(frozen=True)
class PreviousImage:
    content_hash: str
    file: str
    index: int  # row index within the file


@dataclasses.dataclass
class PlannedImage:
    """An accepted, de-duplicated row and what to do with it: compute, or carry `previous` over."""
    row: CatalogRow
    content_hash: str
    previous: PreviousImage | None = None


class ReconcileImages(beam.DoFn):
    """(image_id, {'current': rows, 'previous': [PreviousImage]}) -> PlannedImage | reject.

    The first catalog row of an id wins (stable under reruns); later rows with the same id are rejected.
    """

    def __init__(self, cfg: FeaturizeConfig):
        self.fingerprint = cfg.image_fingerprint()

    def process(self, kv):
        _, groups = kv
        current = sorted(groups["current"], key=lambda r: r.row)
        previous = list(groups["previous"])
        if not current:
            Metrics.counter(NS, "images_deleted").inc()
            return
        first, *dups = current
        for dup in dups:
            yield beam.pvalue.TaggedOutput(REJECTS, reject_of(
                dup, "catalog", "duplicate-image-id",
                f"image id {dup.image_id!r} already used by catalog row {first.row} ({first.source})"))
        chash = content_hash(first.content_sha256, self.fingerprint)
        prev = previous[0] if previous else None
        if prev is not None and prev.content_hash == chash:
            Metrics.counter(NS, "images_carried").inc()
            yield PlannedImage(first, chash, prev)
        else:
            Metrics.counter(NS, "images_changed" if prev is not None else "images_new").inc()
            yield PlannedImage(first, chash)


class DecodeImages(_ReadsImages):
    """Sharded[PlannedImage] -> (Sharded, square uint8 | None, (w, h)); carried rows skip decoding."""

    def process(self, element: Sharded):
        plan: PlannedImage = element.item
        if plan.previous is not None:
            yield element, None, None
            return
        row = plan.row
        try:
            data = self.reader.read(row)
            img = decode_array(data) if isinstance(data, np.ndarray) else decode_image(data, max_pixels=self.cfg.max_pixels)
            size = img.size
            square = fit_square(img, self.cfg.image_size, self.cfg.fit)
        except RejectError as err:
            yield beam.pvalue.TaggedOutput(REJECTS, reject_of(row, "decode", err.reason, err.detail))
            return
        yield element, square, size


class _PreviousFeatures:
    """Reads carried-over features from the previous run's shards, one row group at a time.

    Rows are visited in image-id order and the previous shards are sorted the same way, so consecutive
    lookups almost always hit the cached row group.
    """

    def __init__(self):
        self._key = None
        self._table = None
        self._file = self._file_path = None

    def get(self, prev: PreviousImage) -> dict:
        import pyarrow.parquet as pq

        if self._file_path != prev.file:
            if self._file is not None:
                self._file.close()
            self._file, self._file_path = storage.open_read(prev.file), prev.file
        pf = pq.ParquetFile(self._file)
        start = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if prev.index < start + n:
                break
            start += n
        if self._key != (prev.file, g):
            self._table = pf.read_row_group(g, columns=["features", "width", "height"])
            self._key = (prev.file, g)
        i = prev.index - start
        feats = self._table.column("features").chunk(0) if self._table.column("features").num_chunks == 1 else \
            self._table.column("features").combine_chunks()
        values = feats.values.to_numpy(zero_copy_only=False)
        size = feats.type.list_size
        return {
            "features": values[i * size:(i + 1) * size],
            "width": self._table.column("width")[i].as_py(),
            "height": self._table.column("height")[i].as_py(),
        }


_progress_lock = threading.Lock()
_progress_bars: dict[str, object] = {}


def _shared_bar(key: str, total: int):
    # Beam makes one DoFn instance per worker thread; one bar per run needs one object per process.
    with _progress_lock:
        if key not in _progress_bars:
            from tqdm import tqdm

            _progress_bars[key] = tqdm(total=total, unit="img", desc="featurize images", dynamic_ncols=True)
        return _progress_bars[key]


def close_progress(key: str) -> None:
    with _progress_lock:
        bar = _progress_bars.pop(key, None)
    if bar is not None:
        bar.close()


class EmbedPatches(beam.DoFn):
    """Batches of decoded squares -> Sharded image rows with float16 patch features.

    The CNN is loaded once per worker (setup) and run on whole batches under bf16 autocast; torch gets
    the cores divided by the worker threads so workers do not oversubscribe the CPU.
    """

    def __init__(self, cfg: FeaturizeConfig, torch_threads: int, progress_key: str | None = None):
        self.cfg, self.torch_threads, self.progress_key = cfg, torch_threads, progress_key

    def setup(self):
        import torch

        from fashionbert.model.patch_cnn import PatchCNN

        torch.set_num_threads(max(1, self.torch_threads))
        cfg = self.cfg
        self.model = PatchCNN(cfg.cnn, cfg.patch_mode, cfg.grid, cfg.image_size, cfg.patch_size)
        self.previous = _PreviousFeatures()
        self.computed = Metrics.counter(NS, "images_computed")
        self.cnn_ms = Metrics.distribution(NS, "cnn_batch_ms")

    def process(self, batch):
        import time

        from fashionbert.model.patch_cnn import run_batched

        squares = [(i, sq) for i, (_, sq, _) in enumerate(batch) if sq is not None]
        feats = {}
        if squares:
            t0 = time.perf_counter()
            out = run_batched(self.model, np.stack([sq for _, sq in squares]), self.cfg.precision)
            self.cnn_ms.update(int((time.perf_counter() - t0) * 1000))
            self.computed.inc(len(squares))
            feats = {i: out[k].astype(np.float16).ravel() for k, (i, _) in enumerate(squares)}
        for i, (element, _, size) in enumerate(batch):
            plan: PlannedImage = element.item
            row = plan.row
            if i in feats:
                values = {"features": feats[i], "width": size[0], "height": size[1]}
            else:
                values = self.previous.get(plan.previous)
            yield element._replace(item={
                "image_id": row.image_id, "product_id": row.product_id, "source": row.source,
                "content_sha256": row.content_sha256, "content_hash": plan.content_hash,
                "grid": self.cfg.grid, "cnn": self.cfg.cnn, "patch_mode": self.cfg.patch_mode, **values,
            })
        if self.progress_key:
            _shared_bar(self.progress_key, batch[0][0].total).update(len(batch))


def previous_image_index(previous_dir: str):
    """(image_id, PreviousImage) for every row of an earlier output's image shards (light columns only)."""
    from schemas import read_table

    for path in storage.glob(previous_dir, "images-*.parquet"):
        with storage.open_read(path) as fh:
            table = read_table(fh, "images", columns=["image_id", "content_hash"], where=path)
        for i, (iid, chash) in enumerate(zip(table.column("image_id").to_pylist(),
                                             table.column("content_hash").to_pylist())):
            yield iid, PreviousImage(chash, path, i)
