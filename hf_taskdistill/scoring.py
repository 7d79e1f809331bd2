"""Score every teacher hidden unit by its gradient-based relevance to the task, and keep the top k.

For each scoring batch the teacher's task loss L is the *sum* of token NLLs over the gold completion tokens
(`method.md` §3.2). The tapped layer outputs are the same tensors the trainer's hooks capture; the earliest tapped
layer output is re-entered as a leaf that requires grad, so the backward pass only runs through the layers above it
and the frozen teacher's parameters never receive gradients. Per unit j the score is the mean over completion
positions of |dL/dh_j| (`grad`) or |h_j * dL/dh_j| (`grad_x_act`), accumulated in fp32.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .hooks import decoder_layers
from .losses import valid_positions
from .selection import LayerSelection, UnitSelection


SCORE_METHODS = ("grad", "grad_x_act", "random")

# What a training-time teacher call receives from a collated batch: the attention mask only when the collator made
# one; for packed / padding-free batches (TRL's SFT `packing=True` or `padding_free=True`) the position ids and the
# sequence boundaries, from which transformers builds a block-diagonal causal mask (packed documents never attend
# to each other). `labels` are left out: the loss is computed here.
MODEL_INPUT_KEYS = (
    "input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
    "max_length_k", "seq_idx",
    # vision-language batches (TRL's DataCollatorForVisionLanguageModeling)
    "pixel_values", "image_grid_thw", "image_sizes", "pixel_attention_mask", "token_type_ids", "mm_token_type_ids",
)  # fmt: skip


def model_inputs(batch: dict, device: torch.device | None = None) -> dict:
    """The keys of a collated batch that the model's forward takes (see `MODEL_INPUT_KEYS`), moved to `device`."""
    out = {}
    for key in MODEL_INPUT_KEYS:
        if key in batch and batch[key] is not None:
            value = batch[key]
            out[key] = value.to(device) if device is not None and torch.is_tensor(value) else value
    if "input_ids" not in out:
        raise ValueError(f"A scoring batch needs `input_ids`; it has {sorted(batch)}.")
    return out


class _ScoringTap:
    """Hooks that hand the tapped layer outputs to autograd (earliest layer as a fresh leaf)."""

    def __init__(self, model: nn.Module, layers: Sequence[int], make_leaf: bool):
        self.layers = sorted(set(layers))
        self.make_leaf = make_leaf
        self.outputs: dict[int, torch.Tensor] = {}
        blocks = decoder_layers(model)
        self._handles = [blocks[i].register_forward_hook(self._hook(i)) for i in self.layers]

    def _hook(self, layer: int):
        def hook(module, args, output):
            is_tuple = isinstance(output, (tuple, list))
            hidden = output[0] if is_tuple else output
            if self.make_leaf and layer == self.layers[0]:
                # Gradients start here: nothing below this layer is differentiated.
                hidden = hidden.detach().requires_grad_(True)
                self.outputs[layer] = hidden
                return (hidden, *output[1:]) if is_tuple else hidden
            self.outputs[layer] = hidden
            return None

        return hook

    def remove(self):
        for h in self._handles:
            h.remove()


class _Accumulator:
    """fp32 running sums for one teacher layer; two halves (even / odd batches) for the stability diagnostic."""

    def __init__(self, width: int, device: torch.device):
        self.score = torch.zeros(2, width, dtype=torch.float64, device=device)
        self.act_sum = torch.zeros(width, dtype=torch.float64, device=device)
        self.act_sq = torch.zeros(width, dtype=torch.float64, device=device)

    def add(self, half: int, score_sum: torch.Tensor | None, acts: torch.Tensor) -> None:
        if score_sum is not None:
            self.score[half] += score_sum.double()
        self.act_sum += acts.double().sum(0)
        self.act_sq += acts.double().pow(2).sum(0)

    def tensors(self) -> list[torch.Tensor]:
        return [self.score, self.act_sum, self.act_sq]


def _all_reduce(tensors: list[torch.Tensor]) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            for t in tensors:
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    # Stable sort: ties keep the lower index first, so the selection is deterministic.
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def select_task_units(
    teacher: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]] | None,
    num_units: int,
    layer_pairs: Sequence[tuple[int, int]],
    method: str = "grad",
    order: str = "index",
    seed: int = 0,
    student_hidden_size: int | None = None,
    teacher_id: str | None = None,
    teacher_revision: str | None = None,
    num_samples: int | None = None,
    show_progress: bool = True,
) -> UnitSelection:
    """Score the teacher's units on task batches and return the top-`num_units` per layer pair.

    Args:
        teacher: a causal LM (left frozen; its parameters get no gradient).
        batches: dicts with `input_ids` and `labels` (-100 on prompt and padding) plus whatever else the trainer's
            own collator makes: an `attention_mask`, or for packed / padding-free batches `position_ids` and
            `cu_seq_lens_*` (passed to the teacher exactly as the training-time teacher call gets them). Under `torch.distributed` every rank passes the *same* list of batches and
            scores its share (batch i goes to rank i mod world size); sums are reduced so all ranks end with
            identical indices. May be `None` for `random` (then no unit statistics are recorded).
        num_units: k, usually the student's hidden size d_S. Must be <= the teacher's hidden size d_T.
        layer_pairs: `(student_layer, teacher_layer)` pairs with non-negative indices.
        method: `grad`, `grad_x_act` or `random` (seeded ablation baseline; unit statistics still computed).
        order: `index` stores the units in ascending teacher index, `score` in descending score.
        seed: seed of the `random` draw (the scoring subset is chosen by the caller).

    Returns:
        A `UnitSelection` with the indices, their scores, the teacher unit mean/std over completion tokens, the
        full score vectors (`full_scores`) and diagnostics (wall time, peak memory, split-half overlap, mass share).
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"selection method must be one of {SCORE_METHODS}, got {method!r}.")
    if order not in ("index", "score"):
        raise ValueError(f"selection order must be 'index' or 'score', got {order!r}.")
    d_t = teacher.config.get_text_config().hidden_size
    if num_units > d_t:
        raise ValueError(
            f"Cannot select {num_units} units from a teacher of hidden size {d_t}: the student is wider than the "
            f"teacher. Set `selection_num_units` <= {d_t} (only the first k student units are then matched)."
        )
    if num_units < 1:
        raise ValueError(f"selection_num_units must be >= 1, got {num_units}.")
    t_layers = sorted({t for _, t in layer_pairs})
    device = next(teacher.parameters()).device
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    batches = list(batches) if batches is not None else []
    rank, world = _rank_world()
    need_grad = method != "random"
    acc = {layer: _Accumulator(d_t, device) for layer in t_layers}
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # tokens (half 0), tokens (half 1), examples

    tap = _ScoringTap(teacher, t_layers, make_leaf=need_grad)
    was_training = teacher.training
    teacher.eval()
    # Every rank runs the same number of forwards (sharded teachers gather parameters collectively); a rank with
    # no batch left re-runs its last one with all labels masked, which adds nothing.
    steps = -(-len(batches) // world) if batches else 0
    try:
        for step in tqdm(range(steps), desc="Scoring teacher units", disable=not show_progress or rank != 0):
            index = step * world + rank
            batch = batches[min(index, len(batches) - 1)]
            labels = batch["labels"].to(device)
            if index >= len(batches):
                labels = torch.full_like(labels, -100)
            half = index % 2
            tap.outputs = {}
            with torch.enable_grad() if need_grad else torch.no_grad():
                out = teacher(**model_inputs(batch, device), use_cache=False)
                mask = valid_positions(labels)
                grads = [None] * len(t_layers)
                if need_grad:
                    # Shift the labels, not the logits: reshaping a (B, T-1, V) slice of the logits would copy it.
                    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
                    logits = out.logits.float()
                    loss = F.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]),
                        targets.reshape(-1),
                        ignore_index=-100,
                        reduction="sum",
                    )
                    hidden = [tap.outputs[layer] for layer in t_layers]
                    grads = torch.autograd.grad(loss, hidden, allow_unused=True)
            for layer, grad in zip(t_layers, grads, strict=True):
                acts = tap.outputs[layer].detach()[mask].float()  # (N, d_T) completion positions only
                score = None
                if need_grad:
                    g = torch.zeros_like(acts) if grad is None else grad[mask].float()
                    score = (g.abs() if method == "grad" else (acts * g).abs()).sum(0)
                acc[layer].add(half, score, acts)
            counts[half] += mask.sum()
            counts[2] += (mask.any(dim=1)).sum()
            tap.outputs = {}
    finally:
        tap.remove()
        teacher.train(was_training)

    _all_reduce([t for layer in t_layers for t in acc[layer].tensors()] + [counts])
    n_tok = float(counts[0] + counts[1])
    if need_grad and n_tok == 0:
        raise ValueError(
            "The scoring data has no completion token: every label is -100. Check that the dataset has "
            "completions and that `max_length` does not truncate them away."
        )

    layers, full_scores, overlaps, shares = [], [], [], []
    gen = torch.Generator().manual_seed(seed)
    for s_layer, t_layer in layer_pairs:
        a = acc[t_layer]
        if need_grad:
            total = (a.score[0] + a.score[1]) / max(n_tok, 1.0)
            chosen = _topk(total, num_units)
            half_sets = [set(_topk(a.score[h], num_units).tolist()) for h in (0, 1)]
            if counts[0] > 0 and counts[1] > 0:
                overlaps.append(len(half_sets[0] & half_sets[1]) / num_units)
            shares.append(float(total[chosen].sum() / total.sum().clamp(min=1e-30)))
        else:
            total = torch.zeros(d_t, dtype=torch.float64, device=device)
            chosen = torch.randperm(d_t, generator=gen)[:num_units].to(device)
        if order == "index":
            chosen = torch.sort(chosen).values
        mean = std = None
        if n_tok > 0:
            m = a.act_sum / n_tok
            var = (a.act_sq / n_tok - m.pow(2)).clamp(min=0)
            mean, std = m[chosen].tolist(), var[chosen].sqrt().tolist()
        layers.append(
            LayerSelection(
                student_layer=int(s_layer),
                teacher_layer=int(t_layer),
                indices=chosen.tolist(),
                scores=total[chosen].tolist() if need_grad else None,
                teacher_mean=mean,
                teacher_std=std,
            )
        )
        full_scores.append(total.float().cpu())

    elapsed = time.perf_counter() - start
    diagnostics = {
        "scoring_seconds": round(elapsed, 3),
        "peak_memory_mb": round(_peak_memory_mb(device), 1),
        # CUDA: peak allocated during scoring; CPU: the whole process's peak RSS so far (an upper bound)
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
    }
    if overlaps:
        diagnostics["split_half_overlap"] = [round(o, 4) for o in overlaps]
    if shares:
        diagnostics["selected_score_share"] = [round(s, 4) for s in shares]
    return UnitSelection(
        layers=layers,
        selection_method=method,
        selection_order=order,
        teacher_hidden_size=d_t,
        student_hidden_size=int(student_hidden_size or num_units),
        num_samples=int(num_samples if num_samples is not None else counts[2]),
        num_tokens=int(n_tok),
        seed=seed,
        teacher={"model_id": teacher_id, "revision": teacher_revision},
        diagnostics=diagnostics,
        full_scores=full_scores if need_grad else None,
    )
