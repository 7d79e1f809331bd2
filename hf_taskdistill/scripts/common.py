"""Arguments and loading shared by the `train` and `select` commands (TRL-style: `TrlParser` + YAML recipes)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, TrlParser

from ..config import TaskFeatureDistillConfig
from ..data import fit_to_max_length  # public in hf_taskdistill.data; imported here for the CLI


logger = logging.getLogger(__name__)


@dataclass
class DistillScriptArguments(ScriptArguments):
    """Data and student arguments of `hf-taskdistill train` / `select` (on top of TRL's `ScriptArguments`).

    Data comes from `train_file` (a local JSONL in the Dolly or DialogSum shape) or, as in TRL scripts, from
    `dataset_name` (a Hub id or local dataset directory) and `dataset_train_split`.
    """

    task: str = field(
        default="instruction",
        metadata={"help": "instruction (instruction/input/output rows) or summarization (dialogue/summary rows).",
                  "choices": ["instruction", "summarization"]},
    )  # fmt: skip
    train_file: str | None = field(default=None, metadata={"help": "Local training JSONL file."})
    eval_file: str | None = field(default=None, metadata={"help": "Local evaluation JSONL file (eval loss)."})
    prompt_template: str = field(
        default="chat",
        metadata={"help": "chat: the tokenizer's chat template; alpaca: MiniLLM's Alpaca-style prompt.",
                  "choices": ["chat", "alpaca"]},
    )  # fmt: skip
    max_train_samples: int | None = field(default=None, metadata={"help": "Use a seeded subset of this size."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer (defaults to the student, then the teacher)."}
    )
    student_config_overrides: str | None = field(
        default=None,
        metadata={"help": "JSON dict. When set, the student is freshly initialised from the config of "
                  "model_name_or_path with these overrides (e.g. a narrower hidden_size), instead of its weights."},
    )  # fmt: skip

    def __post_init__(self):
        if isinstance(self.student_config_overrides, str):
            try:
                self.student_config_overrides = json.loads(self.student_config_overrides)
            except json.JSONDecodeError as e:
                raise ValueError(f"student_config_overrides must be a JSON dict: {e}") from e
        if self.student_config_overrides is not None and not isinstance(self.student_config_overrides, dict):
            raise ValueError("student_config_overrides must be a dict of config fields.")


def make_parser(prog: str) -> TrlParser:
    return TrlParser((DistillScriptArguments, TaskFeatureDistillConfig, ModelConfig), prog=prog)


def check_model_paths(model_args: ModelConfig, training_args: TaskFeatureDistillConfig) -> None:
    """Fail fast, naming the path, when the student or teacher is neither an existing local path nor a Hub id."""
    import os

    from ..provenance import is_hub_id

    for flag, name in (("--model_name_or_path", model_args.model_name_or_path),
                       ("--teacher_model_name_or_path", training_args.teacher_model_name_or_path)):  # fmt: skip
        if not isinstance(name, str) or os.path.exists(name):
            continue
        # `local/teacher` reads as a Hub id, but when a local folder `local/` exists it is meant as a path.
        parent = os.path.dirname(os.path.normpath(name))
        if not is_hub_id(name) or (parent and os.path.isdir(parent)):
            raise FileNotFoundError(f"{flag} {name!r}: no such local directory (and not a Hub repo id).")


def load_tokenizer(
    script_args: DistillScriptArguments, model_args: ModelConfig, training_args: TaskFeatureDistillConfig
):
    from transformers import AutoTokenizer

    from ..data import ensure_chat_template

    name = (
        script_args.tokenizer_name_or_path or model_args.model_name_or_path or training_args.teacher_model_name_or_path
    )
    tokenizer = AutoTokenizer.from_pretrained(
        name, revision=model_args.model_revision if name == model_args.model_name_or_path else None
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ensure_chat_template(tokenizer, script_args.prompt_template)
    return tokenizer


def load_student(
    script_args: DistillScriptArguments, model_args: ModelConfig, training_args: TaskFeatureDistillConfig
):
    """The student model: pretrained weights, or a fresh model from a (narrowed) config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_args.model_name_or_path is None:
        raise ValueError("Set the student with --model_name_or_path (a path or Hub id).")
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    if script_args.student_config_overrides:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
        for key, value in script_args.student_config_overrides.items():
            setattr(config, key, value)
        if hasattr(config, "head_dim") and "head_dim" not in script_args.student_config_overrides:
            config.head_dim = config.hidden_size // config.num_attention_heads
        torch.manual_seed(training_args.seed)
        model = AutoModelForCausalLM.from_config(config)
        return model.to(dtype) if isinstance(dtype, torch.dtype) else model
    return AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=training_args.trust_remote_code,
    )


def load_datasets(
    script_args: DistillScriptArguments,
    training_args: TaskFeatureDistillConfig,
    fmt: str,
    tokenizer=None,
    return_description: bool = False,
):
    """(train, eval) datasets in the trainer's format: `messages` (GKD host) or `prompt_completion` (SFT host).

    With a tokenizer, examples are fitted to `max_length` ([`hf_taskdistill.data.fit_to_max_length`]). With
    `return_description`, a third item: the training-data record for the model card
    ([`hf_taskdistill.data.describe_task_data`]: name, examples, truncation counts; never a local path).
    """
    from ..data import describe_task_data, load_task_dataset

    source = script_args.train_file or script_args.dataset_name
    if source is None:
        raise ValueError("Give the training data with --train_file (local JSONL) or --dataset_name.")
    common = dict(task=script_args.task, format=fmt, template=script_args.prompt_template, seed=training_args.seed)
    train = load_task_dataset(source, split=script_args.dataset_train_split, max_samples=script_args.max_train_samples,
                              **common)  # fmt: skip
    evaluation = None
    if script_args.eval_file and training_args.eval_strategy != "no":
        evaluation = load_task_dataset(script_args.eval_file, **common)
    counts = None
    if tokenizer is not None:
        train, counts = fit_to_max_length(train, tokenizer, training_args.max_length, return_counts=True)
        if evaluation is not None:
            evaluation = fit_to_max_length(evaluation, tokenizer, training_args.max_length, name="eval")
    if not return_description:
        return train, evaluation
    description = describe_task_data(source, train, counts, task=script_args.task,
                                     template=script_args.prompt_template, max_samples=script_args.max_train_samples)  # fmt: skip
    return train, evaluation, description
