"""prepare-data's throughput and memory against the tokenizer's own speed, on the shipped text repeated to a size.

    python benchmarks/prepare_data.py             # corpora of 8 and 32 MB
    python benchmarks/prepare_data.py --tiny      # 1 MB (tests)

The corpus is cut into FILES input files (prepare-data runs one task per input). Rows, per corpus size, each
measured in a fresh process pinned to its CPUs (`taskset`; its Ray, when it starts one, inherits the pinning):
  ceiling    the tokenizer's batch encode of the same documents (tokenizers, Rust), on 1 thread and 1 CPU: the most a
             pipeline that tokenizes on one core can reach here
  ray        `ercstudy prepare-data` whole (read, count, split, tokenize, pack, shuffle through spill files, write
             Parquet shards) with that tokenizer (--tokenizer: no training pass), on a local Ray of 1 and of 2 CPUs
             (one task per CPU, the tokenizer on 1 thread each); the Ray is started before the clock (`ray_start_s`)
  process    the same in one process (--workers 0) on 1 and 2 CPUs, the tokenizer on as many threads: the baseline
Each pipeline row runs 1 + --repeats times in its process (default 3; 1 with --tiny): `seconds` and the rates are the
median of the runs after the first (Ray's worker processes already started, as on a cluster that has run anything),
`cold_s` the first run's (those workers started and imported the stack: seconds, whatever the corpus); the ceiling's
`seconds` is the median of as many encodes.
`tokens_per_s` counts the documents' tokens (end-of-document tokens included for the pipeline); `of_ceiling` is a
row's tokens/s over the ceiling's at that size, `vs_1_cpu` a row's over its own kind's 1-CPU row; `peak_rss_mb` is the
measuring process's peak resident set, `worker_peak_rss_mb` the largest of its Ray worker processes' (a worker runs
one task at a time): flat across corpus sizes means memory does not grow with the corpus.
Checked first: the shards hold every document's tokens (the ceiling's count, plus one end-of-document token per
document, less the tails cut off), within the rows dropped at each input's end, and all four runs wrote the same rows.
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
TINY_MB = (1,)
FILES = 8
SEQ_LEN = 256
TEXT = [ROOT / "tests" / "fixtures" / name for name in ("early.txt", "late.txt")]
COLUMNS = ["corpus_mb", "what", "cpus", "seconds", "cold_s", "ray_start_s", "tokens", "tokens_per_s", "of_ceiling", "vs_1_cpu", "peak_rss_mb", "worker_peak_rss_mb"]

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
docs = [d for src in readers.sources(sys.argv[3:]) for _, d in readers.records(src)]
seconds = []
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    tokens = sum(len(e.ids) for i in range(0, len(docs), 256) for e in tok.encode_batch(docs[i:i + 256]))
    seconds.append(time.perf_counter() - start)
print(json.dumps({"seconds": sorted(seconds)[len(seconds) // 2], "tokens": tokens, "documents": len(docs), "peak_rss_mb": peak_mb()}))
"""

PIPELINE = PRELUDE + """
import hashlib, pathlib
from ercstudy.platform.cluster.ray_runtime import ensure_ray, stop_local_ray
from ercstudy.platform.data.prepare import prepare_data
tok, out, seq_len, workers, repeats, inputs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6:]
start = time.perf_counter()
if workers:
    ensure_ray(num_cpus=workers, verbose=False)
ray_start = time.perf_counter() - start
seconds = []
for run in range(1 + repeats):  # the first run starts Ray's worker processes (their imports); the others find them
    start = time.perf_counter()
    meta = prepare_data(inputs, f"{out}-{run}", tokenizer=tok, seq_len=seq_len, workers=workers, progress=False)
    seconds.append(time.perf_counter() - start)
workers_peak = None
if workers:  # the largest peak resident set of Ray's worker processes (this process's children's children)
    import psutil
    peaks = [int(next(l for l in open(f"/proc/{p.pid}/status") if l.startswith("VmHWM")).split()[1]) / 1024
             for p in psutil.Process().children(recursive=True) if p.name().startswith("ray::")]
    workers_peak = max(peaks, default=None)
    stop_local_ray()
rows = meta.train_sequences + meta.eval_sequences
digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(pathlib.Path(f"{out}-1").rglob("*.parquet")))).hexdigest()
print(json.dumps({"seconds": sorted(seconds[1:])[len(seconds[1:]) // 2], "cold_s": seconds[0], "ray_start_s": ray_start if workers else None,
                  "tokens": rows * (meta.seq_len + 1), "peak_rss_mb": peak_mb(), "worker_peak_rss_mb": workers_peak,
                  "digest": digest}))
"""


def corpus(directory: Path, megabytes: int) -> list[Path]:
    """The shipped excerpts repeated to `megabytes` of text, documents separated by blank lines, in FILES files; each
    copy numbered, so that no two documents are the same."""
    base = "\n\n".join(p.read_text() for p in TEXT)
    paths = [directory / f"corpus-{megabytes}mb-{i}.txt" for i in range(FILES)]
    copy = 0
    for path in paths:
        with path.open("w") as f:
            while f.tell() < megabytes * 2**20 / FILES:
                f.write(f"Copy {copy}.\n\n{base}\n\n")
                copy += 1
    return paths


def tokenizer(directory: Path) -> Path:
    """A 4096-token BPE trained by prepare-data on the excerpts themselves (the tokenizer every row uses)."""
    from ercstudy.platform.data.prepare import prepare_data

    out = directory / "tokenizer-run"
    prepare_data([str(p) for p in TEXT], str(out), vocab_size=4096, seq_len=SEQ_LEN, workers=0, progress=False)
    return out / "tokenizer.json"


def child(code: str, args: list[str], cpus: int, threads: int) -> dict:
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    pin = ["taskset", "-c", ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:cpus])]
    proc = subprocess.run([*pin, sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"a measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(megabytes: int, tok: Path, work: Path, repeats: int) -> tuple[list[dict], list[dict]]:
    texts = [str(p) for p in corpus(work, megabytes)]
    ceiling = child(CEILING, [str(tok), str(repeats), *texts], cpus=1, threads=1)
    rows = [{"corpus_mb": megabytes, "what": "ceiling", "cpus": 1, **ceiling}]
    for what in ("ray", "process"):
        for cpus in (1, 2):
            out = work / f"shards-{megabytes}-{what}-{cpus}"
            workers = cpus if what == "ray" else 0
            rows.append({"corpus_mb": megabytes, "what": what, "cpus": cpus,
                         **child(PIPELINE, [str(tok), str(out), str(SEQ_LEN), str(workers), str(repeats), *texts], cpus=cpus,
                                 threads=1 if what == "ray" else cpus)})
    for r in rows:
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["of_ceiling"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
    for two in (rows[2], rows[4]):
        two["vs_1_cpu"] = two["tokens_per_s"] / rows[rows.index(two) - 1]["tokens_per_s"]
    # every document's tokens, an end-of-document token each, less at most one row per input, domain and split cut off
    expected = ceiling["tokens"] + ceiling["documents"]
    checks = [verify_that(f"{megabytes} MB: the shards hold every document's tokens",
                          0 <= expected - rows[1]["tokens"] <= 2 * FILES * (SEQ_LEN + 1), expected=expected, written=rows[1]["tokens"]),
              verify_that(f"{megabytes} MB: the same shards from Ray on 1 and 2 CPUs and from one process",
                          len({r["digest"] for r in rows[1:]}) == 1, digests=[r["digest"][:12] for r in rows[1:]])]
    for r in rows:
        r.pop("documents", None)
        r.pop("digest", None)
    return rows, checks


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", help="corpus sizes in MB (default: 8 32; --tiny: 1)")
    p.set_defaults(repeats=3)  # whole runs of tens of seconds: the median of 3 (--tiny: 1)
    args = p.parse_args(argv)
    sizes = args.sizes or (TINY_MB if args.tiny else SIZES_MB)
    rows, checks = [], []
    with tempfile.TemporaryDirectory(prefix="ercstudy-prepare-bench-") as tmp:
        work = Path(tmp)
        tok = tokenizer(work)
        for megabytes in sizes:
            started = time.perf_counter()
            size_rows, size_checks = measure(megabytes, tok, work, 1 if args.tiny else args.repeats)
            for check in size_checks:
                if not check["passed"]:
                    raise SystemExit(f"check failed: {check['check']}: {check}")
            rows += size_rows
            checks += size_checks
            print(f"{megabytes} MB measured in {time.perf_counter() - started:.0f} s", flush=True)
    import torch

    return report("prepare_data", args, torch.device("cpu"), rows, COLUMNS, checks=checks)


if __name__ == "__main__":
    main()
