"""Logit KD from a cached teacher: GKD's generalized JSD over the teacher's top-K tokens plus a tail bucket.

A cache stores, per completion position, the teacher's K most likely tokens, their log-probabilities and the log of
the mass left outside them (the *tail*). The divergence is then taken between two distributions over K + 1 outcomes
(the K tokens and "any other token"), exactly as TRL's server and async distillation trainers do with a vLLM
teacher's top-k log-probs: the student's tail is `_add_tail_bucket` (log(1 - sum exp(top-K)), clamped so the sum stays
below 1) and the divergence is their `_jsd_divergence` (β = 0: forward KL(teacher ‖ student), β = 1: reverse KL,
otherwise GKD's generalized JSD with mixture βT + (1-β)S, as `GKDTrainer.generalized_jsd_loss`). Both functions are
called, not copied (`trl.experimental.server_distillation`, pinned with `trl==1.16.*`).

The only difference from TRL's path is where the teacher's tail comes from: TRL derives it from the reported top-k
log-probs; the cache stores it, computed at build time in fp32 from the full distribution (log-sum-exp of the tokens
outside the top K), so it stays exact when the stored log-probs are bf16. With K = V the tail is empty (-inf); it is
raised to TRL's own floor (the clamp in `_add_tail_bucket` gives the student the same value), so the bucket then adds
exactly 0 and the loss equals `generalized_jsd_loss` on the full vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from trl.experimental.server_distillation.server_distillation_trainer import _add_tail_bucket, _jsd_divergence


# `_add_tail_bucket` clamps log(sum of top-K probs) at -1e-7, so a tail bucket is never below this value.
TAIL_FLOOR = math.log(-math.expm1(-1e-7))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # bf16/fp16 logits are upcast (the log-sum-exp over V needs fp32); fp64 (tests) stays fp64.
    return torch.promote_types(x.dtype, torch.float32)


def topk_with_tail(
    logits: torch.Tensor, k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-k log-probabilities and the log of the remaining mass, from full logits.

    Args:
        logits: (..., V) teacher logits.
        k: number of tokens kept, 1 <= k <= V.
        temperature: the logits are divided by it before the softmax (1 = the model's distribution).

    Returns:
        `(ids, logprobs, tail)`: (..., k) token ids (long, most likely first), their log-probabilities, and (...) the
        log of the mass of every other token (log-sum-exp over the complement, exact; -inf when k = V).
    """
    vocab = logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top-K must be in 1..{vocab} (the vocabulary size), got {k}.")
    logp = F.log_softmax(logits.to(_compute_dtype(logits)) / temperature, dim=-1)
    values, ids = logp.topk(k, dim=-1)
    if k == vocab:
        tail = torch.full(logp.shape[:-1], float("-inf"), dtype=logp.dtype, device=logp.device)
    else:
        tail = logp.scatter(-1, ids, float("-inf")).logsumexp(dim=-1)
    return ids, values, tail


def teacher_support_logprobs(topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor) -> torch.Tensor:
    """(..., K + 1) teacher log-probs over the top-K tokens and the tail bucket (tail floored at `TAIL_FLOOR`)."""
    tail = tail_logprob.to(topk_logprobs.dtype).clamp(min=TAIL_FLOOR).unsqueeze(-1)
    return torch.cat([topk_logprobs, tail], dim=-1)


def sparse_generalized_jsd(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_tail_logprob: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-position generalized JSD between the student and the cached teacher over top-K + tail.

    Args:
        student_logits: (B, T, V) logits; position t predicts token t + 1 (no shift is applied here).
        teacher_topk_ids: (B, T, K) long, the teacher's top-K tokens at each position.
        teacher_topk_logprobs: (B, T, K) their teacher log-probabilities.
        teacher_tail_logprob: (B, T) log of the teacher mass outside the top K.
        beta: GKD's β (0: KL(teacher ‖ student), 1: KL(student ‖ teacher)).
        temperature: divides the *student* logits; the teacher side was fixed when the cache was built (its header
            records the temperature), so pass the same value.

    Returns:
        (B, T) divergence per position, in the compute dtype (fp32, or fp64 for fp64 logits). Positions that hold no
        cached values (zeros) give finite garbage: mask them (see `sparse_generalized_jsd_loss`).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}.")
    dtype = _compute_dtype(student_logits)
    logits = student_logits.to(dtype)
    if temperature != 1.0:
        logits = logits / temperature
    # log-softmax at the K support tokens only: gather - logsumexp avoids a second (B, T, V) tensor
    student_top = logits.gather(-1, teacher_topk_ids.long()) - logits.logsumexp(dim=-1, keepdim=True)  # (B, T, K)
    support = torch.ones_like(student_top, dtype=torch.bool)
    student_sparse, support = _add_tail_bucket(student_top, support)  # (B, T, K + 1), TRL's student tail
    teacher_sparse = teacher_support_logprobs(teacher_topk_logprobs.to(dtype), teacher_tail_logprob.to(dtype))
    return _jsd_divergence(student_sparse, teacher_sparse, beta, support).sum(dim=-1)


def sparse_generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_tail_logprob: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Token-sum of `sparse_generalized_jsd` over the positions where `mask` is True.

    `mask` is (B, T) bool, normally `hf_taskdistill.losses.valid_positions(labels)` (position t is valid when
    labels[t + 1] != -100, GKD's causal shift). Divide the result by `num_items_in_batch` exactly as the online GKD
    path does (`generalized_jsd_loss(..., num_items_in_batch=n)` returns its token sum / n). With K = V and the tail
    empty this equals `GKDTrainer.generalized_jsd_loss(student[:, :-1], teacher[:, :-1], labels[:, 1:], beta,
    reduction="sum")`. Uses `torch.where` (no boolean indexing), so nothing waits for the device; masked positions
    get no gradient.
    """
    per_position = sparse_generalized_jsd(
        student_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_tail_logprob, beta, temperature
    )
    return torch.where(mask.to(per_position.device), per_position, 0.0).sum()
