"""The on-disk format of Parquet token shards (written by `ercstudy prepare-data`, read by data.py).

Kept free of torch so that preparing data starts in a second.

    DIR/meta.json  DIR/tokenizer.json  DIR/train/part-00000.parquet ...  DIR/eval/part-00000.parquet

Each Parquet row: `tokens` (fixed-size list of seq_len + 1 int32 ids), `domain` (int32: the
index of the input file it came from).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
EOD_TOKEN = "<|endoftext|>"
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
    domains: list[str]  # domain d = the d-th input file
    eod_id: int

    @classmethod
    def read(cls, path: str | Path) -> ShardMeta:
        file = Path(path) / META_FILE
        if not file.is_file():
            raise DataError(f"data.path: {path} holds no {META_FILE}; make shards with `ercstudy prepare-data`")
        return cls(**json.loads(file.read_text()))


