"""`ercstudy prepare-data`: real text -> BPE -> Parquet token shards; one-line errors."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import SEQ, shakespeare_text

from ercstudy.platform.cli import main
from ercstudy.trainables.shards import ShardMeta


def read_split(out: Path, split: str):
    tables = [pq.read_table(p) for p in sorted((out / split).glob("*.parquet"))]
    tokens = np.concatenate([np.stack(t.column("tokens").to_numpy(zero_copy_only=False)) for t in tables])
    domains = np.concatenate([t.column("domain").to_numpy() for t in tables])
    return tokens, domains


def test_shards_hold_the_tokenized_corpus(shards):
    from tokenizers import Tokenizer

    meta = ShardMeta.read(shards)
    assert meta.domains == ["early", "late"] and meta.seq_len == SEQ and meta.vocab_size <= 300
    train, train_dom = read_split(shards, "train")
    held, _ = read_split(shards, "eval")
    assert train.shape == (meta.train_sequences, SEQ + 1) and held.shape == (meta.eval_sequences, SEQ + 1)
    assert len(list((shards / "train").glob("*.parquet"))) == -(-meta.train_sequences // 200)
    assert 0 <= train.min() and train.max() < meta.vocab_size
    assert set(np.unique(train_dom)) == {0, 1}
    # the tokenizer round-trips the text: a decoded sequence is a piece of the corpus
    tok = Tokenizer.from_file(str(shards / "tokenizer.json"))
    row = next(r for r in train if meta.eod_id not in r)
    assert tok.decode(row.tolist()) in shakespeare_text()
    # even 44 merges compress English: fewer tokens than bytes
    assert (meta.train_sequences + meta.eval_sequences) * (SEQ + 1) < 0.8 * 120_000


@pytest.mark.parametrize(
    "args,expected",
    [
        (["{missing}"], "no such file"),
        (["{empty}"], "empty corpus"),
        (["{table}", "--column", "body"], "no column 'body' (columns: text)"),
        (["{text}", "--vocab-size", "100"], "--vocab-size must be >= 260"),
    ],
)
def test_bad_input_is_one_line_with_exit_status_2(tmp_path, capsys, args, expected):
    import pyarrow as pa

    (tmp_path / "empty.txt").write_text("\n\n  \n")
    (tmp_path / "text.txt").write_text("to be or not to be\n")
    pq.write_table(pa.table({"text": ["a play", "a poem"]}), tmp_path / "table.parquet")
    paths = {"missing": tmp_path / "nope.txt", "empty": tmp_path / "empty.txt", "table": tmp_path / "table.parquet",
             "text": tmp_path / "text.txt"}
    argv = ["prepare-data", *[a.format(**paths) for a in args], "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ercstudy: error: ") and expected in err[-1]


def test_parquet_text_column_input(tmp_path):
    import pyarrow as pa

    docs = [shakespeare_text()[i : i + 2000] for i in range(0, 40_000, 2000)]
    pq.write_table(pa.table({"body": docs}), tmp_path / "plays.parquet")
    assert main(["prepare-data", str(tmp_path / "plays.parquet"), "--column", "body", "--out", str(tmp_path / "out"),
                 "--vocab-size", "280", "--seq-len", "16"]) == 0
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["domains"] == ["plays"]


def test_train_refuses_shards_that_do_not_fit_the_model(shards, tmp_path, capsys):
    trial = tmp_path / "trial.yaml"
    trial.write_text(f"model: {{vocab_size: 128, seq_len: {SEQ}}}\ndata: {{kind: parquet, path: {shards}}}\n")
    assert main(["train", str(trial), "--storage", str(tmp_path / "runs")]) == 2
    assert "model.vocab_size: the shards in" in capsys.readouterr().err
    trial.write_text(f"model: {{vocab_size: 512, seq_len: {2 * SEQ}}}\ndata: {{kind: parquet, path: {shards}}}\n")
    assert main(["train", str(trial), "--storage", str(tmp_path / "runs")]) == 2
    assert "model.seq_len: 64 is longer than the shards' sequences (32)" in capsys.readouterr().err
    trial.write_text("data: {kind: parquet, path: /nonexistent/shards}\n")
    assert main(["train", str(trial), "--storage", str(tmp_path / "runs")]) == 2
    assert "holds no meta.json" in capsys.readouterr().err
