"""Model cards for distilled students: our own template (shipped as package data) and the unit-score plot.

TRL's card cannot name the teacher, the layers or k, renders `base_model: None` for local students and writes a
`licence` key; `build_model_card` replaces it. Everything shown is computed here, so the template only prints
strings and never a Python `None`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import textwrap
from collections.abc import Iterable, Mapping
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import jinja2
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .provenance import FLEX_KD_PAPER
from .selection import CONFIG_KEY, SCORES_NAME, UnitSelection, load_unit_selection


logger = logging.getLogger(__name__)

PLOT_NAME = "unit_scores.png"
BASE_TAGS = ["distillation", "trl", "feature-distillation", "hf_taskdistill"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow", ".gguf", ".safetensors")
_PACKAGES = ("torch", "transformers", "trl", "peft", "huggingface_hub", "hf-taskdistill")
# Keyword arguments of `transformers.Trainer.create_model_card` that `push_to_hub(**kwargs)` may forward.
_TRANSFORMERS_CARD_KWARGS = {"language", "license", "tags", "model_name", "finetuned_from", "tasks", "dataset_tags",
                             "dataset", "dataset_args"}  # fmt: skip
_SCORE_FORMS = {
    "grad": "`grad`, the mean of abs(dL/dh_j) over the completion tokens",
    "grad_x_act": "`grad_x_act`, the mean of abs(h_j * dL/dh_j) over the completion tokens",
}
# docstyle-ignore
TRL_CITATION = textwrap.dedent("""\
    @software{vonwerra2020trl,
      title   = {{TRL: Transformers Reinforcement Learning}},
      author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallouédec, Quentin},
      license = {Apache-2.0},
      url     = {https://github.com/huggingface/trl},
      year    = {2020}
    }""")


def is_hub_id(name: Any) -> bool:
    """True for `org/name` or `name` strings that are not local paths (only those go into YAML links)."""
    if not isinstance(name, str) or not name or os.path.exists(name) or name.startswith((".", "/", "~")):
        return False
    if name.lower().endswith(_FILE_SUFFIXES):
        return False
    return bool(_HUB_ID.match(name)) and ".." not in name


def _versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name.replace("-", "_")] = version(name)
        except PackageNotFoundError:
            out[name.replace("-", "_")] = "not installed"
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _name(model_id: str | None, revision: str | None = None) -> str:
    """Markdown for a model reference: a Hub link, a local checkpoint's folder name, or 'not recorded'."""
    if not model_id:
        return "not recorded"  # an in-memory model has no id
    if is_hub_id(model_id):
        text = f"[{model_id}](https://huggingface.co/{model_id})"
    else:  # only the folder name: an absolute path would expose the local file system
        text = f"`{os.path.basename(os.path.normpath(model_id))}` (a local checkpoint)"
    return f"{text} at revision `{revision}`" if revision else text


def normalize_eval_results(eval_results: Any) -> list[dict[str, Any]]:
    """Rows `{"dataset", "value", "std", "n"}` of ROUGE-L from the evaluation module's dict, a JSON file or string.

    Accepts `{set: {"rougeL": {"mean": x, "std": y}, "n": n}}`, `{set: {"rougeL": x}}`, `{set: {"mean": x}}`, a
    flat `{set: x}`, and any of these under a top-level `"sets"` (as `hf-taskdistill eval` writes) or `"results"`
    key. Entries without a finite number are skipped with a warning.
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
        "ROUGE-L of generated responses against the references (mean over seeds, with their standard deviation).",
        "",
        "| Dataset | ROUGE-L | Std | Samples |",
        "|---|---|---|---|",
    ]
    for r in rows:
        std = _fmt(r["std"]) if r["std"] is not None else "-"
        lines.append(f"| {r['dataset']} | {_fmt(r['value'])} | {std} | {r['n'] if r['n'] is not None else '-'} |")
    return "\n".join(lines)


def eval_results_metadata(rows: list[dict[str, Any]]) -> list[EvalResult]:
    """`model-index` entries (legacy `EvalResult` format) of `normalize_eval_results` rows."""
    return [
        EvalResult(
            task_type="text-generation",
            task_name="Text Generation",
            dataset_type=r["dataset"],
            dataset_name=r["dataset"],
            metric_type="rougeL",
            metric_name="ROUGE-L",
            metric_value=r["value"],
        )
        for r in rows
    ]


def _method(selection: UnitSelection | None, feature_loss_weight: float | None, logit_loss: str | None):
    """(key, prose) of the distillation method."""
    if selection is None or feature_loss_weight == 0:
        if logit_loss == "none":
            return "sft", "supervised fine-tuning baseline: cross-entropy on the gold completions, no feature term"
        if logit_loss == "jsd":
            return "logit-only", "logit-only distillation (no feature term)"
        return "logit-only", "no feature distillation (no unit selection was stored)"
    method = selection.selection_method
    if method == "projector":
        return "projector", (
            "learned-projector baseline: a `Linear(d_S, d_T)` of the student state matches the whole teacher layer "
            "(no unit selection; the projector is not part of the saved weights)"
        )
    if method == "random":
        return "random-units", "random teacher units (seeded ablation baseline; no scores)"
    return "task-selected-units", f"task-selected teacher units, scored by gradient relevance ({_SCORE_FORMS[method]})"


def _logit_loss(logit_loss: str | None, beta: float | None, lmbda: float | None) -> tuple[dict, str]:
    if logit_loss == "jsd":
        meta = {"logit_loss": "generalized_jsd", "beta": beta, "lmbda": lmbda}
        text = "GKD generalized Jensen-Shannon divergence"
        if beta is not None and lmbda is not None:
            text += f" (beta={_fmt(beta)}, lmbda={_fmt(lmbda)}: {'on' if lmbda > 0 else 'off'}-policy)"
        return {k: v for k, v in meta.items() if v is not None}, text
    if logit_loss == "none":
        return {"logit_loss": "none"}, "none (cross-entropy on the gold completions, SFT host)"
    return {}, "not recorded"


def _selection_context(selection: UnitSelection) -> dict[str, Any]:
    diag = selection.diagnostics or {}
    overlaps, shares = diag.get("split_half_overlap") or [], diag.get("selected_score_share") or []
    pairs = []
    for i, ls in enumerate(selection.layers):
        pairs.append({
            "student_layer": ls.student_layer,
            "teacher_layer": ls.teacher_layer,
            "k": ls.k if ls.indices is not None else "all",
            "overlap": _fmt(overlaps[i]) if i < len(overlaps) else "-",
            "share": _fmt(shares[i]) if i < len(shares) else "-",
        })  # fmt: skip
    cost = []
    if diag.get("scoring_seconds") is not None:
        cost.append(f"{_fmt(float(diag['scoring_seconds']))} s")
    if diag.get("peak_memory_mb") is not None:
        cost.append(f"peak memory {_fmt(float(diag['peak_memory_mb']))} MiB")
    return {
        "method": selection.selection_method,
        "score_form": _SCORE_FORMS.get(selection.selection_method),
        "k": selection.k,
        "d_t": selection.teacher_hidden_size,
        "d_s": selection.student_hidden_size,
        "order": selection.selection_order,
        "num_samples": selection.num_samples,
        "num_tokens": selection.num_tokens,
        "seed": selection.seed,
        "pairs": pairs,
        "cost": ", ".join(cost),
    }


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
    """Save a PNG of every teacher unit's score, selected units highlighted, one panel per layer pair.

    Returns the path, or None (with the reason logged) when there is nothing to plot.
    """
    if selection.selection_method in ("random", "projector") or not scores:
        return None
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed (`pip install matplotlib`): no unit-score plot.")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(selection.layers)
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.6 * n), squeeze=False)
    for ax, ls, s in zip(axes[:, 0], selection.layers, scores, strict=True):
        values = s.detach().float().cpu().numpy()
        chosen = sorted(ls.indices or [])
        rest = sorted(set(range(len(values))) - set(chosen))
        ax.scatter(rest, values[rest], s=6, color="0.65", label="not selected")
        ax.scatter(chosen, values[chosen], s=10, color="tab:orange", label=f"selected (k={len(chosen)})")
        if chosen:
            ax.axhline(values[chosen].min(), color="tab:orange", lw=0.8, ls="--")
        ax.set_title(f"student layer {ls.student_layer} <- teacher layer {ls.teacher_layer}", fontsize=10, loc="right")
        ax.set_xlabel("teacher unit")
        ax.set_ylabel(f"score ({selection.selection_method})")
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.fspath(path)


def build_model_card(
    selection: UnitSelection | Mapping | None = None,
    *,
    model_name: str | None = None,
    repo_id: str | None = None,
    base_model: str | None = None,
    teacher_id: str | None = None,
    teacher_revision: str | None = None,
    dataset_name: str | list[str] | None = None,
    logit_loss: str | None = None,
    beta: float | None = None,
    lmbda: float | None = None,
    feature_loss_type: str | None = None,
    feature_loss_weight: float | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    license: str | None = None,
    tags: str | Iterable[str] | None = None,
    eval_results: Any = None,
    plot_file: str | None = None,
    no_plot_reason: str | None = None,
    library_name: str = "transformers",
    trainer_name: str | None = None,
    citations: Iterable[str] = (),
    note: str | None = None,
) -> ModelCard:
    """Render the card of a distilled student.

    Args:
        selection: the stored selection (a `UnitSelection`, or a `config.json` / `task_distill` dict); None for a
            run without feature distillation.
        model_name / repo_id: the card title and the repo id used in code snippets.
        base_model: the student's initial checkpoint; only a Hub id reaches the YAML `base_model`.
        teacher_id / teacher_revision: default to `selection.teacher`.
        logit_loss: `"jsd"` (GKD generalized JSD, with `beta` and `lmbda`), `"none"` (cross-entropy) or None
            (not recorded).
        hyperparameters: training settings shown as a table (name -> value; None values are skipped).
        eval_results: see `normalize_eval_results`; rendered as a table and as `model-index`.
        plot_file: file name of the unit-score PNG next to the card (linked relatively).
        no_plot_reason: shown instead of the plot when `plot_file` is None.
        citations: extra BibTeX entries; the Flex-KD paper and TRL are always cited.
        note: a sentence shown under the title (e.g. how the card was produced).
    """
    if isinstance(selection, Mapping):
        selection = load_unit_selection(dict(selection))
    teacher = (selection.teacher if selection is not None else None) or {}
    teacher_id = teacher_id or teacher.get("model_id")
    teacher_revision = teacher_revision or teacher.get("revision")
    repo_id = repo_id or model_name or "path/to/this-model"
    model_name = model_name or repo_id.split("/")[-1]
    datasets = [dataset_name] if isinstance(dataset_name, str) else list(dataset_name or [])
    rows = normalize_eval_results(eval_results)
    method_key, method_text = _method(selection, feature_loss_weight, logit_loss)
    logit_meta, logit_text = _logit_loss(logit_loss, beta, lmbda)
    feature_active = method_key not in ("logit-only", "sft")

    distillation: dict[str, Any] = {"method": method_key}
    if teacher_id:  # a local teacher path is reduced to its folder name
        distillation["teacher"] = (
            teacher_id if is_hub_id(teacher_id) else os.path.basename(os.path.normpath(teacher_id))
        )
    if teacher_revision:
        distillation["teacher_revision"] = teacher_revision
    distillation.update(logit_meta)
    objective = feature_text = None
    if logit_loss in ("jsd", "none"):
        objective = "generalized JSD(student, teacher)" if logit_loss == "jsd" else "cross-entropy(gold completion)"
    if feature_active:
        distillation["selection_method"] = selection.selection_method
        distillation["num_units"] = selection.k
        distillation["layer_pairs"] = [[ls.student_layer, ls.teacher_layer] for ls in selection.layers]
        if feature_loss_type and feature_loss_weight is not None:
            distillation.update(feature_loss=feature_loss_type, feature_loss_weight=feature_loss_weight)
            feature_text = f"{feature_loss_type}, weight {_fmt(feature_loss_weight)}"
            if objective:
                objective += f" + {_fmt(feature_loss_weight)} * {feature_loss_type} loss(student, teacher units)"

    card_data = ModelCardData(
        base_model=base_model if is_hub_id(base_model) else None,
        datasets=[d for d in datasets if is_hub_id(d)] or None,
        library_name=library_name,
        license=license,
        model_name=model_name,
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys([*BASE_TAGS, *([tags] if isinstance(tags, str) else (tags or []))])),
        eval_results=eval_results_metadata(rows) or None,
        distillation=distillation,
    )
    data_links = [f"[{d}](https://huggingface.co/datasets/{d})" if is_hub_id(d) else f"`{os.path.basename(d)}`"
                  for d in datasets]  # fmt: skip
    teacher_text = _name(teacher_id, teacher_revision)
    context = {
        "card_data": card_data.to_yaml(),
        "model_name": model_name,
        "repo_id": repo_id,
        "student": _name(base_model),
        "base_is_hub": is_hub_id(base_model),
        "teacher": teacher_text,
        "teacher_prose": f"the teacher {teacher_text}" if teacher_id else "a teacher whose id was not recorded",
        "note": note,
        "datasets": ", ".join(data_links) or "not recorded",
        "method": method_text,
        "logit_loss": logit_text,
        "feature_loss": feature_text,
        "objective": objective,
        "selection": _selection_context(selection) if feature_active else None,
        "plot_file": plot_file,
        "no_plot_reason": no_plot_reason,
        "hyperparameters": [(k, _fmt(v)) for k, v in (hyperparameters or {}).items() if v is not None],
        "eval_table": eval_table_markdown(rows) if rows else None,
        "versions": _versions(),
        "license": license,
        "trainer_name": trainer_name,
        "paper": FLEX_KD_PAPER,
        "citations": [FLEX_KD_PAPER["citation"], *[c for c in citations if c], TRL_CITATION],
        "adapter": library_name == "peft",
        "config_key": CONFIG_KEY,
    }
    template = resources.files("hf_taskdistill").joinpath("templates/model_card.md").read_text(encoding="utf-8")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    return ModelCard(env.from_string(template).render(**context))


def _trainer_hyperparameters(args) -> dict[str, Any]:
    steps = {"max_steps": args.max_steps} if args.max_steps and args.max_steps > 0 else {}
    world = getattr(args, "world_size", 1) or 1
    return {
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
        **(steps or {"num_train_epochs": args.num_train_epochs}),
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "total_train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
        "max_length": getattr(args, "max_length", None),
        "feature_loss_type": args.feature_loss_type,
        "feature_loss_weight": args.feature_loss_weight,
        "selection_num_samples": args.selection_num_samples,
        "seed": args.seed,
    }


def write_trainer_model_card(trainer, model_name=None, dataset_name=None, tags=None, **kwargs) -> ModelCard:
    """Write `README.md` and the unit-score plot into `trainer.args.output_dir`; return the card.

    `kwargs` are those `Trainer.push_to_hub(**kwargs)` forwards: `license`, `eval_results` (dict or JSON file),
    `finetuned_from` (the student's Hub id when the model was built locally), `dataset` (alias of `dataset_name`)
    and `language`; other transformers card arguments are accepted and ignored.
    """
    args = trainer.args
    unknown = sorted(set(kwargs) - _TRANSFORMERS_CARD_KWARGS - {"eval_results", "citations"})
    if unknown:
        logger.warning("create_model_card: ignoring unknown arguments %s.", unknown)
    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    is_peft = hasattr(trainer.model, "get_base_model")
    selection: UnitSelection | None = getattr(trainer, "unit_selection", None)
    output_dir = args.output_dir
    os.makedirs(output_dir, exist_ok=True)

    teacher = getattr(trainer, "_fd_teacher", None)
    teacher_id = (selection.teacher.get("model_id") if selection else None) or args.teacher_model_name_or_path
    if not teacher_id and teacher is not None:
        teacher_id = getattr(teacher.config, "_name_or_path", None) or None
    teacher_revision = (selection.teacher.get("revision") if selection else None) or (
        getattr(teacher.config, "_commit_hash", None) if teacher is not None else None
    )
    host = getattr(trainer, "_host_loss_name", None)
    logit_loss = {"jsd_loss": "jsd", "ce_loss": "none"}.get(host)
    plot_file, reason = None, None
    if selection is not None and args.feature_loss_weight > 0:
        plot_file, reason = _plot_into(selection, output_dir, output_dir)
    citations = list(kwargs.get("citations") or [])
    if logit_loss == "jsd":
        from trl.experimental.gkd import GKDTrainer

        citations.append(GKDTrainer._paper["citation"])
    hub_id = getattr(trainer, "hub_model_id", None) or args.hub_model_id
    card = build_model_card(
        selection,
        model_name=model_name or (hub_id.split("/")[-1] if hub_id else os.path.basename(os.path.normpath(output_dir))),
        repo_id=hub_id,
        base_model=kwargs.get("finetuned_from") or getattr(model.config, "_name_or_path", None),
        teacher_id=teacher_id,
        teacher_revision=teacher_revision,
        dataset_name=dataset_name or kwargs.get("dataset"),
        logit_loss=logit_loss,
        beta=getattr(args, "beta", None) if logit_loss == "jsd" else None,
        lmbda=getattr(args, "lmbda", None) if logit_loss == "jsd" else None,
        feature_loss_type=args.feature_loss_type,
        feature_loss_weight=args.feature_loss_weight,
        hyperparameters=_trainer_hyperparameters(args),
        license=kwargs.get("license"),
        tags=[*([tags] if isinstance(tags, str) else (tags or [])), *getattr(trainer, "_tag_names", [])],
        eval_results=kwargs.get("eval_results"),
        plot_file=plot_file,
        no_plot_reason=reason,
        library_name="peft" if is_peft else "transformers",
        trainer_name=getattr(trainer, "_name", None),
        citations=citations,
    )
    if kwargs.get("language"):
        card.data.language = kwargs["language"]
    card.save(os.path.join(output_dir, "README.md"))
    return card


def _plot_into(selection: UnitSelection, scores_dir, output_dir) -> tuple[str | None, str | None]:
    """Write `unit_scores.png` into `output_dir`; return (file name, None) or (None, why there is no plot)."""
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
