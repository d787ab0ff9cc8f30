"""`ercstudy prepare-data`: corpora (readers.py) -> Parquet shards of token ids, on a Ray Data pipeline.

The corpus is streamed, never held: memory stays bounded whatever its size.

1. First pass (census.py): every input's documents per domain. With no --tokenizer, a byte-level BPE
   is trained on the way (the `tokenizers` library, locally, no hub download), in this process;
   with one, the inputs are counted in parallel. The held-out documents are drawn from the counts.
2. Packing (packing.py), one task per input: its documents go, whole, to train or eval as drawn, are
   tokenized in batches (Rust), joined with the end-of-text token per domain and split, and cut
   into rows of `seq_len + 1` tokens; each row goes to a bucket of its split's spill file (spill.py),
   by a hash of the seed and the row's place.
3. Shuffle (shuffle.py), one task per bucket: its rows read back, permuted and written as the
   split's Parquet shards. Random bucket then random order within it is a uniform shuffle of the
   split at the memory of one bucket.

Tasks run on a local Ray, the cluster at --address, or in this process (--workers 0): the shards
are the same byte for byte. Each domain (an input file's name, or a field's value) is stored with
every row, so per-domain eval loss and routing-domain specialisation work on real corpora as on the
synthetic one. The layout is the one `ercstudy.trainables.data` reads, in a directory or at a URI
(s3://bucket/prefix, ...: written through pyarrow's filesystems; the spill files go under
OUT/_spill, deleted at the end):

    OUT/tokenizer.json  OUT/meta.json  OUT/train/part-00000-00000.parquet ...  OUT/eval/part-00000-00000.parquet
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from typing import Any

from ercstudy.platform.data import census, pipeline, readers
from ercstudy.platform.data.packing import SPLITS, Input, Plan, pack
from ercstudy.platform.data.shuffle import Bucket, Output, write_bucket
from ercstudy.platform.data.spill import RUN_BYTES, bucket_segments
from ercstudy.trainables.shards import (
    EOD_TOKEN,
    EOS_NAMES,
    META_FILE,
    TOKENIZER_FILE,
    DataError,
    ShardMeta,
    filesystem,
    first_line,
    is_uri,
    join,
    shard_files,
)

SHUFFLE_BYTES = 256 << 20  # default memory for one bucket of the shuffle
MAX_BUCKETS = 4096
SPILL_DIR = "_spill"


def train_tokenizer(inputs: list[readers.Source], vocab_size: int, *, text_field: str, domain_field: str | None,
                    progress: bool) -> tuple[Any, list[census.Census]]:
    """A byte-level BPE tokenizer trained from an iterator over the corpus (nothing held), and each input's census,
    counted on the way."""
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
    counted = [census.Census() for _ in inputs]

    def documents():
        for src, c in zip(inputs, counted):
            for domain, doc in readers.records(src, text_field=text_field, domain_field=domain_field):
                yield c.count(domain, doc)

    # one document per item: the trainer buffers a few hundred items, so an item must not be a batch
    tok.train_from_iterator(documents(), trainer=trainer)
    return tok, counted


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
    workers: int | None = None,
    address: str | None = None,
    progress: bool = True,
) -> ShardMeta:
    """Tokenize `inputs` into shards at `out` (see the module's docstring). workers: Ray Data tasks at once (None: as
    many as the Ray's CPUs; 0: in this process, no Ray); address: a Ray cluster's (None: a private local Ray)."""
    if workers != 0:
        address = address or os.environ.get("RAY_ADDRESS") or None
    check_arguments(inputs, vocab_size=None if tokenizer else vocab_size, seq_len=seq_len, eval_fraction=eval_fraction,
                    rows_per_shard=rows_per_shard, max_domains=max_domains, seed=seed, workers=workers, address=address,
                    out=out)
    sources = readers.sources(inputs)
    if domain_field is None:
        names = [src.name for src in sources]
        if len(set(names)) != len(names):
            raise DataError(f"inputs must have distinct file names (they name the domains): {', '.join(names)}; or take "
                            f"the domains from a field (--domain-field)")
    tok, eod_token = pretrained_tokenizer(tokenizer, eos_token) if tokenizer else (None, EOD_TOKEN)
    for src in sources:  # the first record of every input, before anything is written: a bad file fails here
        if next(readers.records(src, text_field=text_field, domain_field=domain_field), None) is None:
            raise DataError(f"input {src.where}: empty corpus (no non-blank text)")
    fs, root = open_output(out)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    if workers != 0:
        from ercstudy.platform.cluster.ray_runtime import ensure_ray

        try:
            ensure_ray(address, verbose=False)
        except ConnectionError as err:  # no Ray at that address
            raise DataError(f"--address {address}: {first_line(err)}") from None
    log(f"preparing {len(sources)} input(s) on {pipeline.describe(address, workers)}")

    # 1. the census (and the tokenizer), the domains, the held-out draw
    if tok is None:
        log(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on {len(sources)} input(s), streamed")
        tok, counted = train_tokenizer(sources, vocab_size, text_field=text_field, domain_field=domain_field, progress=progress)
    else:
        log(f"counting the documents of {len(sources)} input(s) (tokenizer: {tokenizer}, end of text {eod_token!r})")
        counted = count_inputs(sources, text_field=text_field, domain_field=domain_field, workers=workers)
    names, domains = census.kept_domains(counted, max_domains)
    index = {d: i for i, d in enumerate(domains)}
    documents = [census.per_domain(c, names) for c in counted]
    held = census.held_out_counts(documents, eval_fraction, seed, index)
    total_docs, held_docs = sum(map(sum, (d.values() for d in documents))), sum(map(sum, (h.values() for h in held)))
    width = seq_len + 1
    # every token covers at least one byte: text bytes + one EOD per document bound the rows from above
    bound_rows = (sum(c.text_bytes for c in counted) + total_docs) // width + 1
    # as many buckets for eval as for train: a few long held-out documents may hold most of the text
    buckets = min(MAX_BUCKETS, max(1, math.ceil(bound_rows * (width + 1) * 4 / shuffle_bytes)))
    spill = join(root, SPILL_DIR)
    fs.create_dir(spill, recursive=True)
    # a run is held twice over while it is sorted, one per split: an input's task holds less than a bucket
    run_rows = max(1, min(RUN_BYTES, shuffle_bytes // 8) // ((width + 1) * 4))
    plan = Plan(tok.to_str(), tok.token_to_id(eod_token), width, text_field, domain_field, names, index, seed, buckets, fs, spill,
                run_rows)
    units = [Input(i, src, {d: (n, h[d]) for d, n in docs.items()}) for i, (src, docs, h) in enumerate(zip(sources, documents, held))]
    try:
        # 2. packing, 3. the shuffle
        spilled = pack_inputs(plan, units, total_docs, workers=workers, progress=progress)
        rows = [sum(int(counts.sum()) for _, counts in spilled[split]) for split in range(len(SPLITS))]
        if min(rows) < 1:
            raise DataError(f"corpus too small: {rows[0]} train and {rows[1]} held-out sequences of {width} tokens "
                            f"from {total_docs} documents (each document goes whole to one split)")
        output = Output(fs, root, width, rows_per_shard, seed)
        files = shuffle_buckets(output, spilled, buckets, workers=workers, progress=progress)
    finally:
        try:
            fs.delete_dir(spill)
        except OSError as err:  # never in place of the error that got here
            log(f"could not delete the spill files under {spill}: {first_line(err)}")
    meta = ShardMeta(vocab_size=tok.get_vocab_size(), seq_len=seq_len, train_sequences=rows[0], eval_sequences=rows[1],
                     domains=domains, eod_id=plan.eod, eod_token=eod_token, domain_of=dict(names))
    write_bytes(fs, join(root, TOKENIZER_FILE), plan.tokenizer_json.encode("utf-8"))
    write_bytes(fs, join(root, META_FILE), (json.dumps(meta.__dict__, indent=2) + "\n").encode("utf-8"))  # last: marks it done
    log(f"wrote {rows[0]:,} train + {rows[1]:,} eval sequences of {width} tokens ({files[0]} train shard(s)) "
        f"to {out if is_uri(out) else root}; held out {held_docs:,} of {total_docs:,} documents; "
        f"vocab {meta.vocab_size}, domains: {', '.join(domains)}")
    return meta


def check_arguments(inputs: list[str], *, vocab_size: int | None, seq_len: int, eval_fraction: float, rows_per_shard: int,
                    max_domains: int, seed: int, workers: int | None, address: str | None, out: str) -> None:
    if not inputs:
        raise DataError("no input files given")
    if vocab_size is not None and vocab_size < 260:  # a BPE to train
        raise DataError(f"--vocab-size must be >= 260 (256 bytes + special tokens), got {vocab_size}")
    if seq_len < 2:
        raise DataError(f"--seq-len must be >= 2, got {seq_len}")
    if not 0 < eval_fraction < 1:
        raise DataError(f"--eval-fraction must be in (0, 1), got {eval_fraction}")
    if rows_per_shard < 1:
        raise DataError(f"--rows-per-shard must be >= 1, got {rows_per_shard}")
    if max_domains < 1:
        raise DataError(f"--max-domains must be >= 1, got {max_domains}")
    if workers is not None and workers < 0:
        raise DataError(f"--workers must be >= 0 (0: in this process), got {workers}")
    if not 0 <= seed < 2**63:
        raise DataError(f"--seed must be in [0, 2**63), got {seed}")
    if address and workers == 0:
        raise DataError("--workers 0 runs in this process: it takes no --address")
    if address:  # the cluster's nodes read the inputs and write the shards: paths they all see
        for path in [*inputs, out]:
            if not is_uri(path) and not os.path.isabs(os.path.expanduser(path)):
                raise DataError(f"{path}: a relative path, which the cluster's nodes do not see; with --address, give "
                                f"URIs (s3://...) or absolute paths that every node mounts")


def count_inputs(sources: list[readers.Source], *, text_field: str, domain_field: str | None, workers: int | None) -> list[census.Census]:
    """Each input's census, counted in parallel."""
    def counted(number: int):
        yield {"input": number, "census": census.count(sources[number], text_field=text_field, domain_field=domain_field)}

    out: list[census.Census] = [census.Census() for _ in sources]
    for record in pipeline.run(counted, list(range(len(sources))), workers=workers):
        out[record["input"]] = record["census"]
    return out


def pack_inputs(plan: Plan, units: list[Input], total_docs: int, *, workers: int | None, progress: bool) -> list[list[tuple[str, Any]]]:
    """Every input packed into its spill files; per split, (path, rows per bucket) of each input, in input order."""
    from tqdm import tqdm

    spilled: list[dict[str, Any]] = [{} for _ in SPLITS]
    started, tokens = time.perf_counter(), 0
    with tqdm(total=total_docs, desc="tokenizing", unit="doc", disable=not progress, file=sys.stderr) as bar:
        for record in pipeline.run(lambda unit: pack(plan, unit), units, workers=workers):
            if "split" in record:
                spilled[record["split"]][record["path"]] = record["counts"]
                continue
            tokens += record["tokens"]
            bar.update(record["documents"])
            bar.set_postfix_str(f"{tokens:,} tokens, {tokens / (time.perf_counter() - started):,.0f} tokens/s", refresh=False)
    return [sorted(by_path.items()) for by_path in spilled]  # the paths sort in input order


def shuffle_buckets(output: Output, spilled: list[list[tuple[str, Any]]], buckets: int, *,
                    workers: int | None, progress: bool) -> list[int]:
    """Every non-empty bucket of each split permuted and written as shards; the shard files per split."""
    from tqdm import tqdm

    work = []
    for split, files in enumerate(spilled):
        per_file = [bucket_segments(path, counts) for path, counts in files]  # each input's one segment per bucket
        for b in range(buckets):
            segments = tuple(segs[b] for segs in per_file if segs[b] is not None)
            if segments:
                work.append(Bucket(split, SPLITS[split], b, segments))
    files = [0] * len(SPLITS)
    with tqdm(total=len(work), desc="shuffling", unit="bucket", disable=not progress, file=sys.stderr) as bar:
        for record in pipeline.run(lambda bucket: iter([write_bucket(output, bucket)]), work, workers=workers):
            files[record["split"]] += record["files"]
            bar.update(1)
    return files


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
