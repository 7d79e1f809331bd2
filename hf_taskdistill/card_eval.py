"""Evaluation results on a model card: one scale (ROUGE-L F-measure x 100), one rounding, everywhere.

`normalize_eval_results` reads what `hf-taskdistill eval` writes (or a plainer dict / JSON file) into rows;
`eval_table_markdown` renders the card's Evaluation section from them, `eval_results_metadata` the card's
`model-index` entries, and `rows_from_model_index` reads them back from an existing card (so a re-push keeps them).
Used by `hf_taskdistill.model_card` and `hf_taskdistill.hub`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

from huggingface_hub import EvalResult


logger = logging.getLogger(__name__)

# ROUGE everywhere (eval output, card table, model-index) is the F-measure x 100, rounded to two decimals: the scale of
# `hf-taskdistill eval`, of MiniLLM/DistiLLM, and of transformers' summarization examples (`round(v * 100, 4)`).
ROUGE_LABEL = "ROUGE-L F1 (x100)"
ROUGE_DECIMALS = 2


def format_rouge(value: float | None) -> str:
    """A ROUGE value as the card shows it (two decimals), `–` for none."""
    return "–" if value is None else f"{value:.{ROUGE_DECIMALS}f}"


def normalize_eval_results(eval_results: Any) -> list[dict[str, Any]]:
    """Rows `{"dataset", "value", "std", "n"}` of ROUGE-L (F-measure x 100) from the evaluation module's dict, a
    JSON file or a JSON string.

    Accepts `{set: {"rougeL": {"mean": x, "std": y}, "n": n}}`, `{set: {"rougeL": x}}`, `{set: {"mean": x}}`, a
    flat `{set: x}`, and any of these under a top-level `"sets"` (as `hf-taskdistill eval` writes) or `"results"`
    key. Values are taken to be on the x100 scale `hf-taskdistill eval` writes (a fraction such as 0.19 is shown as
    0.19, not 19). Entries without a finite number are skipped with a warning; a std of None (one seed) stays None.
    """
    if eval_results is None:
        return []
    if isinstance(eval_results, (str, os.PathLike)):
        text = str(eval_results)
        if not text.lstrip().startswith("{"):
            with open(text) as f:
                text = f.read()
        eval_results = json.loads(text)
    if not isinstance(eval_results, Mapping):
        raise TypeError(f"eval_results must be a dict or a JSON file of one, got {type(eval_results).__name__}.")
    for wrapper in ("sets", "results"):  # `hf-taskdistill eval` writes {"protocol": ..., "sets": {...}}
        if isinstance(eval_results.get(wrapper), Mapping):
            eval_results = eval_results[wrapper]
            break
    rows, skipped = [], []
    for name, entry in eval_results.items():
        value, std, n = entry, None, None
        if isinstance(entry, Mapping):
            n = entry.get("n", entry.get("num_samples"))
            key = next((k for k in entry if str(k).lower().replace("-", "").replace("_", "") == "rougel"), None)
            value = entry[key] if key is not None else entry
            if isinstance(value, Mapping):
                value, std = value.get("mean"), value.get("std")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            skipped.append(name)
            continue
        std = float(std) if isinstance(std, (int, float)) and not isinstance(std, bool) else None
        n = int(n) if isinstance(n, int) and not isinstance(n, bool) else None
        rows.append({"dataset": str(name), "value": float(value), "std": std, "n": n})
    if skipped:
        logger.warning("eval_results: no ROUGE-L number for %s; left out of the card.", skipped)
    return rows


def eval_table_markdown(rows: list[dict[str, Any]]) -> str:
    """The evaluation section's body: one line of protocol and a Markdown table of `normalize_eval_results` rows."""
    lines = [
        (
            f"{ROUGE_LABEL}: ROUGE-L F-measure of generated responses against the references, times 100 (0-100), "
            "mean over generation seeds with their sample standard deviation (– for a single seed)."
        ),
        "",
        f"| Dataset | {ROUGE_LABEL} | Std | Samples |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['dataset']} | {format_rouge(r['value'])} | {format_rouge(r['std'])} | "
                     f"{r['n'] if r['n'] is not None else '–'} |")  # fmt: skip
    return "\n".join(lines)


def eval_results_metadata(rows: list[dict[str, Any]]) -> list[EvalResult]:
    """`model-index` entries (legacy `EvalResult` format) of `normalize_eval_results` rows: metric `rouge` (the
    evaluate metric id) with `rouge_types: [rougeL]`, value = F-measure x 100 rounded to two decimals."""
    return [
        EvalResult(
            task_type="text-generation",
            task_name="Text Generation",
            dataset_type=r["dataset"],
            dataset_name=r["dataset"],
            metric_type="rouge",
            metric_name=ROUGE_LABEL,
            metric_value=round(r["value"], ROUGE_DECIMALS),
            metric_args={"rouge_types": ["rougeL"], "use_stemmer": False, "scale": 100},
        )
        for r in rows
    ]


def rows_from_model_index(card) -> dict[str, float] | None:
    """`{dataset: value}` of the ROUGE-L entries of a card's `model-index` (ours: `rouge`; older cards: `rougeL`)."""
    results = getattr(getattr(card, "data", None), "eval_results", None) or []
    return {r.dataset_name: r.metric_value for r in results if r.metric_type in ("rouge", "rougeL")} or None
