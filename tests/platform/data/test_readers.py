"""The corpora researchers have (data/readers.py): text, JSONL, Parquet and `datasets` Arrow folders, compressed or
not, their domains from the file or a field, a pretrained tokenizer; anything unreadable refused in one line, before
anything is written. The inputs are cut, at test time, from the Shakespeare excerpts of tests/fixtures."""

import bz2
import gzip
import json
import lzma
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import fixture_file, read_split

from ercstudy.platform.cli import main
from ercstudy.platform.data import readers
from ercstudy.trainables.shards import ShardMeta

SEQ = 32


def paragraphs(name: str, n: int) -> list[str]:
    """The first n non-blank paragraphs of a fixture excerpt."""
    return [p.strip() for p in fixture_file(name).read_text().split("\n\n") if p.strip()][:n]


EARLY, LATE = paragraphs("early.txt", 120), paragraphs("late.txt", 120)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """The same documents in every format; JSONL / Parquet / Arrow records carry a `source` field."""
    d = tmp_path_factory.mktemp("corpora")
    records = [{"text": t, "source": "early", "id": i} for i, t in enumerate(EARLY)] + \
              [{"text": t, "source": "late", "id": i} for i, t in enumerate(LATE)]
    with gzip.open(d / "mixed.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    (d / "early.txt").write_text("\n\n".join(EARLY))
    with bz2.open(d / "early.txt.bz2", "wt") as f:
        f.write("\n\n".join(EARLY))
    with lzma.open(d / "late.md.xz", "wt") as f:
        f.write("\n\n".join(LATE))
    with pa.CompressedOutputStream(str(d / "late.txt.zst"), "zstd") as f:
        f.write("\n\n".join(LATE).encode())
    table = pa.Table.from_pylist(records)
    pq.write_table(table, d / "mixed.parquet")
    arrow = d / "mixed_arrow"  # as datasets.Dataset.save_to_disk writes it: Arrow IPC streams and two JSON files
    arrow.mkdir()
    with pa.ipc.new_stream(str(arrow / "data-00000-of-00001.arrow"), table.schema) as w:
        w.write_table(table)
    (arrow / "dataset_info.json").write_text("{}")
    (arrow / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    (d / "binary.txt").write_bytes(bytes(range(256)) * 40)  # not text, whatever its name says
    (d / "nul.txt").write_bytes(b"hello\nwor\x00ld\n")
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (d / "table.csv").write_text("text\nhello\n")
    return d


@pytest.mark.parametrize("name,domain_field,expected", [
    ("mixed.jsonl.gz", "source", {"early": EARLY, "late": LATE}),
    ("mixed.jsonl.gz", None, {"mixed": EARLY + LATE}),
    ("mixed.parquet", "source", {"early": EARLY, "late": LATE}),
    ("mixed_arrow", "source", {"early": EARLY, "late": LATE}),
    ("early.txt.bz2", None, {"early": EARLY}),
    ("late.md.xz", None, {"late": LATE}),
    ("late.txt.zst", None, {"late": LATE}),
])
def test_every_format_gives_its_documents_and_domains(corpora, name, domain_field, expected):
    (src,) = readers.sources([str(corpora / name)])
    got: dict[str, list[str]] = {}
    for domain, doc in readers.records(src, domain_field=domain_field):
        got.setdefault(domain, []).append(doc)
    assert got == expected


@pytest.mark.parametrize("name,args,expected", [
    ("binary.txt", [], "binary.txt: not UTF-8 text at line 1 (binary or another encoding)"),
    ("nul.txt", [], "nul.txt: line 2 holds a NUL byte: not text"),
    ("latin1.txt", [], "latin1.txt: not UTF-8 text"),
    ("table.csv", [], "table.csv: not a format ercstudy reads; it reads text (.txt, .md), JSONL"),
    ("mixed.jsonl.gz", ["--text-field", "body"], "mixed.jsonl.gz: line 1 has no field 'body' (it has: text, source, id)"),
    ("mixed.parquet", ["--domain-field", "pile_set_name"], "mixed.parquet: no column 'pile_set_name'"),
    ("early.txt", ["--domain-field", "source"], "--domain-field needs records with fields"),
])
def test_what_cannot_be_read_is_refused_in_one_line_before_anything_is_written(corpora, tmp_path, capsys, name, args, expected):
    out = tmp_path / "shards"
    assert main(["prepare-data", "--workers", "0", str(corpora / name), "--out", str(out), "--seq-len", str(SEQ), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ercstudy: error: input ") or err.startswith("ercstudy: error: ")
    assert expected in err and "\n" not in err, err
    assert not out.exists() or not any(out.iterdir())


def test_domains_from_a_field_capped_with_the_rest_pooled(corpora, tmp_path):
    out = tmp_path / "shards"
    assert main(["prepare-data", "--workers", "0", str(corpora / "mixed.jsonl.gz"), str(corpora / "early.txt"), "--out", str(out),
                 "--seq-len", str(SEQ), "--vocab-size", "300", "--domain-field", "source", "--max-domains", "1"]) == 2
    assert main(["prepare-data", "--workers", "0", str(corpora / "mixed.jsonl.gz"), "--out", str(out), "--seq-len", str(SEQ), "--vocab-size",
                 "300", "--domain-field", "source", "--max-domains", "1"]) == 0
    meta = ShardMeta.read(out)
    assert meta.domains == ["early", "other"] and meta.domain_of == {"early": "early", "late": "other"}
    train, domains = read_split(out, "train")
    assert set(np.unique(domains)) == {0, 1} and train.max() < meta.vocab_size


def test_a_pretrained_tokenizer_is_used_as_it_is_and_its_end_of_text_ends_every_document(corpora, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(EARLY + LATE, trainer=trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path / "llama-like"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))  # as a downloaded one is loaded: from its file
    out = tmp_path / "shards"
    assert main(["prepare-data", "--workers", "0", str(corpora / "mixed.parquet"), "--out", str(out), "--seq-len", str(SEQ),
                 "--tokenizer", str(folder), "--domain-field", "source"]) == 0
    meta = ShardMeta.read(out)
    assert meta.eod_token == "</s>" and meta.eod_id == tok.token_to_id("</s>") and meta.vocab_size == tok.get_vocab_size()
    assert Tokenizer.from_file(str(out / "tokenizer.json")).to_str() == tok.to_str()
    train, _ = read_split(out, "train")
    held, _ = read_split(out, "eval")
    tokens = np.concatenate([train.ravel(), held.ravel()])
    assert (tokens == meta.eod_id).sum() >= 0.8 * len(EARLY + LATE)  # documents end with it (tails dropped)
    expected = np.concatenate([tok.encode(EARLY[0]).ids, [meta.eod_id]])  # the pretrained ids, as they are
    assert any(np.array_equal(row[i : i + len(expected)], expected) for row in np.concatenate([train, held])
               for i in range(len(row) - len(expected) + 1))
    assert main(["prepare-data", "--workers", "0", str(corpora / "early.txt"), "--out", str(tmp_path / "x"), "--tokenizer", str(folder),
                 "--eos-token", "<|endoftext|>"]) == 2


def test_globs_and_directories_expand_to_the_files_they_match(corpora, tmp_path):
    nested = tmp_path / "dolma" / "v1" / "cc"
    nested.mkdir(parents=True)
    (nested / "part-0.jsonl.gz").write_bytes((corpora / "mixed.jsonl.gz").read_bytes())
    (tmp_path / "dolma" / "top.jsonl.gz").write_bytes((corpora / "mixed.jsonl.gz").read_bytes())
    (tmp_path / "dolma" / "README.txt").write_text("a readme")
    names = lambda specs: [s.where.rsplit("/", 1)[1] for s in readers.sources(specs)]  # noqa: E731
    assert names([str(corpora / "mixed.*")]) == ["mixed.jsonl.gz", "mixed.parquet"]  # a name's *, not a folder's
    assert names([str(corpora / "mixed_*")]) == ["mixed_arrow"]  # an Arrow folder is one input
    assert names([str(tmp_path / "dolma" / "**" / "*.jsonl.gz")]) == ["top.jsonl.gz", "part-0.jsonl.gz"]  # ** is also no folder
    assert names([str(tmp_path / "dolma" / "*.jsonl.gz")]) == ["top.jsonl.gz"]
    assert names([str(tmp_path / "dolma")]) == ["README.txt", "top.jsonl.gz", "part-0.jsonl.gz"]  # sorted by path
    with pytest.raises(readers.DataError, match=r"input .*/dolma/\*\.parquet: no file matches that ercstudy reads; it reads"):
        readers.sources([str(tmp_path / "dolma" / "*.parquet")])


def test_inputs_on_object_storage_give_the_local_inputs_shards_byte_for_byte(corpora, bucket, ray_session, tmp_path):
    """Inputs read from a bucket (a real S3-compatible server) through a glob and an Arrow folder: the same records,
    and prepare-data's shards and tokenizer the same bytes as from the local files."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(bucket)
    for name in ("mixed.jsonl.gz", "late.txt.zst", "mixed_arrow/data-00000-of-00001.arrow", "mixed_arrow/state.json"):
        with fs.open_output_stream(f"{root}/corpus/{name}", compression=None) as f:  # the bytes as they are
            f.write((corpora / name).read_bytes())
    remote = readers.sources([f"{bucket}/corpus/*.gz", f"{bucket}/corpus/*.zst", f"{bucket}/corpus/mixed_arrow"])
    local = readers.sources([str(corpora / "mixed.jsonl.gz"), str(corpora / "late.txt.zst"), str(corpora / "mixed_arrow")])
    assert [s.where for s in remote] == [f"{bucket}/corpus/mixed.jsonl.gz", f"{bucket}/corpus/late.txt.zst", f"{bucket}/corpus/mixed_arrow"]
    for there, here in zip(remote, local):
        assert (there.kind, there.compression, there.name) == (here.kind, here.compression, here.name)
        field = "source" if here.kind != "text" else None
        assert list(readers.records(there, domain_field=field)) == list(readers.records(here, domain_field=field))
    # the remote inputs on a Ray Data pipeline (the session's Ray, two tasks), the local ones in this process
    for where, inputs, workers in (("remote", [f"{bucket}/corpus/*.jsonl.gz"], "2"), ("local", [str(corpora / "mixed.jsonl.gz")], "0")):
        assert main(["prepare-data", "--workers", workers, *inputs, "--out", str(tmp_path / where), "--vocab-size", "300",
                     "--seq-len", str(SEQ), "--domain-field", "source"]) == 0
    for part in ("tokenizer.json", "train/part-00000-00000.parquet", "eval/part-00000-00000.parquet"):
        assert (tmp_path / "remote" / part).read_bytes() == (tmp_path / "local" / part).read_bytes(), part


@pytest.mark.parametrize("inputs,flags", [
    (["mixed.jsonl.gz"], ["--domain-field", "source"]),
    (["mixed.parquet"], ["--domain-field", "source", "--tokenizer", "PRETRAINED"]),
    (["mixed_arrow"], ["--domain-field", "source"]),
    (["early.txt.bz2", "late.txt.zst"], []),
], ids=["jsonl-gz", "parquet-pretrained", "arrow", "compressed-text"])
def test_the_workers_loop_trains_on_shards_of_each_kind(corpora, tmp_path, inputs, flags):
    """Shards made from each kind of input train in a worker's own loop (worker.make_trial + worker.train, one rank):
    finite losses, the held-out loss of each domain (from the field or the file), routing measured by domain."""
    import torch
    from conftest import single_process_group
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from ercstudy.trainables.config import TrialConfig
    from ercstudy.trainables.worker import make_trial, train

    if "PRETRAINED" in flags:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator(EARLY + LATE, trainer=trainers.BpeTrainer(vocab_size=350, special_tokens=["</s>"],
                                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.save(str(tmp_path / "tokenizer.json"))
        flags = [str(tmp_path / "tokenizer.json") if f == "PRETRAINED" else f for f in flags]
    out = tmp_path / "shards"
    assert main(["prepare-data", "--workers", "0", *(str(corpora / i) for i in inputs), "--out", str(out), "--seq-len", str(SEQ),
                 "--vocab-size", "300", *flags]) == 0
    meta = ShardMeta.read(out)
    cfg = TrialConfig.from_dict({
        "model": {"vocab_size": meta.vocab_size, "d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": SEQ},
        "moe": {"num_experts": 4, "top_k": 2, "expert_dim": 32},
        "train": {"tokens": 6 * 8 * SEQ, "global_batch_size": 8, "micro_batch_size": 8, "lr": 0.005, "warmup_steps": 1,
                  "report_every": 3, "checkpoint_every": 6, "seed": 1},
        "data": {"kind": "parquet", "path": str(out)},
        "eval": {"every": 3, "sequences": 8},
    })
    reports = []
    with single_process_group():
        trial = make_trial(cfg, rank=0, world=1, device=torch.device("cpu"))
        train(trial, lambda trial, metrics, *, checkpoint: reports.append(metrics))
    assert [m.get("step", m.get("checkpoint_of_step")) for m in reports] == [3, 6, 6]  # step 6 saves before it evaluates
    reports = [m for m in reports if "step" in m]
    for m in reports:
        assert all(math.isfinite(m[k]) for k in ("lm_loss", "erc_loss", "eval/loss", "domain_nmi")), m
        assert {f"eval/loss/{d}" for d in meta.domains} <= m.keys()
    assert meta.domains == ["early", "late"]
