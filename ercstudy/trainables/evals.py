"""Downstream evaluations: held-out loss per domain, and multiple-choice tasks scored by log-likelihood.

Multiple choice as lm-evaluation-harness does it: each choice is scored by the summed
log-probability of its tokens given the context; `acc` takes the best sum, `acc_norm` the
best sum per character of the choice (per token for token-level synthetic tasks). All
(item, choice) rows go through the model in padded batches: one forward per batch, the
choice tokens picked out with a mask, no Python loop over tokens.

In training, every worker evaluates its share of a fixed eval set (rows rank, rank + world,
...) and the sums are all-reduced, so the numbers do not depend on the number of workers,
and under expert parallelism every rank runs the same number of forwards.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ercstudy.trainables.data import DataConfig, ShardIndex, SyntheticCorpus
from ercstudy.trainables.lm_eval_config import HarnessConfig
from ercstudy.trainables.lm_loss import target_logprobs
from ercstudy.trainables.shards import ShardMeta, join
from ercstudy.trainables.validation import require


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """The `eval:` section: what a trial evaluates, and how often."""

    every: int = 0  # steps between evaluations (a multiple of train.report_every); 0 = at the end only
    sequences: int = 64  # held-out sequences for the eval loss
    mc_items: int = 64  # items of the synthetic multiple-choice task (synthetic corpus only)
    mc_choices: int = 4  # choices per synthetic multiple-choice item
    mc_context: int = 16  # context tokens of an item
    mc_continuation: int = 8  # tokens of each choice
    batch_size: int = 16  # rows per forward
    harness: HarnessConfig = field(default_factory=HarnessConfig)  # lm-eval tasks on the trial's model (harness.py)

    def __post_init__(self) -> None:
        for name in ("every", "sequences", "mc_items"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("mc_context", "mc_continuation", "batch_size"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(self.mc_choices >= 2, "mc_choices", f"must be >= 2, got {self.mc_choices}")


@dataclass(frozen=True)
class MCItem:
    context: list[int]
    choices: list[list[int]]
    gold: int
    choice_chars: list[int]  # length of each choice in characters (tokens for token-level tasks)


# ---------------------------------------------------------------------------------------------
# Scoring


def _target_logprobs(model: Any, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """log p(next token) [B, T] (float32) and whether it is the greedy choice [B, T], for tokens [B, T + 1], the
    LM head applied a chunk of positions at a time: an evaluation never holds [B, T, V] float32 logits (13-20 GB
    at seq 4096 and a 32k vocabulary), which could fail a trial at its end."""
    h, _ = model.trunk(tokens[:, :-1])  # [B, T, d]
    logprob, greedy = target_logprobs(h.flatten(0, 1), model.lm_head.weight, tokens[:, 1:].flatten())
    return logprob.view(h.shape[:2]), greedy.view(h.shape[:2])


@torch.no_grad()
def continuation_logprobs(model: Any, pairs: list[tuple[list[int], list[int]]], *, seq_len: int, batch_size: int,
                          device: torch.device) -> tuple[Tensor, Tensor]:
    """For each (context, continuation) pair of token ids: the summed log-probability of the
    continuation given the context [N] (float32), and whether greedy decoding yields it [N] (bool).

    Rows longer than seq_len + 1 tokens keep their last seq_len + 1 (the context is cut on the
    left, as lm-evaluation-harness does). Rows are right-padded: causal attention keeps padding
    out of every scored position.
    """
    rows, spans = [], []
    for context, continuation in pairs:
        row = (context + continuation)[-(seq_len + 1) :]
        n = min(len(continuation), len(row) - 1)
        rows.append(row)
        spans.append((len(row) - n, n))  # scored tokens at [start, start + n)
    width = max(len(r) for r in rows)
    padded = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width - 1, dtype=torch.bool)  # mask[r, t]: target t + 1 is scored
    for r, (row, (start, n)) in enumerate(zip(rows, spans)):
        padded[r, : len(row)] = torch.tensor(row)
        mask[r, start - 1 : start - 1 + n] = True
    logprob, greedy = torch.empty(len(rows)), torch.empty(len(rows), dtype=torch.bool)
    for b in range(0, len(rows), batch_size):
        tok, m = padded[b : b + batch_size].to(device), mask[b : b + batch_size].to(device)
        token_logprob, token_greedy = _target_logprobs(model, tok)
        logprob[b : b + batch_size] = (token_logprob * m).sum(-1).cpu()
        greedy[b : b + batch_size] = (token_greedy | ~m).all(-1).cpu()
    return logprob, greedy


def choice_logprobs(model: Any, items: list[MCItem], *, seq_len: int, batch_size: int, device: torch.device) -> Tensor:
    """[N, C] summed log-probability of each choice's tokens given its context (float32); items with
    fewer than C choices (ARC has 3 to 5) are padded with -inf."""
    pairs = [(item.context, choice) for item in items for choice in item.choices]
    out, _ = continuation_logprobs(model, pairs, seq_len=seq_len, batch_size=batch_size, device=device)
    n_choices = [len(item.choices) for item in items]
    if len(set(n_choices)) == 1:
        return out.view(len(items), -1)
    result = torch.full((len(items), max(n_choices)), float("-inf"))
    item_of_row = torch.repeat_interleave(torch.arange(len(items)), torch.tensor(n_choices))
    choice_of_row = torch.cat([torch.arange(c) for c in n_choices])
    result[item_of_row, choice_of_row] = out
    return result


def mc_correct(logprobs: Tensor, items: list[MCItem]) -> tuple[Tensor, Tensor]:
    """Per item: (acc, acc_norm) as 0/1 floats."""
    gold = torch.tensor([it.gold for it in items])
    chars = torch.ones(logprobs.shape)
    for i, it in enumerate(items):
        chars[i, : len(it.choice_chars)] = torch.tensor(it.choice_chars, dtype=torch.float32)
    acc = (logprobs.argmax(-1) == gold).float()
    acc_norm = ((logprobs / chars).argmax(-1) == gold).float()
    return acc, acc_norm


# ---------------------------------------------------------------------------------------------
# Tasks


def synthetic_mc_task(corpus: SyntheticCorpus, cfg: EvalConfig, *, seed: int) -> list[MCItem]:
    """Which continuation belongs to the context's language? Deterministic per seed.

    Item i: a held-out sequence of domain d gives the context and the right continuation;
    the other choices are the same positions of held-out sequences from other domains. The
    gold position is drawn at random, so a model that scores every choice alike is at chance.
    """
    need = cfg.mc_context + cfg.mc_continuation
    require(need <= corpus.seq_len + 1, "eval.mc_context", f"context + continuation ({need}) must fit in model.seq_len + 1")
    require(corpus.cfg.num_domains >= cfg.mc_choices, "eval.mc_choices", f"must be <= data.num_domains ({corpus.cfg.num_domains})")
    batch = corpus.batch("eval", 10_000 + seed, cfg.mc_items * cfg.mc_choices * 4)  # disjoint from the held-out loss batches
    tokens, domains = batch.tokens.numpy(), batch.domains.numpy()
    rng = np.random.default_rng([seed, 4242])
    by_domain = {d: list(np.flatnonzero(domains == d)) for d in range(corpus.cfg.num_domains)}
    items = []
    for i in range(cfg.mc_items):
        d = i % corpus.cfg.num_domains
        others = rng.choice([o for o in by_domain if o != d], size=cfg.mc_choices - 1, replace=False)
        rows = [by_domain[d].pop()] + [by_domain[o].pop() for o in others]
        gold = int(rng.integers(cfg.mc_choices))
        rows[0], rows[gold] = rows[gold], rows[0]
        context = tokens[rows[gold], : cfg.mc_context].tolist()
        choices = [tokens[r, cfg.mc_context : need].tolist() for r in rows]
        items.append(MCItem(context, choices, gold, [cfg.mc_continuation] * cfg.mc_choices))
    return items


def load_mc_jsonl(path: str | Path, tokenizer: Any) -> list[MCItem]:
    """Items from a JSONL file of {"context": str, "choices": [str, ...], "gold": int}, tokenized with `tokenizer`
    (a `tokenizers.Tokenizer`, e.g. the tokenizer.json that prepare-data wrote)."""
    items = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        missing = {"context", "choices", "gold"} - rec.keys()
        if missing:
            raise ValueError(f"{path}:{n}: missing {', '.join(sorted(missing))}")
        if not 0 <= rec["gold"] < len(rec["choices"]):
            raise ValueError(f"{path}:{n}: gold {rec['gold']} is not an index of its {len(rec['choices'])} choices")
        choices = [tokenizer.encode(c).ids for c in rec["choices"]]
        items.append(MCItem(tokenizer.encode(rec["context"]).ids, choices, rec["gold"], [max(1, len(c)) for c in rec["choices"]]))
    return items


# ---------------------------------------------------------------------------------------------
# Held-out loss


@torch.no_grad()
def token_losses(model: Any, tokens: Tensor) -> Tensor:
    """[B] summed next-token cross-entropy of each row of `tokens` [B, T + 1]."""
    return -_target_logprobs(model, tokens)[0].sum(-1)


def heldout_sums(model: Any, tokens: Tensor, domains: Tensor, num_domains: int, *, batch_size: int, device: torch.device) -> Tensor:
    """[2, num_domains]: summed loss and token count per domain."""
    sums = torch.zeros(2, max(num_domains, 1), device=device)
    for b in range(0, len(tokens), batch_size):
        tok, dom = tokens[b : b + batch_size].to(device), domains[b : b + batch_size].to(device)
        sums[0].index_add_(0, dom, token_losses(model, tok))
        sums[1].index_add_(0, dom, torch.full(dom.shape, tok.shape[1] - 1, dtype=torch.float32, device=device))
    return sums


def loss_metrics(sums: Tensor, domain_names: list[str]) -> dict[str, float]:
    loss, count = sums.tolist()
    total = sum(loss) / max(sum(count), 1)
    out = {"eval/loss": total, "eval/ppl": math.exp(min(total, 50.0))}
    for name, summed, c in zip(domain_names, loss, count):
        if c:
            out[f"eval/loss/{name}"] = summed / c
    return out


# ---------------------------------------------------------------------------------------------
# In training


class TrialEvaluator:
    """The fixed eval set of a trial and its evaluation on every worker (collective)."""

    def __init__(self, eval_cfg: EvalConfig, *, seq_len: int, tokens: Tensor, domains: Tensor, domain_names: list[str],
                 mc_items: list[MCItem], rank: int, world: int, device: torch.device):
        self.eval_cfg, self.seq_len, self.device, self.world = eval_cfg, seq_len, device, world
        self.domain_names = domain_names
        # every rank takes rows rank, rank + world, ...; the set is cut to a multiple of world (equal forwards)
        n = len(tokens) // world * world
        self.tokens, self.domains = tokens[rank:n:world], domains[rank:n:world]
        m = len(mc_items) // world * world
        self.mc_items, self.mc_total = mc_items[rank:m:world], m

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            sums = heldout_sums(model, self.tokens, self.domains, len(self.domain_names),
                                batch_size=self.eval_cfg.batch_size, device=self.device)
            mc = torch.zeros(2, device=self.device)
            if self.mc_items:
                lp = choice_logprobs(model, self.mc_items, seq_len=self.seq_len,
                                     batch_size=self.eval_cfg.batch_size, device=self.device)
                acc, acc_norm = mc_correct(lp, self.mc_items)
                mc = torch.stack([acc.sum(), acc_norm.sum()]).to(self.device)
            if dist.is_initialized() and self.world > 1:
                dist.all_reduce(sums)
                dist.all_reduce(mc)
        finally:
            model.train(was_training)
        out = loss_metrics(sums, self.domain_names)
        if self.mc_total:
            out["eval/mc_domain/acc"], out["eval/mc_domain/acc_norm"] = (mc / self.mc_total).tolist()
        return out


def build_evaluator(ec: EvalConfig, data: DataConfig, *, seq_len: int, seed: int, rank: int, world: int,
                    device: torch.device) -> TrialEvaluator | None:
    """The trial's evaluator: held-out sequences (and, on the synthetic corpus, its multiple-choice task)."""
    if ec.sequences == 0 and ec.mc_items == 0:
        return None
    if data.kind == "synthetic":
        corpus = SyntheticCorpus(data, seq_len=seq_len, seed=seed)
        held = corpus.batch("eval", 0, ec.sequences) if ec.sequences else None
        tokens = held.tokens if held else torch.zeros(0, seq_len + 1, dtype=torch.long)
        domains = held.domains if held else torch.zeros(0, dtype=torch.long)
        names = [f"domain{d}" for d in range(data.num_domains)]
        items = synthetic_mc_task(corpus, ec, seed=seed) if ec.mc_items else []
    else:
        meta = ShardMeta.read(data.path)
        held_out = ShardIndex(join(data.path, "eval"))  # only the row groups of the first `sequences` rows are read
        rows, doms = held_out.read(0, min(ec.sequences, held_out.num_rows)) if ec.sequences else (np.zeros((0, seq_len + 1)), np.zeros(0))
        tokens = torch.from_numpy(np.ascontiguousarray(rows[:, : seq_len + 1], dtype=np.int64))
        domains = torch.from_numpy(doms.astype(np.int64))
        names, items = meta.domains, []
    return TrialEvaluator(ec, seq_len=seq_len, tokens=tokens, domains=domains, domain_names=names, mc_items=items,
                          rank=rank, world=world, device=device)
