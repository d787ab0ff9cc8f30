"""The LM head and its cross-entropy in one op, a chunk of tokens at a time, never holding [N, V] logits.

Forward computes, for each chunk of rows of h [N, d]: logits = h W^T in the weights' dtype, the
cross-entropy in float32, and right away the gradients, d(loss)/dh = (softmax - onehot) W and
d(loss)/dW += (softmax - onehot)^T h, both GEMMs on the weights' dtype (bf16 operands, float32 accumulation
inside the GEMM, the chunks' products summed in float32), so backward only scales them. An fp32 weight-gradient
GEMM would run on an H100's CUDA cores (~55 TFLOP/s): about 20 ms per 8k-token micro-batch. Memory:
one chunk's float32 logits instead of the whole [N, V] (3.5 GiB a micro-batch at 64k tokens x 32k
vocabulary when computed as logits.float()). Under no_grad only the loss is computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100
CHUNK_ROWS = 4096


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND: Tensor, w_VD: Tensor, targets_N: Tensor, chunk: int) -> Tensor:
        valid = (targets_N != IGNORE).sum().clamp_min(1).to(torch.float32)
        loss = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        grad_h = torch.empty_like(h_ND)
        grad_w = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device)
        for start in range(0, h_ND.shape[0], chunk):
            h, t = h_ND[start : start + chunk], targets_N[start : start + chunk]
            logits = (h @ w_VD.T).float()  # [c, V]
            keep = t != IGNORE
            safe_t = torch.where(keep, t, 0)
            lse = torch.logsumexp(logits, dim=-1)
            loss += ((lse - logits.gather(1, safe_t[:, None]).squeeze(1)) * keep).sum()
            g = torch.softmax(logits, dim=-1)  # d(loss_sum)/d(logits) = softmax - onehot, rows of ignored targets 0
            g.scatter_add_(1, safe_t[:, None], -torch.ones_like(g[:, :1]))
            g *= keep[:, None]
            g /= valid
            g = g.to(w_VD.dtype)  # both gradient GEMMs on the weights' dtype: bf16 tensor cores, fp32 accumulation inside
            grad_h[start : start + chunk] = (g @ w_VD).to(h_ND.dtype)
            grad_w += (g.T @ h.to(w_VD.dtype)).float()  # each chunk's product summed in float32 across chunks
        ctx.save_for_backward(grad_h, grad_w.to(w_VD.dtype))
        return loss / valid

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype), None, None


@torch.no_grad()
def target_logprobs(h_ND: Tensor, w_VD: Tensor, targets_N: Tensor, *, chunk: int = CHUNK_ROWS) -> tuple[Tensor, Tensor]:
    """For each row of h: log p(target) under softmax(h W^T) [N] (float32) and whether the target is the argmax [N],
    a chunk of rows at a time: evaluations score long sequences and large vocabularies without [N, V] logits."""
    logprob = torch.empty(h_ND.shape[0], dtype=torch.float32, device=h_ND.device)
    greedy = torch.empty(h_ND.shape[0], dtype=torch.bool, device=h_ND.device)
    for s in range(0, h_ND.shape[0], chunk):
        logits = (h_ND[s : s + chunk] @ w_VD.T).float()  # [c, V]
        t = targets_N[s : s + chunk]
        logprob[s : s + chunk] = logits.gather(1, t[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
        greedy[s : s + chunk] = logits.argmax(-1) == t
    return logprob, greedy


def linear_cross_entropy(h_ND: Tensor, w_VD: Tensor, targets_N: Tensor, *, chunk: int = CHUNK_ROWS) -> Tensor:
    """mean_N cross_entropy(h W^T, targets) (targets == -100 ignored), float32, without the [N, V] logits."""
    if torch.is_grad_enabled() and (h_ND.requires_grad or w_VD.requires_grad):
        return _LinearCrossEntropy.apply(h_ND, w_VD, targets_N, chunk)
    valid = (targets_N != IGNORE).sum().clamp_min(1)
    total = sum(F.cross_entropy((h_ND[s : s + chunk] @ w_VD.T).float(), targets_N[s : s + chunk], ignore_index=IGNORE,
                                reduction="sum") for s in range(0, h_ND.shape[0], chunk))
    return total / valid
