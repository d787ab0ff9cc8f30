"""Training data: the built-in synthetic multi-domain corpus, and Parquet token shards.

Synthetic corpus: `num_domains` token "languages", each a first-order Markov chain over its
own vocabulary (`shared_tokens` common to all domains + `tokens_per_domain` private ones).
Each token has `branching` likely successors (Dirichlet weights) plus a little uniform
mass, so the corpus is learnable (its entropy rate is far below the unigram entropy) and
the domain of a sequence is recoverable from its tokens, so experts can specialise and
routing can be checked against the true domain. Everything is a function of the seed:
the languages of `seed`, and batch `index` of a split from (seed, split, index).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ercstudy.trainables.shards import DataError, ShardMeta, join, shard_files
from ercstudy.trainables.validation import require

SPLITS = {"train": 0, "eval": 1}
UNIFORM_MASS = 0.02  # share of each transition row spread over the whole domain vocabulary


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The `data:` section: the built-in synthetic corpus, or Parquet token shards from `ercstudy prepare-data`."""

    kind: Literal["synthetic", "parquet"] = "synthetic"  # synthetic: the built-in multi-domain corpus; parquet: shards made by `ercstudy prepare-data`
    path: str | None = None  # parquet: what prepare-data wrote: a directory (relative: to the working directory) or a URI (s3://...)
    # parquet: who reads the training shards on each worker, the same batches either way: `direct` (pyarrow, only
    # the row groups of the worker's own rows) or `ray_data` (an ordered Ray Data read on the worker's node; it needs
    # a CPU free beside the trials, which a study leaves: RAY_DATA_CPUS in platform/cluster/capacity.py)
    reader: Literal["direct", "ray_data"] = "direct"
    # synthetic: several Markov-chain "languages" over partly shared vocabularies
    num_domains: int = 4
    tokens_per_domain: int = 48  # private tokens of each domain
    shared_tokens: int = 16  # tokens every domain uses
    branching: int = 3  # likely successors per token: lower = more learnable

    def __post_init__(self) -> None:
        for name in ("num_domains", "tokens_per_domain", "branching"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(self.shared_tokens >= 0, "shared_tokens", f"must be >= 0, got {self.shared_tokens}")
        require(self.kind != "parquet" or bool(self.path), "path", "kind 'parquet' needs the shard directory made by `ercstudy prepare-data`")
        require(self.reader in ("direct", "ray_data"), "reader", f"must be direct or ray_data, got {self.reader!r}")
        if self.path and "://" not in self.path:
            # Ray Train workers run in another working directory: hand them an absolute path.
            object.__setattr__(self, "path", os.path.abspath(os.path.expanduser(self.path)))

    @property
    def synthetic_vocab(self) -> int:
        return self.shared_tokens + self.num_domains * self.tokens_per_domain

@dataclass(frozen=True)
class Batch:
    tokens: torch.Tensor  # [B, T + 1] int64: inputs are tokens[:, :-1], targets tokens[:, 1:]
    domains: torch.Tensor  # [B] int64 domain of each sequence (-1 when unknown)


class SyntheticCorpus:
    def __init__(self, cfg: DataConfig, *, seq_len: int, seed: int):
        self.cfg, self.seq_len, self.seed = cfg, seq_len, seed
        rng = np.random.default_rng([seed, 7919])
        shared, per, n_dom = cfg.shared_tokens, cfg.tokens_per_domain, cfg.num_domains
        self.vocab_size = cfg.synthetic_vocab
        v = shared + per  # vocabulary of one domain, local ids 0..v-1
        # local id -> global token id, per domain: shared ids first, then the domain's private ids
        self.token_ids = np.stack(
            [np.concatenate([np.arange(shared), shared + d * per + np.arange(per)]) for d in range(n_dom)]
        )  # [n_dom, v]
        trans = np.full((n_dom, v, v), UNIFORM_MASS / v)
        for d in range(n_dom):
            for a in range(v):
                succ = rng.choice(v, size=min(cfg.branching, v), replace=False)
                trans[d, a, succ] += (1 - UNIFORM_MASS) * rng.dirichlet(np.ones(len(succ)))
        self.transitions = trans  # [n_dom, v, v] rows sum to 1
        self._cdf = np.cumsum(trans, axis=-1)
        self._cdf[..., -1] = 1.0

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        """Batch `index` of `split` ("train" or "eval"): the same sequences for the same arguments."""
        rng = np.random.default_rng([self.seed, SPLITS[split], index])
        domains = rng.integers(0, self.cfg.num_domains, size=batch_size)
        local = np.empty((batch_size, self.seq_len + 1), dtype=np.int64)
        local[:, 0] = rng.integers(0, self.token_ids.shape[1], size=batch_size)
        u = rng.random((batch_size, self.seq_len))
        for t in range(self.seq_len):
            cdf = self._cdf[domains, local[:, t]]  # [B, v]
            local[:, t + 1] = (cdf < u[:, t, None]).sum(axis=-1)
        tokens = self.token_ids[domains[:, None], local]
        return Batch(torch.from_numpy(tokens), torch.from_numpy(domains))

    def entropy_rate(self) -> float:
        """The corpus's true next-token entropy in nats (the loss a perfect model reaches), domains equally likely.

        Uses each chain's stationary distribution; a model must also infer the domain, which
        costs a little more at the first positions.
        """
        rates = []
        for trans in self.transitions:
            evals, evecs = np.linalg.eig(trans.T)
            pi = np.real(evecs[:, np.argmin(np.abs(evals - 1))])
            pi = pi / pi.sum()
            rates.append(float(-(pi[:, None] * trans * np.log(trans)).sum()))
        return float(np.mean(rates))

    def unigram_entropy(self, num_batches: int = 4, batch_size: int = 64) -> float:
        """Entropy in nats of the empirical token frequencies (the loss of a model that ignores context)."""
        counts = np.zeros(self.vocab_size)
        for i in range(num_batches):
            counts += np.bincount(self.batch("eval", i, batch_size).tokens.numpy().ravel(), minlength=self.vocab_size)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


class GlobalBatchStream:
    """A worker's view of the training data: optimizer step s trains on global batch s.

    Rank r of `world` takes the contiguous rows r * share ... (r + 1) * share of the step's
    global batch (share = global_batch / world), micro-batch m of them rows m * mb ... + mb,
    whatever the number of workers. The data position is therefore the step counter alone,
    which makes resuming exact. Subclasses say what a rank's share of step s is.
    """

    num_domains: int  # domain labels of the sequences are 0 .. num_domains - 1

    def __init__(self, *, global_batch: int, micro_batch: int, rank: int, world: int):
        if global_batch % world:
            raise ValueError(f"global_batch {global_batch} must be a multiple of world {world}")
        self.global_batch, self.micro_batch_size, self.rank, self.world = global_batch, micro_batch, rank, world
        self.share = global_batch // world
        self._cached: tuple[int, Batch] | None = None

    def share_at(self, step: int) -> Batch:
        """This rank's rows of global batch `step` [share, T + 1]."""
        raise NotImplementedError

    def micro_batch(self, step: int, micro: int) -> Batch:
        if self._cached is None or self._cached[0] != step:
            self._cached = (step, self.share_at(step))
        share = self._cached[1]
        rows = slice(micro * self.micro_batch_size, (micro + 1) * self.micro_batch_size)
        return Batch(share.tokens[rows], share.domains[rows])


class SyntheticStream(GlobalBatchStream):
    """Global batch s of the synthetic corpus: `corpus.batch("train", s, global_batch)`.

    Generating a batch is a Python loop over positions: while step s trains, step s + 1's share is built on a
    thread of its own (numpy releases the GIL in most of it), so the training thread does not leave the GPU
    waiting. The share is a function of the step alone: prefetched or not, resumed or not, the same rows."""

    def __init__(self, corpus: SyntheticCorpus, **kwargs: int):
        super().__init__(**kwargs)
        self.corpus, self.num_domains = corpus, corpus.cfg.num_domains
        self._executor: ThreadPoolExecutor | None = None
        self._next: tuple[int, Future] | None = None  # (step, its share being built)

    def build(self, step: int) -> Batch:
        full = self.corpus.batch("train", step, self.global_batch)
        rows = slice(self.rank * self.share, (self.rank + 1) * self.share)
        return Batch(full.tokens[rows], full.domains[rows])

    def share_at(self, step: int) -> Batch:
        share = self._next[1].result() if self._next is not None and self._next[0] == step else self.build(step)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ercstudy-synthetic-batch")
        self._next = (step + 1, self._executor.submit(self.build, step + 1))
        return share


def check_data(data: DataConfig, *, vocab_size: int, seq_len: int, global_batch: int, eval_sequences: int = 0) -> ShardMeta | None:
    """Check that the trial's data fits its model, batch and held-out set (on the driver, before any worker starts)."""
    if data.kind != "parquet":
        return None
    meta = ShardMeta.read(data.path)
    if meta.vocab_size > vocab_size:
        raise DataError(f"model.vocab_size: the shards in {data.path} use {meta.vocab_size} token ids, the model has {vocab_size}")
    if seq_len > meta.seq_len:
        raise DataError(f"model.seq_len: {seq_len} is longer than the shards' sequences ({meta.seq_len})")
    if meta.train_sequences < global_batch:
        raise DataError(f"train.global_batch_size: {global_batch} exceeds the {meta.train_sequences} training sequences in {data.path}")
    if eval_sequences > meta.eval_sequences:  # scored on fewer than asked, and a study would compare unequal sets
        raise DataError(f"eval.sequences: {eval_sequences} exceeds the {meta.eval_sequences} held-out sequences in {data.path} "
                        "(prepare-data's --eval-fraction sets them)")
    return meta


COLUMNS = ["tokens", "domain"]


def decode(table) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a pyarrow table of shards: tokens [n, T + 1] (fixed-size rows: one flat buffer) and domains [n]."""
    tokens = table.column("tokens").combine_chunks()
    flat = tokens.flatten().to_numpy()
    return (flat.reshape(len(tokens), -1) if len(tokens) else flat.reshape(0, 0)), table.column("domain").to_numpy()


class ShardIndex:
    """Random access by row to the Parquet files of one split, at row-group granularity.

    Rows have a fixed size, so row i of the split is found from the row counts in the files'
    footers alone; reading rows [start, stop) decodes only the row groups that hold them
    (`groups_read` lists them; the last one is kept, since consecutive steps read on from it).
    """

    def __init__(self, directory: str | Path):
        import pyarrow.parquet as pq

        self.fs, self.files = shard_files(directory)  # a local directory or a URI (s3://...): pyarrow's filesystems
        if not self.files:
            raise DataError(f"{directory}: no Parquet shards")
        # read once (in parallel: on object storage each footer is a round trip); every row-group read reuses them
        with ThreadPoolExecutor(max_workers=min(16, len(self.files))) as pool:
            footers = pool.map(lambda f: pq.read_metadata(f, filesystem=self.fs), self.files)
            self.footers = dict(zip(self.files, footers))
        self.groups: list[tuple[str, int]] = []  # (file, row group)
        starts = [0]
        for f, meta in self.footers.items():
            for g in range(meta.num_row_groups):
                self.groups.append((f, g))
                starts.append(starts[-1] + meta.row_group(g).num_rows)
        self.starts = np.asarray(starts)  # [groups + 1] first row of each group, then the total
        self.num_rows = int(self.starts[-1])
        self.groups_read: list[int] = []  # indices into self.groups, in the order decoded
        self._last: tuple[int, dict[str, np.ndarray]] | None = None
        self._open: tuple[str, object] | None = None  # the file read last, kept open: consecutive groups share it

    def _group(self, g: int) -> dict[str, np.ndarray]:
        if self._last is None or self._last[0] != g:
            import pyarrow.parquet as pq

            file, group = self.groups[g]
            if self._open is None or self._open[0] != file:
                self._open = (file, pq.ParquetFile(file, metadata=self.footers[file], filesystem=self.fs))
            tokens, domains = decode(self._open[1].read_row_group(group, columns=COLUMNS))
            self._last = (g, {"tokens": tokens, "domain": domains})
            self.groups_read.append(g)
        return self._last[1]

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [start, stop): tokens [stop - start, T + 1] and domains [stop - start]."""
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        tokens, domains = [], []
        g = first
        while g < len(self.groups) and self.starts[g] < stop:
            rows = self._group(g)
            lo, hi = max(start, self.starts[g]) - self.starts[g], min(stop, self.starts[g + 1]) - self.starts[g]
            tokens.append(rows["tokens"][lo:hi])
            domains.append(rows["domain"][lo:hi])
            g += 1
        return np.concatenate(tokens), np.concatenate(domains)


ROTATION_KEY = 48611  # the seed's stream of ShardStream.offset, apart from the seed's other draws


class ShardStream(GlobalBatchStream):
    """Parquet token shards (from `ercstudy prepare-data`) as the training stream: global batch s is rows
    first_row(s) ... + global_batch of the train split in file order, epochs wrapping, the last partial batch
    dropped. Subclasses say who reads the rows.

    `seed` (the trial's train.seed) rotates the order: the stream starts at global batch offset(seed) of the
    split and wraps around to it, so two seeds train on the split's batches in a different order (for a run
    shorter than an epoch, on different batches), while the data position stays a function of the step (a
    resume reads exactly what the uninterrupted run would have). A rotation, not a reshuffle: the reads stay
    sequential (row groups decoded once, one ordered Ray Data read per pass); prepare-data's `--seed` is the
    shuffle of the sequences themselves. None: no rotation (batch 1 is the split's first rows)."""

    def __init__(self, directory: str | Path, *, num_domains: int, seq_len: int, seed: int | None = None, **kwargs: int):
        super().__init__(**kwargs)
        self.index = ShardIndex(join(directory, "train"))  # the footers: the files' and row groups' first rows
        self.seq_len, self.num_domains = seq_len, num_domains
        self.batches_per_epoch = self.index.num_rows // self.global_batch
        if self.batches_per_epoch == 0:
            raise DataError(f"{directory}: {self.index.num_rows} training sequences, fewer than one global batch ({self.global_batch})")
        self.offset = 0 if seed is None else int(np.random.default_rng([seed, ROTATION_KEY]).integers(self.batches_per_epoch))

    def first_row(self, step: int) -> int:
        """The split's row where global batch `step` starts."""
        return ((step - 1 + self.offset) % self.batches_per_epoch) * self.global_batch

    def batch(self, tokens: np.ndarray, domains: np.ndarray) -> Batch:
        """Rows as read (int32, seq_len + 1 or more tokens each) as a Batch of the model's sequence length."""
        return Batch(torch.from_numpy(np.ascontiguousarray(tokens[:, : self.seq_len + 1], dtype=np.int64)),
                     torch.from_numpy(domains.astype(np.int64)))


class ParquetStream(ShardStream):
    """Parquet token shards (from `ercstudy prepare-data`), read straight from the files by each worker.

    Global batch s is rows (s - 1 + offset) % batches_per_epoch * global_batch ... + global_batch of
    the split in file order (offset: the seed's rotation, ShardStream; prepare-data shuffled the
    sequences once; every epoch reads them in that order, the last partial batch dropped).
    `directory` is a local path or a URI (s3://...): the worker reads from where the shards live. A worker reads only its own share of each step, and a
    resumed worker starts at its step's rows: nothing before them is read. The next step's share
    is read in a background thread while the current step trains.
    """

    def __init__(self, directory: str | Path, **kwargs: int):
        super().__init__(directory, **kwargs)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ercstudy-shards")
        self._ahead: tuple[int, Future[Batch]] | None = None

    def _read(self, step: int) -> Batch:
        start = self.first_row(step) + self.rank * self.share
        return self.batch(*self.index.read(start, start + self.share))

    def share_at(self, step: int) -> Batch:
        # every read goes through the one reader thread: the index and its cached row group are not shared
        ahead, self._ahead = self._ahead, None
        batch = (ahead[1] if ahead is not None and ahead[0] == step else self._pool.submit(self._read, step)).result()
        self._ahead = (step + 1, self._pool.submit(self._read, step + 1))
        return batch


class RayDataStream(ShardStream):
    """Parquet token shards read by Ray Data, where the worker runs: the same batches as ParquetStream.

    Step s is global batch s of the split in file order, rotated by the seed as ParquetStream's (epochs wrap, the
    last partial batch dropped) and rank r keeps rows r * share ... (r + 1) * share of it, as with ParquetStream:
    the data position is the step alone. Each worker runs its own ordered read (Ray Data's streaming split hands out blocks to whichever worker asks first and
    cannot start at an offset, so it could not keep "step s is batch s" across a restart): its read tasks run on
    the worker's node with no CPU of their own (they wait on storage, and the trial's CPUs are held by its workers),
    and Ray Data streams the next blocks in while the step trains. Ray Data still lists and samples the files in
    tasks of one CPU: a study leaves one free (capacity.RAY_DATA_CPUS). A worker starting at step s reads from the
    file that holds the step's first row: nothing of the files before it. Every worker reads the whole of each
    global batch it trains on (it keeps its share): `world` times the bytes of ParquetStream, which reads row groups
    of its own rows only; a 1M-token global batch is 4 MB per worker and step.
    """

    def __init__(self, directory: str | Path, **kwargs: int):
        super().__init__(directory, **kwargs)
        rows = [self.index.footers[f].num_rows for f in self.index.files]
        self.file_starts = np.concatenate([[0], np.cumsum(rows)])  # [files + 1]
        self._batches = None  # the open read: global batches from step self._next on
        self._next = -1
        self.reads: list[tuple[int, int]] = []  # (step, first file) of every read started: a restart starts one

    def _read_from(self, step: int):
        """Global batches step, step + 1, ... to the end of the step's epoch, each as this rank's (tokens, domains)."""
        import ray
        import ray.data

        start = self.first_row(step)
        first = int(np.searchsorted(self.file_starts, start, side="right")) - 1
        skip = start - int(self.file_starts[first])
        self.reads.append((step, first))
        ds = ray.data.read_parquet(self.index.files[first:], filesystem=self.index.fs, columns=COLUMNS, num_cpus=0,
                                   label_selector={"ray.io/node-id": ray.get_runtime_context().get_node_id()})
        ds.context.execution_options.preserve_order = True  # blocks in file order: batch s is the same rows on every rank
        ds.context.enable_progress_bars = False
        want = self.batches_per_epoch - start // self.global_batch  # global batches left in the epoch
        g, lo = self.global_batch, self.rank * self.share
        left: tuple[np.ndarray, np.ndarray] | None = None  # rows read, not yet a whole global batch
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            tokens, domains = decode(table)
            drop = min(skip, len(tokens))  # the rows of the first file before the step's
            skip -= drop
            tokens, domains = tokens[drop:], domains[drop:]
            if left is not None:
                tokens, domains = np.concatenate([left[0], tokens]), np.concatenate([left[1], domains])
            whole = min(len(tokens) // g, want)
            for b in range(whole):
                yield tokens[b * g + lo : b * g + lo + self.share], domains[b * g + lo : b * g + lo + self.share]
            want -= whole
            if not want:
                return
            left = tokens[whole * g :], domains[whole * g :]

    def share_at(self, step: int) -> Batch:
        got = next(self._batches, None) if self._batches is not None and self._next == step else None
        if got is None:  # the first step, a jump (a restart), or an epoch's end: a new read from this step
            if self._batches is not None:
                self._batches.close()
            self._batches = self._read_from(step)
            got = next(self._batches)
        self._next = step + 1
        return self.batch(*got)


def build_train_data(data: DataConfig, *, seq_len: int, seed: int, global_batch: int, micro_batch: int,
                     rank: int, world: int) -> GlobalBatchStream:
    """The training stream of one worker."""
    kwargs = {"global_batch": global_batch, "micro_batch": micro_batch, "rank": rank, "world": world}
    if data.kind == "parquet":
        meta = ShardMeta.read(data.path)
        stream = RayDataStream if data.reader == "ray_data" else ParquetStream
        return stream(data.path, num_domains=len(meta.domains), seq_len=seq_len, seed=seed, **kwargs)
    return SyntheticStream(SyntheticCorpus(data, seq_len=seq_len, seed=seed), **kwargs)
