"""The trainers' checks of their inputs, run before any model is loaded or any step is taken.

Each raises a clear, actionable error on bad input: a config of the wrong type, the wrong host for the asked logit
loss, a student or teacher path that does not exist, a vocabulary mismatch, a student wider than the teacher, a bad
layer index, a dataset without the columns the host reads. Configs are read with `AutoConfig` only (no weights), so
a wrong path costs seconds, not a model load.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from transformers import AutoConfig

from .config import TaskFeatureDistillConfig
from .provenance import is_hub_id


logger = logging.getLogger(__name__)

# per host: the column sets it accepts (any one of them), and what to do when none is there
DATASET_COLUMNS = {
    "gkd": (
        [("messages",)],
        "GKD-host",
        (
            "Dolly- or DialogSum-shaped JSONL: load it with hf_taskdistill.data.load_task_dataset(path, "
            "format='messages') (then fit_to_max_length); other prompt/completion data: map it to "
            "{'messages': [...prompt turns, assistant turn]}, or use FeatureDistillSFTTrainer."
        ),
    ),
    "sft": (
        [("prompt", "completion"), ("messages",), ("text",), ("input_ids",)],
        "SFT-host",
        (
            "Dolly- or DialogSum-shaped JSONL: load it with hf_taskdistill.data.load_task_dataset(path, "
            "format='prompt_completion') (then fit_to_max_length)."
        ),
    ),
}


def text_config(model_or_path: Any, init_kwargs: dict | None = None, who: str = "model"):
    """The text config of a model, a PEFT-wrapped model, a local directory or a Hub id (config only, no weights);
    a missing local path or an unreadable config raises, naming `who` and how the name was read."""
    if isinstance(model_or_path, (str, os.PathLike)):
        name = os.fspath(model_or_path)
        if not is_hub_id(name) and not os.path.exists(name):
            raise FileNotFoundError(
                f"The {who} {name!r} is not an existing local directory (and not a Hub repo id). Check the path."
            )
        kwargs = {k: v for k, v in (init_kwargs or {}).items() if k in ("revision", "trust_remote_code", "token")}
        try:
            return AutoConfig.from_pretrained(name, **kwargs).get_text_config()
        except OSError as e:
            offline = (
                " (HF_HUB_OFFLINE is set: only the local cache is read)" if os.environ.get("HF_HUB_OFFLINE") else ""
            )
            where = "local directory" if os.path.isdir(name) else f"Hub repo id{offline}"
            raise OSError(f"Could not load the {who} config from {name!r}, read as a {where}: {e}") from e
    model = model_or_path.get_base_model() if hasattr(model_or_path, "get_base_model") else model_or_path
    return model.config.get_text_config()


def check_dataset_columns(dataset, host: str) -> None:
    """Raise unless `dataset` has one of the column sets the `host` ("gkd" or "sft") reads. A `DatasetDict` is
    refused (pass one split); a dataset without column names (an iterable one, a list) is not checked."""
    needed, label, hint = DATASET_COLUMNS[host]
    columns = getattr(dataset, "column_names", None)
    if dataset is None or columns is None:
        return
    if isinstance(columns, dict):  # DatasetDict
        raise ValueError(f"Pass a single split (e.g. dataset['train']), not a DatasetDict with {list(columns)}.")
    if not any(all(c in columns for c in option) for option in needed):
        wanted = " or ".join("+".join(option) for option in needed)
        raise ValueError(f"The {label} trainer needs dataset column(s) {wanted}; the dataset has {columns}. {hint}")


def coerce_args(args: Any, model: Any, trainer_name: str) -> TaskFeatureDistillConfig:
    """`args=None` -> defaults (output_dir named after the model, as TRL does); a parent config (`TrainingArguments`,
    `SFTConfig`, `GKDConfig`) -> converted with every field kept, the feature fields defaulted."""
    if args is None:
        name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
        name = os.path.basename(os.path.normpath(name or "model")) or "model"
        return TaskFeatureDistillConfig(output_dir=f"{name}-distilled")
    if isinstance(args, TaskFeatureDistillConfig):
        return args
    try:
        converted = TaskFeatureDistillConfig.from_training_args(args)
    except TypeError as e:
        raise TypeError(
            f"{trainer_name} got args of type {type(args).__name__}. Pass a TaskFeatureDistillConfig, e.g. "
            "`args=TaskFeatureDistillConfig(output_dir=..., feature_loss_weight=1.0)`, or a TrainingArguments / "
            "SFTConfig / GKDConfig (converted: every field kept, the feature fields at their defaults)."
        ) from e
    logger.info("Converted %s to TaskFeatureDistillConfig (feature fields at their defaults).", type(args).__name__)
    return converted


def check_models(model, teacher_model, args: TaskFeatureDistillConfig, trainer_name: str, logit_loss: str) -> None:
    """Check the student and teacher against each other and the config, from their configs alone: the host's
    `logit_loss`, a teacher (or `teacher_cache`) given, one vocabulary, enough teacher units for the student, and
    layer indices inside both models (`args.resolve_layer_pairs`)."""
    if not isinstance(args, TaskFeatureDistillConfig):
        raise TypeError(f"args must be a TaskFeatureDistillConfig, got {type(args).__name__}.")
    if args.logit_loss is not None and args.logit_loss != logit_loss:
        other = "FeatureDistillSFTTrainer" if args.logit_loss == "none" else "FeatureDistillTrainer"
        raise ValueError(
            f"{trainer_name} trains with logit_loss={logit_loss!r}, but the config asks "
            f"for {args.logit_loss!r}: use {other} (the CLI picks it from logit_loss)."
        )
    student_cfg = text_config(model, getattr(args, "model_init_kwargs", None), "student")
    if args.teacher_cache:
        return  # no teacher: the cache's header is checked against the tokenizer and selection at set-up
    if teacher_model is None:
        raise ValueError(
            "A teacher is required: pass `teacher_model` (a model or a path / Hub id), or `teacher_cache`."
        )
    teacher_cfg = text_config(teacher_model, args.teacher_model_init_kwargs, "teacher")
    if student_cfg.vocab_size != teacher_cfg.vocab_size:
        raise ValueError(
            f"Vocabulary mismatch: the student has vocab_size {student_cfg.vocab_size}, the teacher "
            f"{teacher_cfg.vocab_size}. Logit KD and feature KD both need one shared tokenizer: build the student "
            "on the teacher's tokenizer (same vocab_size)."
        )
    d_s, d_t = student_cfg.hidden_size, teacher_cfg.hidden_size
    k = args.selection_num_units
    if args.feature_loss_weight > 0 and not args.feature_projector:
        if k is None and d_s > d_t:
            raise ValueError(
                f"The student (hidden size {d_s}) is wider than the teacher ({d_t}), so {d_s} teacher units "
                f"cannot be selected. Set `selection_num_units` <= {d_t} (only the first k student units are "
                "then matched), or use `feature_projector=True`."
            )
        if k is not None and k > min(d_s, d_t):
            raise ValueError(
                f"selection_num_units={k} exceeds min(student hidden size {d_s}, teacher hidden size {d_t})."
            )
    args.resolve_layer_pairs(student_cfg.num_hidden_layers, teacher_cfg.num_hidden_layers)  # bad index: error
