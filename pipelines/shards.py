"""Even, deterministic Parquet shards.

Beam's WriteToParquet shards by bundle, which gives uneven or empty shards and buffers whole tables.
Here the light keys are ranked globally first (ids only, never features), so shard i holds exactly the
rows ranked [i*n/S, (i+1)*n/S): every shard has the same number of rows give or take one, rows are
sorted by key inside it, and the same catalog always gives the same files. The heavy columns are
computed after the grouping and streamed to the file in row groups, so memory stays flat however
large the catalog grows.
"""
from __future__ import annotations

import bisect
import math
import typing

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fashionbert.data import storage


class Sharded(typing.NamedTuple):
    shard: int
    num_shards: int
    total: int
    item: typing.Any


def shard_of(rank: int, total: int, num_shards: int) -> int:
    return rank * num_shards // total


class AssignShards(beam.PTransform):
    """PCollection[item] -> PCollection[Sharded], grouped by shard and sorted by `key_fn` within it."""

    def __init__(self, key_fn, rows_per_shard: int):
        super().__init__()
        self.key_fn, self.rows_per_shard = key_fn, rows_per_shard

    def expand(self, items):
        key_fn, per_shard = self.key_fn, self.rows_per_shard
        sorted_keys = (
            items
            | "Keys" >> beam.Map(key_fn)
            | "AllKeys" >> beam.combiners.ToList()
            | "Sort" >> beam.Map(sorted)
        )

        def assign(item, keys):
            total = len(keys)
            num_shards = max(1, math.ceil(total / per_shard))
            return shard_of(bisect.bisect_left(keys, key_fn(item)), total, num_shards), (num_shards, total, item)

        def expand_shard(kv):
            shard, members = kv
            members = sorted(members, key=lambda m: key_fn(m[2]))
            for num_shards, total, item in members:
                yield Sharded(shard, num_shards, total, item)

        return (
            items
            | "Assign" >> beam.Map(assign, keys=beam.pvalue.AsSingleton(sorted_keys))
            | "GroupShards" >> beam.GroupByKey()
            | "Expand" >> beam.FlatMap(expand_shard)
        )


@beam.ptransform_fn
def ReadShardFiles(pbegin, folder: str, kind: str, read: beam.PTransform):  # noqa: N802 - a PTransform
    """An output folder's `{kind}-*.parquet` files -> what `read` makes of each path. The workers list and read the
    files (one per element, spread over them) through `storage`, so nothing of them passes through the driver or
    the job graph."""
    return (
        pbegin
        | "Folder" >> beam.Create([folder])
        | "List" >> beam.FlatMap(lambda f: storage.glob(f, f"{kind}-*.parquet"))
        | "Spread" >> beam.Reshuffle()
        | "Read" >> read
    )


def rows_to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    arrays = []
    for field in schema:
        values = [r[field.name] for r in rows]
        if pa.types.is_fixed_size_list(field.type):
            flat = np.concatenate([np.asarray(v, dtype=np.float16).ravel() for v in values]) if values else \
                np.zeros(0, np.float16)
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(flat, type=field.type.value_type),
                                                            field.type.list_size))
        else:
            arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def shard_file_name(kind: str, shard: int, num_shards: int) -> str:
    return f"{kind}-{shard:05d}-of-{num_shards:05d}.parquet"


class WriteShardRows(beam.DoFn):
    """Streams Sharded rows into one zstd Parquet file per shard under `folder`.

    A shard's rows come from one grouped element, so they all arrive in one bundle, in key order; a
    retried bundle rewrites its files from scratch. Emits (kind, file name, rows) per file written.
    """

    def __init__(self, folder: str, kind: str, schema: pa.Schema, row_group_rows: int = 128):
        self.folder, self.kind, self.schema, self.row_group_rows = folder, kind, schema, row_group_rows

    def _dictionary_columns(self) -> list[str]:
        # Dictionary-encoding 82k-value feature vectors never pays off and tripled the write time.
        return [f.name for f in self.schema if not pa.types.is_fixed_size_list(f.type)]

    def start_bundle(self):
        self._writers: dict[int, tuple[pq.ParquetWriter, str, list]] = {}
        self._counts: dict[int, int] = {}

    def process(self, element: Sharded):
        shard = element.shard
        if shard not in self._writers:
            # Shards arrive one after another: a new one means the others in this bundle are complete.
            for done in list(self._writers):
                self._close(done)
            name = shard_file_name(self.kind, shard, element.num_shards)
            fh = storage.create(storage.join(self.folder, name))
            writer = pq.ParquetWriter(fh, self.schema, compression="zstd", use_dictionary=self._dictionary_columns())
            self._writers[shard] = (writer, fh, [])
            self._counts[shard] = 0
        writer, _, buffer = self._writers[shard]
        buffer.append(element.item)
        self._counts[shard] += 1
        if len(buffer) >= self.row_group_rows:
            writer.write_table(rows_to_table(buffer, self.schema))
            buffer.clear()

    def _close(self, shard: int) -> None:
        writer, fh, buffer = self._writers.pop(shard)
        if buffer:
            writer.write_table(rows_to_table(buffer, self.schema))
        writer.close()
        fh.close()

    def finish_bundle(self):
        for shard in list(self._writers):
            self._close(shard)
