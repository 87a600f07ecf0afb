"""Image stages: read + hash, reconcile with the previous run, link or write, decode to squares, run the patch CNN.

The pure work lives in `decode.py` and `fashionbert.model.patch_cnn`; these DoFns only move elements, count
them (Beam metrics) and turn `RejectError`s into reject rows on a tagged output.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import posixpath
import threading

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from fashionbert.data import storage

from .catalog import CatalogRow
from .config import FeaturizeConfig
from .decode import decode_array, decode_image, fit_square
from .rejects import Reject, RejectError
from .shards import ReadShardFiles, Sharded

REJECTS = "rejects"
LINKED = "linked"
NS = "featurize"
LINKS_HANDOFF = "_linked_rows.json"  # staging only: which previous rows the pipeline linked, for `finalize`

# Linked files keep the rows of images deleted, changed or re-owned since they were written: disk spent on
# nothing and rows every reader skips. Once they are over a quarter of the folder's image rows, one rewrite
# (what a backfill writes) is cheaper than carrying them on night after night; at a quarter the waste stays
# under a third of the live data.
COMPACT_DEAD_FRACTION = 0.25
# Each night adds its computed rows as new, mostly small files, and every reader opens every file. Rewrite
# when a chain of nights has left more than twice the files a fresh run would write; the slack keeps a small
# catalog (one fresh file) from being rewritten every other night.
COMPACT_FILE_FACTOR = 2
COMPACT_FILE_SLACK = 16


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
    product_id: str | None = None
    source: str | None = None
    file_rows: int = 0  # rows in the file, live or dead


@dataclasses.dataclass
class PlannedImage:
    """An accepted, de-duplicated row and what to do with it: compute, or carry `previous` over; `linkable` when
    the previous row is this row exactly (features and every light column), so its file can serve it as is."""
    row: CatalogRow
    content_hash: str
    previous: PreviousImage | None = None
    linkable: bool = False


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
            # A re-assigned or moved image keeps its features but not its row: it is written anew.
            same_row = (prev.product_id, prev.source) == (first.product_id, first.source)
            yield PlannedImage(first, chash, prev, linkable=same_row)
        else:
            Metrics.counter(NS, "images_changed" if prev is not None else "images_new").inc()
            yield PlannedImage(first, chash)


@dataclasses.dataclass(frozen=True)
class LinkDecision:
    link: bool  # serve linkable rows from the previous run's files, hard-linked; else rewrite every row
    compacted: str | None = None  # why linking was refused (the folder would degrade), None otherwise


def decide_links(planned: int, files: dict[str, tuple[int, int]], images_per_shard: int,
                 force_rewrite: bool = False) -> LinkDecision:
    """Link or rewrite, from the planned rows and, per previous file with a linkable row, (its rows, its linkable
    rows): linking is refused when it would leave the folder with too many dead rows or too many files."""
    if not files:
        return LinkDecision(False)
    if force_rewrite:
        return LinkDecision(False, "--compact")
    linked = sum(n for _, n in files.values())
    in_files = sum(rows for rows, _ in files.values())
    written = planned - linked
    dead = in_files - linked
    if dead > COMPACT_DEAD_FRACTION * (in_files + written):
        return LinkDecision(False, f"{dead} dead rows of {in_files + written} > {COMPACT_DEAD_FRACTION:.0%}")
    fresh_files = max(1, math.ceil(planned / images_per_shard))
    image_files = len(files) + math.ceil(written / images_per_shard)
    if image_files > COMPACT_FILE_FACTOR * fresh_files + COMPACT_FILE_SLACK:
        return LinkDecision(False, f"{image_files} image files > {COMPACT_FILE_FACTOR} x {fresh_files} + "
                                   f"{COMPACT_FILE_SLACK}")
    return LinkDecision(True)


class PlanLinks(beam.CombineFn):
    """PlannedImage -> one LinkDecision for the run (a side input of LinkOrWrite)."""

    def __init__(self, cfg: FeaturizeConfig):
        self.images_per_shard, self.force_rewrite = cfg.images_per_shard, cfg.compact

    def create_accumulator(self):
        return 0, {}  # planned rows, previous file -> [rows in it, linkable rows]

    def add_input(self, acc, plan: PlannedImage):
        planned, files = acc
        if plan.linkable:
            files.setdefault(plan.previous.file, [plan.previous.file_rows, 0])[1] += 1
        return planned + 1, files

    def merge_accumulators(self, accs):
        planned, files = 0, {}
        for n, part in accs:
            planned += n
            for f, (rows, linkable) in part.items():
                files.setdefault(f, [rows, 0])[1] += linkable
        return planned, files

    def extract_output(self, acc):
        planned, files = acc
        return decide_links(planned, {f: tuple(v) for f, v in files.items()}, self.images_per_shard,
                            self.force_rewrite)


class LinkOrWrite(beam.DoFn):
    """PlannedImage -> itself on LINKED (its previous file will serve it) or on the main output (rows to write)."""

    def setup(self):
        self.linked = Metrics.counter(NS, "images_linked")

    def process(self, plan: PlannedImage, decision: LinkDecision):
        if plan.linkable and decision.link:
            self.linked.inc()
            yield beam.pvalue.TaggedOutput(LINKED, plan)
        else:
            yield plan


def write_links_handoff(files: list, staging: str, decision: LinkDecision) -> None:
    """Records (previous file, its linked rows) for `finalize`, which links the files and lists their dead rows."""
    files = sorted(files)
    storage.write_text(storage.join(staging, LINKS_HANDOFF), json.dumps({
        "compacted": decision.compacted, "files": files}))


class RecordLinks(beam.PTransform):
    """Linked PlannedImages -> the staging folder's LINKS_HANDOFF file (written also when nothing was linked)."""

    def __init__(self, staging: str, decision):
        super().__init__()
        self.staging, self.decision = staging, decision

    def expand(self, linked):
        return (
            linked
            | "ByFile" >> beam.Map(lambda p: (p.previous.file, p.previous.index))
            | "GroupByFile" >> beam.GroupByKey()
            | "SortRows" >> beam.MapTuple(lambda f, rows: (f, sorted(rows)))
            | "AllFiles" >> beam.combiners.ToList()
            | "Write" >> beam.Map(write_links_handoff, self.staging, beam.pvalue.AsSingleton(self.decision))
        )


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
    # Beam makes one DoFn instance per worker thread; one bar per run needs one object per process. A bar on a
    # terminal, a log line every 30 s otherwise (a nightly run's log file).
    with _progress_lock:
        if key not in _progress_bars:
            from fashionbert.logs import progress

            _progress_bars[key] = progress(total, "featurize images", "img")
        return _progress_bars[key]


def close_progress(key: str) -> None:
    with _progress_lock:
        bar = _progress_bars.pop(key, None)
    if bar is not None:
        bar.close()


class EmbedPatches(beam.DoFn):
    """Batches of decoded squares -> Sharded image rows with float16 patch features.

    The CNN is loaded once per worker (setup) and run on whole batches at the run's --precision; torch gets
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


LIGHT_COLUMNS = ["image_id", "product_id", "source", "content_hash"]  # what reconciling needs; never features


def ReadPreviousImages(previous_dir: str) -> beam.PTransform:  # noqa: N802 - a PTransform, named like one
    """An earlier output's image files -> (image_id, PreviousImage) for each live row, read by the workers (light
    columns only, never features). Not `ReadFromParquet`: linking and dead-row records need each row's position in
    its file, which its records do not carry."""
    return ReadShardFiles(previous_dir, "images", beam.ParDo(_ReadPreviousFile(previous_dir)))


class _ReadPreviousFile(beam.DoFn):
    def __init__(self, previous_dir: str):
        self.previous_dir = previous_dir

    def setup(self):
        self.dead = read_dead_record(self.previous_dir)

    def process(self, path: str):
        yield from previous_file_index(path, self.dead.get(posixpath.basename(path), ()))


def read_dead_record(previous_dir: str) -> dict:
    """image file name -> its dead rows, from an earlier output's `_dead_image_rows.parquet`."""
    from fashionbert.data.features import DEAD_IMAGE_ROWS, read_dead_rows

    record = storage.join(previous_dir, DEAD_IMAGE_ROWS)
    if not storage.exists(record):  # absent in folders of runs that linked nothing, or made before linking
        return {}
    with storage.open_read(record) as fh:
        return read_dead_rows(fh, where=record)


def previous_file_index(path: str, dead_rows):
    """(image_id, PreviousImage) for every row of one image file not in `dead_rows` (light columns only)."""
    from schemas import read_table

    with storage.open_read(path) as fh:
        table = read_table(fh, "images", columns=LIGHT_COLUMNS, where=path)
    gone = set(np.asarray(dead_rows, dtype=np.int64).tolist())
    columns = [table.column(c).to_pylist() for c in LIGHT_COLUMNS]
    for i, (iid, pid, src, chash) in enumerate(zip(*columns)):
        if i not in gone:
            yield iid, PreviousImage(chash, path, i, pid, src, table.num_rows)
