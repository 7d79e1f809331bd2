"""Feature losses between student hidden states and the teacher's selected units (pure functions).

Every loss returns a *token sum* form so the trainer can normalise it exactly like the host loss
(`num_items_in_batch`, see `method.md` §3.4): `mse`, `nmse` and `cosine` are sums over valid positions, and
`correlation` (a batch statistic) is the per-micro-batch loss times the number of valid positions N. All losses
are finite, with a zero gradient path, when the batch has no valid position. They are written with masked sums
rather than boolean indexing, so nothing in them synchronises the host with an accelerator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


FEATURE_LOSS_TYPES = ("correlation", "mse", "nmse", "cosine")


@dataclass
class FeatureLossOutput:
    """`loss_sum`: the loss in token-sum form; `num_tokens`: N (0-d tensor); `mean_corr`: mean Pearson rho over the
    live units (0-d tensor, correlation only). All stay on the device: nothing here waits for the accelerator."""

    loss_sum: torch.Tensor
    num_tokens: torch.Tensor
    mean_corr: torch.Tensor | None = None

    @property
    def mean(self) -> torch.Tensor:
        """The per-token (micro-batch) value, for logging: loss_sum / N."""
        return self.loss_sum / self.num_tokens.clamp(min=1)


def valid_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose hidden state predicts a supervised token: `labels[:, t + 1] != -100` (GKD's causal shift).

    Returns a bool mask of shape (B, T); the last position is never valid.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def _correlation_sum(s: torch.Tensor, t: torch.Tensor, w: torch.Tensor, n: torch.Tensor, eps: float):
    # s, t: (P, k) fp32, zero outside the valid rows; w: (P,) 1.0 on valid rows; n = w.sum(). Weighted sums (w @ x)
    # instead of s[mask]: no data-dependent shape, so no host sync on an accelerator. Two passes (centre, then
    # square): hidden units with a large mean would lose their variance in E[x^2] - E[x]^2.
    denom = n.clamp(min=1)
    s = s - (w @ s) / denom
    t = t - (w @ t) / denom
    s_var = (w @ (s * s)) / denom
    t_var = (w @ (t * t)) / denom
    # eps inside the sqrt: a constant student unit must not give an infinite gradient
    rho = (w @ (s * t)) / denom / ((s_var + eps).sqrt() * (t_var + eps).sqrt())  # (k,)
    # Teacher units constant within the batch (every unit when N < 2) carry no signal: leave them out of the mean.
    live = (t_var > eps).float()
    n_live = live.sum().clamp(min=1)
    loss = ((1.0 - rho) * live).sum() / n_live
    return loss * n, (rho.detach() * live).sum() / n_live


def feature_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str = "correlation",
    teacher_var: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> FeatureLossOutput:
    """Compare student units with teacher units over the valid positions of a batch.

    Args:
        student: (B, T, k) student hidden units (already cut or projected to k).
        teacher: (B, T, k) teacher units in the same order (detached).
        mask: (B, T) bool, the valid positions (see `valid_positions`).
        loss_type: `correlation` (1 - per-unit Pearson rho, averaged over units), `mse`, `nmse` (MSE divided by the
            teacher unit's variance from the scoring pass), or `cosine` (1 - cosine across units, per token).
        teacher_var: (k,) teacher unit variances, required by `nmse`.

    Returns:
        A `FeatureLossOutput` whose `loss_sum` is the token-sum form described in the module docstring. Values at
        masked positions never reach the result, not even as NaN; no operation waits for the device (no `.item()`,
        no boolean indexing), so the term adds no host sync to a GPU step.
    """
    if loss_type not in FEATURE_LOSS_TYPES:
        raise ValueError(f"feature loss type must be one of {FEATURE_LOSS_TYPES}, got {loss_type!r}.")
    if student.shape != teacher.shape:
        raise ValueError(f"student units {tuple(student.shape)} and teacher units {tuple(teacher.shape)} differ.")
    if loss_type == "nmse" and teacher_var is None:
        raise ValueError("feature_loss_type='nmse' needs the teacher unit variances from the scoring pass.")
    k = student.shape[-1]
    m = mask.reshape(-1, 1)  # (P, 1), P = B * T
    w = m[:, 0].float()
    n = w.sum()
    # Captured activations are in the compute dtype (bf16 under AMP): do the statistics in fp32.
    s = torch.where(m, student.reshape(-1, k).float(), 0.0)
    t = torch.where(m, teacher.reshape(-1, k).float().detach(), 0.0)
    if loss_type == "correlation":
        loss_sum, corr = _correlation_sum(s, t, w, n, eps)
        return FeatureLossOutput(loss_sum, n, corr)
    if loss_type == "mse":
        loss_sum = (s - t).pow(2).sum() / k
    elif loss_type == "nmse":
        loss_sum = ((s - t).pow(2) / (teacher_var.to(s.device).float() + eps)).sum() / k
    else:  # cosine; masked rows are zero vectors, whose (1 - cos) the where drops
        loss_sum = torch.where(m[:, 0], 1.0 - F.cosine_similarity(s, t, dim=-1, eps=eps), 0.0).sum()
    return FeatureLossOutput(loss_sum, n, None)


def feature_distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    loss_type: str = "correlation",
    num_items_in_batch: int | torch.Tensor | None = None,
    teacher_var: torch.Tensor | None = None,
) -> torch.Tensor:
    """Feature loss for one layer pair, normalised like TRL's host losses.

    `student` is (B, T, d_S) and is cut to the teacher's k units (student unit i matches teacher unit i of the
    selection); `labels` are the batch labels (-100 = ignored), from which the valid positions are derived. With
    `num_items_in_batch` (the token count of the whole accumulation window) the result is `loss_sum /
    num_items_in_batch`, so gradient accumulation gives the same total weight as one big batch; without it, the
    per-token mean.
    """
    k = teacher.shape[-1]
    out = feature_loss(student[..., :k], teacher, valid_positions(labels), loss_type, teacher_var)
    if num_items_in_batch is None:
        return out.mean
    return out.loss_sum / torch.as_tensor(num_items_in_batch, device=out.loss_sum.device).clamp(min=1)
