"""The shuffle's intermediate files: an input's sequences of one split, on their way to the shards.

A spill file holds rows of `width + 1` int32 (the tokens, then the domain), raw, grouped by bucket:
bucket 0's rows, then bucket 1's, ..., so each bucket's rows of an input are one contiguous segment
that one range read fetches (local disk or an object store alike). A row's bucket is a hash of
(seed, input, split, its row number in the input): a function of the data alone, never of which
worker wrote it or when.

While an input is packed, its rows are held in runs of at most RUN_BYTES, each sorted by bucket and
appended to a file on the worker's local disk; at the end the runs are merged, bucket by bucket,
into the spill file where every worker reaches it (the output's filesystem).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

RUN_BYTES = 16 << 20  # at most this much of an input's rows is held before a run is sorted and written locally
MERGE_BYTES = 8 << 20  # the merge writes the spill file in pieces of about this size


def mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer, elementwise on uint64 (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def buckets_of(key: tuple[int, ...], first_row: int, rows: int, buckets: int) -> np.ndarray:
    """The bucket of rows first_row .. first_row + rows - 1 of the input and split that `key` names [rows] int64."""
    with np.errstate(over="ignore"):
        k = np.zeros(1, dtype=np.uint64)
        for part in key:
            k = mix(k ^ np.uint64(part))
        h = mix(np.arange(first_row, first_row + rows, dtype=np.uint64) ^ k)
    return (h % np.uint64(buckets)).astype(np.int64)


@dataclass(frozen=True)
class Segment:
    """Rows of one bucket in one spill file: `rows` rows from row `first`."""

    path: str
    first: int
    rows: int


class SpillFile:
    """One input's rows of one split: bucket-sorted runs on local disk, merged by `close()` into `path` on `fs`."""

    def __init__(self, fs: Any, path: str, width: int, buckets: int, key: tuple[int, ...], *, run_rows: int):
        self.fs, self.path, self.width, self.buckets, self.key, self.run_rows = fs, path, width, buckets, key, run_rows
        # the run being filled (tokens, then the domain), grown up to run_rows: a split of few rows holds little
        self.run = np.empty((min(run_rows, 64), width + 1), dtype=np.int32)
        self.buffered = self.rows = 0
        self.counts: list[np.ndarray] = []  # per run: rows per bucket [buckets]
        self.local = None  # the runs, on this worker's disk

    def add(self, rows: np.ndarray, domain: int) -> None:
        """Rows [n, width] of one domain (copied into the run: no view of them is kept)."""
        while len(rows):
            take = min(len(rows), len(self.run) - self.buffered)
            self.run[self.buffered : self.buffered + take, :-1] = rows[:take]
            self.run[self.buffered : self.buffered + take, -1] = domain
            self.buffered += take
            rows = rows[take:]
            if self.buffered == len(self.run) and len(self.run) < self.run_rows:
                grown = np.empty((min(2 * len(self.run), self.run_rows), self.width + 1), dtype=np.int32)
                grown[: self.buffered] = self.run
                self.run = grown
            elif self.buffered == len(self.run):
                self._write_run()

    def _sorted_run(self) -> np.ndarray:
        """The rows held, sorted by bucket (a copy); their counts are appended to self.counts."""
        run = self.run[: self.buffered]
        bucket = buckets_of(self.key, self.rows, len(run), self.buckets)
        self.counts.append(np.bincount(bucket, minlength=self.buckets))
        self.rows += len(run)
        self.buffered = 0
        return run[np.argsort(bucket, kind="stable")]

    def _write_run(self) -> None:
        if self.local is None:
            self.local = tempfile.TemporaryFile(prefix="ercstudy-run-")  # noqa: SIM115 (closed in close/abort)
        self.local.write(self._sorted_run().data)  # the sorted copy's own buffer, not another copy of it

    def close(self) -> np.ndarray:
        """Merge the runs into the spill file; its rows per bucket [buckets] (all zero: it got no rows, no file)."""
        if self.local is None:  # at most one run, still in memory: it is the spill file as it is
            if not self.buffered:
                return np.zeros(self.buckets, dtype=np.int64)
            with self.fs.open_output_stream(self.path) as out:
                out.write(self._sorted_run().data)
            return self.counts[0]
        if self.buffered:
            self._write_run()
        counts = np.stack(self.counts)  # [runs, buckets]
        starts = np.concatenate([[0], np.cumsum(counts.sum(axis=1))[:-1]])[:, None] + exclusive_cumsum(counts)
        self.local.flush()
        runs = np.memmap(self.local, dtype=np.int32, mode="r").reshape(-1, self.width + 1)
        pieces, held = [], 0
        with self.fs.open_output_stream(self.path) as out:
            for b in range(self.buckets):  # bucket by bucket, run by run: each bucket one contiguous segment
                for r in np.flatnonzero(counts[:, b]):
                    pieces.append(runs[starts[r, b] : starts[r, b] + counts[r, b]])
                    held += pieces[-1].nbytes
                if held >= min(MERGE_BYTES, self.run.nbytes) or b == self.buckets - 1:  # no more than a run's memory
                    out.write(np.concatenate(pieces).data if pieces else b"")
                    pieces, held = [], 0
        del runs
        self.abort()
        return counts.sum(axis=0)

    def abort(self) -> None:
        """Drop the local runs (on failure, and once merged)."""
        if self.local is not None:
            self.local.close()
            self.local = None


def exclusive_cumsum(counts: np.ndarray) -> np.ndarray:
    """Along the last axis: each entry's offset after the ones before it."""
    return np.cumsum(counts, axis=-1) - counts


def bucket_segments(path: str, counts: np.ndarray) -> list[Segment | None]:
    """Per bucket, where its rows lie in the spill file at `path` whose rows per bucket are `counts` (None: no rows)."""
    firsts = exclusive_cumsum(counts)
    return [Segment(path, int(first), int(rows)) if rows else None for first, rows in zip(firsts, counts)]


def read_segments(fs: Any, segments: list[Segment], width: int) -> np.ndarray:
    """The rows of these segments, in their order [rows, width + 1] int32 (one range read per segment)."""
    row_bytes = (width + 1) * 4
    out = np.empty((sum(s.rows for s in segments), width + 1), dtype=np.int32)
    at = 0
    for s in segments:
        with fs.open_input_file(s.path) as f:
            data = f.read_at(s.rows * row_bytes, s.first * row_bytes)
        out[at : at + s.rows] = np.frombuffer(data, dtype=np.int32).reshape(s.rows, width + 1)
        at += s.rows
    return out

