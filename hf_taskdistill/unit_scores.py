"""The scoring pass of `hf_taskdistill.pruning`: per-unit statistics of the residual stream and the MLP neurons, and
every pruning criterion's scores computed from them (pure functions of the statistics).

One forward/backward pass over the scoring batches (`collect_unit_statistics`) measures, at each of the 2L+1 RMSNorm
inputs that read the residual stream and at each down_proj input, what every criterion needs; `scores_from_statistics`
turns those sums into one criterion's per-point scores and aggregates them over points (`aggregate_scores`). The
criteria and aggregations are described in `pruning.py`'s module docstring.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .losses import valid_positions


CRITERIA = ("grad", "grad_x_act", "fisher", "activation", "hybrid", "random")
AGGREGATIONS = ("sum_normalized", "sum", "max_normalized", "last")
# Per criterion, as benchmarked (benchmarks/pruning.py): Minitron's plain sum for the magnitude and random scores,
# per-norm-normalised sums for the gradient scores (their scale differs by orders of magnitude between norms).
DEFAULT_AGGREGATIONS = {"activation": "sum", "random": "sum"}
DEFAULT_AGGREGATION = "sum_normalized"


def default_aggregation(criterion: str) -> str:
    """The aggregation `prune_teacher` uses for `criterion` when none is given."""
    return DEFAULT_AGGREGATIONS.get(criterion, DEFAULT_AGGREGATION)


# --------------------------------------------------------------------------------------------- scoring
def _layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def _norms(model: nn.Module) -> list[nn.Module]:
    """The 2L+1 RMSNorms that read the residual stream, in forward order."""
    out = []
    for layer in _layers(model):
        out += [layer.input_layernorm, layer.post_attention_layernorm]
    return out + [model.model.norm]


@dataclass
class UnitStatistics:
    """Everything one scoring pass measures (float64 sums; divide by the token / example counts).

    Residual tensors are (P, d) over the P = 2L+1 norm inputs; MLP tensors are (L, m) over the down_proj inputs.
    """

    grad_abs: torch.Tensor | None
    gx_abs: torch.Tensor | None
    gx_sq: torch.Tensor | None
    act_sq: torch.Tensor  # sum of h^2 at each norm input (for the RMS rescale)
    norm_out_l2: torch.Tensor  # sum over examples of (mean over the sequence of |norm output|)^2
    mlp_grad_abs: torch.Tensor | None
    mlp_gx_abs: torch.Tensor | None
    mlp_gx_sq: torch.Tensor | None
    mlp_act_l2: torch.Tensor
    last_sum: torch.Tensor  # last layer output over completion tokens
    last_sq: torch.Tensor
    block_cos: torch.Tensor  # (L,) sum over tokens of cos(layer input, layer output)
    num_tokens: int
    num_completion_tokens: int
    num_samples: int
    seconds: float = 0.0


def _model_inputs(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    inputs = {"input_ids": batch["input_ids"].to(device)}
    for key in ("attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        if batch.get(key) is not None:
            value = batch[key]
            inputs[key] = value.to(device) if torch.is_tensor(value) else value
    return inputs


def collect_unit_statistics(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], need_grad: bool = True, mlp: bool = True
) -> UnitStatistics:
    """One pass over `batches` (forward, and backward of the summed completion NLL when `need_grad`).

    Gradients start at the embedding output (re-entered as a leaf), so no parameter gets a gradient. Statistics
    are taken over non-padding tokens (`attention_mask`, or every token when absent, e.g. packed batches).
    """
    batches = list(batches)
    start = time.perf_counter()
    layers, norms = _layers(model), _norms(model)
    n_layers, n_points = len(layers), len(norms)
    device = next(model.parameters()).device
    d = model.config.hidden_size
    m = model.config.intermediate_size
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
    grad_abs, gx_abs, gx_sq = (zeros(n_points, d) for _ in range(3)) if need_grad else (None, None, None)
    mlp_g = [zeros(n_layers, m) for _ in range(3)] if need_grad and mlp else [None, None, None]
    act_sq, norm_out_l2 = zeros(n_points, d), zeros(n_points, d)
    mlp_act_l2 = zeros(n_layers, m)
    last_sum, last_sq, block_cos = zeros(d), zeros(d), zeros(n_layers)
    n_tok = n_comp = n_ex = 0
    captured: dict[str, list] = {"in": [None] * n_points, "out": [None] * n_points, "mlp": [None] * n_layers}

    def norm_hook(i):
        def hook(module, args, output):
            captured["in"][i], captured["out"][i] = args[0], output

        return hook

    def mlp_hook(i):
        def hook(module, args):
            captured["mlp"][i] = args[0]

        return hook

    def embed_hook(module, args, output):
        return output.detach().requires_grad_(True) if need_grad else None

    handles = [model.get_input_embeddings().register_forward_hook(embed_hook)]
    handles += [norm.register_forward_hook(norm_hook(i)) for i, norm in enumerate(norms)]
    if mlp:
        handles += [layer.mlp.down_proj.register_forward_pre_hook(mlp_hook(i)) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            inputs = _model_inputs(batch, device)
            labels = batch["labels"].to(device)
            tok = inputs["attention_mask"].bool() if "attention_mask" in inputs else torch.ones_like(labels).bool()
            with torch.enable_grad() if need_grad else torch.no_grad():
                out = model(**inputs)
                grads = None
                if need_grad:
                    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
                    logits = out.logits.float()
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                           ignore_index=-100, reduction="sum")  # fmt: skip
                    wrt = list(captured["in"]) + (list(captured["mlp"]) if mlp else [])
                    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
                del out
            w = tok.double()  # (B, T)
            per_ex = w.sum(1).clamp(min=1)  # tokens per example
            has = w.sum(1) > 0
            for p in range(n_points):
                h, y = captured["in"][p].detach().double(), captured["out"][p].detach().double()
                act_sq[p] += torch.einsum("bt,btd->d", w, h * h)
                mean_abs = torch.einsum("bt,btd->bd", w, y.abs()) / per_ex[:, None]
                norm_out_l2[p] += mean_abs[has].pow(2).sum(0)
                if need_grad:
                    g = grads[p]
                    g = torch.zeros_like(h) if g is None else g.double()
                    hg = h * g
                    grad_abs[p] += torch.einsum("bt,btd->d", w, g.abs())
                    gx_abs[p] += torch.einsum("bt,btd->d", w, hg.abs())
                    gx_sq[p] += torch.einsum("bt,btd->d", w, hg * hg)
            for i in range(n_layers):
                x_in, x_out = captured["in"][2 * i].detach().double(), captured["in"][2 * i + 2].detach().double()
                block_cos[i] += (F.cosine_similarity(x_in, x_out, dim=-1) * w).sum()
                if mlp:
                    z = captured["mlp"][i].detach().double()
                    mean_abs = torch.einsum("bt,btd->bd", w, z.abs()) / per_ex[:, None]
                    mlp_act_l2[i] += mean_abs[has].pow(2).sum(0)
                    if need_grad:
                        g = grads[n_points + i]
                        g = torch.zeros_like(z) if g is None else g.double()
                        zg = z * g
                        mlp_g[0][i] += torch.einsum("bt,btd->d", w, g.abs())
                        mlp_g[1][i] += torch.einsum("bt,btd->d", w, zg.abs())
                        mlp_g[2][i] += torch.einsum("bt,btd->d", w, zg * zg)
            comp = valid_positions(labels)
            last = captured["in"][-1].detach().double()[comp]
            last_sum += last.sum(0)
            last_sq += last.pow(2).sum(0)
            n_tok += int(tok.sum())
            n_comp += int(comp.sum())
            n_ex += int(has.sum())
            captured = {"in": [None] * n_points, "out": [None] * n_points, "mlp": [None] * n_layers}
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return UnitStatistics(
        grad_abs=grad_abs, gx_abs=gx_abs, gx_sq=gx_sq, act_sq=act_sq, norm_out_l2=norm_out_l2,
        mlp_grad_abs=mlp_g[0], mlp_gx_abs=mlp_g[1], mlp_gx_sq=mlp_g[2], mlp_act_l2=mlp_act_l2,
        last_sum=last_sum, last_sq=last_sq, block_cos=block_cos, num_tokens=n_tok, num_completion_tokens=n_comp,
        num_samples=n_ex, seconds=time.perf_counter() - start,
    )  # fmt: skip


@dataclass
class ResidualScores:
    """Scores of the residual-stream units (and, when measured, of each layer's MLP neurons).

    Attributes:
        per_layer: (P, d) per-point scores, P = 2L+1 norm inputs in forward order (the last is the final norm's
            input, i.e. the last decoder layer's output).
        aggregated: (d,) the scores the cut ranks by (see `aggregate_scores`).
        last_layer: (d,) the last point's scores (the project's usual last-layer selection).
        mlp: (L, m) per-layer MLP neuron scores on the down_proj input, or None.
        criterion / aggregation: how they were computed.
        stats: the raw `UnitStatistics` (reused by the careful cut).
    """

    per_layer: torch.Tensor
    aggregated: torch.Tensor
    last_layer: torch.Tensor
    mlp: torch.Tensor | None
    criterion: str
    aggregation: str
    stats: UnitStatistics | None = field(default=None, repr=False)


def aggregate_scores(per_point: torch.Tensor, aggregation: str) -> torch.Tensor:
    """(P, d) per-point scores -> (d,): `sum_normalized` (each point normalised to sum 1, then summed), `sum`
    (Minitron: plain sum over points), `max_normalized` (max over the normalised points) or `last` (last point)."""
    per_point = per_point.double()
    if aggregation == "sum":
        return per_point.sum(0)
    if aggregation == "last":
        return per_point[-1]
    normed = per_point / per_point.sum(1, keepdim=True).clamp(min=1e-300)
    if aggregation == "sum_normalized":
        return normed.sum(0)
    if aggregation == "max_normalized":
        return normed.max(0).values
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}.")


def _unit_sum(scores: torch.Tensor) -> torch.Tensor:
    return scores / scores.sum(-1, keepdim=True).clamp(min=1e-300)


def scores_from_statistics(
    stats: UnitStatistics, criterion: str, aggregation: str | None = None, seed: int = 0
) -> ResidualScores:
    """Per-point and aggregated scores of one criterion from a scoring pass (pure: no model needed)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}.")
    aggregation = aggregation or default_aggregation(criterion)
    n_tok = max(stats.num_tokens, 1)
    n_points, d = stats.act_sq.shape
    mlp = None
    if criterion == "random":
        gen = torch.Generator().manual_seed(seed)
        per = torch.rand(d, generator=gen, dtype=torch.float64).expand(n_points, d).clone()
        mlp = torch.rand(stats.mlp_act_l2.shape, generator=gen, dtype=torch.float64)
    elif criterion == "activation":
        per = stats.norm_out_l2.sqrt()
        mlp = stats.mlp_act_l2.sqrt()
    elif criterion == "hybrid":
        if stats.gx_abs is None:
            raise ValueError("criterion 'hybrid' needs a scoring pass with gradients (need_grad=True).")
        per = (_unit_sum(stats.norm_out_l2.sqrt()) * _unit_sum(stats.gx_abs)).sqrt()
        if stats.mlp_gx_abs is not None:
            mlp = (_unit_sum(stats.mlp_act_l2.sqrt()) * _unit_sum(stats.mlp_gx_abs)).sqrt()
    else:
        if stats.grad_abs is None:
            raise ValueError(f"criterion {criterion!r} needs a scoring pass with gradients (need_grad=True).")
        key = {"grad": ("grad_abs", "mlp_grad_abs"), "grad_x_act": ("gx_abs", "mlp_gx_abs"),
               "fisher": ("gx_sq", "mlp_gx_sq")}[criterion]  # fmt: skip
        per = getattr(stats, key[0]) / n_tok
        raw_mlp = getattr(stats, key[1])
        mlp = None if raw_mlp is None else raw_mlp / n_tok
    aggregated = per[-1].clone() if criterion == "random" else aggregate_scores(per, aggregation)
    return ResidualScores(per.cpu(), aggregated.cpu(), per[-1].cpu(), None if mlp is None else mlp.cpu(),
                          criterion, aggregation, stats)  # fmt: skip
