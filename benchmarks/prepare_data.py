"""prepare-data's throughput and memory against the tokenizer's own speed, on the shipped text repeated to a size.

    python benchmarks/prepare_data.py             # corpora of 8 and 32 MB
    python benchmarks/prepare_data.py --tiny      # 1 and 2 MB (tests)

Rows, per corpus size, each measured in a fresh process (its own peak memory, its own thread count):
  ceiling    the tokenizer's batch encode of the same documents (tokenizers, Rust), on 1 thread: the most a pipeline
             that tokenizes on one core can reach here
  pipeline   `ercstudy prepare-data` whole (read, count, split, tokenize, pack, shuffle through spill files, write
             Parquet shards) with that tokenizer (--tokenizer: no training pass), the tokenizer on 1 and on 2 threads
`tokens_per_s` counts the documents' tokens (end-of-document tokens included for the pipeline); `of_ceiling` is a
row's tokens/s over the ceiling's at that size, `vs_1_thread` a pipeline row's over its 1-thread row; `peak_rss_mb` is
the process's peak resident set: flat across corpus sizes means memory does not grow with the corpus.
Checked first: the pipeline's shards hold every document's tokens (the ceiling's count, plus one end-of-document token
per document, less the tails cut off), within the rows dropped at each split's end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import parser, report, verify_that  # noqa: E402

SIZES_MB = (8, 32)
TINY_MB = (1, 2)
SEQ_LEN = 256
TEXT = [ROOT / "tests" / "fixtures" / name for name in ("early.txt", "late.txt")]
COLUMNS = ["corpus_mb", "what", "threads", "seconds", "tokens", "tokens_per_s", "of_ceiling", "vs_1_thread", "peak_rss_mb"]

# each measurement's process: its own peak resident set (VmHWM: of its address space since exec; ru_maxrss would
# include the benchmark process it was forked from)
PRELUDE = """
import json, sys, time
def peak_mb():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024
"""

CEILING = PRELUDE + """
from tokenizers import Tokenizer
from ercstudy.platform.data import readers
tok = Tokenizer.from_file(sys.argv[1])
docs = [d for _, d in readers.records(readers.sources([sys.argv[2]])[0])]
start = time.perf_counter()
tokens = sum(len(e.ids) for i in range(0, len(docs), 256) for e in tok.encode_batch(docs[i:i + 256]))
print(json.dumps({"seconds": time.perf_counter() - start, "tokens": tokens, "documents": len(docs), "peak_rss_mb": peak_mb()}))
"""

PIPELINE = PRELUDE + """
from ercstudy.platform.data.prepare import prepare_data
start = time.perf_counter()
meta = prepare_data([sys.argv[2]], sys.argv[3], tokenizer=sys.argv[1], seq_len=int(sys.argv[4]), progress=False)
seconds = time.perf_counter() - start
rows = meta.train_sequences + meta.eval_sequences
print(json.dumps({"seconds": seconds, "tokens": rows * (meta.seq_len + 1), "peak_rss_mb": peak_mb()}))
"""


def corpus(directory: Path, megabytes: int) -> Path:
    """The shipped excerpts repeated to `megabytes` of text, documents separated by blank lines; each copy numbered,
    so that no two documents are the same."""
    base = "\n\n".join(p.read_text() for p in TEXT)
    path = directory / f"corpus-{megabytes}mb.txt"
    with path.open("w") as f:
        copy = 0
        while f.tell() < megabytes * 2**20:
            f.write(f"Copy {copy}.\n\n{base}\n\n")
            copy += 1
    return path


def tokenizer(directory: Path) -> Path:
    """A 4096-token BPE trained by prepare-data on the excerpts themselves (the tokenizer every row uses)."""
    from ercstudy.platform.data.prepare import prepare_data

    out = directory / "tokenizer-run"
    prepare_data([str(p) for p in TEXT], str(out), vocab_size=4096, seq_len=SEQ_LEN, progress=False)
    return out / "tokenizer.json"


def child(code: str, args: list[str], threads: int) -> dict:
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"a measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(megabytes: int, tok: Path, work: Path) -> tuple[list[dict], dict]:
    text = corpus(work, megabytes)
    ceiling = child(CEILING, [str(tok), str(text)], threads=1)
    rows = [{"corpus_mb": megabytes, "what": "ceiling", "threads": 1, **ceiling}]
    for threads in (1, 2):
        out = work / f"shards-{megabytes}-{threads}"
        rows.append({"corpus_mb": megabytes, "what": "pipeline", "threads": threads,
                     **child(PIPELINE, [str(tok), str(text), str(out), str(SEQ_LEN)], threads=threads)})
    for r in rows:
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["of_ceiling"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
    rows[2]["vs_1_thread"] = rows[2]["tokens_per_s"] / rows[1]["tokens_per_s"]
    # every document's tokens, an end-of-document token each, less at most one row per domain and split cut off
    expected = ceiling["tokens"] + ceiling["documents"]
    check = verify_that(f"{megabytes} MB: the shards hold every document's tokens", 0 <= expected - rows[1]["tokens"] <= 4 * (SEQ_LEN + 1),
                        expected=expected, written=rows[1]["tokens"])
    for r in rows:
        r.pop("documents", None)
    return rows, check


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", help="corpus sizes in MB (default: 8 32; --tiny: 1 2)")
    args = p.parse_args(argv)
    sizes = args.sizes or (TINY_MB if args.tiny else SIZES_MB)
    rows, checks = [], []
    with tempfile.TemporaryDirectory(prefix="ercstudy-prepare-bench-") as tmp:
        work = Path(tmp)
        tok = tokenizer(work)
        for megabytes in sizes:
            started = time.perf_counter()
            size_rows, check = measure(megabytes, tok, work)
            if not check["passed"]:
                raise SystemExit(f"check failed: {check['check']}: {check}")
            rows += size_rows
            checks.append(check)
            print(f"{megabytes} MB measured in {time.perf_counter() - started:.0f} s", flush=True)
    import torch

    return report("prepare_data", args, torch.device("cpu"), rows, COLUMNS, checks=checks)


if __name__ == "__main__":
    main()
