"""`ercstudy prepare-data`: text files (or a Parquet text column) -> Parquet shards of token ids.

A byte-level BPE tokenizer is trained locally with the `tokenizers` library (no hub download),
the documents are tokenized in batches (Rust, parallel), joined with an end-of-document token,
cut into sequences of `seq_len + 1` tokens, shuffled with a seed and split into train and eval.
Each input file is one "domain" (shard group): its index is stored with every sequence, so
per-domain eval loss and routing-domain specialisation work on real corpora as on the
synthetic one. The layout is the one `ercstudy.trainables.data` reads:

    OUT/tokenizer.json  OUT/meta.json  OUT/train/part-00000.parquet ...  OUT/eval/part-00000.parquet
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ercstudy.trainables.shards import EOD_TOKEN, META_FILE, ROW_GROUP_ROWS, TOKENIZER_FILE, DataError, ShardMeta

DOCS_PER_BATCH = 1024


@dataclass(frozen=True)
class Source:
    name: str  # the domain name: the file's stem
    documents: list[str]


def read_source(path: Path, column: str | None) -> Source:
    """The documents of one input: a Parquet file's text column, or a text file split on blank lines."""
    if not path.is_file():
        raise DataError(f"input {path}: no such file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        schema = pq.read_schema(path)
        col = column or "text"
        if col not in schema.names:
            raise DataError(f"input {path}: no column {col!r} (columns: {', '.join(schema.names)}); pass --column")
        docs = [d for d in pq.read_table(path, columns=[col]).column(col).to_pylist() if d]
    else:
        if column:
            raise DataError(f"input {path}: --column applies to Parquet inputs only")
        text = path.read_text(encoding="utf-8", errors="replace")
        docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    if not docs:
        raise DataError(f"input {path}: empty corpus (no non-blank text)")
    return Source(path.stem, docs)


def train_tokenizer(sources: list[Source], vocab_size: int, *, progress: bool):
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
    tok.train_from_iterator((d for s in sources for d in s.documents), trainer=trainer, length=sum(len(s.documents) for s in sources))
    return tok


def tokenize(tok, source: Source, eod: int, bar) -> np.ndarray:
    """One source as one stream of token ids, documents separated by the end-of-document token."""
    parts = []
    for i in range(0, len(source.documents), DOCS_PER_BATCH):
        for enc in tok.encode_batch(source.documents[i : i + DOCS_PER_BATCH]):
            parts.append(np.asarray(enc.ids, dtype=np.int32))
            parts.append(np.asarray([eod], dtype=np.int32))
        bar.update(min(DOCS_PER_BATCH, len(source.documents) - i))
    return np.concatenate(parts)


def write_split(out: Path, split: str, tokens: np.ndarray, domains: np.ndarray, rows_per_shard: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (out / split).mkdir(parents=True, exist_ok=True)
    width = tokens.shape[1]
    n_shards = max(1, -(-len(tokens) // rows_per_shard))
    for s in range(n_shards):
        rows = slice(s * rows_per_shard, (s + 1) * rows_per_shard)
        flat = pa.array(tokens[rows].ravel(), type=pa.int32())
        table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(flat, width), "domain": pa.array(domains[rows], type=pa.int32())})
        pq.write_table(table, out / split / f"part-{s:05d}.parquet", row_group_size=ROW_GROUP_ROWS)
    return n_shards


def prepare_data(
    inputs: list[str],
    out: str,
    *,
    vocab_size: int = 4096,
    seq_len: int = 256,
    eval_fraction: float = 0.05,
    column: str | None = None,
    rows_per_shard: int = 8192,
    seed: int = 0,
    progress: bool = True,
) -> ShardMeta:
    from tqdm import tqdm

    if not inputs:
        raise DataError("no input files given")
    if vocab_size < 260:
        raise DataError(f"--vocab-size must be >= 260 (256 bytes + special tokens), got {vocab_size}")
    if seq_len < 2:
        raise DataError(f"--seq-len must be >= 2, got {seq_len}")
    if not 0 < eval_fraction < 1:
        raise DataError(f"--eval-fraction must be in (0, 1), got {eval_fraction}")
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"output directory {out_dir} is not empty")
    sources = [read_source(Path(p), column) for p in inputs]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise DataError(f"inputs must have distinct file names (they name the domains): {', '.join(names)}")

    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    log(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on {sum(len(s.documents) for s in sources):,} documents")
    tok = train_tokenizer(sources, vocab_size, progress=progress)
    eod = tok.token_to_id(EOD_TOKEN)
    rows, domains = [], []
    with tqdm(total=sum(len(s.documents) for s in sources), desc="tokenizing", unit="doc", disable=not progress, file=sys.stderr) as bar:
        for d, source in enumerate(sources):
            stream = tokenize(tok, source, eod, bar)
            n = len(stream) // (seq_len + 1)
            if n == 0:
                raise DataError(f"input {source.name}: {len(stream)} tokens, too few for one sequence of {seq_len + 1}")
            rows.append(stream[: n * (seq_len + 1)].reshape(n, seq_len + 1))
            domains.append(np.full(n, d, dtype=np.int32))
    tokens, domain = np.concatenate(rows), np.concatenate(domains)
    order = np.random.default_rng(seed).permutation(len(tokens))
    tokens, domain = tokens[order], domain[order]
    n_eval = max(1, round(eval_fraction * len(tokens)))
    if len(tokens) - n_eval < 1:
        raise DataError(f"corpus too small: {len(tokens)} sequences of {seq_len + 1} tokens leave none for training")

    out_dir.mkdir(parents=True, exist_ok=True)
    write_split(out_dir, "eval", tokens[:n_eval], domain[:n_eval], rows_per_shard)
    n_shards = write_split(out_dir, "train", tokens[n_eval:], domain[n_eval:], rows_per_shard)
    tok.save(str(out_dir / TOKENIZER_FILE))
    meta = ShardMeta(
        vocab_size=tok.get_vocab_size(),
        seq_len=seq_len,
        train_sequences=len(tokens) - n_eval,
        eval_sequences=n_eval,
        domains=names,
        eod_id=eod,
    )
    (out_dir / META_FILE).write_text(json.dumps(meta.__dict__, indent=2) + "\n")
    log(
        f"wrote {meta.train_sequences:,} train + {meta.eval_sequences:,} eval sequences of {seq_len + 1} tokens "
        f"({n_shards} train shard(s)) to {os.path.abspath(out_dir)}; vocab {meta.vocab_size}, domains: {', '.join(names)}"
    )
    return meta
