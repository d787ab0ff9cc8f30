"""The format of Parquet token shards (written by `ercstudy prepare-data`, read by data.py), and where they live.

Kept free of torch so that preparing data starts in a second.

    DIR/meta.json  DIR/tokenizer.json  DIR/train/part-00000-00000.parquet ...  DIR/eval/part-00000-00000.parquet

DIR is a local path or a URI (s3://bucket/prefix, gs://..., hdfs://...): every read and write goes
through pyarrow's filesystems, which take an S3 endpoint and credentials from the standard AWS_*
environment, so the shards are read where the workers run and never travel with a job.

Each Parquet row: `tokens` (fixed-size list of seq_len + 1 int32 ids), `domain` (int32: the
index of the input file it came from).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow.fs

META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
EOD_TOKEN = "<|endoftext|>"
# end-of-text tokens of the tokenizers researchers use (GPT-2/NeoX, Llama 2, Llama 3, others), tried in this order
EOS_NAMES = (EOD_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
# Rows per Parquet row group: the unit a worker decodes (data.ShardIndex). Small enough that each worker
# of a trial reads about its own share of a step, large enough (64 x 257 int32 = 66 kB) for cheap reads.
ROW_GROUP_ROWS = 64


class DataError(ValueError):
    """Training data that cannot be used as asked: the message is one line that says why."""


@dataclass(frozen=True, kw_only=True)
class ShardMeta:
    """meta.json of a directory of token shards."""

    vocab_size: int
    seq_len: int  # each row holds seq_len + 1 tokens
    train_sequences: int
    eval_sequences: int
    domains: list[str]  # domain d's name: an input file's, or a --domain-field value (or "other", the rest pooled)
    eod_id: int
    eod_token: str = EOD_TOKEN  # the tokenizer's end-of-text token, which ends every document
    domain_of: dict[str, str] | None = None  # each source domain -> its domain in the shards (itself or "other")

    @classmethod
    def read(cls, path: str | Path) -> ShardMeta:
        text = read_file(path, META_FILE)
        if text is None:
            raise DataError(f"data.path: {path} holds no {META_FILE}; make shards with `ercstudy prepare-data`")
        return cls(**json.loads(text))


def end_of_text_id(tokenizer: Any, data_path: str | None) -> int:
    """The id of the end-of-text token the shards were made with (their meta.json's eod_token, where readable), else
    the first of EOS_NAMES the tokenizer has; a tokenizer with none is refused rather than scored with id 0."""
    names: list[str] = []
    if data_path:
        try:
            names.append(ShardMeta.read(data_path).eod_token)
        except DataError:
            pass  # shards moved since: the usual names
    for name in (*names, *EOS_NAMES):
        token = tokenizer.token_to_id(name)
        if token is not None:
            return token
    raise DataError(f"the tokenizer has no end-of-text token ({', '.join(dict.fromkeys((*names, *EOS_NAMES)))})")


def is_uri(path: str | Path) -> bool:
    """A URI (s3://, gs://, file://, ...) rather than a plain path."""
    return "://" in str(path)


def join(path: str | Path, *names: str) -> str:
    """`path/names...` for paths and URIs alike."""
    return "/".join([str(path).rstrip("/"), *names])


def filesystem(path: str | Path) -> tuple[pyarrow.fs.FileSystem, str]:
    """The pyarrow filesystem of a path or URI, and the path inside it (a relative path: from the working directory)."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    uri = str(path) if is_uri(path) else os.path.abspath(os.path.expanduser(str(path)))
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise DataError(f"{path}: {first_line(err)}") from None


def read_file(path: str | Path, name: str) -> bytes | None:
    """The bytes of `path/name`, or None if there is no such file; an unreadable store is a DataError."""
    import pyarrow.fs as pafs

    fs, root = filesystem(path)
    file = join(root, name)
    try:
        if fs.get_file_info(file).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(file) as f:
            return f.read()
    except OSError as err:
        raise DataError(f"{join(path, name)}: {first_line(err)}") from None


def shard_files(path: str | Path) -> tuple[pyarrow.fs.FileSystem, list[str]]:
    """The filesystem and the sorted Parquet files of one split directory (none if it does not exist)."""
    import pyarrow.fs as pafs

    fs, root = filesystem(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError as err:
        raise DataError(f"{path}: {first_line(err)}") from None
    return fs, sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


