"""Catalog sources -> `CatalogRow`s: one per catalog image, with its product's text.

Sources: a manifest (CSV, JSONL or Parquet; one row per image), a Fashion-Gen HDF5 file, or
`synthetic:N[:SEED]`. `inspect_catalog` runs in the driver before the pipeline is built, so a bad path
or a missing column fails at once with one clear message instead of deep inside a worker. Each source is
then read inside the pipeline in chunks (row ranges), so no single process ever holds the whole catalog.

Row-level problems (empty or non-UTF-8 text, missing id, a path escaping the catalog folder) do not stop
the run: the row carries a `problem` and becomes a reject downstream.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import posixpath
import re

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from fashionbert.errors import UserError

from .config import FeaturizeConfig

_SURROGATE = re.compile("[\udc80-\udcff]")
_SYNTH = re.compile(r"^synthetic:(\d+)(?::(\d+))?$")
SYNTH_CHUNK = 64


@dataclasses.dataclass
class CatalogRow:
    row: int
    source: str  # what a human looks up: the image path as written, or file.h5#row
    image_id: str
    product_id: str
    group_id: str
    text: str
    category: str | None = None
    subcategory: str | None = None
    variant_texts: tuple[str, ...] = ()  # --text-variants' texts: distinct, non-empty, none equal to `text`
    image_uri: str | None = None  # read through Beam's FileSystems
    h5_ref: tuple[str, int] | None = None  # (path, row) for Fashion-Gen pixels
    synth_ref: tuple[int, int] | None = None  # (seed, index): re-rendered, never shuffled as bytes
    problem: tuple[str, str] | None = None  # (reason, detail) -> reject
    content_sha256: str | None = None  # filled by the hashing stage


@dataclasses.dataclass(frozen=True)
class CatalogInfo:
    kind: str  # csv | jsonl | parquet | hdf5 | synthetic
    path: str
    chunks: tuple  # what each reader task reads


def _kind(path: str) -> str:
    lower = path.lower()
    for suffix, kind in ((".csv", "csv"), (".jsonl", "jsonl"), (".ndjson", "jsonl"), (".parquet", "parquet"),
                         (".h5", "hdf5"), (".hdf5", "hdf5")):
        if lower.endswith(suffix):
            return kind
    raise UserError(f"--catalog {path}: unknown catalog format; use a .csv, .jsonl, .parquet manifest, a "
                    f"Fashion-Gen .h5 file, or synthetic:N")


def inspect_catalog(cfg: FeaturizeConfig) -> CatalogInfo:
    """Validate the source and its columns; plan the chunks the pipeline reads."""
    m = _SYNTH.match(cfg.catalog)
    if m:
        _no_variants(cfg, "the synthetic catalog")
        n, seed = int(m.group(1)), int(m.group(2) or 0)
        chunks = tuple((seed, s, min(s + SYNTH_CHUNK, n)) for s in range(0, n, SYNTH_CHUNK))
        return CatalogInfo("synthetic", cfg.catalog, chunks)
    if cfg.catalog.startswith("synthetic"):
        raise UserError(f"--catalog {cfg.catalog}: write synthetic:N or synthetic:N:SEED, e.g. synthetic:500")
    kind = _kind(cfg.catalog)
    if not FileSystems.exists(cfg.catalog):
        raise UserError(f"--catalog {cfg.catalog}: no such file; check the path")
    if kind == "hdf5":
        _no_variants(cfg, "a Fashion-Gen file")
        return _inspect_hdf5(cfg)
    columns = _manifest_columns(cfg.catalog, kind)
    variant_columns = [c for cols in cfg.text_variants for c in cols if c not in cfg.text_columns]
    required = [cfg.id_column, cfg.image_column, *cfg.text_columns, *dict.fromkeys(variant_columns)]
    optional = {"--category-column": cfg.category_column, "--subcategory-column": cfg.subcategory_column,
                "--group-column": cfg.group_column}
    missing = [c for c in required if c not in columns]
    missing += [c for opt, c in optional.items() if c and c not in columns and opt == "--group-column"]
    if missing:
        raise UserError(
            f"--catalog {cfg.catalog}: column(s) {missing} not found; the manifest has {columns}. Map them with "
            f"--id-column, --image-column, --text-columns, --text-variants, --group-column"
        )
    if kind == "parquet":
        import pyarrow.parquet as pq

        with FileSystems.open(cfg.catalog) as fh:
            groups = pq.ParquetFile(fh).metadata.num_row_groups
        return CatalogInfo(kind, cfg.catalog, tuple(range(groups)))
    return CatalogInfo(kind, cfg.catalog, (0,))  # text manifests: one reader (quoted newlines defeat splitting)


def _no_variants(cfg: FeaturizeConfig, what: str) -> None:
    if cfg.text_variants:
        raise UserError(f"--text-variants: --catalog {cfg.catalog} is {what}, whose texts are fixed; text variants "
                        f"need a manifest (.csv, .jsonl, .parquet) with the columns they name: drop --text-variants")


def _manifest_columns(path: str, kind: str) -> list[str]:
    try:
        with FileSystems.open(path) as fh:
            if kind == "parquet":
                import pyarrow.parquet as pq

                return pq.ParquetFile(fh).schema_arrow.names
            head = fh.read(1 << 20).decode("utf-8-sig", errors="replace")
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad catalog file for the user
        raise UserError(f"--catalog {path}: cannot read it as {kind} ({exc})") from exc
    if kind == "csv":
        return next(csv.reader(io.StringIO(head)), [])
    first = head.split("\n", 1)[0]
    try:
        return list(json.loads(first))
    except ValueError as exc:
        raise UserError(f"--catalog {path}: first line is not a JSON object ({exc})") from exc


def _inspect_hdf5(cfg: FeaturizeConfig) -> CatalogInfo:
    import h5py

    needed = ("input_image", "input_name", "input_description", "input_productID")
    try:
        with FileSystems.open(cfg.catalog) as fh, h5py.File(fh, "r") as h5:
            missing = [k for k in needed if k not in h5]
            n = h5["input_image"].shape[0] if "input_image" in h5 else 0
    except OSError as exc:
        raise UserError(f"--catalog {cfg.catalog}: not a readable HDF5 file ({exc})") from exc
    if missing:
        raise UserError(f"--catalog {cfg.catalog}: HDF5 datasets {missing} missing; expected the Fashion-Gen layout")
    step = cfg.hdf5_chunk_rows
    return CatalogInfo("hdf5", cfg.catalog, tuple((s, min(s + step, n)) for s in range(0, n, step)))


# ---------------------------------------------------------------- row parsing (pure, unit-tested)

def _clean(value) -> str:
    return "" if value is None else str(value).strip()


def join_text(values: list) -> str:
    return ". ".join(v for v in (_clean(x) for x in values) if v)


def resolve_image(base_dir: str, ref: str) -> tuple[str | None, tuple[str, str] | None]:
    """(uri, problem). Relative paths must stay inside the catalog folder: a manifest must not be able
    to make the pipeline read /etc/passwd or another tenant's files."""
    if not ref:
        return None, ("missing-image-path", "the image column is empty")
    if "://" in ref or ref.startswith("/"):
        return ref, None
    norm = posixpath.normpath(ref.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        return None, ("path-outside-catalog", f"{ref!r} points outside the catalog folder {base_dir}")
    return FileSystems.join(base_dir, norm) if base_dir else norm, None


def row_from_record(cfg: FeaturizeConfig, base_dir: str, index: int, rec: dict) -> CatalogRow:
    """A manifest record (already str values, surrogate-escaped where bytes were not UTF-8) -> CatalogRow."""
    image_ref = _clean(rec.get(cfg.image_column))
    product_id = _clean(rec.get(cfg.id_column))
    image_id = _clean(rec.get(cfg.image_id_column)) if cfg.image_id_column in rec else image_ref
    group = _clean(rec.get(cfg.group_column)) if cfg.group_column else product_id
    text = join_text([rec.get(c) for c in cfg.text_columns])
    variants = [join_text([rec.get(c) for c in cols]) for cols in cfg.text_variants]
    row = CatalogRow(
        row=index, source=image_ref or f"{cfg.catalog}#row={index}", image_id=image_id, product_id=product_id,
        group_id=group or product_id, text=text,
        category=_clean(rec.get(cfg.category_column)) or None if cfg.category_column else None,
        subcategory=_clean(rec.get(cfg.subcategory_column)) or None if cfg.subcategory_column else None,
        variant_texts=tuple(dict.fromkeys(v for v in variants if v and v != text)),
    )
    fields = [product_id, image_id, text, row.category or "", row.subcategory or "", group, *variants]
    if any(_SURROGATE.search(v) for v in fields):
        row.problem = ("bad-text-encoding", "the row has bytes that are not valid UTF-8; re-export the manifest as UTF-8")
        row.text, row.variant_texts = _SURROGATE.sub("\ufffd", row.text), ()
        row.product_id, row.image_id = (_SURROGATE.sub("\ufffd", v) for v in (row.product_id, row.image_id))
        return row
    if not product_id:
        row.problem = ("missing-id", f"column {cfg.id_column!r} is empty")
        return row
    if not image_id:
        row.problem = ("missing-image-path", f"column {cfg.image_column!r} is empty")
        return row
    if not text:
        row.problem = ("empty-text", f"all text columns {list(cfg.text_columns)} are empty")
        return row
    row.image_uri, row.problem = resolve_image(base_dir, image_ref)
    return row


def read_text_manifest(cfg: FeaturizeConfig, data: bytes, kind: str):
    """Yield CatalogRows from CSV/JSONL bytes. Decoding with surrogateescape keeps a bad byte confined to
    its own row (which is rejected) instead of failing the whole file."""
    text = data.decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    base_dir = posixpath.dirname(cfg.catalog) if "://" in cfg.catalog else _local_dir(cfg.catalog)
    if kind == "csv":
        for i, rec in enumerate(csv.DictReader(io.StringIO(text, newline=""))):
            yield row_from_record(cfg, base_dir, i, rec)
        return
    for i, line in enumerate(line for line in text.splitlines() if line.strip()):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            yield CatalogRow(row=i, source=f"{cfg.catalog}#line={i + 1}", image_id="", product_id="", group_id="",
                             text="", problem=("bad-manifest-row", str(exc)))
            continue
        yield row_from_record(cfg, base_dir, i, rec)


def _local_dir(path: str) -> str:
    import os

    return os.path.dirname(os.path.abspath(path))


def read_parquet_group(cfg: FeaturizeConfig, group: int, offset_rows: list[int] | None = None):
    import pyarrow.parquet as pq

    with FileSystems.open(cfg.catalog) as fh:
        pf = pq.ParquetFile(fh)
        start = sum(pf.metadata.row_group(g).num_rows for g in range(group))
        table = pf.read_row_group(group)
    base_dir = posixpath.dirname(cfg.catalog) if "://" in cfg.catalog else _local_dir(cfg.catalog)
    for i, rec in enumerate(table.to_pylist()):
        yield row_from_record(cfg, base_dir, start + i, rec)


def _h5_str(value) -> str:
    v = value[0] if hasattr(value, "__len__") and not isinstance(value, (bytes, str)) else value
    return v.decode("latin-1") if isinstance(v, bytes) else str(v)


def read_hdf5_range(cfg: FeaturizeConfig, start: int, stop: int):
    """Rows [start, stop) of a Fashion-Gen file: text columns only; pixels are read later, per shard."""
    import h5py

    with FileSystems.open(cfg.catalog) as fh, h5py.File(fh, "r") as h5:
        cols = {k: h5[k][start:stop] for k in ("input_name", "input_description", "input_productID",
                                               "input_category", "input_subcategory", "input_pose") if k in h5}
    for j in range(stop - start):
        i = start + j
        pid = _h5_str(cols["input_productID"][j])
        pose = _h5_str(cols["input_pose"][j]) if "input_pose" in cols else str(i)
        text = join_text([_h5_str(cols["input_name"][j]), _h5_str(cols["input_description"][j])])
        row = CatalogRow(
            row=i, source=f"{cfg.catalog}#{i}", image_id=f"{pid}-{pose}", product_id=pid, group_id=pid, text=text,
            category=_h5_str(cols["input_category"][j]) if "input_category" in cols else None,
            subcategory=_h5_str(cols["input_subcategory"][j]) if "input_subcategory" in cols else None,
            h5_ref=(cfg.catalog, i),
        )
        if not text:
            row.problem = ("empty-text", "input_name and input_description are empty")
        yield row


def synthetic_rows(cfg: FeaturizeConfig, seed: int, start: int, stop: int):
    from fashionbert.data import synth

    for i in range(start, stop):
        p = synth.render_product(seed, i)
        yield CatalogRow(
            row=i, source=f"synthetic:{seed}:{i}", image_id=p.image_id, product_id=p.product_id,
            group_id=p.product_id, text=join_text([p.title, p.description]), category=p.category,
            subcategory=p.subcategory, synth_ref=(seed, i),
        )


class _ReadChunk(beam.DoFn):
    def __init__(self, cfg: FeaturizeConfig, kind: str):
        self.cfg, self.kind = cfg, kind

    def process(self, chunk):
        cfg, kind = self.cfg, self.kind
        if kind in ("csv", "jsonl"):
            with FileSystems.open(cfg.catalog) as fh:
                yield from read_text_manifest(cfg, fh.read(), kind)
        elif kind == "parquet":
            yield from read_parquet_group(cfg, chunk)
        elif kind == "hdf5":
            yield from read_hdf5_range(cfg, *chunk)
        else:
            yield from synthetic_rows(cfg, *chunk)


class ReadCatalog(beam.PTransform):
    """Planned chunks -> CatalogRows, redistributed so later stages run in parallel."""

    def __init__(self, cfg: FeaturizeConfig, info: CatalogInfo):
        super().__init__()
        self.cfg, self.info = cfg, info

    def expand(self, pbegin):
        return (
            pbegin
            | "Chunks" >> beam.Create(list(self.info.chunks))
            | "Read" >> beam.ParDo(_ReadChunk(self.cfg, self.info.kind))
            | "Redistribute" >> beam.Reshuffle()
        )
