"""The last pass of prepare-data: each bucket of a split, read from the spill files, permuted, written as shards.

A bucket's rows are read in a fixed order (input by input, run by run) and permuted by a generator
seeded with (seed, split, bucket), then written as Parquet files `part-BBBBB-FFFFF.parquet` of
`rows_per_shard` rows. Every row went to a bucket by a hash (spill.py), so random bucket then random
order within it is a uniform shuffle of the whole split, at the memory of one bucket, and the shards
are a function of the data and the seed whatever the number of workers. The same function runs in
this process or as a task of a Ray Data pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ercstudy.platform.data.spill import Segment, read_segments
from ercstudy.trainables.shards import ROW_GROUP_ROWS, join


@dataclass(frozen=True)
class Output:
    """Where the shards go (sent once to each worker)."""

    fs: Any  # the destination's pyarrow filesystem, which holds the spill files too
    root: str
    width: int  # tokens per row
    rows_per_shard: int
    seed: int


@dataclass(frozen=True)
class Bucket:
    split: int  # packing.SPLITS index
    name: str  # the split's directory: train, eval
    number: int
    segments: tuple[Segment, ...]  # its rows in the spill files, input by input


class ShardWriter:
    """Parquet files of one split, written a row group at a time: files of `rows_per_shard` rows named
    `{prefix}{n:05d}.parquet`, groups of ROW_GROUP_ROWS."""

    def __init__(self, fs: Any, root: str, width: int, rows_per_shard: int, *, prefix: str = "part-"):
        import pyarrow as pa

        self.fs, self.root, self.width, self.rows_per_shard, self.prefix = fs, root, width, rows_per_shard, prefix
        fs.create_dir(root, recursive=True)
        self.schema = pa.schema([("tokens", pa.list_(pa.int32(), width)), ("domain", pa.int32())])
        self.pending: list[np.ndarray] = []  # rows not yet written: fewer than one row group
        self.buffered = 0
        self.writer, self.in_file, self.files = None, 0, 0

    def _room(self) -> int:
        """Rows of the next row group: a full one, or what the current file has left."""
        return min(ROW_GROUP_ROWS, self.rows_per_shard - self.in_file)

    def add(self, rows: np.ndarray) -> None:
        """Rows [n, width + 1]: tokens, then the domain (copied: no view of the caller's array is kept)."""
        self.pending.append(rows.copy())
        self.buffered += len(rows)
        while self.buffered >= self._room():
            self._flush(self._room())

    def close(self) -> None:
        while self.buffered:
            self._flush(min(self._room(), self.buffered))
        if self.writer is not None:
            self.writer.close()
            self.writer, self.in_file = None, 0

    def _flush(self, take: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        stack = np.concatenate(self.pending)
        rows, self.pending = stack[:take], [stack[take:]]
        self.buffered -= take
        if self.writer is None:
            path = join(self.root, f"{self.prefix}{self.files:05d}.parquet")
            self.writer = pq.ParquetWriter(path, self.schema, filesystem=self.fs)
            self.files += 1
        flat = pa.array(np.ascontiguousarray(rows[:, : self.width]).ravel(), type=pa.int32())
        table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(flat, self.width),
                          "domain": pa.array(rows[:, self.width], type=pa.int32())}, schema=self.schema)
        self.writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self.in_file += take
        if self.in_file >= self.rows_per_shard:
            self.writer.close()
            self.writer, self.in_file = None, 0


def write_bucket(out: Output, bucket: Bucket) -> dict[str, Any]:
    """Read, permute and write one bucket; {"split", "rows", "files"}."""
    rows = read_segments(out.fs, list(bucket.segments), out.width)
    np.random.default_rng([out.seed, 2, bucket.split, bucket.number]).shuffle(rows)  # in place: no permuted copy
    writer = ShardWriter(out.fs, join(out.root, bucket.name), out.width, out.rows_per_shard, prefix=f"part-{bucket.number:05d}-")
    for j in range(0, len(rows), ROW_GROUP_ROWS):  # a row group at a time: no copy of the bucket
        writer.add(rows[j : j + ROW_GROUP_ROWS])
    writer.close()
    return {"split": bucket.split, "rows": len(rows), "files": writer.files}
