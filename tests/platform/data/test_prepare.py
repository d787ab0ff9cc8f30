"""`ercstudy prepare-data`: real text -> BPE -> Parquet token shards; one-line errors."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import SEQ, read_split, shakespeare_text

from ercstudy.platform.cli import main
from ercstudy.trainables.shards import ShardMeta


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
                 "--vocab-size", "280", "--seq-len", "16", "--workers", "0"]) == 0
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["domains"] == ["plays"]


def test_train_refuses_shards_that_do_not_fit_the_model(shards, tmp_path, capsys):
    trial = tmp_path / "trial.yaml"
    trial.write_text(f"model: {{vocab_size: 128, seq_len: {SEQ}}}\ndata: {{kind: parquet, path: {shards}}}\n")
    assert main(["train", str(trial), "--storage", str(tmp_path / "runs")]) == 2
    assert "model.vocab_size: the shards in" in capsys.readouterr().err
    trial.write_text(f"model: {{vocab_size: 512, seq_len: {2 * SEQ}}}\ndata: {{kind: parquet, path: {shards}}}\n")
    assert main(["train", str(trial), "--storage", str(tmp_path / "runs")]) == 2
    assert "model.seq_len: 64 is longer than the shards' sequences (32)" in capsys.readouterr().err
    held_out = json.loads((shards / "meta.json").read_text())["eval_sequences"]
    trial.write_text(f"model: {{vocab_size: 512, seq_len: {SEQ}}}\ndata: {{kind: parquet, path: {shards}}}\neval: {{sequences: {held_out + 8}}}\n")
    assert main(["train", str(trial), "--storage", str(tmp_path / "runs")]) == 2  # not scored on fewer than asked
    assert f"eval.sequences: {held_out + 8} exceeds the {held_out} held-out sequences in {shards}" in capsys.readouterr().err
    trial.write_text("data: {kind: parquet, path: /nonexistent/shards}\n")
    assert main(["train", str(trial), "--storage", str(tmp_path / "runs")]) == 2
    assert "holds no meta.json" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Held-out documents, determinism, streaming


def blank_line_documents(text: str) -> list[str]:
    """The documents of a text input, cut here independently of prepare-data: blocks between blank lines."""
    docs, lines = [], []
    for line in text.splitlines(keepends=True):
        if line.strip():
            lines.append(line)
        elif lines:
            docs.append("".join(lines).strip())
            lines = []
    return docs + (["".join(lines).strip()] if lines else [])


def which_documents(rows: np.ndarray, tok, eod: int, corpus: str, starts: list[int], min_chars: int = 24) -> list[set[int]]:
    """For each row, the documents it holds text of: each piece of the row between end-of-document tokens is
    decoded and looked up in the corpus (the documents joined by a separator); pieces shorter than `min_chars`
    or found in more than one place are ambiguous and skipped."""
    import bisect

    out = []
    for row in rows:
        ids, found, piece = row.tolist() + [eod], set(), []
        for t in ids:
            if t != eod:
                piece.append(t)
                continue
            text = tok.decode(piece)
            piece = []
            if len(text) < min_chars:
                continue
            at = corpus.find(text)
            if at >= 0 and corpus.find(text, at + 1) < 0:
                found.add(bisect.bisect_right(starts, at) - 1)
        out.append(found)
    return out


def test_every_document_lies_in_one_split(shards):
    """Shakespeare's speeches (blank-line blocks) are the documents: every piece of text in a train or eval
    sequence is traced back to the one speech it comes from, and no speech has pieces on both sides."""
    from conftest import SHAKESPEARE_EXCERPTS, fixture_file
    from tokenizers import Tokenizer

    meta = ShardMeta.read(shards)
    tok = Tokenizer.from_file(str(shards / "tokenizer.json"))
    sep = "\u0000"
    docs = [d for name in SHAKESPEARE_EXCERPTS for d in blank_line_documents(fixture_file(name).read_text())]
    corpus = sep.join(docs)
    starts = list(np.cumsum([0] + [len(d) + 1 for d in docs[:-1]]))
    side: dict[int, set[str]] = {}
    for split in ("train", "eval"):
        tokens, _ = read_split(shards, split)
        for found in which_documents(tokens, tok, meta.eod_id, corpus, starts):
            for doc in found:
                side.setdefault(doc, set()).add(split)
    both = [docs[d][:60] for d, s in side.items() if len(s) > 1]
    assert not both, both[:5]
    held = [d for d, s in side.items() if s == {"eval"}]
    # most documents were traced (the rest are too short to place), and about --eval-fraction of them are held out
    assert len(side) > 0.6 * len(docs) and 0.05 < len(held) / len(side) < 0.2, (len(side), len(docs), len(held))
    # both inputs have held-out documents: the split is drawn within each file
    assert {starts[d] < len(sep.join(blank_line_documents(fixture_file("early.txt").read_text()))) for d in held} == {True, False}


def test_a_leaky_split_would_be_caught(shards):
    """The tracing above sees a document on both sides when it is: the rows of one long document, cut in two."""
    from conftest import SHAKESPEARE_EXCERPTS, fixture_file
    from tokenizers import Tokenizer

    meta = ShardMeta.read(shards)
    tok = Tokenizer.from_file(str(shards / "tokenizer.json"))
    docs = [d for name in SHAKESPEARE_EXCERPTS for d in blank_line_documents(fixture_file(name).read_text())]
    longest = max(range(len(docs)), key=lambda d: len(docs[d]))
    ids = np.asarray(tok.encode(docs[longest]).ids[: 4 * (SEQ + 1)], dtype=np.int32).reshape(4, SEQ + 1)
    starts = list(np.cumsum([0] + [len(d) + 1 for d in docs[:-1]]))
    found = which_documents(ids, tok, meta.eod_id, "\u0000".join(docs), starts)
    assert found[:2] == [{longest}, {longest}] and found[3] == {longest}


def prepare(tmp_path, name, *inputs, seed=0, **flags):
    out = tmp_path / name
    argv = ["prepare-data", *map(str, inputs), "--out", str(out), "--vocab-size", "280", "--seq-len", "16",
            "--rows-per-shard", "100", "--seed", str(seed), "--workers", "0"]
    for flag, value in flags.items():
        argv += [f"--{flag.replace('_', '-')}", str(value)]
    assert main(argv) == 0
    return out


def test_the_split_and_the_order_are_functions_of_the_seed(tmp_path):
    from conftest import fixture_file

    text = fixture_file("early.txt")
    a, b, c = (prepare(tmp_path, n, text, seed=s, eval_fraction=0.2) for n, s in (("a", 7), ("b", 7), ("c", 8)))
    for split in ("train", "eval"):
        assert np.array_equal(read_split(a, split)[0], read_split(b, split)[0]), split
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    # another seed holds out other documents (not only another order of the same sequences)
    held = {seed: {tuple(r) for r in read_split(out, "eval")[0]} for seed, out in ((7, a), (8, c))}
    assert held[7] != held[8] and len(held[7] & held[8]) < 0.5 * len(held[7])


def test_sequences_of_all_inputs_are_shuffled_together(shards):
    """Training reads the rows in file order: every stretch of rows mixes the inputs (domains)."""
    _, domains = read_split(shards, "train")
    for start in range(0, len(domains) - 64, 64):
        assert 0.2 < domains[start : start + 64].mean() < 0.8, start


def test_a_corpus_streams_through_in_bounded_memory(tmp_path):
    """A generated 6 MB corpus of seeded pseudo-words prepares with a Python-heap peak (tracemalloc: strings,
    lists, numpy arrays) and an Arrow-pool peak each far below the corpus size: nothing holds the corpus,
    the tokenizer trains from an iterator, the shuffle holds one bucket (here forced to ~1 MB) at a time."""
    import tracemalloc

    import pyarrow as pa

    from ercstudy.platform.data.prepare import prepare_data

    rng = np.random.default_rng(0)
    syllables = np.array(["ka", "to", "mi", "re", "su", "no", "la", "ve", "qu", "is"])
    words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(500)]
    path = tmp_path / "corpus.txt"
    with open(path, "w") as f:
        while f.tell() < 6 << 20:
            doc = rng.choice(words, size=(rng.integers(2, 12), 12))  # a document: lines of 12 words
            f.write("\n".join(" ".join(line) for line in doc) + "\n\n")
    size = path.stat().st_size
    (tmp_path / "warm.txt").write_text("\n\n".join(" ".join(words[i : i + 40]) for i in range(0, 500, 40)))
    prepare_data([str(tmp_path / "warm.txt")], str(tmp_path / "warm"), vocab_size=300, seq_len=8, eval_fraction=0.2,
                 workers=0, progress=False)  # first, the imports it makes (pyarrow's lazy ones, pandas): code, not data
    default_pool = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(default_pool)  # its own peak: the default pool's counts the whole session
    pa.set_memory_pool(pool)
    tracemalloc.start()
    try:
        meta = prepare_data([str(path)], str(tmp_path / "out"), vocab_size=300, seq_len=64, rows_per_shard=4096,
                            shuffle_bytes=1 << 20, workers=0, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(default_pool)
    assert meta.train_sequences * 65 > size / 4  # the whole corpus went through (about 3 bytes per token)
    assert len(list((tmp_path / "out" / "train").glob("*.parquet"))) >= 5
    assert peak < size / 4, (peak, size)
    assert pool.max_memory() < size / 8, (pool.max_memory(), size)
    print(f"corpus {size / 1e6:.1f} MB: Python heap peak {peak / 1e6:.2f} MB, Arrow pool peak {pool.max_memory() / 1e6:.2f} MB")
