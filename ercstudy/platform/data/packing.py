"""One input of prepare-data, tokenized and packed: documents -> token rows -> the shuffle's spill files.

An input's work depends on the input and the plan alone (never on the worker that runs it): its
documents of each domain go to train or eval as its share of the held-out draw says (`Input.held`,
drawn up front, see census.py), are tokenized in batches, joined with the end-of-text token per
(domain, split) and cut into rows of `seq_len + 1` tokens (the tail of each is dropped at the end of
the input; a row never mixes domains or splits), and each row goes to a bucket of its split's spill
file (spill.py). The same function runs in this process or as a task of a Ray Data pipeline.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ercstudy.platform.data import readers
from ercstudy.platform.data.spill import SpillFile
from ercstudy.trainables.shards import DataError

DOCS_PER_BATCH = 256
CHARS_PER_BATCH = 1 << 20  # a batch of documents also ends at this much text: a few huge documents stay bounded
PROGRESS_DOCS = 4096  # documents between two progress records of an input
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Plan:
    """What the packing of every input shares (sent once to each worker)."""

    tokenizer_json: str
    eod: int  # the end-of-text id that ends every document
    width: int  # tokens per row: seq_len + 1
    text_field: str
    domain_field: str | None
    names: dict[str, str]  # a record's domain -> its domain in the shards (itself, or census.OTHER)
    index: dict[str, int]  # a shard domain -> its number
    seed: int
    buckets: int  # of each split's shuffle
    spill_fs: Any  # where the spill files go: a pyarrow filesystem every worker reaches
    spill_root: str
    run_rows: int  # rows of an input's split held before they are written (spill.SpillFile)


@dataclass(frozen=True)
class Input:
    """One input and its share of the held-out draw."""

    number: int  # its place in the inputs: the spill files' names and the rows' buckets derive from it
    source: readers.Source
    held: dict[str, tuple[int, int]]  # shard domain -> (its documents in this input, how many of them are held out)


@functools.lru_cache(maxsize=2)
def tokenizer(tokenizer_json: str) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def batches(docs: Iterator[Any]) -> Iterator[list[Any]]:
    """(domain, document) records in batches of at most DOCS_PER_BATCH documents or about CHARS_PER_BATCH characters."""
    batch: list[Any] = []
    chars = 0
    for record in docs:
        batch.append(record)
        chars += len(record[1])
        if len(batch) >= DOCS_PER_BATCH or chars >= CHARS_PER_BATCH:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encoded(docs: Iterator[list[tuple[str, str]]], tok: Any) -> Iterator[tuple[list[tuple[str, str]], list[Any]]]:
    """Each batch of (domain, document) records with its encodings, in order; the next batch is read (Python) while
    this one encodes on a thread (the tokenizer's Rust batch encode releases the GIL), so reading, splitting and
    packing overlap the encoding instead of following it."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ercstudy-encode") as pool:
        pending = None
        for batch in docs:
            started = (batch, pool.submit(tok.encode_batch, [doc for _, doc in batch]))
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = started
        if pending is not None:
            yield pending[0], pending[1].result()


class Cutter:
    """Cuts one token stream into rows of `width` tokens; the tail waits for the next document."""

    def __init__(self, width: int):
        self.width, self.tail = width, np.zeros(0, dtype=np.int32)

    def cut(self, pieces: list[np.ndarray]) -> np.ndarray:
        stream = np.concatenate([self.tail, *pieces]) if pieces else self.tail
        n = len(stream) // self.width
        self.tail = stream[n * self.width :].copy()
        return stream[: n * self.width].reshape(n, self.width)


class HeldOut:
    """Selection sampling (Knuth's algorithm S): exactly `k` of `n` documents, each held out with probability
    (k - chosen) / (n - seen), one uniform per document: O(1) memory, a function of the seed and the order alone."""

    def __init__(self, n: int, k: int, rng: np.random.Generator):
        self.n, self.k, self.rng, self.seen, self.chosen = n, k, rng, 0, 0

    def next(self) -> bool:
        """Whether the next document is held out; IndexError past the n-th."""
        if self.seen >= self.n:
            raise IndexError(self.n)
        held = self.rng.random() * (self.n - self.seen) < self.k - self.chosen
        self.seen += 1
        self.chosen += held
        return bool(held)


def held_out(plan: Plan, unit: Input) -> dict[str, HeldOut]:
    """Per shard domain, the draw of which of this input's documents of it are held out (as many as `unit.held` says)."""
    return {d: HeldOut(n, k, np.random.default_rng([plan.seed, 4, unit.number, plan.index[d]])) for d, (n, k) in unit.held.items()}


def spill_path(plan: Plan, unit: Input, split: int) -> str:
    return f"{plan.spill_root}/{SPLITS[split]}-{unit.number:06d}.bin"


def pack(plan: Plan, unit: Input) -> Iterator[dict[str, Any]]:
    """Tokenize and pack one input into its spill files. Yields progress records ({"documents", "tokens"} since the
    last one) as it goes, then one record per split: {"split", "path", "counts"} (its rows per bucket)."""
    spills = [SpillFile(plan.spill_fs, spill_path(plan, unit, split), plan.width, plan.buckets,
                        (plan.seed, unit.number, split), run_rows=plan.run_rows) for split in range(len(SPLITS))]
    try:
        yield from pack_into(plan, unit, spills)
        counts = [spill.close() for spill in spills]
    finally:
        for spill in spills:
            spill.abort()
    for split, spill in enumerate(spills):
        yield {"split": split, "path": spill.path, "counts": counts[split]}


def pack_into(plan: Plan, unit: Input, spills: list[SpillFile]) -> Iterator[dict[str, int]]:
    tok = tokenizer(plan.tokenizer_json)
    held = held_out(plan, unit)
    eod = np.asarray([plan.eod], dtype=np.int32)
    cutters = {(d, split): Cutter(plan.width) for d in held for split in range(len(SPLITS))}
    docs = tokens = 0
    records = readers.records(unit.source, text_field=plan.text_field, domain_field=plan.domain_field)
    for batch, encodings in encoded(batches(records), tok):
        pieces: dict[tuple[str, int], list[np.ndarray]] = {}
        for (domain, _), enc in zip(batch, encodings):
            d = plan.names.get(domain)
            try:
                split = int(held[d].next())  # 1: eval
            except (KeyError, IndexError):
                raise changed(unit) from None
            ids = np.asarray(enc.ids, dtype=np.int32)
            pieces.setdefault((d, split), []).extend([ids, eod])
            tokens += len(ids) + 1
        for (d, split), parts in pieces.items():
            spills[split].add(cutters[d, split].cut(parts), plan.index[d])
        docs += len(batch)
        if docs >= PROGRESS_DOCS:
            yield {"documents": docs, "tokens": tokens}
            docs = tokens = 0
    if any(h.seen != h.n for h in held.values()):
        raise changed(unit)
    if docs:
        yield {"documents": docs, "tokens": tokens}


def changed(unit: Input) -> DataError:
    return DataError(f"input {unit.source.where} changed while it was read: it holds other documents than when they "
                     f"were counted")
