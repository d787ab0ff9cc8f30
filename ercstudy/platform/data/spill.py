"""The shuffle's intermediate files: an input's sequences of one split, on their way to the shards.

A spill file holds rows of `width + 1` int32 (the tokens, then the domain), raw, in runs of at most
RUN_BYTES; each run is sorted by bucket, so a bucket's rows in a run are one contiguous segment
that a range read fetches (local disk or an object store alike). A row's bucket is a hash of
(seed, input, split, its row number in the file): a function of the data alone, never of which worker
wrote it or when.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

RUN_BYTES = 16 << 20  # at most this much of an input's rows is held before a run is sorted and written


def mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer, elementwise on uint64 (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def buckets_of(key: tuple[int, ...], first_row: int, rows: int, buckets: int) -> np.ndarray:
    """The bucket of rows first_row .. first_row + rows - 1 of the file that `key` names [rows] int64."""
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
    """One input's rows of one split, written in bucket-sorted runs; `close()` says where each bucket's rows lie."""

    def __init__(self, fs: Any, path: str, width: int, buckets: int, key: tuple[int, ...], *, run_rows: int):
        self.fs, self.path, self.width, self.buckets, self.key, self.run_rows = fs, path, width, buckets, key, run_rows
        # the run being filled (tokens, then the domain), grown up to run_rows: a split of few rows holds little
        self.run = np.empty((min(run_rows, 64), width + 1), dtype=np.int32)
        self.buffered = self.rows = 0
        self.counts: list[np.ndarray] = []  # per run: rows per bucket [buckets]
        self.out = None

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

    def _write_run(self) -> None:
        run = self.run[: self.buffered]
        bucket = buckets_of(self.key, self.rows, len(run), self.buckets)
        if self.out is None:
            self.out = self.fs.open_output_stream(self.path)
        self.out.write(run[np.argsort(bucket, kind="stable")].data)  # the sorted copy's own buffer, not another copy
        self.counts.append(np.bincount(bucket, minlength=self.buckets))
        self.rows += len(run)
        self.buffered = 0

    def close(self) -> np.ndarray:
        """Closes the file; its rows per run and bucket [runs, buckets] (no runs: the input gave this split no rows)."""
        if self.buffered:
            self._write_run()
        if self.out is not None:
            self.out.close()
        return np.stack(self.counts) if self.counts else np.zeros((0, self.buckets), dtype=np.int64)


def bucket_segments(path: str, counts: np.ndarray) -> list[list[Segment]]:
    """Per bucket, where its rows lie in the spill file at `path` whose rows per run and bucket are `counts`."""
    segments: list[list[Segment]] = [[] for _ in range(counts.shape[1])]
    start = 0
    for run in counts:
        offsets = start + np.concatenate([[0], np.cumsum(run)[:-1]])
        for b in np.flatnonzero(run):
            segments[b].append(Segment(path, int(offsets[b]), int(run[b])))
        start += int(run.sum())
    return segments


def read_segments(fs: Any, segments: list[Segment], width: int) -> np.ndarray:
    """The rows of these segments, in their order [rows, width + 1] int32 (one range read per segment)."""
    row_bytes = (width + 1) * 4
    out = np.empty((sum(s.rows for s in segments), width + 1), dtype=np.int32)
    at, files = 0, {}
    try:
        for s in segments:
            if s.path not in files:
                files[s.path] = fs.open_input_file(s.path)
            data = files[s.path].read_at(s.rows * row_bytes, s.first * row_bytes)
            out[at : at + s.rows] = np.frombuffer(data, dtype=np.int32).reshape(s.rows, width + 1)
            at += s.rows
    finally:
        for f in files.values():
            f.close()
    return out
