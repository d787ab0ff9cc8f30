"""`ercstudy prepare-data`: text files (or a Parquet text column) -> Parquet shards of token ids.

The corpus is streamed, never held: memory stays bounded whatever its size.

1. First pass: a byte-level BPE tokenizer is trained locally with the `tokenizers` library (no hub
   download) from an iterator over the documents, which also counts them per input file.
2. Second pass: each input file's documents go, whole, to train or eval: exactly
   round(eval_fraction * documents) of each file are held out, drawn by selection sampling from
   `seed` (one uniform per document, O(1) memory), so the held-out loss is a held-out-document
   loss. Documents are tokenized in batches (Rust, parallel), joined with an end-of-document
   token per split and cut into sequences of `seq_len + 1` tokens (the tail of a file's split is
   dropped); a sequence never mixes the two splits. Each sequence goes to one of K spill files
   on local disk (K chosen so that one spill file fits `shuffle_bytes`), drawn from the seed.
3. Each spill file is read back, permuted and appended to the split's Parquet shards, a row
   group at a time: random bucket then random order within it is a uniform shuffle of the whole
   split, at the memory of one bucket.

Each input file is one "domain" (shard group): its index is stored with every sequence, so
per-domain eval loss and routing-domain specialisation work on real corpora as on the synthetic
one. The layout is the one `ercstudy.trainables.data` reads, in a directory or at a URI
(s3://bucket/prefix, ...: written through pyarrow's filesystems):

    OUT/tokenizer.json  OUT/meta.json  OUT/train/part-00000.parquet ...  OUT/eval/part-00000.parquet
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ercstudy.platform.data import readers
from ercstudy.trainables.shards import (
    EOD_TOKEN,
    EOS_NAMES,
    META_FILE,
    ROW_GROUP_ROWS,
    TOKENIZER_FILE,
    DataError,
    ShardMeta,
    filesystem,
    first_line,
    is_uri,
    join,
    shard_files,
)

DOCS_PER_BATCH = 256
CHARS_PER_BATCH = 1 << 20  # a batch of documents also ends at this much text: a few huge documents stay bounded
SHUFFLE_BYTES = 256 << 20  # default memory for one spill bucket of the shuffle
MAX_BUCKETS = 4096
SPLITS = ("train", "eval")
OTHER = "other"  # the domain that pools the domains past --max-domains


def batches(docs: Iterator[str]) -> Iterator[list[str]]:
    """Documents in batches of at most DOCS_PER_BATCH documents or about CHARS_PER_BATCH characters."""
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= DOCS_PER_BATCH or chars >= CHARS_PER_BATCH:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encoded(docs: Iterator[list[tuple[str, str]]], tok: Any) -> Iterator[tuple[list[tuple[str, str]], list[Any]]]:
    """Each batch of (domain, document) records with its encodings, in order; the next batch is read (Python) while
    this one encodes on a thread (the tokenizer's Rust batch encode releases the GIL), so reading, splitting and
    packing overlap the encoding instead of following it."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ercstudy-encode") as pool:
        pending = None
        for batch in docs:
            started = (batch, pool.submit(tok.encode_batch, [doc for _, doc in batch]))
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = started
        if pending is not None:
            yield pending[0], pending[1].result()


@dataclass
class Census:
    """What the first pass counted: documents per domain (in the order met) and UTF-8 bytes."""

    documents: dict[str, int]
    text_bytes: int = 0

    def count(self, domain: str, doc: str) -> str:
        self.documents[domain] = self.documents.get(domain, 0) + 1
        self.text_bytes += len(doc.encode("utf-8"))
        return doc


class Corpus:
    """The inputs as (domain, document) records (readers.py), domains capped: the `max_domains` with the most
    documents keep their names, the rest are pooled as OTHER."""

    def __init__(self, inputs: list[readers.Source], *, text_field: str, domain_field: str | None):
        self.inputs, self.text_field, self.domain_field = inputs, text_field, domain_field
        self.names: dict[str, str] = {}  # a record's domain -> its domain in the shards (itself, or OTHER)

    def records(self) -> Iterator[tuple[str, str]]:
        for src in self.inputs:
            yield from readers.records(src, text_field=self.text_field, domain_field=self.domain_field)

    def cap(self, census: Census, max_domains: int) -> list[str]:
        """The shards' domain names, in the order first met; counts merged into OTHER past the cap."""
        kept = set(sorted(census.documents, key=lambda d: -census.documents[d])[:max_domains])
        self.names = {d: (d if d in kept else OTHER) for d in census.documents}
        merged: dict[str, int] = {}
        for d, n in census.documents.items():
            merged[self.names[d]] = merged.get(self.names[d], 0) + n
        census.documents = merged
        return list(merged)


def train_tokenizer(corpus: Corpus, vocab_size: int, census: Census, *, progress: bool) -> object:
    """A byte-level BPE tokenizer trained from an iterator over the corpus (nothing held); the census counted on the way."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    # one document per item: the trainer buffers a few hundred items, so an item must not be a batch
    tok.train_from_iterator((census.count(domain, doc) for domain, doc in corpus.records()), trainer=trainer)
    return tok


def pretrained_tokenizer(path: str, eos_token: str | None) -> tuple[object, str]:
    """A Hugging Face tokenizer.json (a file, or a folder holding one; local or on object storage) and its
    end-of-text token: `eos_token`, else the first of EOS_NAMES it has."""
    from tokenizers import Tokenizer

    from ercstudy.trainables.shards import read_file

    folder, name = (path, TOKENIZER_FILE) if not path.endswith(".json") else path.rsplit("/", 1) if "/" in path else (".", path)
    try:
        data = read_file(folder, name)
    except DataError as err:
        raise DataError(f"--tokenizer {path}: {err}") from None
    if data is None:
        raise DataError(f"--tokenizer {path}: no such file (a tokenizer.json, or a folder holding one)")
    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as err:
        raise DataError(f"--tokenizer {path}: not a Hugging Face tokenizer.json ({str(err).splitlines()[0]})") from None
    names = [eos_token] if eos_token else [n for n in EOS_NAMES if tok.token_to_id(n) is not None][:1]
    if not names or tok.token_to_id(names[0]) is None:
        raise DataError(f"--tokenizer {path}: " + (f"has no token {eos_token!r}" if eos_token else
                        f"has none of the end-of-text tokens {', '.join(EOS_NAMES)}") + "; pass --eos-token NAME")
    return tok, names[0]


class HeldOutDocuments:
    """Selection sampling (Knuth's algorithm S): exactly `k` of `n` documents, each chosen with probability
    (k - chosen) / (n - seen), from one uniform per document; a function of the seed and the order alone."""

    def __init__(self, n: int, k: int, rng: np.random.Generator):
        self.n, self.k, self.rng, self.seen, self.chosen = n, k, rng, 0, 0

    def draw(self, count: int) -> np.ndarray:
        """Whether each of the next `count` documents is held out [count] bool."""
        u = self.rng.random(count)
        held = np.zeros(count, dtype=bool)
        for i in range(count):
            if u[i] * (self.n - self.seen) < self.k - self.chosen:
                held[i] = True
                self.chosen += 1
            self.seen += 1
        return held


class Cutter:
    """Cuts one split's token stream of one input into rows of `width` tokens; the tail waits for the next document."""

    def __init__(self, width: int):
        self.width, self.tail = width, np.zeros(0, dtype=np.int32)

    def cut(self, pieces: list[np.ndarray]) -> np.ndarray:
        stream = np.concatenate([self.tail, *pieces]) if pieces else self.tail
        n = len(stream) // self.width
        self.tail = stream[n * self.width :].copy()
        return stream[: n * self.width].reshape(n, self.width)


class Spill:
    """The rows of one split, scattered over `buckets` files on local disk (token ids, then the domain, int32)."""

    def __init__(self, directory: Path, split: str, buckets: int, width: int, rng: np.random.Generator):
        self.width, self.rng, self.rows = width + 1, rng, 0
        self.paths = [directory / f"{split}-{b:05d}.bin" for b in range(buckets)]
        self.files = [open(p, "wb") for p in self.paths]  # noqa: SIM115 (closed in done())

    def add(self, rows: np.ndarray, domain: int) -> None:
        if not len(rows):
            return
        tagged = np.concatenate([rows, np.full((len(rows), 1), domain, dtype=np.int32)], axis=1)
        bucket = self.rng.integers(0, len(self.files), size=len(rows))
        for b in np.unique(bucket):
            self.files[b].write(tagged[bucket == b].tobytes())
        self.rows += len(rows)

    def done(self) -> None:
        for f in self.files:
            f.close()

    def shuffled(self, rng: np.random.Generator) -> Iterator[np.ndarray]:
        """Each bucket read back and permuted [rows, width + 1]: together, a uniform shuffle of the split."""
        for path in self.paths:
            rows = np.fromfile(path, dtype=np.int32).reshape(-1, self.width)
            path.unlink()
            rng.shuffle(rows)  # in place: one bucket in memory, no permuted copy
            yield rows
            del rows  # before the next bucket is read


class ShardWriter:
    """One split's Parquet files, written a row group at a time: files of `rows_per_shard` rows, groups of ROW_GROUP_ROWS."""

    def __init__(self, fs, root: str, width: int, rows_per_shard: int):
        import pyarrow as pa

        self.fs, self.root, self.width, self.rows_per_shard = fs, root, width, rows_per_shard
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
            self.writer = pq.ParquetWriter(join(self.root, f"part-{self.files:05d}.parquet"), self.schema, filesystem=self.fs)
            self.files += 1
        flat = pa.array(np.ascontiguousarray(rows[:, : self.width]).ravel(), type=pa.int32())
        table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(flat, self.width),
                          "domain": pa.array(rows[:, self.width], type=pa.int32())}, schema=self.schema)
        self.writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self.in_file += take
        if self.in_file >= self.rows_per_shard:
            self.writer.close()
            self.writer, self.in_file = None, 0


def open_output(out: str):
    """The filesystem and root of OUT (a new or empty directory, or a prefix in an existing bucket)."""
    import pyarrow.fs as pafs

    fs, root = filesystem(out)
    try:
        if isinstance(fs, pafs.S3FileSystem) and fs.get_file_info(root.split("/")[0]).type == pafs.FileType.NotFound:
            raise DataError(f"--out {out}: no bucket {root.split('/')[0]!r} (create it first)")
        if fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
            raise DataError(f"--out {out}: output directory is not empty")
        if not is_uri(out):
            fs.create_dir(root, recursive=True)
    except OSError as err:
        raise DataError(f"--out {out}: {first_line(err)}") from None
    return fs, root


def write_bytes(fs, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def prepare_data(
    inputs: list[str],
    out: str,
    *,
    vocab_size: int = 4096,
    seq_len: int = 256,
    eval_fraction: float = 0.05,
    text_field: str = "text",
    domain_field: str | None = None,
    max_domains: int = 64,
    tokenizer: str | None = None,
    eos_token: str | None = None,
    rows_per_shard: int = 8192,
    seed: int = 0,
    shuffle_bytes: int = SHUFFLE_BYTES,
    progress: bool = True,
) -> ShardMeta:
    from tqdm import tqdm

    if not inputs:
        raise DataError("no input files given")
    if tokenizer is None and vocab_size < 260:
        raise DataError(f"--vocab-size must be >= 260 (256 bytes + special tokens), got {vocab_size}")
    if seq_len < 2:
        raise DataError(f"--seq-len must be >= 2, got {seq_len}")
    if not 0 < eval_fraction < 1:
        raise DataError(f"--eval-fraction must be in (0, 1), got {eval_fraction}")
    if rows_per_shard < 1:
        raise DataError(f"--rows-per-shard must be >= 1, got {rows_per_shard}")
    if max_domains < 1:
        raise DataError(f"--max-domains must be >= 1, got {max_domains}")
    corpus = Corpus(readers.sources(inputs), text_field=text_field, domain_field=domain_field)
    if domain_field is None:
        names = [src.name for src in corpus.inputs]
        if len(set(names)) != len(names):
            raise DataError(f"inputs must have distinct file names (they name the domains): {', '.join(names)}; or take "
                            f"the domains from a field (--domain-field)")
    tok, eod_token = pretrained_tokenizer(tokenizer, eos_token) if tokenizer else (None, EOD_TOKEN)
    census = Census({})
    for src in corpus.inputs:  # the first record of every input, before anything is written: a bad file fails here
        if next(readers.records(src, text_field=text_field, domain_field=domain_field), None) is None:
            raise DataError(f"input {src.where}: empty corpus (no non-blank text)")
    fs, root = open_output(out)

    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    if tok is None:
        log(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on {len(corpus.inputs)} input(s), streamed")
        tok = train_tokenizer(corpus, vocab_size, census, progress=progress)
    else:
        log(f"counting the documents of {len(corpus.inputs)} input(s) (tokenizer: {tokenizer}, end of text {eod_token!r})")
        for domain, doc in corpus.records():
            census.count(domain, doc)
    domains = corpus.cap(census, max_domains)
    index = {name: i for i, name in enumerate(domains)}
    eod = tok.token_to_id(eod_token)
    width = seq_len + 1
    # every token covers at least one byte: text bytes + one EOD per document bound the rows from above
    bound_rows = (census.text_bytes + sum(census.documents.values())) // width + 1
    buckets = min(MAX_BUCKETS, max(1, math.ceil(bound_rows * (width + 1) * 4 / shuffle_bytes)))
    held_docs = {d: min(n - 1, max(1, round(eval_fraction * n))) if n > 1 else 0 for d, n in census.documents.items()}

    with tempfile.TemporaryDirectory(prefix="ercstudy-prepare-") as tmp:
        spills = {split: Spill(Path(tmp), split, buckets, width, np.random.default_rng([seed, 1, i]))
                  for i, split in enumerate(SPLITS)}
        # per domain: its held-out draw and a cutter per split (a sequence never mixes domains or splits)
        held = {d: HeldOutDocuments(census.documents[d], held_docs[d], np.random.default_rng([seed, 0, index[d]])) for d in domains}
        cutters = {(d, split): Cutter(width) for d in domains for split in SPLITS}
        with tqdm(total=sum(census.documents.values()), desc="tokenizing", unit="doc", disable=not progress, file=sys.stderr) as bar:
            for batch, encodings in encoded(batches(corpus.records()), tok):
                pieces: dict[tuple[str, str], list[np.ndarray]] = {}
                for (domain, _), enc in zip(batch, encodings):
                    d = corpus.names[domain]
                    split = "eval" if held[d].draw(1)[0] else "train"
                    pieces.setdefault((d, split), []).extend([np.asarray(enc.ids, dtype=np.int32), np.asarray([eod], dtype=np.int32)])
                for (d, split), parts in pieces.items():
                    spills[split].add(cutters[d, split].cut(parts), index[d])
                bar.update(len(batch))
        for spill in spills.values():
            spill.done()
        n_train, n_eval = spills["train"].rows, spills["eval"].rows
        if n_train < 1 or n_eval < 1:
            raise DataError(f"corpus too small: {n_train} train and {n_eval} held-out sequences of {width} tokens "
                            f"from {sum(census.documents.values())} documents (each document goes whole to one split)")

        shard_counts = {}
        for i, split in enumerate(SPLITS):
            writer = ShardWriter(fs, join(root, split), width, rows_per_shard)
            for rows in spills[split].shuffled(np.random.default_rng([seed, 2, i])):
                for j in range(0, len(rows), ROW_GROUP_ROWS):  # a row group at a time: no copy of the bucket
                    writer.add(rows[j : j + ROW_GROUP_ROWS])
                del rows  # the writer holds no view of it: ShardWriter copies what it keeps
            writer.close()
            shard_counts[split] = writer.files
    meta = ShardMeta(
        vocab_size=tok.get_vocab_size(),
        seq_len=seq_len,
        train_sequences=n_train,
        eval_sequences=n_eval,
        domains=domains,
        eod_id=eod,
        eod_token=eod_token,
        domain_of=dict(corpus.names),
    )
    write_bytes(fs, join(root, TOKENIZER_FILE), tok.to_str().encode("utf-8"))
    write_bytes(fs, join(root, META_FILE), (json.dumps(meta.__dict__, indent=2) + "\n").encode("utf-8"))  # last: marks it done
    log(
        f"wrote {n_train:,} train + {n_eval:,} eval sequences of {width} tokens ({shard_counts['train']} train shard(s)) "
        f"to {out if is_uri(out) else root}; held out {sum(held_docs.values()):,} of {sum(census.documents.values()):,} documents; "
        f"vocab {meta.vocab_size}, domains: {', '.join(domains)}"
    )
    return meta


def check_cluster_data(path: str | None, *, working_dir: str) -> None:
    """Shards that every node of a cluster sees (a URI such as s3://..., or a path every node mounts), and for a
    URI that they are there; otherwise a DataError that says why. A job's working_dir carries code, never data."""
    if not path:
        return
    why = ("a Ray job's working_dir carries code, never data (Ray caps it at 512 MiB): put the shards on shared "
           "storage (`ercstudy prepare-data ... --out s3://BUCKET/PREFIX`, or a path every node mounts)")
    if path.startswith("file://"):
        raise DataError(f"data.path: {path} is a file on this machine, which the cluster's nodes do not see; {why}")
    if not is_uri(path):
        local = os.path.expanduser(path)
        if not os.path.isabs(local):
            raise DataError(f"data.path: {path} is a relative path, which the cluster's nodes do not see; {why}")
        real, here, tmp = os.path.realpath(local), os.path.realpath(working_dir), os.path.realpath(tempfile.gettempdir())
        for root, where in ((here, "inside the directory being submitted"), (tmp, "in this machine's temporary directory")):
            if os.path.commonpath([real, root]) == root:
                raise DataError(f"data.path: {path} is {where}, which the cluster's nodes do not see; {why}")
        if not os.path.exists(local):
            return  # a mount of the cluster's that this machine lacks: the driver checks it there, before any trial
    ShardMeta.read(path)
    for split in SPLITS:
        if not shard_files(join(path, split))[1]:
            raise DataError(f"data.path: {path} holds no Parquet shards in {split}/; make them with `ercstudy prepare-data`")
