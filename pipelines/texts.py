"""Text stages: one row per distinct (product_id, text), tokenized with the backbone's fast WordPiece.

The same stages make the texts table (each catalog row's --text-columns text) and the text_variants table (its
--text-variants texts, `variant_rows`); `kind` names the table and its counters."""
from __future__ import annotations

import dataclasses
import hashlib

import apache_beam as beam
from apache_beam.metrics import Metrics

import schemas
from fashionbert.data import storage

from .catalog import CatalogRow
from .config import FeaturizeConfig
from .shards import ReadShardFiles, Sharded

NS = "featurize"


@dataclasses.dataclass
class PlannedText:
    product_id: str
    text: str
    category: str | None
    subcategory: str | None
    group_id: str
    content_hash: str
    previous_row: dict | None = None  # carried over as is


def text_hash(text: str, fingerprint: str) -> str:
    return hashlib.sha256(f"{text}\x00{fingerprint}".encode()).hexdigest()


def text_key(row: CatalogRow, fingerprint: str) -> tuple[str, str]:
    return row.product_id, text_hash(row.text, fingerprint)


def variant_rows(row: CatalogRow):
    """A catalog row -> one copy per --text-variants text, with that text as its `text`."""
    for text in row.variant_texts:
        yield dataclasses.replace(row, text=text, variant_texts=())


class ReconcileTexts(beam.DoFn):
    """((product_id, hash), {'current': rows, 'previous': [text rows]}) -> PlannedText.

    Several images of one product share its text: the first catalog row supplies the category fields.
    """

    def __init__(self, kind: str = "texts"):
        self.kind = kind

    def process(self, kv):
        (product_id, chash), groups = kv
        current = sorted(groups["current"], key=lambda r: r.row)
        previous = list(groups["previous"])
        if not current:
            Metrics.counter(NS, f"{self.kind}_deleted").inc()
            return
        first = current[0]
        plan = PlannedText(product_id, first.text, first.category, first.subcategory, first.group_id, chash)
        if previous:
            Metrics.counter(NS, f"{self.kind}_carried").inc()
            # Category fields are not part of the hash: take today's values, keep the tokens.
            plan.previous_row = {**previous[0], "category": first.category, "subcategory": first.subcategory,
                                 "group_id": first.group_id}
        else:
            Metrics.counter(NS, f"{self.kind}_computed").inc()
        yield plan


def tokenize_texts(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    """[CLS] tokens [SEP], truncated to max_len, unpadded (the trainer pads per batch)."""
    return tokenizer(texts, truncation=True, max_length=max_len, add_special_tokens=True)["input_ids"]


class TokenizeTexts(beam.DoFn):
    """Batches of Sharded[PlannedText] -> Sharded text rows. The tokenizer loads once per worker."""

    def __init__(self, cfg: FeaturizeConfig):
        self.cfg = cfg

    def setup(self):
        from fashionbert.model.backbone import load_tokenizer

        self.tokenizer = load_tokenizer(self.cfg.backbone)

    def process(self, batch: list[Sharded]):
        todo = [e for e in batch if e.item.previous_row is None]
        ids = {}
        if todo:
            tokens = tokenize_texts(self.tokenizer, [e.item.text for e in todo], self.cfg.max_text_len)
            ids = dict(zip((id(e) for e in todo), tokens))
        for e in batch:
            p: PlannedText = e.item
            row = p.previous_row or {
                "product_id": p.product_id, "text": p.text, "input_ids": ids[id(e)], "category": p.category,
                "subcategory": p.subcategory, "group_id": p.group_id, "content_hash": p.content_hash,
            }
            yield e._replace(item=row)


def ReadPreviousTexts(previous_dir: str, kind: str = "texts") -> beam.PTransform:  # noqa: N802 - a PTransform
    """An earlier output's `kind` files (texts or text_variants) -> ((product_id, content_hash), row), read by the
    workers."""
    return ReadShardFiles(previous_dir, kind, beam.FlatMap(previous_text_rows, kind))


def previous_text_rows(path: str, kind: str = "texts"):
    """((product_id, content_hash), row) for every row of one of an earlier output's texts (text_variants) files."""
    with storage.open_read(path) as fh:
        rows = schemas.read_table(fh, kind, where=path).to_pylist()
    for row in rows:
        yield (row["product_id"], row["content_hash"]), row
