"""The synthetic corpus (deterministic, learnable, domain-separable) and the specialization metrics."""

import math

import pytest
import torch

from ercstudy.trainables.data import DataConfig, SyntheticCorpus, SyntheticStream
from ercstudy.trainables.specialization import (
    domain_expert_counts,
    layer_metric_tensors,
    load_balance,
    normalized_mutual_information,
    router_cosine,
    to_host,
)

CFG = DataConfig(num_domains=3, tokens_per_domain=20, shared_tokens=8)


def test_corpus_is_deterministic_per_seed_and_index():
    a = SyntheticCorpus(CFG, seq_len=16, seed=1)
    b = SyntheticCorpus(CFG, seq_len=16, seed=1)
    assert torch.equal(a.batch("train", 5, 8).tokens, b.batch("train", 5, 8).tokens)
    assert not torch.equal(a.batch("train", 5, 8).tokens, a.batch("train", 6, 8).tokens)
    assert not torch.equal(a.batch("train", 5, 8).tokens, a.batch("eval", 5, 8).tokens)
    assert not torch.equal(a.batch("train", 5, 8).tokens, SyntheticCorpus(CFG, seq_len=16, seed=2).batch("train", 5, 8).tokens)


def test_corpus_is_learnable_and_domains_are_distinguishable():
    corpus = SyntheticCorpus(CFG, seq_len=32, seed=0)
    assert corpus.entropy_rate() < corpus.unigram_entropy() - 1.0  # context helps by more than a nat
    batch = corpus.batch("train", 0, 64)
    assert batch.tokens.max() < corpus.vocab_size
    private = batch.tokens >= CFG.shared_tokens
    owner = (batch.tokens - CFG.shared_tokens) // CFG.tokens_per_domain  # the domain a private token belongs to
    assert torch.all(owner[private] == batch.domains[:, None].expand_as(owner)[private])


def test_a_global_batch_is_the_same_for_any_number_of_workers():
    corpus = SyntheticCorpus(CFG, seq_len=8, seed=0)
    one = [SyntheticStream(corpus, global_batch=8, micro_batch=4, rank=0, world=1).micro_batch(3, m).tokens for m in range(2)]
    two = [SyntheticStream(corpus, global_batch=8, micro_batch=2, rank=r, world=2).micro_batch(3, m).tokens for r in range(2) for m in range(2)]
    assert torch.equal(torch.cat(one), torch.cat(two))  # rank r takes rows r * 4 .. r * 4 + 3, in micro-batches
    assert torch.equal(torch.cat(one), corpus.batch("train", 3, 8).tokens)


def test_the_next_synthetic_batch_is_built_ahead_and_is_the_batch_of_its_step():
    """Step s + 1's share is built on a thread while s trains: the same rows as built on demand, in order, after a
    jump (a resume at another step) too."""
    corpus = SyntheticCorpus(DataConfig(num_domains=3, tokens_per_domain=8, shared_tokens=4), seq_len=16, seed=2)
    stream = SyntheticStream(corpus, global_batch=8, micro_batch=2, rank=1, world=2)
    for step in (0, 1, 2, 7, 8):
        got = stream.micro_batch(step, 1).tokens
        assert stream._next[0] == step + 1 and not stream._next[1].cancelled()  # the next one under way
        assert got.shape == (2, 17) and torch.equal(got, stream.build(step).tokens[2:4])
        assert torch.equal(got, corpus.batch("train", step, 8).tokens[6:8])  # rank 1's second micro-batch


def test_nmi_is_one_for_a_deterministic_routing_and_zero_for_an_independent_one():
    routed = torch.tensor([[[10.0, 0, 0], [0, 10, 0], [0, 0, 10]]])
    independent = torch.full((1, 3, 3), 5.0)
    assert normalized_mutual_information(routed).item() == pytest.approx(1.0)
    assert normalized_mutual_information(independent).item() == pytest.approx(0.0, abs=1e-6)


def test_domain_expert_counts_pairs_every_token_slot_with_its_sequence_domain():
    experts = torch.tensor([[[0, 1], [1, 2], [2, 0], [2, 2]]])  # L=1, 2 sequences x 2 tokens, k=2
    counts = domain_expert_counts(experts, torch.tensor([0, 1]), num_domains=2, num_experts=3)
    assert counts[0].tolist() == [[1, 2, 1], [1, 0, 3]]


def test_load_balance_and_router_cosine_on_known_cases():
    entropy, max_over_mean = load_balance(torch.tensor([[5.0, 5, 5, 5], [20, 0, 0, 0]]))
    assert entropy.tolist() == pytest.approx([1.0, 0.0], abs=1e-6) and max_over_mean.tolist() == pytest.approx([1.0, 4.0])
    assert router_cosine(torch.eye(4)[None]).item() == pytest.approx(0.0)
    assert router_cosine(torch.ones(1, 3, 5)).item() == pytest.approx(1.0)


def test_layer_metrics_names_every_layer_and_their_mean():
    m = torch.rand(2, 4, 4) + torch.eye(4)
    out = to_host(layer_metric_tensors(torch.randn(2, 4, 8), m, torch.rand(2, 4) * 10, torch.zeros(2), torch.rand(2, 3, 4)))
    for name in ("eps_mean", "eps_min", "alpha_star", "diag_dominance", "router_cos", "load_entropy", "load_max_over_mean", "dropped", "domain_nmi"):
        assert math.isfinite(out[name]) and out[name] == pytest.approx((out[f"{name}/layer0"] + out[f"{name}/layer1"]) / 2)
