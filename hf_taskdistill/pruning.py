"""Cut a narrower (and optionally shallower) student out of the teacher, at task-scored units.

The residual stream is one set of units shared by every layer, so it is scored at every place it is read: the
input of each RMSNorm (two per decoder layer plus the final norm, `2L + 1` *points*), all in one forward/backward
pass over the scoring batches. Per point and unit j, over the non-padding tokens of the scoring data:

- `grad`: mean |dL/dh_j|; `grad_x_act`: mean |h_j dL/dh_j|; `fisher`: mean (h_j dL/dh_j)^2 (a diagonal Fisher /
  second-order Taylor estimate of the loss change when unit j is zeroed), where L is the summed NLL of the gold
  completion tokens (the project's task loss, `method.md` §3.2);
- `activation` (Minitron, arXiv:2407.14679): the norm's *output*, mean |y_j| over each sequence, L2 over examples;
- `hybrid`: per point, the geometric mean of the `activation` and `grad_x_act` scores (each normalised to sum 1):
  a unit must be both large and task-relevant;
- `random`: a seeded uniform draw (the scoring pass still runs, for the norm statistics of the careful cut).

The per-point scores are aggregated over points (`AGGREGATIONS`: the sum of per-point scores each normalised to
sum 1, Minitron's plain sum, the max of the normalised scores, or the last point only) and the top K units kept,
in ascending teacher order (student unit i is teacher unit `indices[i]`). MLP neurons (optional M) are scored the
same way on each down_proj input; depth (optional N) keeps the N layers of largest Minitron block importance
1 - cos(layer input, layer output), in their original order. Attention heads stay whole (`head_dim` is kept and set
explicitly in the config).

The *careful cut*: an RMSNorm over K of d units divides by the RMS of the kept units, not of all d. With
`norm_rescale="rms"` each norm weight is multiplied by sqrt(E[mean_kept h^2] / E[mean_all h^2]) measured at that
norm's input on the scoring data, so that the kept units' normalised values match the teacher's on average; with
`"lsq"` by the least-squares factor that brings the outputs of the layers reading the norm (q/k/v, gate/up, LM head)
closest to the teacher's on the scoring data (one extra forward pass); `"none"` is the raw cut.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .provenance import model_reference, reference_text
from .selection import LayerSelection, UnitSelection
from .unit_scores import (  # noqa: F401 (the scoring pass and its criteria, re-exported: `pruning.CRITERIA`, ...)
    AGGREGATIONS,
    CRITERIA,
    DEFAULT_AGGREGATION,
    DEFAULT_AGGREGATIONS,
    ResidualScores,
    UnitStatistics,
    _layers,
    _model_inputs,
    _norms,
    aggregate_scores,
    collect_unit_statistics,
    default_aggregation,
    scores_from_statistics,
)


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
_MODEL_TYPES = ("llama", "qwen2", "mistral")
NORM_RESCALES = ("rms", "lsq", "none")
DEFAULT_CRITERION = "activation"
DEFAULT_NORM_RESCALE = "rms"


# --------------------------------------------------------------------------------------------- validation
def _check_architecture(config, model: nn.Module | None = None) -> None:
    """Raise unless the teacher (its class when given, else its config's model_type) is a supported one."""
    if model is not None:
        name, ok = type(model).__name__, type(model).__name__ in SUPPORTED_ARCHITECTURES
    else:
        model_type = getattr(config, "model_type", None)
        name, ok = f"model_type {model_type!r}", model_type in _MODEL_TYPES
    if not ok:
        raise ValueError(
            f"Pruning supports {', '.join(SUPPORTED_ARCHITECTURES)} (SmolLM2 is Llama); the teacher is {name}."
        )


def _student_config(config, hidden_size: int, intermediate_size: int, layers_kept: Sequence[int]):
    """The teacher's config narrowed to the student's sizes, built through the class (so its validation runs)."""
    values = config.to_dict()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    values.update(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=len(layers_kept),
        head_dim=head_dim,
    )
    if isinstance(values.get("layer_types"), list):
        values["layer_types"] = [values["layer_types"][i] for i in layers_kept]
    if isinstance(values.get("max_window_layers"), int):
        values["max_window_layers"] = min(values["max_window_layers"], len(layers_kept))
    values.pop("task_distill", None)
    values.pop("transformers_version", None)
    return type(config).from_dict(values)


def _accepts(config, hidden_size: int, intermediate_size: int, num_layers: int) -> bool:
    try:
        _student_config(config, hidden_size, intermediate_size, list(range(num_layers)))
    except Exception:
        return False
    return True


def check_prune_request(
    config,
    hidden_size: int,
    intermediate_size: int | None = None,
    num_layers: int | None = None,
    criterion: str = DEFAULT_CRITERION,
    aggregation: str | None = None,
    norm_rescale: str = DEFAULT_NORM_RESCALE,
):
    """Validate a pruning request against the teacher's config before any scoring; returns the student config.

    Raises `ValueError` for an unsupported architecture, an unknown criterion / aggregation, a width larger than
    the teacher's (or below 1), a width the architecture's config validation rejects (the nearest valid widths are
    listed: Llama needs `hidden_size % num_attention_heads == 0` even with an explicit `head_dim`, Qwen2 and Mistral
    accept any width), an MLP width outside 1..intermediate_size, or more layers than the teacher has.
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    _check_architecture(config)
    aggregation = aggregation or default_aggregation(criterion)
    for name, value, choices in (
        ("criterion", criterion, CRITERIA),
        ("aggregation", aggregation, AGGREGATIONS),
        ("norm_rescale", norm_rescale, NORM_RESCALES),
    ):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}.")
    d_t, m_t, n_t = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                        ("num_layers", num_layers)):  # fmt: skip
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name} must be an integer, got {value!r}.")
    if hidden_size > d_t:
        raise ValueError(
            f"The student's hidden_size {hidden_size} is larger than the teacher's ({d_t}): pruning only narrows. "
            f"Choose hidden_size <= {d_t}."
        )
    if hidden_size < 1:
        raise ValueError(f"hidden_size must be >= 1, got {hidden_size}.")
    m = m_t if intermediate_size is None else intermediate_size
    if not 1 <= m <= m_t:
        raise ValueError(f"intermediate_size must be in 1..{m_t} (the teacher's), got {m}.")
    n = n_t if num_layers is None else num_layers
    if not 1 <= n <= n_t:
        raise ValueError(f"num_layers must be in 1..{n_t} (the teacher has {n_t} layers), got {n}.")
    try:
        return _student_config(config, hidden_size, m, list(range(n)))
    except Exception as e:  # the architecture's own config validation
        valid = [cand for cand in range(1, d_t + 1) if _accepts(config, cand, m, n)]
        lower = [v for v in valid if v < hidden_size][-2:]
        upper = [v for v in valid if v > hidden_size][:2]
        raise ValueError(
            f"hidden_size {hidden_size} is rejected by {type(config).__name__}'s validation "
            f"({str(e).strip().splitlines()[-1].strip()}); attention heads stay whole (head_dim "
            f"{getattr(config, 'head_dim', None)}, {config.num_attention_heads} heads). Nearest valid sizes: "
            f"{lower + upper}."
        ) from None


def _check_batches(batches) -> list:
    batches = list(batches) if batches is not None else []
    if not batches:
        raise ValueError("The scoring set is empty: give at least one batch (e.g. raise --selection_num_samples).")
    if all(bool((b["labels"] == -100).all()) for b in batches):
        raise ValueError(
            "The scoring data has no completion token: every label is -100. Check that the dataset has "
            "completions and that `max_length` does not truncate them away."
        )
    return batches


def score_residual_units(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    criterion: str = DEFAULT_CRITERION,
    aggregation: str | None = None,
    seed: int = 0,
    mlp: bool = True,
) -> ResidualScores:
    """Score every residual-stream unit of `model` (and its MLP neurons when `mlp`) on task batches.

    Args:
        model: a supported causal LM (left unchanged; no parameter gets a gradient).
        batches: dicts with `input_ids`, `labels` (-100 on prompt and padding) and, when present,
            `attention_mask`, `position_ids` or `cu_seq_lens_*` (e.g. from TRL's collators).
        criterion: one of `CRITERIA` (see the module docstring).
        aggregation: one of `AGGREGATIONS`, how the 2L+1 per-point scores become one (default:
            `default_aggregation(criterion)`).
        seed: the seed of `random`.
    """
    _check_architecture(model.config, model)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}.")
    aggregation = aggregation or default_aggregation(criterion)
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}.")
    batches = _check_batches(batches)
    stats = collect_unit_statistics(model, batches, need_grad=criterion not in ("activation", "random"), mlp=mlp)
    return scores_from_statistics(stats, criterion, aggregation, seed)


# --------------------------------------------------------------------------------------------- the cut
def top_units(scores: torch.Tensor, k: int, force: Sequence[int] = ()) -> list[int]:
    """The k highest-scoring units (stable: ties keep the lower index), `force`d units first, in ascending order."""
    forced = list(dict.fromkeys(int(i) for i in force))[:k]
    order = torch.sort(scores.double(), descending=True, stable=True).indices.tolist()
    rest = [i for i in order if i not in set(forced)][: k - len(forced)]
    return sorted(forced + rest)


def block_importance(stats: UnitStatistics) -> torch.Tensor:
    """Minitron's block importance per layer: 1 - mean over tokens of cos(layer input, layer output)."""
    return 1 - stats.block_cos / max(stats.num_tokens, 1)


def norm_rescale_factors(act_sq: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
    """(P,) sqrt(E[mean over kept units of h^2] / E[mean over all units of h^2]) per norm input."""
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    act_sq = act_sq.double().cpu()
    kept = act_sq[:, idx].mean(1)
    full = act_sq.mean(1)
    return (kept / full.clamp(min=1e-300)).sqrt()


def _readers(model: nn.Module) -> list[list[torch.Tensor]]:
    """Per norm (forward order), the weights of the linear layers that read its output."""
    out = []
    for layer in _layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        out += [
            [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight],
            [mlp.gate_proj.weight, mlp.up_proj.weight],
        ]
    return out + [[model.get_output_embeddings().weight]]


def least_squares_norm_scales(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], indices: Sequence[int], chunk: int = 1024
) -> torch.Tensor:
    """(P,) per-norm factor c minimising sum ||W y - c W[:, S] y_S^cut||^2 over the scoring tokens.

    y is the teacher's norm output, y_S^cut the output of the same norm restricted to the kept units S (divided by
    their own RMS), and W the weights that read it (q/k/v, gate/up, or the LM head). Each norm is calibrated on the
    teacher's own inputs, so the factors do not depend on each other. Multiplying the cut norm's weight by c gives
    the readers' outputs closest to the teacher's in the least-squares sense (a raw cut is c = 1).
    """
    norms, readers = _norms(model), _readers(model)
    idx = torch.as_tensor(list(indices), dtype=torch.long, device=next(model.parameters()).device)
    num = torch.zeros(len(norms), dtype=torch.float64)
    den = torch.zeros(len(norms), dtype=torch.float64)
    masks: list[torch.Tensor] = []

    def hook(p):
        def fn(module, args, output):
            x = args[0][masks[0]].float()  # (N, d) non-padding tokens
            y = output[masks[0]].float()
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
            xs = x[:, idx]
            y_cut = module.weight[idx].float() * xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + eps)
            for w in readers[p]:
                w = w.float()
                for start in range(0, y.shape[0], chunk):
                    u = y[start : start + chunk] @ w.T
                    v = y_cut[start : start + chunk] @ w[:, idx].T
                    num[p] += float((u * v).sum())
                    den[p] += float((v * v).sum())

        return fn

    handles = [norm.register_forward_hook(hook(p)) for p, norm in enumerate(norms)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = _model_inputs(batch, next(model.parameters()).device)
                mask = inputs.get("attention_mask")
                masks[:] = [mask.bool() if mask is not None else torch.ones_like(inputs["input_ids"]).bool()]
                model.model(**inputs)  # the backbone; the final norm's hook applies the LM head itself
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return num / den.clamp(min=1e-300)


@dataclass
class PruneResult:
    """The pruned student and how it was cut.

    Attributes:
        model: a `PreTrainedModel` of the teacher's class, with the student's sizes.
        init: the `init` block stored in `config.task_distill` (criterion, indices, layers kept, teacher, ...).
        num_parameters: the student's parameter count (tied embeddings counted once).
        selection: the `UnitSelection` `save_pruned` stores (last student layer <-> last teacher layer).
        scores: the `ResidualScores` the cut ranked by.
    """

    model: nn.Module
    init: dict[str, Any]
    num_parameters: int
    selection: UnitSelection
    scores: ResidualScores | None = field(default=None, repr=False)


def _slice_state_dict(teacher, student_keys, residual, mlp_indices, layers_kept, scales) -> dict[str, torch.Tensor]:
    """The student's tensors as slices of the teacher's (`scales`: per norm, in forward order)."""
    t_state = teacher.state_dict()
    res = torch.as_tensor(residual, dtype=torch.long)
    out = {}
    for key in student_keys:
        parts = key.split(".")
        if parts[:2] == ["model", "layers"]:
            s_layer = int(parts[2])
            t_layer = layers_kept[s_layer]
            t_key = ".".join(parts[:2] + [str(t_layer)] + parts[3:])
            name = ".".join(parts[3:])
        else:
            t_layer, t_key, name = None, key, key
        w = t_state[t_key]
        mi = None if t_layer is None or mlp_indices is None else torch.as_tensor(mlp_indices[s_layer])
        if name == "model.embed_tokens.weight" or name == "lm_head.weight":
            w = w[:, res]
        elif name == "lm_head.bias":
            pass
        elif name == "model.norm.weight":
            w = w[res] * scales[-1]
        elif name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            point = 2 * t_layer + (name == "post_attention_layernorm.weight")
            w = w[res] * scales[point]
        elif name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"):
            w = w[:, res]
        elif name in ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"):
            pass
        elif name in ("self_attn.o_proj.weight", "self_attn.o_proj.bias"):
            w = w[res]
        elif name in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            w = w[:, res] if mi is None else w[mi][:, res]
        elif name in ("mlp.gate_proj.bias", "mlp.up_proj.bias"):
            w = w if mi is None else w[mi]
        elif name == "mlp.down_proj.weight":
            w = w[res] if mi is None else w[res][:, mi]
        elif name == "mlp.down_proj.bias":
            w = w[res]
        else:
            raise ValueError(f"Pruning does not know how to slice the tensor {key!r} of {type(teacher).__name__}.")
        out[key] = w.detach().clone().contiguous()
    return out


def prune_teacher(
    teacher: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]] | None,
    hidden_size: int,
    intermediate_size: int | None = None,
    num_layers: int | None = None,
    criterion: str = DEFAULT_CRITERION,
    aggregation: str | None = None,
    seed: int = 0,
    norm_rescale: str = DEFAULT_NORM_RESCALE,
    keep_outliers: int = 0,
    mlp_criterion: str | None = None,
    teacher_reference: dict[str, Any] | str | None = None,
    stats: UnitStatistics | None = None,
) -> PruneResult:
    """Cut a student of width `hidden_size` (MLP width `intermediate_size`, `num_layers` layers) out of `teacher`.

    Everything is validated before scoring (`check_prune_request`). The residual indices, kept in ascending teacher
    order, slice the embedding columns, every norm, the q/k/v input columns, the o_proj and down_proj output rows,
    the final norm and the LM head (tied or not); attention heads stay whole.

    Args:
        teacher: a Llama / Qwen2 / Mistral causal LM (left unchanged).
        batches: scoring batches (see `score_residual_units`); needed by every criterion (the careful cut uses the
            norm statistics).
        hidden_size: K, the student's width. intermediate_size: M (default: the teacher's, no MLP cut).
        num_layers: N (default: all); the N layers of largest block importance are kept, in order.
        criterion / aggregation / seed: see `score_residual_units`.
        norm_rescale: `rms` (rescale each norm weight for the smaller RMS of the kept units), `lsq` (the factor
            that brings the readers' outputs closest to the teacher's, `least_squares_norm_scales`) or `none`.
        keep_outliers: always keep this many units of largest mean square over the residual stream.
        mlp_criterion: criterion of the MLP neurons (default: `criterion`).
        teacher_reference: the teacher's public reference (default: `model_reference(teacher)`).
        stats: a `UnitStatistics` from an earlier pass over the same batches (skips the scoring pass).
    """
    mlp_criterion = mlp_criterion or criterion
    aggregation = aggregation or default_aggregation(criterion)
    _check_architecture(teacher.config, teacher)
    s_config = check_prune_request(teacher.config, hidden_size, intermediate_size, num_layers, criterion,
                                   aggregation, norm_rescale)  # fmt: skip
    if mlp_criterion not in CRITERIA:
        raise ValueError(f"mlp_criterion must be one of {CRITERIA}, got {mlp_criterion!r}.")
    t_cfg = teacher.config
    d_t, m_t, n_t = t_cfg.hidden_size, t_cfg.intermediate_size, t_cfg.num_hidden_layers
    m = s_config.intermediate_size
    n = s_config.num_hidden_layers
    prune_mlp = m < m_t
    if stats is None:
        batches = _check_batches(batches)
        need_grad = criterion not in ("activation", "random") or (
            prune_mlp and mlp_criterion not in ("activation", "random")
        )
        stats = collect_unit_statistics(teacher, batches, need_grad=need_grad, mlp=prune_mlp)
    scores = scores_from_statistics(stats, criterion, aggregation, seed)

    outliers = []
    if keep_outliers:
        outliers = torch.sort(stats.act_sq.double().sum(0).cpu(), descending=True, stable=True).indices
        outliers = outliers[:keep_outliers].tolist()
    residual = top_units(scores.aggregated, hidden_size, force=outliers)
    layers_kept = list(range(n_t))
    if n < n_t:
        importance = block_importance(stats).cpu()
        layers_kept = sorted(torch.sort(importance, descending=True, stable=True).indices[:n].tolist())
    mlp_indices = None
    if prune_mlp:
        mlp_scores = scores.mlp if mlp_criterion == criterion else scores_from_statistics(stats, mlp_criterion).mlp
        mlp_indices = [top_units(mlp_scores[t], m) for t in layers_kept]
    if norm_rescale == "rms":
        scales = norm_rescale_factors(stats.act_sq, residual).tolist()
    elif norm_rescale == "lsq":
        if batches is None:
            raise ValueError("norm_rescale='lsq' calibrates on the scoring batches: pass them with `stats`.")
        scales = least_squares_norm_scales(teacher, _check_batches(batches), residual).tolist()
    else:
        scales = [1.0] * stats.act_sq.shape[0]
    param = next(teacher.parameters())
    s_config.architectures = [type(teacher).__name__]
    student = type(teacher)(s_config).to(dtype=param.dtype, device=param.device)
    state = _slice_state_dict(teacher, list(student.state_dict().keys()), residual, mlp_indices, layers_kept, scales)
    student.load_state_dict(state, strict=True)
    student.eval()
    num_parameters = sum(p.numel() for p in student.parameters())

    teacher_ref = teacher_reference if isinstance(teacher_reference, dict) else model_reference(
        teacher_reference if teacher_reference is not None else teacher
    )  # fmt: skip
    n_comp = max(stats.num_completion_tokens, 1)
    mean = stats.last_sum.cpu() / n_comp
    std = (stats.last_sq.cpu() / n_comp - mean.pow(2)).clamp(min=0).sqrt()
    idx = torch.as_tensor(residual)
    init = {
        "criterion": criterion,
        "aggregation": aggregation,
        "mlp_criterion": mlp_criterion if prune_mlp else None,
        "scored_layers": list(range(n_t)),
        "scored_points": "input of every RMSNorm: input_layernorm and post_attention_layernorm of each layer, "
        "and the final norm",
        "residual_indices": residual,
        "mlp_indices": mlp_indices,
        "layers_kept": layers_kept,
        "depth_rule": "block importance 1 - cos(layer input, layer output), top N kept in order" if n < n_t else None,
        "teacher": teacher_ref,
        "num_samples": stats.num_samples,
        "num_tokens": stats.num_tokens,
        "hidden_size": hidden_size,
        "intermediate_size": m,
        "num_layers": n,
        "num_parameters": num_parameters,
        "norm_rescale": norm_rescale,
        "norm_scales": [round(float(s), 6) for s in scales],
        "keep_outliers": keep_outliers,
        "seed": seed,
    }
    selection = UnitSelection(
        layers=[
            LayerSelection(
                student_layer=n - 1,
                teacher_layer=n_t - 1,
                indices=residual,
                scores=[float(s) for s in scores.aggregated[idx]],
                teacher_mean=mean[idx].tolist() if stats.num_completion_tokens else None,
                teacher_std=std[idx].tolist() if stats.num_completion_tokens else None,
            )
        ],
        selection_method=criterion,
        teacher_hidden_size=d_t,
        student_hidden_size=hidden_size,
        num_samples=stats.num_samples,
        num_tokens=stats.num_completion_tokens,
        seed=seed,
        teacher=teacher_ref,
        diagnostics={"scoring_seconds": round(stats.seconds, 3)},
        init=init,
    )
    student.config.task_distill = selection.to_dict()
    return PruneResult(student, init, num_parameters, selection, scores)


# --------------------------------------------------------------------------------------------- saving
def _card(result: PruneResult) -> str:
    init = result.init
    teacher = init.get("teacher") or {}
    base = f"base_model: {teacher['model_id']}\n" if teacher.get("model_id") else ""
    teacher_text = reference_text(teacher) or "the teacher"
    return (
        f"---\n{base}library_name: transformers\ntags:\n- hf_taskdistill\n- pruning\n---\n\n"
        f"# Pruned student of {teacher_text}\n\n"
        f"Cut out of {teacher_text} by `hf-taskdistill prune`: hidden size {init['hidden_size']}, MLP width "
        f"{init['intermediate_size']}, {init['num_layers']} layers, {init['num_parameters']:,} parameters. "
        f"Residual units ranked by `{init['criterion']}` (aggregated over the residual stream by "
        f"`{init['aggregation']}`) on {init['num_samples']} task examples; norm rescale `{init['norm_rescale']}`.\n\n"
        "Student unit i is teacher unit `task_distill.init.residual_indices[i]` (see `config.json`), so "
        "`FeatureDistillTrainer` reuses these indices without re-scoring. The student is meant to be distilled "
        "from its teacher before use.\n"
    )


def save_pruned(
    result: PruneResult,
    output_dir: str | os.PathLike,
    tokenizer=None,
    teacher_reference: dict[str, Any] | str | None = None,
) -> None:
    """`save_pretrained` the pruned student (safetensors, `config.task_distill` with the `init` block), copy the
    tokenizer and write a model card stub (`README.md`). `teacher_reference` overrides the recorded teacher."""
    if teacher_reference is not None:
        ref = teacher_reference if isinstance(teacher_reference, dict) else model_reference(teacher_reference)
        result.init["teacher"] = ref
        result.selection.teacher = ref
        result.selection.init = result.init
    result.model.config.task_distill = result.selection.to_dict()
    os.makedirs(output_dir, exist_ok=True)
    result.model.save_pretrained(output_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    with open(os.path.join(output_dir, "README.md"), "w") as f:
        f.write(_card(result))
    with open(os.path.join(output_dir, "prune_summary.json"), "w") as f:
        json.dump({k: v for k, v in result.init.items() if k not in ("residual_indices", "mlp_indices")}, f,
                  indent=2, sort_keys=True)  # fmt: skip
