"""A decoder-only Mixture-of-Experts language model in the OLMoE mould.

RMSNorm -> RoPE -> causal attention (scaled_dot_product_attention) -> SwiGLU / MoE -> Block -> MoELM.
Single-device code: parallelism is applied from outside (parallelize.py swaps the MoE layers for
those of the trial's backend and expert-parallel size). The forward returns the logits,
the LM loss and each MoE layer's auxiliary losses and routing explicitly; the router and
gate weights of all MoE layers are exposed for the ERC loss, which runs once over all of them.
Shapes: B batch, T sequence, d model width, nh heads, hs head size, V vocab, L MoE layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ercstudy.trainables.aoe import AoEMoE, matched_rank
from ercstudy.trainables.lm_loss import linear_cross_entropy
from ercstudy.trainables.moe import GroupedMoE, MoEConfig, MoEStats, random_expert_weights
from ercstudy.trainables.validation import require


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The `model:` section of a trial config (the MoE part is the `moe:` section)."""

    vocab_size: int = 512  # token ids the model embeds (>= the shards' vocabulary)
    d_model: int = 128  # width of the residual stream
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention heads (d_model divisible by them)
    seq_len: int = 128  # tokens per training sequence
    rope_theta: float = 10000.0  # RoPE's base
    norm_eps: float = 1e-5  # RMSNorm's epsilon
    init_std: float = 0.02  # std of the normal initialization
    tie_embeddings: bool = False  # share the input embedding and the output head

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "seq_len"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(
            self.d_model % self.n_heads == 0,
            "n_heads",
            f"must divide d_model ({self.d_model}), got {self.n_heads}",
        )
        require(
            (self.d_model // self.n_heads) % 2 == 0,
            "n_heads",
            f"head size d_model / n_heads must be even for RoPE, got {self.d_model // self.n_heads}",
        )
        require(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
        require(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps}")
        require(self.init_std > 0, "init_std", f"must be > 0, got {self.init_std}")


# ---------------------------------------------------------------------------------------------
# Sizes computed from the config, before any model exists


def moe_layer_ids(model: ModelConfig, moe: MoEConfig) -> list[int]:
    """Indices of the MoE blocks: every `moe_every`-th block, counting from the last of each group."""
    return [i for i in range(model.n_layers) if (i + 1) % moe.moe_every == 0]


def aoe_rank(model: ModelConfig, moe: MoEConfig) -> int:
    """The rank of an AoE expert's factorized gate (aoe.matched_rank unless moe.aoe_rank sets it)."""
    return moe.aoe_rank or matched_rank(model.d_model, moe.expert_dim)


def expert_params(model: ModelConfig, moe: MoEConfig) -> tuple[int, int]:
    """(parameters of one MoE layer's choosing of experts, of one expert's own weights): a router row and a
    SwiGLU expert; for AoE no router, the expert's gate factorized as gate_down [d, r] and gate_up [r, D]."""
    d, D = model.d_model, moe.expert_dim
    if moe.kind == "aoe":
        r = aoe_rank(model, moe)
        return 0, d * r + r * D + 2 * d * D
    return moe.num_experts * d, 3 * d * D


def num_params(model: ModelConfig, moe: MoEConfig) -> int:
    """Total parameters of MoELM(model, moe)."""
    d, n_moe = model.d_model, len(moe_layer_ids(model, moe))
    attention = 4 * d * d + 2 * d  # qkv + out projection + the block's two RMSNorm weights
    chooser, expert = expert_params(model, moe)
    moe_ffn = chooser + moe.num_experts * expert
    dense_ffn = 3 * d * moe.dense_hidden
    embeddings = model.vocab_size * d * (1 if model.tie_embeddings else 2)
    return embeddings + d + model.n_layers * attention + n_moe * moe_ffn + (model.n_layers - n_moe) * dense_ffn


def num_active_params(model: ModelConfig, moe: MoEConfig) -> int:
    """Parameters one token uses: all but the (n - k) experts it is not routed to in each MoE block. An AoE token
    uses every expert's gate_down (the pre-computation that chooses), the rest of k experts only."""
    _, expert = expert_params(model, moe)
    idle = (moe.num_experts - moe.top_k) * expert
    if moe.kind == "aoe":
        idle -= (moe.num_experts - moe.top_k) * model.d_model * aoe_rank(model, moe)
    return num_params(model, moe) - len(moe_layer_ids(model, moe)) * idle


def flops_per_token(model: ModelConfig, moe: MoEConfig) -> float:
    """Training FLOPs per token (forward + backward): 6 x the active matmul parameters + attention.

    Matmul parameters exclude the embedding lookup but include the LM head (computed even when
    tied). Causal attention adds 6 * layers * d * T: the scores (QK^T) and the weighted values (PV) are
    2 * 2 * d * T FLOPs per token and layer forward, x3 with backward, halved because a token attends
    to the positions up to its own only (PaLM's 12 * layers * d * T counts the full T x T square).
    """
    matmul = num_active_params(model, moe) - model.vocab_size * model.d_model * (0 if model.tie_embeddings else 1)
    return 6.0 * matmul + 6.0 * model.n_layers * model.d_model * model.seq_len


# ---------------------------------------------------------------------------------------------
# The model


def rope_tables(seq_len: int, head_size: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin [T, hs / 2] of the rotary embedding."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., :hs/2], x[..., hs/2:]) of x [B, nh, T, hs] by position, in x's dtype.

    The tables stay float32 (angles of late positions need its precision) and are rounded to x's dtype
    here, [T, hs/2] each: bf16 training rotates q and k in bf16, with no float32 copy of [B, nh, T, hs]
    (half the memory traffic; the error is that of storing q and k in bf16 at all).
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
        q, k = apply_rope(q, cos[:T], sin[:T]), apply_rope(k, cos[:T], sin[:T])
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class SwiGLU(nn.Module):
    """Dense feed-forward: (silu(x W_gate) * (x W_up)) W_down."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn: nn.Module):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = ffn
        self.is_moe = not isinstance(ffn, SwiGLU)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, MoEStats | None]:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        if not self.is_moe:
            return x + self.ffn(self.ffn_norm(x)), None
        y, stats = self.ffn(self.ffn_norm(x))
        return x + y, stats


# The outputs are NamedTuples, not dataclasses: DeepSpeed's engine finds the output tensors by walking
# tuples, lists and dicts, and hooks them to run its backward prologue. Without it, its BF16 optimizer
# never clears the bf16 gradients between micro-batches and counts the first ones twice.


class MoEAux(NamedTuple):
    """Per-MoE-layer auxiliary outputs of one forward, stacked over the L MoE layers."""

    lb_loss: Tensor  # [L]
    z_loss: Tensor  # [L]
    tokens_per_expert: Tensor  # [L, n]
    dropped_fraction: Tensor  # [L]
    experts: Tensor  # [L, B*T, k] chosen experts
    coupling: Tensor | None = None  # [L, n, n + 1] AoE layers' coupling sums (MoEStats.coupling_sums), None when routed


class ModelOutput(NamedTuple):
    logits: Tensor | None  # [B, T, V]; None when the loss was computed without them (return_logits=False)
    lm_loss: Tensor | None  # [] mean next-token cross-entropy (float32), when targets are given
    aux: MoEAux


def moe_layer(model: ModelConfig, moe: MoEConfig) -> nn.Module:
    """A single-device MoE layer of `moe.kind`: routed (GroupedMoE; parallelize.py may swap it) or AoE."""
    if moe.kind == "aoe":
        return AoEMoE(moe, model.d_model, rank=aoe_rank(model, moe))
    return GroupedMoE(moe, model.d_model)


class MoELM(nn.Module):
    def __init__(self, model: ModelConfig, moe: MoEConfig, *, seed: int = 0):
        super().__init__()
        self.cfg, self.moe_cfg = model, moe
        moe_ids = set(moe_layer_ids(model, moe))
        self.embed = nn.Embedding(model.vocab_size, model.d_model)
        self.blocks = nn.ModuleList(
            Block(model, moe_layer(model, moe) if i in moe_ids else SwiGLU(model.d_model, moe.dense_hidden))
            for i in range(model.n_layers)
        )
        self.norm = nn.RMSNorm(model.d_model, eps=model.norm_eps)
        self.lm_head = nn.Linear(model.d_model, model.vocab_size, bias=False)
        if model.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(model.seq_len, model.d_model // model.n_heads, model.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters(seed)

    @property
    def moe_layers(self) -> list[nn.Module]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def reset_parameters(self, seed: int = 0) -> None:
        """Deterministic init from `seed`: the same model on every rank (parallelize.py then keeps each
        rank's slice of the experts, so global expert j starts the same for any expert-parallel size)."""
        gen = torch.Generator().manual_seed(seed)
        std = self.cfg.init_std
        out_std = std / (2 * self.cfg.n_layers) ** 0.5  # residual-branch outputs, GPT-2 style
        # MoE layers are drawn last, whole, in one call per layer (the draw order of earlier releases)
        moe_params = {id(p) for layer in self.moe_layers for p in layer.parameters()}
        with torch.no_grad():
            for name, p in self.named_parameters():
                if id(p) in moe_params:
                    continue
                if p.dim() == 1:
                    p.fill_(1.0)  # RMSNorm weights
                else:
                    s = out_std if name.endswith(("proj.weight", "down.weight")) else std
                    p.copy_(torch.randn(p.shape, generator=gen) * s)
            for layer in self.moe_layers:
                if isinstance(layer, AoEMoE):
                    layer.reset_parameters(std=std, out_std=out_std, generator=gen)
                    continue
                layer.load_expert_weights(random_expert_weights(
                    self.moe_cfg.num_experts, self.cfg.d_model, self.moe_cfg.expert_dim, std=std, out_std=out_std, generator=gen
                ))

    def router_weights(self) -> Tensor:
        """[L, n, d] the routers of all MoE layers, stacked (differentiable)."""
        return torch.stack([layer.router_weight for layer in self.moe_layers])

    def gate_weights(self) -> list[Tensor]:
        """The experts' gate projections of each MoE layer, [n_local, d, D] each (the parameters themselves,
        not a stacked copy; n_local = n on one device, this rank's experts once parallelized)."""
        return [layer.gate_weight for layer in self.moe_layers]

    def expert_weights_of(self, name: str) -> list[Tensor]:
        """One kind of expert weight ("gate", "up" [n_local, d, D] or "down" [n_local, D, d]) of each MoE layer,
        as each layer's expert_weights() holds it (the ERC loss's activation variants read these)."""
        if name == "gate":
            return self.gate_weights()
        return [layer.expert_weights()[name] for layer in self.moe_layers]

    def trunk(self, idx: Tensor) -> tuple[Tensor, list[MoEStats]]:
        """The final hidden states h [B, T, d] (normed, before the LM head) and each MoE layer's stats."""
        T = idx.shape[1]
        if T > self.cfg.seq_len:
            raise ValueError(f"idx: sequence length {T} exceeds model.seq_len {self.cfg.seq_len}")
        x = self.embed(idx)  # (B, T, d)
        stats: list[MoEStats] = []
        for block in self.blocks:
            x, layer_stats = block(x, self.rope_cos, self.rope_sin)
            if layer_stats is not None:
                stats.append(layer_stats)
        return self.norm(x), stats

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, return_logits: bool = True) -> ModelOutput:
        """Logits [B, T, V] and, with targets, the mean next-token loss. return_logits=False (training)
        computes the loss with the LM head fused into it (lm_loss.py) and returns no logits."""
        h, stats = self.trunk(idx)
        logits = self.lm_head(h) if return_logits or targets is None else None  # (B, T, V)
        lm_loss = None
        if targets is not None and logits is not None:
            lm_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        elif targets is not None:
            lm_loss = linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten())
        aux = MoEAux(
            lb_loss=torch.stack([s.lb_loss for s in stats]),
            z_loss=torch.stack([s.z_loss for s in stats]),
            tokens_per_expert=torch.stack([s.tokens_per_expert for s in stats]),
            dropped_fraction=torch.stack([s.dropped_fraction for s in stats]),
            experts=torch.stack([s.experts_TK for s in stats]),
            coupling=torch.stack([s.coupling_sums for s in stats]) if stats[0].coupling_sums is not None else None,
        )
        return ModelOutput(logits, lm_loss, aux)
