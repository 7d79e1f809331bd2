"""The package's matplotlib figures: the unit-score plot of a model card and the keep-k curve of the selection report.

`plot_unit_scores` draws every teacher unit's score per layer pair (selected units highlighted, the cut-off marked,
and the scores sorted); `plot_into` writes it as `unit_scores.png` next to a card, from the selection's scores or the
raw-scores sidecar (`load_scores`). `plot_keep_k_curve` draws a `selection_report.json` report (format in
`hf_taskdistill.report.write_report`). matplotlib is optional and imported only when drawing: without it no PNG is
written and the reason is logged. This module imports neither the model card nor the trainer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from .selection import SCORES_NAME, UnitSelection


logger = logging.getLogger(__name__)

PLOT_NAME = "unit_scores.png"


def _pyplot(what: str):
    """matplotlib's pyplot on the non-interactive Agg backend, or None (with a warning) when it is not installed."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed (`pip install matplotlib`): no %s.", what)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----- the unit-score plot of the model card -----
def load_scores(selection: UnitSelection | None, directory: str | os.PathLike | None = None):
    """The full (d_T,) score vector per layer pair: `selection.full_scores`, else the scores sidecar, else None."""
    if selection is not None and selection.full_scores is not None:
        return list(selection.full_scores)
    path = os.path.join(directory, SCORES_NAME) if directory is not None else None
    if path is None or not os.path.isfile(path):
        return None
    from safetensors.torch import load_file

    tensors = load_file(path)
    return [tensors[f"layer_{i}"] for i in range(len(tensors)) if f"layer_{i}" in tensors] or None


def plot_unit_scores(selection: UnitSelection, scores, path: str | os.PathLike) -> str | None:
    """Save a PNG of every teacher unit's score, one row per layer pair: by unit index (selected units highlighted,
    the cut-off score as a line) and sorted in descending order (the k-th score marked), which shows how close the
    scores around the cut-off are. Titles give the number of scoring examples and tokens.

    Returns the path, or None (with the reason logged) when there is nothing to plot.
    """
    if selection.selection_method in ("random", "projector") or not scores:
        return None
    plt = _pyplot("unit-score plot")
    if plt is None:
        return None
    import numpy as np

    n = len(selection.layers)
    fig, axes = plt.subplots(n, 2, figsize=(11, 3.0 * n), squeeze=False, gridspec_kw={"width_ratios": [3, 2]})
    samples = f"{selection.num_samples:,} scoring examples, {selection.num_tokens:,} completion tokens"
    for (ax, ax_sorted), ls, s in zip(axes, selection.layers, scores, strict=True):
        values = s.detach().float().cpu().numpy()
        chosen = sorted(ls.indices or [])
        rest = sorted(set(range(len(values))) - set(chosen))
        k = len(chosen)
        label = f"student layer {ls.student_layer} <- teacher layer {ls.teacher_layer}"
        ax.scatter(rest, values[rest], s=6, color="0.65", label=f"not selected ({len(rest)})")
        ax.scatter(chosen, values[chosen], s=10, color="tab:orange", label=f"selected (k={k})")
        if chosen:
            cut = float(values[chosen].min())
            ax.axhline(cut, color="tab:orange", lw=0.8, ls="--", label=f"cut-off: k-th score {cut:.3g}")
        ax.set_title(f"{label}: score per unit", fontsize=9, loc="left")
        ax.set_xlabel("teacher unit")
        ax.set_ylabel(f"score ({selection.selection_method})")
        ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
        ranked = np.sort(values)[::-1]
        ax_sorted.plot(np.arange(1, len(ranked) + 1), ranked, color="0.3", lw=1.0, label="scores, sorted")
        if chosen:
            ax_sorted.axvline(k, color="tab:orange", lw=0.8, ls="--", label=f"k = {k}")
            ax_sorted.scatter([k], [ranked[k - 1]], s=14, color="tab:orange", zorder=3)
            if k < len(ranked):
                gap = ranked[k - 1] - ranked[k]
                ax_sorted.set_title(f"sorted, descending; k-th minus (k+1)-th score: {gap:.3g} "
                                    f"({100 * gap / max(abs(ranked[k - 1]), 1e-12):.2g}%)",
                                    fontsize=9, loc="left")  # fmt: skip
        ax_sorted.set_xlabel("rank")
        ax_sorted.set_ylabel("score")
        ax_sorted.legend(loc="upper right", fontsize=7, framealpha=0.8)
    fig.suptitle(f"Teacher unit scores ({selection.selection_method}) over {samples}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.fspath(path)


def plot_into(selection: UnitSelection, scores_dir, output_dir) -> tuple[str | None, str | None]:
    """Write `unit_scores.png` into `output_dir` from the selection's scores (or the `scores_dir` sidecar); return
    (file name, None) or (None, why there is no plot)."""
    if selection.selection_method == "random":
        return None, "No unit-score plot: the `random` baseline draws units without scoring them."
    if selection.selection_method == "projector":
        return None, "No unit-score plot: the projector baseline matches the whole teacher layer (no selection)."
    scores = load_scores(selection, scores_dir)
    if scores is None or all(float(s.abs().sum()) == 0 for s in scores):
        return None, f"No unit-score plot: the raw scores (`{SCORES_NAME}`) were not saved with this model."
    if plot_unit_scores(selection, scores, os.path.join(output_dir, PLOT_NAME)) is None:
        return None, "No unit-score plot: matplotlib is not installed."
    return PLOT_NAME, None


# ----- the keep-k curve of the selection report -----
def _curve_label(name: str, criterion: str) -> str:
    if name == f"{criterion}_bottom":  # `report.bottom_name(criterion)`
        return f"{criterion}, bottom-k"
    if name == "activation":
        return "activation (mean |h|)"
    return f"{name} (seeded)" if name == "random" else name


def plot_keep_k_curve(report: Mapping[str, Any], path: str | os.PathLike) -> str | None:
    """Save a PNG of a keep-k report (`hf_taskdistill.report.keep_k_curve`): held-out NLL against the units kept,
    one line per curve, the full teacher and the mean floor as horizontal lines, the student's k as a vertical
    one and the pruned student (`report["pruned"]`) before/after recovery as points.

    Returns the path, or None (with the reason logged) when matplotlib is not installed.
    """
    plt = _pyplot("keep-k plot")
    if plt is None:
        return None
    criterion, grid = report["criterion"], report["k_grid"]
    styles = {"random": ("tab:gray", "o"), "activation": ("tab:green", "s"), f"{criterion}_bottom": ("tab:red", "v")}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, values in report["nll"].items():
        color, marker = styles.get(name, ("tab:blue" if name == criterion else None, "D"))
        ax.plot(grid, values, marker=marker, ms=4, color=color, lw=2 if name == criterion else 1.2,
                label=_curve_label(name, criterion))  # fmt: skip
    ax.axhline(report["full_teacher_nll"], color="black", ls="--", lw=1, label="full teacher")
    ax.axhline(report["mean_floor_nll"], color="0.6", ls=":", lw=1, label="all units at their mean")
    pruned = report.get("pruned") or {}
    if pruned.get("nll_before") is not None:
        ax.scatter([pruned["hidden_size"]], [pruned["nll_before"]], marker="*", s=120, color="tab:purple", zorder=5,
                   label=f"pruned student, untrained (K={pruned['hidden_size']})")  # fmt: skip
    if pruned.get("nll_after") is not None:
        ax.scatter([pruned["hidden_size"]], [pruned["nll_after"]], marker="P", s=90, color="tab:purple", zorder=5,
                   label=f"pruned student, {pruned.get('recovery_steps')} recovery steps")  # fmt: skip
    if report.get("k"):
        ax.axvline(report["k"], color="tab:orange", lw=1, ls="-.", label=f"student k = {report['k']}")
    ax.set_xlabel(f"units kept of the teacher's layer {report['layer']} (d_T = {report['d_t']})")
    ax.set_ylabel("held-out completion NLL (nats/token)")
    ax.set_title(
        f"Keep-k curve: {report['num_examples']} held-out examples, {report['num_tokens']:,} tokens", fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.fspath(path)
