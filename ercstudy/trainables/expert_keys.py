"""DeepSpeed's per-expert parameter names, which ercstudy's expert-parallel checkpoints use too, and their inverse.

DeepSpeed's MoE layers hold one module per expert, so their weights are named
`<layer>.deepspeed_moe.experts.deepspeed_experts.<e>.<weight>`, and its checkpoints write one file
per global expert e. The grouped backend stacks its experts ([n, d, D]) and uses these names only
in checkpoints written under expert parallelism. Kept apart from parallelize.py so that loading a
checkpoint (checkpoint.py) needs no DeepSpeed import.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ercstudy.trainables.moe import MoEConfig

EXPERT_KEY = "deepspeed_moe.experts.deepspeed_experts."
EXPERT_WEIGHTS = ("gate", "up", "down")  # DeepSpeed's per-expert names; the grouped layer holds gate and up as one gate_up


def unstack_expert_keys(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, local_metadata: object) -> None:
    """State-dict post-hook of GroupedEPMoE: stacked `<prefix>experts.<w>` -> DeepSpeed's per-expert names
    `<prefix>deepspeed_moe.experts.deepspeed_experts.<e>.<w>` (views), so DeepSpeed writes one file per expert.
    The grouped layer's gate_up [n, d, 2D] is written as DeepSpeed's separate gate and up [d, D]."""
    gate, up = state_dict.pop(f"{prefix}experts.gate_up").chunk(2, dim=-1)
    stacked = {"gate": gate, "up": up, "down": state_dict.pop(f"{prefix}experts.down")}
    for name in EXPERT_WEIGHTS:
        for e, weight in enumerate(stacked[name].unbind(0)):
            state_dict[f"{prefix}{EXPERT_KEY}{e}.{name}"] = weight


def stack_expert_keys(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: object) -> None:
    """Load pre-hook of GroupedEPMoE: DeepSpeed's per-expert names `<prefix>deepspeed_moe.experts.deepspeed_experts.<e>.<w>`
    (the local expert ids 0.. of this rank, as DeepSpeed's engine hands them over) -> stacked `<prefix>experts.gate_up`
    ([n, d, 2D], gate then up) and `<prefix>experts.down`."""
    stacked = {}
    for name in EXPERT_WEIGHTS:
        found = {}
        for key in [k for k in state_dict if k.startswith(prefix + EXPERT_KEY) and k.endswith("." + name)]:
            expert = key[len(prefix + EXPERT_KEY) : -len(name) - 1]
            if expert.isdigit():
                found[int(expert)] = state_dict.pop(key)
        if found:
            stacked[name] = torch.stack([found[e] for e in sorted(found)])
    if stacked:
        state_dict[f"{prefix}experts.gate_up"] = torch.cat([stacked["gate"], stacked["up"]], dim=-1)
        state_dict[f"{prefix}experts.down"] = stacked["down"]


def single_device_state_dict(state: dict[str, Tensor], moe: MoEConfig) -> dict[str, Tensor]:
    """A checkpoint's module state (DeepSpeed's per-expert files merged in, global expert ids) -> the
    names of the single-device model with parallelize(ep_size=1) applied: for the grouped backend,
    per-expert weights are stacked into `<layer>.experts.<w>`; the deepspeed backend keeps DeepSpeed's names."""
    out = dict(state)
    if moe.backend == "grouped":
        for layer in {k.partition(EXPERT_KEY)[0] for k in state if EXPERT_KEY in k}:
            stack_expert_keys(None, out, layer)
    return out
