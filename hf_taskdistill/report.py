"""The selection report: how much of the teacher's task loss its top-k units carry (the *keep-k curve*).

For a scored teacher layer and each k on a grid, the teacher's completion NLL per token on held-out examples is
measured with only k units of that layer's output kept and every other unit replaced by its mean over the scoring
data's completion tokens (a forward hook that overwrites the layer's output hidden state, at every position). The
curve is drawn for the chosen criterion beside three references: `random` (a seeded permutation, so the sets are
nested), `activation` (mean |h| over the scoring completion tokens, Minitron's magnitude) and the criterion's
bottom-k. k = d_T is the full teacher; no unit kept is the *mean floor*. A criterion that finds task-relevant units
stays near the full teacher at small k, above random, and its bottom-k sits near the floor.

Speed: the layers up to the scored one run once per held-out batch; each point of the curve replays only the
layers above it and the LM head at the completion positions (`engine="replay"`), checked once against the real
forward (k = d_T must give the teacher's own NLL). Where the replay does not reproduce the model, the plain hooked
forward is used for every point (`engine="hook"`). All sums are fp64; nothing is differentiated.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .hooks import decoder_layers
from .losses import valid_positions
from .plots import plot_keep_k_curve
from .selection import REPORT_NAME
from .selection import REPORT_PLOT_NAME as PLOT_NAME  # the file names live with the other selection files


logger = logging.getLogger(__name__)


FORMAT_VERSION = 1
REFERENCE_CRITERIA = ("random", "activation")
# Batch keys handed to the model besides `input_ids` (padded batches, or padding-free packed ones).
_FORWARD_KEYS = ("attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# Replay vs the real forward: the same operations on fewer rows, so only rounding differs (more in half precision);
# a structural difference (a logit soft-cap, a head this module does not know) is far larger.
_REPLAY_RTOL = {torch.float64: 1e-8, torch.float32: 1e-4}
_REPLAY_RTOL_HALF = 5e-3


def bottom_name(criterion: str) -> str:
    """The `nll` key of a criterion's bottom-k curve."""
    return f"{criterion}_bottom"


def default_k_grid(d_t: int, k: int | None = None, num_points: int = 8) -> list[int]:
    """About `num_points` widths from d_T/16 to d_T (fractions 1/16, 1/8, 1/4, 3/8, 1/2, 3/4, 1), plus k."""
    fractions = (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1.0)[-max(num_points - 1, 1) :]
    grid = {max(1, round(d_t * f)) for f in fractions} | {d_t}
    if k is not None:
        grid.add(int(k))
    return sorted(grid)


def _forward_kwargs(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    kwargs = {"input_ids": batch["input_ids"].to(device)}
    for key in _FORWARD_KEYS:
        value = batch.get(key)
        if value is not None:
            kwargs[key] = value.to(device) if isinstance(value, torch.Tensor) else value
    return kwargs


def _completion_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (B, T) of positions that predict a completion token, their targets (N,))."""
    mask = valid_positions(labels)
    targets = labels[:, 1:][mask[:, :-1]]
    return mask, targets


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """fp64 sum of token NLLs; `logits` (N, V) at the completion positions, `targets` (N,)."""
    return F.cross_entropy(logits.float(), targets, reduction="none").double().sum()


def _check_batches(batches: Sequence[Mapping[str, Any]], what: str) -> None:
    if not batches:
        raise ValueError(f"The {what} set is empty: give at least one batch.")
    for batch in batches:
        if "input_ids" not in batch or "labels" not in batch:
            raise ValueError(f"Every {what} batch needs `input_ids` and `labels` (-100 on prompt and padding).")
    if not any(bool(valid_positions(b["labels"]).any()) for b in batches):
        raise ValueError(
            f"The {what} data has no completion token: every label is -100. Check that the dataset has "
            "completions and that `max_length` does not truncate them away."
        )


class _StopForward(Exception):
    """Raised by a hook once the layers needed have run (the rest of the forward is skipped)."""


@torch.no_grad()
def unit_statistics(
    teacher: nn.Module, batches: Iterable[Mapping[str, Any]], layer: int, show_progress: bool = False
) -> dict[str, Any]:
    """Mean and mean |h| of every unit of decoder layer `layer`'s output over the completion tokens of `batches`.

    Only the layers up to `layer` run. Returns `{"mean", "mean_abs"}` ((d,) fp64 tensors), `num_tokens` and
    `num_examples`.
    """
    device = next(teacher.parameters()).device
    block = decoder_layers(teacher)[layer]
    state: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        state["hidden"] = (output[0] if isinstance(output, (tuple, list)) else output).detach()
        raise _StopForward

    handle = block.register_forward_hook(hook)
    was_training = teacher.training
    teacher.eval()
    total = total_abs = None
    n_tok = n_ex = 0
    try:
        for batch in tqdm(list(batches), desc="Unit statistics", disable=not show_progress):
            try:
                teacher(**_forward_kwargs(batch, device), use_cache=False)
            except _StopForward:
                pass
            mask = valid_positions(batch["labels"].to(device))
            acts = state.pop("hidden")[mask].double()
            total = acts.sum(0) if total is None else total + acts.sum(0)
            total_abs = acts.abs().sum(0) if total_abs is None else total_abs + acts.abs().sum(0)
            n_tok += int(mask.sum())
            n_ex += int(mask.any(dim=1).sum())
    finally:
        handle.remove()
        teacher.train(was_training)
    if not n_tok:
        raise ValueError("The scoring data has no completion token: every label is -100.")
    return {"mean": total / n_tok, "mean_abs": total_abs / n_tok, "num_tokens": n_tok, "num_examples": n_ex}


@torch.no_grad()
def model_nll(model: nn.Module, batches: Iterable[Mapping[str, Any]]) -> dict[str, float | int]:
    """A causal LM's completion NLL per token (nats, fp64 sum) on `batches`: `{"nll", "num_tokens", "num_examples"}`."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, n_tok, n_ex = torch.zeros((), dtype=torch.float64), 0, 0
    try:
        for batch in batches:
            mask, targets = _completion_targets(batch["labels"].to(device))
            logits = model(**_forward_kwargs(batch, device), use_cache=False).logits
            total += _nll_sum(logits[mask], targets).cpu()
            n_tok += int(mask.sum())
            n_ex += int(mask.any(dim=1).sum())
    finally:
        model.train(was_training)
    if not n_tok:
        raise ValueError("The held-out data has no completion token: every label is -100.")
    return {"nll": float(total / n_tok), "num_tokens": n_tok, "num_examples": n_ex}


def _final_norm_and_head(teacher: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    decoder = teacher.get_decoder() if hasattr(teacher, "get_decoder") else None
    norm = None
    for name in ("norm", "ln_f", "final_layernorm"):
        norm = getattr(decoder, name, None) if decoder is not None else None
        if isinstance(norm, nn.Module):
            break
    head = teacher.get_output_embeddings() if hasattr(teacher, "get_output_embeddings") else None
    return norm, head


class _HeldOut:
    """Held-out batches with the scored layer's output and the upper layers' call arguments cached.

    One real forward per batch records the layer-`layer` output, the arguments each layer above it was called
    with, and the teacher's own NLL (the reference every replay is checked against).
    """

    @torch.no_grad()
    def __init__(self, teacher: nn.Module, batches: Sequence[Mapping[str, Any]], layer: int, show_progress: bool):
        self.teacher, self.layer = teacher, layer
        self.device = next(teacher.parameters()).device
        blocks = decoder_layers(teacher)
        self.upper = list(blocks)[layer + 1 :]
        self.norm, self.head = _final_norm_and_head(teacher)
        self.items: list[dict[str, Any]] = []
        self.reference = torch.zeros((), dtype=torch.float64)
        self.num_tokens = self.num_examples = 0
        calls: list[tuple[tuple, dict]] = []
        state: dict[str, torch.Tensor] = {}

        def capture_output(module, args, output):
            state["hidden"] = (output[0] if isinstance(output, (tuple, list)) else output).detach()

        def capture_call(module, args, kwargs):
            calls.append((args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}))

        handles = [blocks[layer].register_forward_hook(capture_output)]
        handles += [b.register_forward_pre_hook(capture_call, with_kwargs=True) for b in self.upper]
        try:
            for batch in tqdm(list(batches), desc="Held-out forward", disable=not show_progress):
                calls.clear()
                mask, targets = _completion_targets(batch["labels"].to(self.device))
                logits = teacher(**_forward_kwargs(batch, self.device), use_cache=False).logits
                self.reference += _nll_sum(logits[mask], targets).cpu()
                del logits
                hidden = state.pop("hidden")
                # Without layers above, only the completion positions are ever needed.
                self.items.append({
                    "batch": batch,
                    "hidden": hidden if self.upper else hidden[mask],
                    "calls": list(calls),
                    "mask": mask,
                    "targets": targets,
                })  # fmt: skip
                self.num_tokens += int(mask.sum())
                self.num_examples += int(mask.any(dim=1).sum())
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def replay(self, keep: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """fp64 NLL sum with only the `keep` units of the scored layer (the others at `mean`), by replay."""
        total = torch.zeros((), dtype=torch.float64)
        for item in self.items:
            h = item["hidden"]
            h = torch.where(keep.to(h.device), h, mean.to(h.device, h.dtype))
            for block, (args, kwargs) in zip(self.upper, item["calls"], strict=True):
                out = block(h, *args, **kwargs)
                h = out[0] if isinstance(out, (tuple, list)) else out
            if self.upper:
                h = h[item["mask"]]
            if self.norm is not None:
                h = self.norm(h)
            total += _nll_sum(self.head(h), item["targets"]).cpu()
        return total

    @torch.no_grad()
    def hooked(self, keep: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """The same NLL sum by a full forward with a hook that overwrites the scored layer's output."""

        def overwrite(module, args, output):
            is_tuple = isinstance(output, (tuple, list))
            h = output[0] if is_tuple else output
            h = torch.where(keep.to(h.device), h, mean.to(h.device, h.dtype))
            return (h, *output[1:]) if is_tuple else h

        handle = decoder_layers(self.teacher)[self.layer].register_forward_hook(overwrite)
        total = torch.zeros((), dtype=torch.float64)
        try:
            for item in self.items:
                logits = self.teacher(**_forward_kwargs(item["batch"], self.device), use_cache=False).logits
                total += _nll_sum(logits[item["mask"]], item["targets"]).cpu()
        finally:
            handle.remove()
        return total


def _order(scores: torch.Tensor, descending: bool = True) -> torch.Tensor:
    # Stable sort: ties keep the lower index first (as `select_task_units` does).
    return torch.sort(scores.detach().double().cpu(), descending=descending, stable=True).indices


@torch.no_grad()
def keep_k_curve(
    teacher: nn.Module,
    scoring_batches: Iterable[Mapping[str, Any]],
    heldout_batches: Iterable[Mapping[str, Any]],
    layer: int,
    scores: Mapping[str, torch.Tensor] | torch.Tensor | None,
    k_grid: Sequence[int] | None = None,
    criterion: str | None = None,
    k: int | None = None,
    seed: int = 0,
    engine: str = "auto",
    show_progress: bool = False,
) -> dict[str, Any]:
    """The keep-k curve of teacher decoder layer `layer` (see the module docstring).

    Args:
        teacher: a causal LM (left unchanged; no gradient is computed).
        scoring_batches: the batches the scores came from (`input_ids`, `attention_mask` when padded, `labels`
            with -100 on prompt and padding; `position_ids` / `cu_seq_lens_*` of packed batches are passed
            through). They give each unit's replacement mean and the `activation` criterion.
        heldout_batches: batches of examples *not* in the scoring set, in the same form; the NLL is measured here.
        layer: the non-negative index of the scored decoder layer.
        scores: `{criterion: (d_T,) score}` (e.g. `{"grad": selection.full_scores[i]}`; higher is kept first), a
            bare tensor (named `criterion`), or `None` (only the `random` and `activation` references).
        k_grid: widths to evaluate (1..d_T); default `default_k_grid(d_T, k)`. k is always added.
        criterion: the chosen criterion (the first key of `scores` by default); its bottom-k is also drawn.
        k: the student's width, marked in the plot and used by `report_sentence`.
        seed: seed of the `random` permutation.
        engine: `auto` (replay the upper layers, checked against the real forward; hooked forwards if the check
            fails), `replay` (fail instead of falling back) or `hook` (a hooked full forward per point).

    Returns:
        The report dict (format in `write_report`); `pruned` is `None` (the caller fills it).
    """
    start = time.perf_counter()
    if engine not in ("auto", "replay", "hook"):
        raise ValueError(f"engine must be 'auto', 'replay' or 'hook', got {engine!r}.")
    d_t = teacher.config.get_text_config().hidden_size
    num_layers = len(decoder_layers(teacher))
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise ValueError(f"layer must be a decoder-layer index in 0..{num_layers - 1}, got {layer!r}.")
    if isinstance(scores, torch.Tensor):
        scores = {criterion or "score": scores}
    scores = dict(scores or {})
    for name, s in scores.items():
        if name in REFERENCE_CRITERIA or name.endswith("_bottom"):
            raise ValueError(f"Score name {name!r} is reserved for a reference curve; rename it.")
        if tuple(s.shape) != (d_t,):
            raise ValueError(
                f"scores[{name!r}] must have shape ({d_t},) (one per teacher unit), got {tuple(s.shape)}."
            )
    criterion = criterion or (next(iter(scores)) if scores else "random")
    if scores and criterion not in scores:
        raise ValueError(f"criterion {criterion!r} is not among the scores given: {sorted(scores)}.")
    grid = sorted(
        {int(x) for x in (k_grid if k_grid is not None else default_k_grid(d_t, k))} | ({int(k)} if k else set())
    )
    if not grid or grid[0] < 1 or grid[-1] > d_t:
        raise ValueError(f"k_grid values must lie in 1..{d_t} (the teacher's hidden size), got {grid}.")
    scoring_batches, heldout_batches = list(scoring_batches), list(heldout_batches)
    _check_batches(scoring_batches, "scoring")
    _check_batches(heldout_batches, "held-out")

    was_training = teacher.training
    teacher.eval()
    try:
        stats = unit_statistics(teacher, scoring_batches, layer, show_progress=show_progress)
        mean = stats["mean"].to(next(teacher.parameters()).dtype)
        held = _HeldOut(teacher, heldout_batches, layer, show_progress)
        full = torch.ones(d_t, dtype=torch.bool)
        used = engine
        if engine != "hook":
            replayed = held.replay(full, mean)
            rtol = _REPLAY_RTOL.get(mean.dtype, _REPLAY_RTOL_HALF)
            if (replayed - held.reference).abs() > rtol * max(1.0, float(held.reference.abs())):
                msg = (f"Replaying the layers above {layer} gives NLL sum {float(replayed):.6f}, the real forward "
                       f"{float(held.reference):.6f}")  # fmt: skip
                if engine == "replay":
                    raise RuntimeError(msg + "; use engine='hook' for this architecture.")
                logger.warning(msg + "; using a hooked full forward per point (slower).")
                used = "hook"
            else:
                used = "replay"
        evaluate = held.replay if used == "replay" else held.hooked

        orders = {name: _order(s) for name, s in scores.items()}
        if scores:
            orders[bottom_name(criterion)] = _order(scores[criterion], descending=False)
        orders["random"] = torch.randperm(d_t, generator=torch.Generator().manual_seed(seed))
        orders["activation"] = _order(stats["mean_abs"])
        names = ([criterion] if scores else []) + [n for n in scores if n != criterion] + list(REFERENCE_CRITERIA)
        names += [bottom_name(criterion)] if scores else []

        cache: dict[bytes, float] = {full.numpy().tobytes(): float(held.reference)}
        n_tok = held.num_tokens

        def nll(keep: torch.Tensor) -> float:
            key = keep.numpy().tobytes()
            if key not in cache:
                cache[key] = float(evaluate(keep, mean))
            return cache[key] / n_tok

        jobs = [(name, kk) for name in names for kk in grid]
        curves: dict[str, list[float]] = {name: [] for name in names}
        for name, kk in tqdm(jobs, desc="Keep-k curve", disable=not show_progress):
            keep = torch.zeros(d_t, dtype=torch.bool)
            keep[orders[name][:kk]] = True
            curves[name].append(round(nll(keep), 6))
        floor = nll(torch.zeros(d_t, dtype=torch.bool))
    finally:
        teacher.train(was_training)

    return {
        "format_version": FORMAT_VERSION,
        "layer": layer,
        "criterion": criterion,
        "d_t": d_t,
        "k": int(k) if k else None,
        "k_grid": grid,
        "nll": curves,
        "full_teacher_nll": round(float(held.reference) / n_tok, 6),
        "mean_floor_nll": round(floor, 6),
        "num_examples": held.num_examples,
        "num_tokens": n_tok,
        "num_scoring_examples": stats["num_examples"],
        "num_scoring_tokens": stats["num_tokens"],
        "seed": seed,
        "engine": used,
        "seconds": round(time.perf_counter() - start, 2),
        "pruned": None,
    }


def write_report(report: Mapping[str, Any], output_dir: str | os.PathLike) -> tuple[str, str | None]:
    """Write `selection_report.json` and the keep-k plot `selection_report.png` into `output_dir`.

    The JSON (`format_version` 1) holds: `layer` (scored teacher decoder layer), `criterion`, `d_t`, `k` (the
    student's width or null), `k_grid`, `nll` (`{curve name: [NLL per completion token at each k]}`, curves
    `<criterion>`, `random`, `activation`, `<criterion>_bottom`), `full_teacher_nll`, `mean_floor_nll`,
    `num_examples` / `num_tokens` (held-out), `num_scoring_examples` / `num_scoring_tokens`, `seed`, `engine`,
    `seconds`, optionally `teacher` (a `provenance.model_reference`), and `pruned`: null or `{"hidden_size",
    "criterion", "num_parameters", "nll_before", "nll_after", "recovery_steps"}`.
    Returns the two paths (the PNG's is `None` when matplotlib is missing).
    """
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, REPORT_NAME)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    return json_path, plot_keep_k_curve(report, os.path.join(output_dir, PLOT_NAME))


def load_report(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The `selection_report.json` of a directory, or `None` when there is none."""
    path = os.path.join(directory, REPORT_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        report = json.load(f)
    if report.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {report['format_version']}; upgrade hf_taskdistill.")
    return report


def sentence_point(report: Mapping[str, Any], k: int | None = None) -> tuple[int, int]:
    """(index in `k_grid`, width) of the grid point `report_sentence` describes: `k` (default: the report's k, else
    the largest k below d_T), or the grid point nearest to it when the grid does not hold it."""
    grid, d_t = report["k_grid"], report["d_t"]
    k = k or report.get("k") or max([x for x in grid if x < d_t] or grid)
    i = grid.index(k) if k in grid else min(range(len(grid)), key=lambda j: abs(grid[j] - k))
    return i, grid[i]


def report_sentence(report: Mapping[str, Any], k: int | None = None) -> str:
    """One sentence for a model card: the NLL at the student's k for the criterion, random units and the teacher,
    and, when the report has a `pruned` block, the pruned student's NLL before and after recovery.

    `k` overrides the report's own k (see `sentence_point`; a k off the grid is described at the nearest grid point).
    """
    nll, d_t, criterion = report["nll"], report["d_t"], report["criterion"]
    i, k = sentence_point(report, k)
    parts = []
    if criterion in nll and criterion != "random":
        parts.append(f"Keeping {k} of {d_t} units of teacher layer {report['layer']} by `{criterion}` leaves the "
                     f"held-out NLL at {nll[criterion][i]:.3f} nats/token")  # fmt: skip
        parts.append(f"{k} random units give {nll['random'][i]:.3f}")
    else:
        parts.append(f"Keeping {k} random units of {d_t} in teacher layer {report['layer']} leaves the held-out NLL "
                     f"at {nll['random'][i]:.3f} nats/token")  # fmt: skip
    if "activation" in nll:
        parts.append(f"the {k} most active {nll['activation'][i]:.3f}")
    sentence = "; ".join(parts) + f"; the full teacher {report['full_teacher_nll']:.3f}"
    sentence += f" (every unit at its mean: {report['mean_floor_nll']:.3f}"
    sentence += f"; {report['num_examples']} held-out examples, {report['num_tokens']:,} tokens)."
    pruned = report.get("pruned") or {}
    if pruned.get("nll_before") is not None:
        how = f" (`{pruned['criterion']}`)" if pruned.get("criterion") else ""
        sentence += (f" The teacher cut to {pruned['hidden_size']} units{how} starts at {pruned['nll_before']:.3f} "
                     "before training")  # fmt: skip
        if pruned.get("nll_after") is not None:
            steps = pruned.get("recovery_steps")
            sentence += f" and reaches {pruned['nll_after']:.3f}" + (
                f" after {steps} distillation steps" if steps else ""
            )
        sentence += "."
    return sentence


# ----- the stored report as a model card reads it: lenient, every problem logged, never a made-up number -----
def load_selection_report(directory: str | os.PathLike | None) -> dict[str, Any] | None:
    """`selection_report.json` of a model directory, or None (absent, unreadable or a format this version does not
    know, with the reason logged)."""
    path = os.path.join(directory, REPORT_NAME) if directory is not None else None
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        logger.warning("%s is unreadable (%s): left out of the card.", REPORT_NAME, e)
        return None
    if not isinstance(report, dict) or report.get("format_version") != 1:
        logger.warning("%s has an unknown format_version: left out of the card.", REPORT_NAME)
        return None
    return report


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _report_problem(report: Mapping[str, Any], k: int | None) -> str | None:
    """Why `report_sentence` cannot describe `report` at `k` with real, finite numbers; None when it can."""
    grid, nll = report.get("k_grid"), report.get("nll")
    if not isinstance(grid, list) or not grid or not all(_is_int(x) for x in grid):
        return "no k_grid"
    if not isinstance(nll, Mapping) or "random" not in nll:
        return "no `random` curve"
    if not (_is_int(report.get("d_t")) and _is_int(report.get("layer")) and isinstance(report.get("criterion"), str)):
        return "no d_t, layer or criterion"
    if not (report.get("k") is None or _is_int(report["k"])):
        return "a k that is not an integer"
    i, _ = sentence_point(report, k)
    for name in dict.fromkeys((report["criterion"], "random", "activation")):
        values = nll.get(name, [])
        if name in nll and (not isinstance(values, list) or len(values) != len(grid) or not _finite(values[i])):
            return f"no finite `{name}` NLL at k = {grid[i]} (or not one per k of the grid)"
    if not (_finite(report.get("full_teacher_nll")) and _finite(report.get("mean_floor_nll"))):
        return "no full-teacher or mean-floor NLL"
    if not (_is_int(report.get("num_examples")) and _is_int(report.get("num_tokens"))):
        return "no held-out example and token counts"
    return None


def selection_report_sentence(report: Mapping[str, Any] | None, k: int | None = None) -> str | None:
    """The keep-k sentence of `selection_report.json`: `hf_taskdistill.report.report_sentence`, the sentence
    `hf-taskdistill select --report` prints (the pruned student's NLL before/after recovery included when the report
    has them), at `k` when given (the card passes the selection's k; off the grid, the nearest grid point).

    None, with the reason logged, when there is no report or it lacks a number the sentence states (never a made-up
    or non-finite number); a malformed `pruned` block only drops the pruned student's part.
    """
    if not isinstance(report, Mapping) or not report:
        return None
    k = k if _is_int(k) and k > 0 else None
    problem = _report_problem(report, k)
    if problem is not None:
        logger.warning("%s has %s: no keep-k sentence in the card.", REPORT_NAME, problem)
        return None
    pruned = report.get("pruned")
    if pruned is not None and not (
        isinstance(pruned, Mapping)
        and (
            pruned.get("nll_before") is None or (_finite(pruned["nll_before"]) and _is_int(pruned.get("hidden_size")))
        )
        and (pruned.get("nll_after") is None or _finite(pruned["nll_after"]))
    ):
        logger.warning("%s has a malformed `pruned` block: the card leaves the pruned student out.", REPORT_NAME)
        report = {**report, "pruned": None}
    return report_sentence(report, k)
