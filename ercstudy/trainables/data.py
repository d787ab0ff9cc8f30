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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import DataConfig
from .shards import DataError, ShardMeta

SPLITS = {"train": 0, "eval": 1}
UNIFORM_MASS = 0.02  # share of each transition row spread over the whole domain vocabulary

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

    Micro-batch m of rank r is rows (m * world + r) * mb ... + mb of the step's global batch,
    whatever the number of workers. The data position is therefore the step counter alone,
    which makes resuming exact. Subclasses say what global batch s is.
    """

    num_domains: int  # domain labels of the sequences are 0 .. num_domains - 1

    def __init__(self, *, global_batch: int, micro_batch: int, rank: int, world: int):
        self.global_batch, self.micro_batch_size, self.rank, self.world = global_batch, micro_batch, rank, world
        self._cached: tuple[int, Batch] | None = None

    def global_batch_at(self, step: int) -> Batch:
        raise NotImplementedError

    def micro_batch(self, step: int, micro: int) -> Batch:
        if self._cached is None or self._cached[0] != step:
            self._cached = (step, self.global_batch_at(step))
        full = self._cached[1]
        start = (micro * self.world + self.rank) * self.micro_batch_size
        rows = slice(start, start + self.micro_batch_size)
        return Batch(full.tokens[rows], full.domains[rows])


class SyntheticStream(GlobalBatchStream):
    """Global batch s of the synthetic corpus: `corpus.batch("train", s, global_batch)`."""

    def __init__(self, corpus: SyntheticCorpus, **kwargs: int):
        super().__init__(**kwargs)
        self.corpus, self.num_domains = corpus, corpus.cfg.num_domains

    def global_batch_at(self, step: int) -> Batch:
        return self.corpus.batch("train", step, self.global_batch)


def check_data(cfg) -> ShardMeta | None:
    """Check that the trial's data fits its model (on the driver, before any worker starts)."""
    if cfg.data.kind != "parquet":
        return None
    meta = ShardMeta.read(cfg.data.path)
    if meta.vocab_size > cfg.model.vocab_size:
        raise DataError(f"model.vocab_size: the shards in {cfg.data.path} use {meta.vocab_size} token ids, the model has {cfg.model.vocab_size}")
    if cfg.model.seq_len > meta.seq_len:
        raise DataError(f"model.seq_len: {cfg.model.seq_len} is longer than the shards' sequences ({meta.seq_len})")
    if meta.train_sequences < cfg.train.global_batch_size:
        raise DataError(f"train.global_batch_size: {cfg.train.global_batch_size} exceeds the {meta.train_sequences} training sequences in {cfg.data.path}")
    return meta


def train_dataset(cfg):
    """The Ray Dataset of the trial's training shards (None for the synthetic corpus)."""
    if cfg.data.kind != "parquet":
        return None
    import ray.data

    # Pre-tokenized shards only need decoding: 0-CPU read tasks run beside workers that hold every CPU.
    ds = ray.data.read_parquet(str(Path(cfg.data.path) / "train"), columns=["tokens", "domain"], num_cpus=0)
    ds.context.execution_options.preserve_order = True  # file order: the step -> batch contract of ParquetStream
    return ds


class ParquetStream(GlobalBatchStream):
    """Parquet token shards streamed by Ray Data.

    Every worker iterates the whole dataset in file order (Ray Data with preserve_order; the
    dataset is not split across workers) in global batches and takes its rows of each:
    step s trains on batch (s - 1) % batches_per_epoch of epoch (s - 1) // batches_per_epoch.
    A resumed worker skips the batches before its step, so no sequence is trained twice or
    lost. prepare-data shuffled the sequences once; every epoch reads them in that order.
    """

    def __init__(self, iterator: Any, meta: ShardMeta, *, seq_len: int, **kwargs: int):
        super().__init__(**kwargs)
        self.iterator, self.seq_len, self.num_domains = iterator, seq_len, len(meta.domains)
        self.batches_per_epoch = meta.train_sequences // self.global_batch
        self._batches: Any = None
        self._epoch, self._next = -1, 0

    def global_batch_at(self, step: int) -> Batch:
        epoch, index = divmod(step - 1, self.batches_per_epoch)
        if epoch != self._epoch or index < self._next:
            self._batches = iter(self.iterator.iter_batches(batch_size=self.global_batch, batch_format="numpy", drop_last=True))
            self._epoch, self._next = epoch, 0
        while self._next <= index:
            rows = next(self._batches)
            self._next += 1
        tokens = rows["tokens"]
        if tokens.dtype == object:  # a list column can arrive as an array of arrays
            tokens = np.stack(tokens)
        tokens = torch.from_numpy(np.ascontiguousarray(tokens[:, : self.seq_len + 1], dtype=np.int64))
        return Batch(tokens, torch.from_numpy(rows["domain"].astype(np.int64)))


def build_train_data(cfg, *, rank: int, world: int):
    """The training stream of one worker for the trial config `cfg` (inside a Ray Train worker)."""
    t = cfg.train
    if cfg.data.kind == "parquet":
        import ray.train

        meta = ShardMeta.read(cfg.data.path)
        return ParquetStream(
            ray.train.get_dataset_shard("train"), meta, seq_len=cfg.model.seq_len,
            global_batch=t.global_batch_size, micro_batch=t.micro_batch_size, rank=rank, world=world,
        )
    corpus = SyntheticCorpus(cfg.data, seq_len=cfg.model.seq_len, seed=t.seed)
    return SyntheticStream(corpus, global_batch=t.global_batch_size, micro_batch=t.micro_batch_size, rank=rank, world=world)
