"""Model cards for distilled students: our own template (shipped as package data), filled from the stored selection.

TRL's card cannot name the teacher, the layers or k, renders `base_model: None` for local students and writes a
`licence` key; `build_model_card` replaces it. Everything shown is computed here, so the template only prints
strings and never a Python `None`. What the card states comes from the stored selection (`config.json`'s
`task_distill`: teacher, student, data, training settings, a pruned student's `init`), the raw-scores sidecar (the
plot, drawn by `hf_taskdistill.plots`, whose `load_scores` / `plot_unit_scores` / `plot_into` / `PLOT_NAME` are
re-exported here) and an optional `selection_report.json` (the keep-k sentence of `hf_taskdistill.report`). Models
are named through `hf_taskdistill.provenance`: a Hub id is linked with its revision, a local model gets a label that
is never a link and never a path. ROUGE is the F-measure x 100 everywhere, at two decimals (`ROUGE_LABEL`): the
evaluation section and `model-index` are `hf_taskdistill.card_eval`, the stored report is read by
`hf_taskdistill.report.load_selection_report` (both re-exported here).
"""

from __future__ import annotations

import logging
import os
import textwrap
from collections.abc import Iterable, Mapping
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import jinja2
from huggingface_hub import ModelCard, ModelCardData

from .card_eval import (  # noqa: F401 (re-exported: the card's evaluation section and model-index)
    ROUGE_DECIMALS,
    ROUGE_LABEL,
    eval_results_metadata,
    eval_table_markdown,
    normalize_eval_results,
    rows_from_model_index,
)
from .data import DATA_FILE_SUFFIXES, data_label
from .plots import PLOT_NAME, load_scores, plot_into, plot_unit_scores  # noqa: F401 (re-exported)
from .provenance import FLEX_KD_PAPER, is_hub_id, local_label, model_reference, reference_text
from .report import load_selection_report, selection_report_sentence
from .selection import CONFIG_KEY, REPORT_PLOT_NAME, UnitSelection, load_unit_selection


logger = logging.getLogger(__name__)

BASE_TAGS = ["distillation", "trl", "feature-distillation", "hf_taskdistill"]
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


# ----- references to models and data (never a local path) -----
def as_reference(value: Any, revision: str | None = None) -> dict[str, str | None]:
    """A `{"model_id", "revision", "local_name"}` dict from a stored reference dict, a Hub id, a path or a model.

    A stored `model_id` that is not a Hub id (a path written by an older version) becomes its local label, so a
    file-system path never reaches a card.
    """
    if isinstance(value, Mapping):
        model_id, local = value.get("model_id"), value.get("local_name")
        if model_id and not is_hub_id(model_id):
            model_id, local = None, local or local_label(model_id)
        return {"model_id": model_id or None, "revision": (value.get("revision") if model_id else None) or None,
                "local_name": None if model_id else (local or None)}  # fmt: skip
    return model_reference(value, revision)


def reference_markdown(reference: Mapping[str, Any] | None) -> str:
    """Markdown for a model reference: a Hub link (with its revision), a local label that is never a link, or
    'not recorded'."""
    reference = as_reference(reference or {})
    if reference["model_id"]:
        model_id, rev = reference["model_id"], reference["revision"]
        text = f"[{model_id}](https://huggingface.co/{model_id})"
        return f"{text} at revision `{rev}`" if rev else text
    if reference["local_name"]:
        return f"`{reference['local_name']}` (a local checkpoint, not on the Hub)"
    return "not recorded"


def _fresh_student_source(raw: Any, student: dict, teacher: dict, selection: UnitSelection | None) -> str | None:
    """Markdown for a student built with fresh weights from a config, else None.

    Recorded by `hf-taskdistill train --student_config_overrides` as `{"config_from": <reference>,
    "config_overrides": {...}}`; inferred when the recorded student is the teacher itself but narrower (a model made
    with `AutoModelForCausalLM.from_config(teacher_config)` keeps the teacher's name, not its weights).
    """
    raw = raw if isinstance(raw, Mapping) else {}
    source = raw.get("config_from")
    if source is None and selection is not None and selection.student_hidden_size != selection.teacher_hidden_size:
        same = (student["model_id"] or student["local_name"]) and (
            (student["model_id"], student["local_name"]) == (teacher["model_id"], teacher["local_name"])
        )
        source = student if same else None
    if source is None:
        return None
    overrides = raw.get("config_overrides")
    text = f"random weights, built from the config of {reference_markdown(source)}"
    if isinstance(overrides, Mapping) and overrides:
        text += " with " + ", ".join(f"`{k}={v}`" for k, v in overrides.items())
    elif selection is not None:
        text += f", narrowed to hidden size {selection.student_hidden_size}"
    return text


def _data_is_hub(name: str | None) -> bool:
    return bool(name) and is_hub_id(name) and not name.lower().endswith(DATA_FILE_SUFFIXES)


def _data_context(data: Mapping[str, Any] | None, dataset_name: Any) -> tuple[str, list[str]]:
    """(Markdown of the training data, Hub dataset ids for the YAML)."""
    names = [dataset_name] if isinstance(dataset_name, (str, os.PathLike)) else list(dataset_name or [])
    data = dict(data or {})
    if data.get("name") and not names:
        names = [data["name"]]
    labels = [label for label in (data_label(n) for n in names) if label]
    hub = [label for label in labels if _data_is_hub(label)]
    links = [f"[{d}](https://huggingface.co/datasets/{d})" if d in hub else f"`{d}` (a local file)" for d in labels]
    if not links:
        return "not recorded", []
    details = []
    if isinstance(data.get("num_examples"), int):
        details.append(f"{data['num_examples']:,} training examples")
    if isinstance(data.get("max_length"), int):
        cut = [f"{data[k]:,} {what}" for k, what in (("truncated", "completions truncated"),
               ("dropped", "examples dropped")) if isinstance(data.get(k), int) and data[k]]  # fmt: skip
        details.append(f"fitted to {data['max_length']} tokens" + (f" ({', '.join(cut)})" if cut else ""))
    for key, text in (("task", "task"), ("template", "prompt template")):
        if data.get(key):
            details.append(f"{text} `{data[key]}`")
    return ", ".join(links) + (f": {', '.join(details)}" if details else ""), hub


# ----- method, losses, selection -----
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
    form = _SCORE_FORMS.get(method, f"`{method}`")
    return "task-selected-units", f"task-selected teacher units, scored by gradient relevance ({form})"


def _logit_loss(logit_loss: str | None, beta: float | None, lmbda: float | None) -> tuple[dict, str | None]:
    """(YAML metadata, prose) of the logit loss; prose None when it was not recorded."""
    if logit_loss == "jsd":
        meta = {"logit_loss": "generalized_jsd", "beta": beta, "lmbda": lmbda}
        text = "GKD generalized Jensen-Shannon divergence"
        if beta is not None and lmbda is not None:
            text += f" (beta={_fmt(beta)}, lmbda={_fmt(lmbda)}: {'on' if lmbda > 0 else 'off'}-policy)"
        return {k: v for k, v in meta.items() if v is not None}, text
    if logit_loss == "none":
        return {"logit_loss": "none"}, "none (cross-entropy on the gold completions, SFT host)"
    return {}, None


def _selection_context(selection: UnitSelection) -> dict[str, Any]:
    diag = selection.diagnostics or {}
    overlaps, shares = diag.get("split_half_overlap") or [], diag.get("selected_score_share") or []
    pairs = []
    for i, ls in enumerate(selection.layers):
        pairs.append({
            "student_layer": ls.student_layer,
            "teacher_layer": ls.teacher_layer,
            "k": ls.k if ls.indices is not None else "all",
            "overlap": _fmt(overlaps[i]) if i < len(overlaps) else "–",
            "share": _fmt(shares[i]) if i < len(shares) else "–",
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
        "num_samples": f"{selection.num_samples:,}",
        "num_tokens": f"{selection.num_tokens:,}",
        "seed": selection.seed,
        "pairs": pairs,
        "cost": ", ".join(cost),
    }


def _first(mapping: Mapping[str, Any], *keys: str) -> Any:
    return next((mapping[k] for k in keys if mapping.get(k) not in (None, [], {})), None)


def _width(value: Any) -> int | None:
    """A width from an int, a list of indices, or a list of per-layer index lists (all the same length)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(v, list) for v in value):
            widths = {len(v) for v in value}
            return widths.pop() if len(widths) == 1 else None
        return len(value)
    return None


def pruned_init_sentence(selection: UnitSelection | None) -> str | None:
    """One sentence on how a student cut out of its teacher (`selection.init`, `hf-taskdistill prune`) was cut."""
    init = dict(getattr(selection, "init", None) or {})
    if not init:
        return None
    criterion = _first(init, "criterion", "selection_method", "method") or selection.selection_method
    k = _width(_first(init, "k", "num_units", "hidden_size", "residual_indices", "indices"))
    mlp = _width(_first(init, "mlp_width", "intermediate_size", "mlp_indices"))
    layers = _first(init, "layers_kept", "kept_layers", "layers")
    teacher = as_reference(init["teacher"]) if isinstance(init.get("teacher"), Mapping) else selection.teacher
    parts = [f"criterion `{criterion}`"]
    if k is not None:
        parts.append(f"K = {k} of the teacher's {selection.teacher_hidden_size} residual units")
    if mlp is not None:
        parts.append(f"MLP width {mlp}")
    if isinstance(layers, list) and layers:
        parts.append(f"{len(layers)} teacher layers kept ({', '.join(str(x) for x in layers)})")
    elif isinstance(layers, int):
        parts.append(f"{layers} teacher layers kept")
    who = reference_markdown(teacher)
    source = f"the teacher {who}" if who != "not recorded" else "its teacher"
    return f"The student was cut out of {source} (`hf-taskdistill prune`): {', '.join(parts)}."


# ----- the card -----
def build_model_card(
    selection: UnitSelection | Mapping | None = None,
    *,
    model_name: str | None = None,
    repo_id: str | None = None,
    base_model: str | Mapping | None = None,
    teacher: Mapping | None = None,
    teacher_id: str | None = None,
    teacher_revision: str | None = None,
    dataset_name: str | list[str] | None = None,
    data: Mapping[str, Any] | None = None,
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
    selection_report: Mapping[str, Any] | None = None,
    report_plot_file: str | None = None,
    library_name: str = "transformers",
    trainer_name: str | None = None,
    citations: Iterable[str] = (),
    note: str | None = None,
) -> ModelCard:
    """Render the card of a distilled student.

    Everything not passed is read from the selection (as `config.json["task_distill"]` stores it): the teacher
    (`selection.teacher`), the student's starting checkpoint (`selection.student`), the training data
    (`selection.data`), the logit loss, beta, lmbda, the feature loss and the hyperparameters
    (`selection.training`, `selection.training["hyperparameters"]`), and how a pruned student was cut
    (`selection.init`).

    Args:
        selection: the stored selection (a `UnitSelection`, or a `config.json` / `task_distill` dict); None for a
            run without feature distillation.
        model_name / repo_id: the card title and the repo id used in code snippets.
        base_model: the student's initial checkpoint (a Hub id, a path or a reference dict); only a Hub id reaches
            the YAML `base_model` and gets a link; a local checkpoint is shown by its folder name, never a path.
        teacher: a `{"model_id", "revision", "local_name"}` reference; `teacher_id` / `teacher_revision` are the
            older spelling. Default: `selection.teacher`.
        dataset_name / data: the training data (Hub id or file name) and its description (`{"name",
            "num_examples", ...}`); only Hub ids reach the YAML `datasets`.
        logit_loss: `"jsd"` (GKD generalized JSD, with `beta` and `lmbda`), `"none"` (cross-entropy) or None
            (then `selection.training`).
        hyperparameters: training settings shown as a table (name -> value; None values are skipped).
        eval_results: see `normalize_eval_results` (ROUGE-L F-measure x 100); rendered as a table and as
            `model-index`.
        plot_file: file name of the unit-score PNG next to the card (linked relatively).
        no_plot_reason: shown instead of the plot when `plot_file` is None.
        selection_report / report_plot_file: the keep-k report of `hf-taskdistill select` (`selection_report.json`)
            and its plot, summarised in one sentence.
        citations: extra BibTeX entries; the Flex-KD paper and TRL are always cited.
        note: a sentence shown under the title (e.g. how the card was produced).
    """
    if isinstance(selection, Mapping):
        selection = load_unit_selection(dict(selection))
    training = dict(selection.training if selection is not None else {})
    if teacher is None:
        teacher = {"model_id": teacher_id, "revision": teacher_revision} if teacher_id else None
    teacher_ref = as_reference(teacher if teacher is not None else (selection.teacher if selection else None))
    if teacher_revision and teacher_ref["model_id"] and not teacher_ref["revision"]:
        teacher_ref["revision"] = teacher_revision
    student_raw = base_model if base_model is not None else (selection.student if selection else None)
    student_ref = as_reference(student_raw)
    student_text = reference_markdown(student_ref)
    fresh = _fresh_student_source(student_raw, student_ref, teacher_ref, selection)
    if fresh is not None:  # random weights from a config: no checkpoint to name as base_model
        student_ref = as_reference(None)
        student_text = fresh
    data = dict(data if data is not None else (selection.data if selection is not None else {}) or {})
    logit_loss = logit_loss or training.get("logit_loss")
    if logit_loss == "jsd":
        beta = beta if beta is not None else training.get("beta")
        lmbda = lmbda if lmbda is not None else training.get("lmbda")
    feature_loss_type = feature_loss_type or training.get("feature_loss_type")
    if feature_loss_weight is None:
        feature_loss_weight = training.get("feature_loss_weight")
    if hyperparameters is None:
        hyperparameters = training.get("hyperparameters")
    repo_id = repo_id or model_name or "path/to/this-model"
    model_name = model_name or repo_id.split("/")[-1]
    data_text, hub_datasets = _data_context(data, dataset_name)
    rows = normalize_eval_results(eval_results)
    method_key, method_text = _method(selection, feature_loss_weight, logit_loss)
    logit_meta, logit_text = _logit_loss(logit_loss, beta, lmbda)
    feature_active = method_key not in ("logit-only", "sft")

    distillation: dict[str, Any] = {"method": method_key}
    if teacher_ref["model_id"]:
        distillation["teacher"] = teacher_ref["model_id"]
        if teacher_ref["revision"]:
            distillation["teacher_revision"] = teacher_ref["revision"]
    elif teacher_ref["local_name"]:
        distillation["teacher_local_name"] = teacher_ref["local_name"]
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
    if selection is not None and selection.init:
        distillation["init"] = "pruned-from-teacher"

    card_data = ModelCardData(
        base_model=student_ref["model_id"],
        datasets=hub_datasets or None,
        library_name=library_name,
        license=license,
        model_name=model_name,
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys([*BASE_TAGS, *([tags] if isinstance(tags, str) else (tags or []))])),
        eval_results=eval_results_metadata(rows) or None,
        distillation=distillation,
    )
    teacher_text = reference_markdown(teacher_ref)
    recorded = teacher_text != "not recorded"
    context = {
        "card_data": card_data.to_yaml(),
        "model_name": model_name,
        "repo_id": repo_id,
        "student": student_text,
        "base_is_hub": bool(student_ref["model_id"]),
        "student_fresh": fresh is not None,
        "teacher": teacher_text,
        "teacher_prose": f"the teacher {teacher_text}" if recorded else "a teacher whose id was not recorded",
        "note": note,
        "datasets": data_text,
        "method": method_text,
        "logit_loss": logit_text or "not recorded",
        "feature_loss": feature_text,
        "objective": objective,
        "selection": _selection_context(selection) if feature_active else None,
        "pruned": pruned_init_sentence(selection),
        "plot_file": plot_file,
        "no_plot_reason": no_plot_reason,
        "report_sentence": selection_report_sentence(selection_report, selection.k if selection else None),
        "report_plot_file": report_plot_file,
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


def missing_card_fields(selection: UnitSelection | None) -> list[str]:
    """What a card built from `config.json` alone cannot state: the names of the facts the selection lacks."""
    if selection is None:
        return ["the unit selection", "the teacher", "the student", "the training data", "the logit loss",
                "the training hyperparameters"]  # fmt: skip
    training = selection.training or {}
    missing = []
    if not (as_reference(selection.teacher)["model_id"] or as_reference(selection.teacher)["local_name"]):
        missing.append("the teacher")
    student = selection.student or {}
    if not (student.get("config_from") or reference_text(as_reference(student))):
        missing.append("the student's starting checkpoint")
    if not (selection.data or {}).get("name"):
        missing.append("the training data")
    if training.get("logit_loss") not in ("jsd", "none"):
        missing.append("the logit loss")
    if not training.get("hyperparameters"):
        missing.append("the training hyperparameters")
    return missing


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

    teacher_model = getattr(trainer, "_fd_teacher", None)
    teacher = as_reference(selection.teacher) if selection is not None else None
    if not teacher or not (teacher["model_id"] or teacher["local_name"]):
        teacher = as_reference(args.teacher_model_name_or_path or teacher_model)
    student: Any = dict(selection.student) if selection is not None and selection.student else None
    if kwargs.get("finetuned_from"):
        student = as_reference(kwargs["finetuned_from"])
    elif not student or not (student.get("config_from") or reference_text(as_reference(student))):
        student = as_reference(model)
    host = getattr(trainer, "_host_loss_name", None)
    logit_loss = {"jsd_loss": "jsd", "ce_loss": "none"}.get(host)
    plot_file, reason = None, None
    if selection is not None and args.feature_loss_weight > 0:
        plot_file, reason = plot_into(selection, output_dir, output_dir)
    report, report_plot = load_selection_report(output_dir), os.path.join(output_dir, REPORT_PLOT_NAME)
    citations = list(kwargs.get("citations") or [])
    if logit_loss == "jsd":
        from trl.experimental.gkd import GKDTrainer

        citations.append(GKDTrainer._paper["citation"])
    hub_id = getattr(trainer, "hub_model_id", None) or args.hub_model_id
    card = build_model_card(
        selection,
        model_name=model_name or (hub_id.split("/")[-1] if hub_id else os.path.basename(os.path.normpath(output_dir))),
        repo_id=hub_id,
        base_model=student,
        teacher=teacher,
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
        selection_report=report,
        report_plot_file=REPORT_PLOT_NAME if report and os.path.isfile(report_plot) else None,
        library_name="peft" if is_peft else "transformers",
        trainer_name=getattr(trainer, "_name", None),
        citations=citations,
    )
    if kwargs.get("language"):
        card.data.language = kwargs["language"]
    card.save(os.path.join(output_dir, "README.md"))
    return card
