"""Featurize options, parsed once into a frozen config that every stage reads.

Options Beam itself knows (--runner, --direct_num_workers, --project, --setup_file, ...) are not ours:
they pass through untouched to `PipelineOptions`, so the same command runs locally or on Dataflow/Flink.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json

from fashionbert.errors import UserError

CNN_NAMES = ("efficientnet-lite0", "efficientnet-lite2")  # fashionbert/model/patch_cnn.py's CNNS, without importing torch
PRECISIONS = ("auto", "bf16", "fp32")  # auto is made concrete by `featurize.resolve_precision` before any row is hashed
FEATURIZE_VERSION = "1"  # bump when a change alters feature values: invalidates --previous carry-over


@dataclasses.dataclass(frozen=True)
class FeaturizeConfig:
    catalog: str
    out: str
    previous: str | None = None
    overwrite: bool = False
    compact: bool = False  # with --previous: rewrite every row instead of linking the previous run's image files
    shared_filesystem: bool = False  # local paths are mounted at the same place on every worker (`execution`)
    # manifest column mapping
    id_column: str = "product_id"
    image_column: str = "image"
    image_id_column: str = "image_id"
    text_columns: tuple[str, ...] = ("title", "description")
    # training-only alternative texts: each a tuple of columns joined like text_columns (text_variants-*.parquet)
    text_variants: tuple[tuple[str, ...], ...] = ()
    category_column: str | None = "category"
    subcategory_column: str | None = "subcategory"
    group_column: str | None = None
    # image features
    image_size: int = 256
    grid: int = 8
    fit: str = "pad"
    cnn: str = "efficientnet-lite0"
    patch_mode: str = "grid"
    patch_size: int = 64
    precision: str = "auto"
    batch_size: int = 32
    max_pixels: int = 40_000_000
    # text
    backbone: str = "minilm"
    max_text_len: int = 64
    # output
    images_per_shard: int = 1000
    rows_per_small_shard: int = 200_000
    hdf5_chunk_rows: int = 256
    progress: bool = True

    def check(self) -> None:
        """Refuses values no run can use; `featurize.run` calls it first, so a config built in code (nightly, the
        demo, tests) is held to the same rules as one parsed from the command line."""
        if not self.text_columns:
            raise UserError("--text-columns is empty; name at least one text column, e.g. --text-columns "
                            "title,description")
        if any(not cols for cols in self.text_variants):
            raise UserError(f"--text-variants {format_variants(self.text_variants)!r} has an empty variant; give "
                            f"comma-separated columns per variant, variants separated by ';', e.g. "
                            f"--text-variants 'type,colour;colour,title'")
        for name in ("image_size", "grid", "patch_size", "batch_size", "max_pixels", "max_text_len",
                     "images_per_shard"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be a positive number, got {getattr(self, name)}")
        if self.image_size % self.grid:
            raise UserError(f"--image-size {self.image_size} must be divisible by --grid {self.grid} (e.g. 256 and 8)")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.max_text_len < 3:
            raise UserError("--max-text-len must be at least 3 ([CLS], one token, [SEP])")

    def image_fingerprint(self) -> str:
        """Everything that changes an image's features; part of each image row's content hash."""
        from fashionbert.model.patch_cnn import FEATURE_LAYOUT

        if self.precision == "auto":  # two machines would hash the same rows alike yet compute them differently
            raise ValueError("image_fingerprint of an unresolved --precision auto; featurize.resolve_precision first")
        keys = ("image_size", "grid", "fit", "cnn", "patch_mode", "patch_size", "precision")
        return _fingerprint({"v": FEATURIZE_VERSION, "layout": FEATURE_LAYOUT, **{k: getattr(self, k) for k in keys}})

    def text_fingerprint(self) -> str:
        return _fingerprint({"v": FEATURIZE_VERSION, "backbone": self.backbone, "max_text_len": self.max_text_len})

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def parse_variants(value: str) -> tuple[tuple[str, ...], ...]:
    """'a,b;c' -> (('a', 'b'), ('c',)); '' -> (). An empty variant ('a;;b') is kept, for `check` to name."""
    if not value.strip():
        return ()
    return tuple(tuple(c.strip() for c in part.split(",") if c.strip()) for part in value.split(";"))


def format_variants(variants) -> str:
    return ";".join(",".join(cols) for cols in variants)


def _fingerprint(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


CATALOG_HELP = ("catalog source: a manifest (.csv, .jsonl, .parquet; one row per image), a Fashion-Gen .h5 file, "
                "or synthetic:N for N generated products")


def add_arguments(parser: argparse.ArgumentParser, with_outputs: bool = True) -> None:
    """All featurize options; `with_outputs=False` leaves out --catalog/--out/--previous/--overwrite for
    commands (nightly, backfill) that decide those themselves."""
    d = FeaturizeConfig("", "")
    if with_outputs:
        p = parser.add_argument_group("inputs and outputs")
        p.add_argument("--catalog", required=True, help=CATALOG_HELP)
        p.add_argument("--out", required=True, help="output folder (published atomically with a _SUCCESS marker)")
        p.add_argument("--previous", help="an earlier featurize output: unchanged rows are carried over, not recomputed")
        p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds an output")
    m = parser.add_argument_group("manifest columns")
    m.add_argument("--id-column", default=d.id_column, help="product id column (default %(default)s)")
    m.add_argument("--image-column", default=d.image_column,
                   help="image path column: relative to the manifest's folder, absolute, or a URI Beam's "
                        "FileSystems reads (default %(default)s)")
    m.add_argument("--image-id-column", default=d.image_id_column,
                   help="image id column; when the manifest lacks it the image column's value (the path as "
                        "written) is the id (default %(default)s)")
    m.add_argument("--text-columns", default=",".join(d.text_columns),
                   help="comma-separated text columns, joined with '. ' in this order (default %(default)s)")
    m.add_argument("--text-variants", default="", metavar="COLS;COLS...",
                   help="more texts per product for training only, each a comma-separated list of columns joined as "
                        "--text-columns are, variants separated by ';' (e.g. 'product_type,colour,description;"
                        "colour,title'): written to text_variants-*.parquet; training draws one of a product's texts "
                        "per pass, scoring uses --text-columns' text alone. A variant whose columns are all empty, or "
                        "that equals the product's text, is not written (default: none)")
    m.add_argument("--category-column", default=d.category_column, help="category column, optional (default %(default)s)")
    m.add_argument("--subcategory-column", default=d.subcategory_column,
                   help="sub-category column, optional; training draws hard negatives within it (default %(default)s)")
    m.add_argument("--group-column", default=None,
                   help="column whose value keeps related products on one side of a train/validation split "
                        "(e.g. product_code for colour variants); default: the id column")
    f = parser.add_argument_group("image features")
    f.add_argument("--image-size", type=int, default=d.image_size, help="square input size in px (default %(default)s)")
    f.add_argument("--grid", type=int, default=d.grid, help="patch grid per side (default %(default)s: 8x8=64 patches)")
    f.add_argument("--fit", choices=("pad", "crop"), default=d.fit,
                   help="how a non-square photo becomes square: pad keeps the whole product (default), crop "
                        "centre-crops")
    f.add_argument("--cnn", choices=CNN_NAMES, default=d.cnn,
                   help="patch network (packaged ImageNet weights; default %(default)s)")
    f.add_argument("--patch-mode", choices=("grid", "patch"), default=d.patch_mode,
                   help="grid: one CNN pass per image pooled to the grid (fast); patch: every patch through the "
                        "CNN on its own, as in the paper (default %(default)s)")
    f.add_argument("--patch-size", type=int, default=d.patch_size,
                   help="px each patch is resized to in patch mode (default %(default)s)")
    f.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="CNN arithmetic. bf16 autocast is ~2.6x faster than fp32 on CPUs with native bf16 (AVX512-BF16 "
                        "or AMX) and over 10x slower on CPUs without it, which emulate it. auto: with --previous, the "
                        "previous run's precision (its rows carry over; another precision recomputes every image); "
                        "else bf16 where this machine runs it natively, fp32 where it does not; on workers elsewhere "
                        "(Dataflow, Flink) bf16, so name fp32 for workers without native bf16 (default %(default)s)")
    f.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images per batch handed to the CNN; fp32 runs a batch 4 images a call "
                        "(`patch_cnn.FP32_CHUNK`) (default %(default)s)")
    f.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help="images declaring more pixels are rejected before decoding (default %(default)s)")
    t = parser.add_argument_group("text")
    t.add_argument("--backbone", default=d.backbone,
                   help="tokenizer source: 'minilm' (packaged) or a local BERT folder (default %(default)s)")
    t.add_argument("--max-text-len", type=int, default=d.max_text_len,
                   help="max tokens per text incl. [CLS]/[SEP] (default %(default)s)")
    o = parser.add_argument_group("output")
    o.add_argument("--images-per-shard", type=int, default=d.images_per_shard,
                   help="image rows per Parquet shard (default %(default)s, ~160 MB at 8x8x1280 fp16)")
    o.add_argument("--compact", action="store_true",
                   help="with --previous: write every image row into this run's own files instead of hard-linking "
                        "the previous run's image files (which featurize also does by itself once too many of their "
                        "rows are dead)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    r = parser.add_argument_group("runner (Beam's own options, e.g. --runner, pass through)")
    r.add_argument("--shared-filesystem", action="store_true",
                   help="on a runner whose workers run on other machines: the local catalog, output and previous "
                        "folders are mounted at the same place on every worker (NFS, a bucket mount); without it "
                        "such paths are refused")


def config_from_args(args: argparse.Namespace, **io) -> FeaturizeConfig:
    """`io` supplies catalog/out/previous/overwrite when the parser was built without them. Values are checked when
    the config runs (`FeaturizeConfig.check`)."""
    text_columns = tuple(c.strip() for c in args.text_columns.split(",") if c.strip())
    io = {"catalog": getattr(args, "catalog", None), "out": getattr(args, "out", None),
          "previous": getattr(args, "previous", None), "overwrite": getattr(args, "overwrite", False), **io}
    return FeaturizeConfig(
        **io,
        id_column=args.id_column, image_column=args.image_column, image_id_column=args.image_id_column,
        text_columns=text_columns, text_variants=parse_variants(args.text_variants),
        category_column=args.category_column or None, subcategory_column=args.subcategory_column or None,
        group_column=args.group_column or None,
        image_size=args.image_size, grid=args.grid, fit=args.fit, cnn=args.cnn, patch_mode=args.patch_mode,
        patch_size=args.patch_size, precision=args.precision, batch_size=args.batch_size,
        max_pixels=args.max_pixels, backbone=args.backbone, max_text_len=args.max_text_len,
        images_per_shard=args.images_per_shard, compact=args.compact, progress=not args.no_progress,
        shared_filesystem=args.shared_filesystem,
    )
