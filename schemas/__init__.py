"""Parquet schemas: the single source of truth for every table the system reads or writes.

Every file carries its schema name and version in the Parquet key-value metadata. Readers call
`read_table` / `validate_schema`, which refuse a file whose schema differs, naming the file and the
difference, so a downstream system never silently reads a table of the wrong shape.

Only pyarrow is imported here: the GPU stage (torch + pyarrow only) reads these contracts too.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = "1"
META_NAME = b"fashionbert.schema"
META_VERSION = b"fashionbert.schema_version"
META_GRID = b"fashionbert.grid"
META_FEATURE_DIM = b"fashionbert.feature_dim"
META_MODEL_VERSION = b"fashionbert.model_version"
META_PRECISION = b"fashionbert.precision"


class SchemaError(ValueError):
    """A Parquet file does not have the schema this system expects."""


def _with_meta(name: str, fields: list[pa.Field], extra: dict[bytes, bytes] | None = None) -> pa.Schema:
    meta = {META_NAME: name.encode(), META_VERSION: SCHEMA_VERSION.encode()}
    meta.update(extra or {})
    return pa.schema(fields, metadata=meta)


def images_schema(grid: int, feature_dim: int) -> pa.Schema:
    """One row per accepted catalog image; `features` is the grid*grid x feature_dim patch matrix,
    row-major (patch index = row * grid + col), flattened, float16."""
    n = grid * grid * feature_dim
    return _with_meta(
        "images",
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("product_id", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("content_sha256", pa.string(), nullable=False),
            pa.field("content_hash", pa.string(), nullable=False),
            pa.field("width", pa.int32(), nullable=False),
            pa.field("height", pa.int32(), nullable=False),
            pa.field("grid", pa.int16(), nullable=False),
            pa.field("cnn", pa.string(), nullable=False),
            pa.field("patch_mode", pa.string(), nullable=False),
            pa.field("features", pa.list_(pa.float16(), n), nullable=False),
        ],
        {META_GRID: str(grid).encode(), META_FEATURE_DIM: str(feature_dim).encode()},
    )


TEXTS = _with_meta(
    "texts",
    [
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("category", pa.string()),
        pa.field("subcategory", pa.string()),
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
    ],
)

# Training-only alternative texts of products (featurize --text-variants): the columns of `texts`, one row per distinct
# (product_id, text) that is not also one of the product's `texts` rows. Training draws one of a product's texts per
# pass from both tables; scoring, validation and every ranked table use `texts` alone.
TEXT_VARIANTS = _with_meta("text_variants", list(TEXTS))

REJECTS = _with_meta(
    "rejects",
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("row", pa.int64()),
        pa.field("image_id", pa.string()),
        pa.field("product_id", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
    ],
)


# A feature folder's `_dead_image_rows.parquet`: rows of its image files that readers skip. Incremental featurize
# hard-links the previous run's image files instead of copying their rows; the rows of those files that are no
# longer live (deleted, changed or re-owned images) are listed here. No such file: every row is live.
DEAD_IMAGE_ROWS = _with_meta(
    "dead_image_rows",
    [
        pa.field("file", pa.string(), nullable=False),  # an images-*.parquet file name in the same folder
        pa.field("row", pa.int64(), nullable=False),  # 0-based row index within that file
    ],
)

RETRIEVAL = _with_meta(
    "retrieval",
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("query_kind", pa.string(), nullable=False),  # "text" (a product_id) or "image" (an image_id)
        pa.field("rank", pa.int32(), nullable=False),  # 1-based, by `score`
        pa.field("candidate_id", pa.string(), nullable=False),  # image_id for text queries, product_id for image ones
        pa.field("score", pa.float32(), nullable=False),  # P(aligned): the model's ranking score (fashionbert/model/score_fusion.py)
        pa.field("recall_score", pa.float32(), nullable=False),  # dual-encoder cosine from the recall stage
        pa.field("stage", pa.string(), nullable=False),  # "rerank" (scored by the cross-encoder) or "recall" (the model's fusion gives TIA no weight: ranked by the calibrated recall cosine alone)
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ],
)

PAIR_REJECTS = _with_meta(
    "pair_rejects",
    [
        pa.field("row", pa.int64(), nullable=False),  # 0-based row of the input pairs file
        pa.field("product_id", pa.string()),
        pa.field("image_id", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
    ],
)

# `fashionbert explain`'s token -> patch attention maps (fashionbert/model/attention.py says what they are): one row per
# explained pair. Patch lists are grid x grid values, row-major from the top-left patch; token lists are parallel.
ATTENTION = _with_meta(
    "attention",
    [
        pa.field("row", pa.int64(), nullable=False),  # 0-based row of the input pairs file
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),  # P(aligned), the ranking score (as score-pairs gives it)
        pa.field("tia_margin", pa.float32(), nullable=False),  # the TIA logit margin of the pass the maps come from
        pa.field("method", pa.string(), nullable=False),  # "last" (last layer) or "rollout"
        pa.field("picture", pa.string(), nullable=False),  # the PNG, relative to the output folder
        pa.field("patch_map", pa.list_(pa.float32()), nullable=False),  # sums to 1
        pa.field("tokens", pa.list_(pa.string()), nullable=False),  # the text's word tokens (WordPiece)
        pa.field("token_image_mass", pa.list_(pa.float32()), nullable=False),  # per token: its attention's share on
        # the patches
        pa.field("token_patch_maps", pa.list_(pa.list_(pa.float32())), nullable=False),  # per token, sums to 1
    ],
)

# What retrieve and evaluate computed, for the next run of the same model (fashionbert/rank/score_cache.py): one row
# per pair (kind "pair": text_hash, image_hash, margin) and per embedding (kind "text": text_hash, vector; kind
# "image": image_hash, vector). Hashes are the featurize shards' content_hash. The metadata adds META_MODEL_VERSION
# and META_PRECISION: the scores hold for that model at that precision only.
SCORE_CACHE = _with_meta(
    "score_cache",
    [
        pa.field("kind", pa.string(), nullable=False),  # "pair", "text" or "image"
        pa.field("text_hash", pa.string()),
        pa.field("image_hash", pa.string()),
        pa.field("margin", pa.float32()),  # the cross-encoder's TIA logit margin
        pa.field("vector", pa.list_(pa.float32())),  # the L2-normalised recall embedding
    ],
)


def schema_name(schema: pa.Schema) -> str | None:
    meta = schema.metadata or {}
    name = meta.get(META_NAME)
    return name.decode() if name else None


def expected_for(schema: pa.Schema) -> pa.Schema:
    """The contract a file claims to follow, rebuilt from its own metadata (images carry their shape)."""
    name = schema_name(schema)
    if name == "texts":
        return TEXTS
    if name == "text_variants":
        return TEXT_VARIANTS
    if name == "rejects":
        return REJECTS
    if name == "retrieval":
        return RETRIEVAL
    if name == "pair_rejects":
        return PAIR_REJECTS
    if name == "score_cache":
        return SCORE_CACHE
    if name == "attention":
        return ATTENTION
    if name == "dead_image_rows":
        return DEAD_IMAGE_ROWS
    if name == "images":
        meta = schema.metadata
        try:
            return images_schema(int(meta[META_GRID]), int(meta[META_FEATURE_DIM]))
        except (KeyError, ValueError) as exc:
            raise SchemaError(f"images file metadata lacks grid/feature_dim ({exc})") from exc
    raise SchemaError(f"not a fashionbert table (schema name {name!r} in metadata)")


def validate_schema(actual: pa.Schema, expected_name: str, where: str) -> pa.Schema:
    """Raise SchemaError naming `where` unless `actual` is exactly the `expected_name` contract."""
    name = schema_name(actual)
    if name != expected_name:
        raise SchemaError(
            f"{where}: expected a fashionbert '{expected_name}' table, found schema name {name!r}; "
            f"point the option at a featurize output folder"
        )
    version = (actual.metadata or {}).get(META_VERSION, b"").decode()
    if version != SCHEMA_VERSION:
        raise SchemaError(
            f"{where}: schema version {version!r}, this code reads version {SCHEMA_VERSION}; "
            f"re-run featurize with this version (or use --previous only with matching versions)"
        )
    expected = expected_for(actual)
    if not actual.remove_metadata().equals(expected.remove_metadata()):
        diff = [
            f"{f.name}: {f.type}" for f in expected if f.name not in actual.names or actual.field(f.name).type != f.type
        ]
        raise SchemaError(f"{where}: columns differ from the '{expected_name}' contract: expected {diff}")
    return expected


def read_schema(source, expected_name: str, where: str | None = None) -> pa.Schema:
    """`source`: a path or an open binary file (e.g. from Beam's FileSystems); `where` names it in errors."""
    where = where or str(source)
    try:
        schema = pq.read_schema(source)
    except (OSError, pa.ArrowInvalid) as exc:
        raise SchemaError(f"{where}: not a readable Parquet file ({exc})") from exc
    return validate_schema(schema, expected_name, where)


def read_table(source, expected_name: str, columns: list[str] | None = None, where: str | None = None) -> pa.Table:
    pf = pq.ParquetFile(source)
    validate_schema(pf.schema_arrow, expected_name, where or str(source))
    return pf.read(columns=columns)
