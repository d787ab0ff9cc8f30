"""Evaluations: the multiple-choice scorer against log-likelihoods by hand, acc_norm, the synthetic task, held-out loss."""

import pytest
import torch
import torch.nn.functional as F
from conftest import train_plain

from ercstudy.trainables.config import DataConfig, TrialConfig
from ercstudy.trainables.data import SyntheticCorpus
from ercstudy.trainables.evals import (
    EvalConfig,
    MCItem,
    build_evaluator,
    choice_logprobs,
    heldout_sums,
    loss_metrics,
    mc_correct,
    synthetic_mc_task,
)
from ercstudy.trainables.model import ModelConfig, MoELM
from ercstudy.trainables.moe import MoEConfig

CPU = torch.device("cpu")


def tiny_model(seed=1):
    return MoELM(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, seq_len=12), MoEConfig(num_experts=4, top_k=2, expert_dim=16), seed=seed).eval()


def test_choice_logprobs_equal_the_sum_of_token_log_likelihoods_by_hand():
    lm = tiny_model()
    items = [
        MCItem([1, 2, 3], [[4], [5, 6, 7], [8, 9]], 1, [1, 3, 2]),
        MCItem([10] * 11, [[11, 12], [13, 14]], 0, [2, 2]),  # 13 tokens: the context is cut on the left to fit seq_len + 1
        MCItem([20], [[21, 22, 23, 24], [25]], 0, [4, 1]),
    ]
    got = choice_logprobs(lm, items, seq_len=12, batch_size=3, device=CPU)
    for i, item in enumerate(items):
        for c, choice in enumerate(item.choices):
            row = (item.context + choice)[-13:]
            with torch.no_grad():
                logp = F.log_softmax(lm(torch.tensor([row[:-1]])).logits[0].double(), -1)
            expected = sum(logp[t - 1, row[t]].item() for t in range(len(row) - len(choice), len(row)))
            assert got[i, c].item() == pytest.approx(expected, abs=1e-4), (i, c)


def test_acc_norm_divides_by_characters_and_can_differ_from_acc():
    items = [MCItem([0], [[1], [2]], 1, [1, 10]), MCItem([0], [[1], [2]], 0, [5, 5])]
    logprobs = torch.tensor([[-2.0, -5.0], [-1.0, -3.0]])  # item 0: -2/1 < -5/10, so acc_norm picks the long choice
    acc, acc_norm = mc_correct(logprobs, items)
    assert acc.tolist() == [0.0, 1.0] and acc_norm.tolist() == [1.0, 1.0]


def test_synthetic_task_is_deterministic_and_solvable_by_a_trained_model_only():
    *_, trained = train_plain(erc_weight=0.0)  # 200 steps on this corpus (shared with test_model)
    corpus = SyntheticCorpus(DataConfig(num_domains=4, tokens_per_domain=16, shared_tokens=16), seq_len=32, seed=0)
    cfg = EvalConfig(mc_items=64, mc_context=16, mc_continuation=8)
    items = synthetic_mc_task(corpus, cfg, seed=0)
    assert items == synthetic_mc_task(corpus, cfg, seed=0) and items != synthetic_mc_task(corpus, cfg, seed=1)
    golds = [it.gold for it in items]
    assert len(set(golds)) == 4  # the answer is not always in the same place
    untrained = MoELM(trained.cfg, trained.moe_cfg, seed=5).eval()
    acc = {name: mc_correct(choice_logprobs(m, items, seq_len=32, batch_size=32, device=CPU), items)[0].mean().item()
           for name, m in (("trained", trained), ("untrained", untrained))}
    assert acc["trained"] > 0.8, acc
    assert acc["untrained"] < 0.5, acc  # chance is 0.25


def test_heldout_loss_per_domain_matches_the_model_loss():
    lm = tiny_model()
    tokens = torch.randint(0, 50, (6, 13), generator=torch.Generator().manual_seed(0))
    domains = torch.tensor([0, 1, 0, 2, 1, 0])
    sums = heldout_sums(lm, tokens, domains, 3, batch_size=4, device=CPU)
    metrics = loss_metrics(sums, ["a", "b", "c"])
    with torch.no_grad():
        whole = lm(tokens[:, :-1], tokens[:, 1:]).lm_loss.item()
        only_a = lm(tokens[domains == 0, :-1], tokens[domains == 0, 1:]).lm_loss.item()
    assert metrics["eval/loss"] == pytest.approx(whole, rel=1e-5)
    assert metrics["eval/loss/a"] == pytest.approx(only_a, rel=1e-5)
    assert sums[1].tolist() == [36.0, 24.0, 12.0]


def test_sharded_evaluation_covers_the_eval_set_once():
    cfg = TrialConfig.from_dict({"model": {"vocab_size": 96, "d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 32},
                                 "moe": {"num_experts": 4, "top_k": 2, "expert_dim": 32},
                                 "data": {"num_domains": 4, "tokens_per_domain": 16, "shared_tokens": 16},
                                 "eval": {"sequences": 10, "mc_items": 9}})
    def evaluator(rank, world):
        return build_evaluator(cfg.eval, cfg.data, seq_len=cfg.model.seq_len, seed=cfg.train.seed, rank=rank, world=world,
                               device=CPU)

    whole = evaluator(0, 1)
    halves = [evaluator(r, 2) for r in range(2)]
    assert len(whole.tokens) == 10 and [len(h.tokens) for h in halves] == [5, 5]
    assert torch.equal(torch.cat([h.tokens for h in halves]).sort(0).values, whole.tokens.sort(0).values)
    assert [len(h.mc_items) for h in halves] == [4, 4] and halves[0].mc_total == 8
    metrics = whole(tiny_model_for(cfg))
    assert set(metrics) >= {"eval/loss", "eval/ppl", "eval/loss/domain0", "eval/mc_domain/acc", "eval/mc_domain/acc_norm"}


def tiny_model_for(cfg):
    return MoELM(cfg.model, cfg.moe, seed=0)


def test_eval_config_is_checked_against_the_trial():
    from ercstudy.trainables.validation import ConfigError

    with pytest.raises(ConfigError, match="eval.every: must be a multiple of train.report_every"):
        TrialConfig.from_dict({"train": {"report_every": 10}, "eval": {"every": 15}})
    with pytest.raises(ConfigError, match="eval.mc_choices: must be <= data.num_domains"):
        TrialConfig.from_dict({"data": {"num_domains": 3}, "eval": {"mc_choices": 4}})


def test_scoring_never_holds_the_logits_of_every_position():
    """Held-out losses and choice log-probabilities apply the LM head a chunk of positions at a time (lm_loss
    CHUNK_ROWS): the same numbers as the full logits, without a [B, T, V] float32 tensor (13-20 GB at seq 4096 and a
    32k vocabulary: an out-of-memory at a trial's last evaluation)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ercstudy.trainables.evals import token_losses
    from ercstudy.trainables.lm_loss import CHUNK_ROWS

    model = tiny_model()
    tokens = torch.randint(0, 50, (400, 13), generator=torch.Generator().manual_seed(0))  # 4,800 positions > CHUNK_ROWS
    with torch.no_grad():
        full = F.cross_entropy(model(tokens[:, :-1]).logits.float().transpose(1, 2), tokens[:, 1:], reduction="none").sum(-1)

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.rows = 0  # the most positions any [.., V] result covered

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dim() >= 2 and out.shape[-1] == 50:
                self.rows = max(self.rows, out.numel() // 50)
            return out

    with Largest() as seen:
        chunked = token_losses(model, tokens)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    assert 0 < seen.rows <= CHUNK_ROWS < 400 * 12
