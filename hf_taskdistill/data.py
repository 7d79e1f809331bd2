"""Task data: strict JSONL reading, MiniLLM's Alpaca prompt template, TRL dataset formats and the eval sets.

Instruction data has the Dolly / MiniLLM shape (`instruction`, `input`, `output`); summarization data has the
DialogSum shape (`dialogue`, `summary`; the test split has `summary1..3`). Two prompt templates:

- `"alpaca"`: MiniLLM's template, byte for byte (it reproduces the `prompt` field of its eval files). With
  conversational data the tokenizer needs [`PASSTHROUGH_CHAT_TEMPLATE`] (see [`ensure_chat_template`]) so that the
  messages render to exactly that text.
- `"chat"`: the user turn holds the instruction (and the input after a blank line); the tokenizer's own chat
  template does the rest.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)

TASKS = ("instruction", "summarization")
FORMATS = ("messages", "prompt_completion")
TEMPLATES = ("chat", "alpaca")

# MiniLLM's prompt (minillm/data_utils/prompt_datasets.py); every `prompt` field of ../shared/data matches it.
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
SUMMARIZATION_INSTRUCTION = "Summarize the following dialogue."

# Renders messages as the bare concatenation of their contents, the assistant turn followed by eos, so that
# `apply_chat_template(prompt, add_generation_prompt=True)` is exactly the raw (Alpaca) prompt text.
PASSTHROUGH_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)

# Eval set name -> file under the data dir. `unni_slice` is a slice of Unnatural Instructions, never "UnNI".
EVAL_SETS = {
    "dolly": "dolly/test.jsonl",
    "self_inst": "self_inst/test.jsonl",
    "vicuna": "vicuna/test.jsonl",
    "sinst": "sinst/test.jsonl",
    "unni_slice": "uinst_slice/test.jsonl",
    "dialogsum": "dialogsum/test.jsonl",
}
INSTRUCTION_EVAL_SETS = ("dolly", "self_inst", "vicuna", "sinst", "unni_slice")
SUMMARIZATION_EVAL_SETS = ("dialogsum",)
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow", ".tsv")  # local files, not Hub ids

# A field spec is `str`, `list` (a non-empty list of strings) or a tuple of those (any of them).
_TRAIN_FIELDS = {
    "instruction": ({"instruction": str, "output": str}, {"input": str}),
    "summarization": ({"dialogue": str, "summary": str}, {}),
}
# Column names of the upstream Hub copies (databricks/databricks-dolly-15k) mapped to the MiniLLM names.
_HUB_ALIASES = {"context": "input", "response": "output"}


def _describe(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _type_error(name: str, value: Any, spec: Any) -> str | None:
    """None when `value` matches `spec`, else what is wrong with it."""
    specs = spec if isinstance(spec, tuple) else (spec,)
    for s in specs:
        if s is str and isinstance(value, str):
            return None
        if s is list and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return None
    wanted = " or ".join("a string" if s is str else "a non-empty list of strings" for s in specs)
    if isinstance(value, list) and list in specs:
        bad = [i for i, v in enumerate(value) if not isinstance(v, str)]
        got = f"item {bad[0]} is {_describe(value[bad[0]])}" if bad else "an empty list"
    else:
        got = _describe(value)
    return f"field {name!r} must be {wanted}, got {got}"


def _validate(row: Any, required: Mapping[str, Any], optional: Mapping[str, Any], where: str) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {_describe(row)}.")
    for name, spec in required.items():
        if name not in row:
            raise ValueError(f"{where}: missing field {name!r} (required: {', '.join(required)}).")
        if (error := _type_error(name, row[name], spec)) is not None:
            raise ValueError(f"{where}: {error}.")
    for name, spec in optional.items():
        if row.get(name) is not None and (error := _type_error(name, row[name], spec)) is not None:
            raise ValueError(f"{where}: {error}.")
    return row


def _as_specs(fields: Mapping[str, Any] | Sequence[str] | None) -> dict[str, Any]:
    if fields is None:
        return {}
    if isinstance(fields, Mapping):
        return dict(fields)
    return dict.fromkeys(fields, str)


def _iter_jsonl(path: str | os.PathLike, required: Mapping, optional: Mapping) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno}).") from None
            yield lineno, _validate(row, required, optional, where)


def read_jsonl(
    path: str | os.PathLike,
    required_fields: Mapping[str, Any] | Sequence[str] = (),
    optional_fields: Mapping[str, Any] | Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Read a JSONL file (one object per line; blank lines skipped), checking the fields of every record.

    Args:
        path: the `.jsonl` file.
        required_fields: field names (each must be a string) or a mapping `name -> spec`, where a spec is `str`,
            `list` (a non-empty list of strings) or a tuple of those, e.g. `{"output": (str, list)}`.
        optional_fields: the same, for fields that may be absent (or null); checked when present.

    Raises:
        ValueError: naming the file, the 1-based line number and the problem (invalid JSON, a line that is not an
            object, a missing field, a field of the wrong type).
    """
    return [row for _, row in _iter_jsonl(path, _as_specs(required_fields), _as_specs(optional_fields))]


def build_prompt(instruction: str, input: str = "", template: str = "alpaca") -> str:
    """The prompt text for `"alpaca"` (MiniLLM's template), or the user-turn content for `"chat"`."""
    if template == "alpaca":
        return (PROMPT_WITH_INPUT if input else PROMPT_NO_INPUT).format(instruction=instruction, input=input)
    if template == "chat":
        return f"{instruction}\n\n{input}" if input else instruction
    raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}.")


def _instruction_and_input(row: Mapping[str, Any], task: str) -> tuple[str, str]:
    if task == "summarization":
        return SUMMARIZATION_INSTRUCTION, row["dialogue"]
    return row["instruction"], row.get("input") or ""


def subsample(items: Sequence, max_samples: float | None, seed: int = 0) -> list:
    """A seeded subset in the original order: an int is a count, a float in (0, 1] a fraction.

    For one seed, a smaller subset is contained in a larger one (e.g. 5% of Dolly inside 10%).
    """
    items = list(items)
    if max_samples is None:
        return items
    if isinstance(max_samples, bool) or not isinstance(max_samples, (int, float)):
        raise TypeError(f"max_samples must be an int, a float in (0, 1] or None, got {max_samples!r}.")
    if isinstance(max_samples, float):
        if not 0 < max_samples <= 1:
            raise ValueError(f"A fractional max_samples must be in (0, 1], got {max_samples}.")
        k = max(1, round(max_samples * len(items)))
    elif max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}.")
    else:
        k = max_samples
    if k >= len(items):
        return items
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:k])]


def _load_rows(source: str | os.PathLike, task: str, split: str) -> list[dict[str, Any]]:
    required, optional = _TRAIN_FIELDS[task]
    path = Path(source)
    if path.is_dir():
        path = path / f"{split}.jsonl"
    if path.is_file():
        return read_jsonl(path, required, optional)
    if str(source).endswith((".json", ".jsonl")):
        raise FileNotFoundError(f"No such data file: {source}")
    from datasets import load_dataset

    dataset = load_dataset(str(source), split=split)
    renames = {old: new for old, new in _HUB_ALIASES.items() if old in dataset.column_names}
    renames = {old: new for old, new in renames.items() if new not in dataset.column_names}
    if renames:
        dataset = dataset.rename_columns(renames)
    return [_validate(row, required, optional, f"{source} [{split}], row {i}") for i, row in enumerate(dataset)]


def load_task_dataset(
    source: str | os.PathLike,
    task: str = "instruction",
    format: str = "messages",
    template: str = "chat",
    max_samples: float | None = None,
    seed: int = 0,
    split: str = "train",
):
    """Load task data as a [`~datasets.Dataset`] in a format the TRL trainers take.

    Args:
        source: a `.jsonl` file, a folder holding `{split}.jsonl`, or a Hub dataset id (read with
            `datasets.load_dataset(source, split=split)`; Dolly's `context`/`response` columns are renamed).
        task: `"instruction"` (`instruction`, `input`, `output`) or `"summarization"` (`dialogue`, `summary`).
        format: `"messages"` (`{"messages": [user, assistant]}`, for the GKD host) or `"prompt_completion"`.
        template: `"chat"` (conversational prompt/completion lists, the tokenizer's chat template formats them) or
            `"alpaca"` (MiniLLM's prompt; `prompt_completion` then gives plain strings, and `messages` need
            [`ensure_chat_template`] on the tokenizer).
        max_samples: keep a seeded subset (see [`subsample`]): a count, a fraction in (0, 1], or None for all.
        seed: seed of that subset.
        split: the split read from a folder or the Hub.

    The dataset's `info.dataset_name` is [`data_label`] of `source` (e.g. `dolly/train.jsonl`, never a path).
    """
    from datasets import Dataset, DatasetInfo

    for name, value, choices in (
        ("task", task, TASKS),
        ("format", format, FORMATS),
        ("template", template, TEMPLATES),
    ):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}.")
    rows = subsample(_load_rows(source, task, split), max_samples, seed)
    if not rows:
        raise ValueError(f"{source}: no records.")
    completion_field = "summary" if task == "summarization" else "output"
    records = []
    for row in rows:
        prompt = build_prompt(*_instruction_and_input(row, task), template=template)
        user = {"role": "user", "content": prompt}
        assistant = {"role": "assistant", "content": row[completion_field]}
        if format == "messages":
            records.append({"messages": [user, assistant]})
        elif template == "chat":
            records.append({"prompt": [user], "completion": [assistant]})
        else:
            records.append({"prompt": prompt, "completion": row[completion_field]})
    # `info.dataset_name` carries a publishable name of the source (never a path) to the trainer's data record.
    info = DatasetInfo(
        dataset_name=data_label(source), description=f"hf_taskdistill {task} data ({format}, {template})"
    )
    return Dataset.from_list(records, info=info)


def to_messages(example: Mapping[str, Any]) -> dict[str, list[dict[str, str]]]:
    """Map a prompt/completion example (conversational or plain strings) to `{"messages": [...]}` for GKD.

    Use with `dataset.map(to_messages, remove_columns=dataset.column_names)`: TRL's GKD collator reads a leftover
    `prompt` column as the already formatted prompt text.
    """
    prompt, completion = example["prompt"], example["completion"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    return {"messages": list(prompt) + list(completion)}


@dataclass(frozen=True)
class FitCounts:
    """What [`fit_to_max_length`] did: examples in, completions truncated, examples dropped, examples left."""

    total: int
    truncated: int
    dropped: int
    kept: int
    max_length: int | None

    def __str__(self) -> str:
        return (
            f"{self.truncated} of {self.total} completions truncated and {self.dropped} examples dropped to fit "
            f"max_length={self.max_length}; {self.kept} examples left"
        )


# Room left in the window for the end-of-turn / eos tokens the chat template appends after the completion.
_END_TOKENS = 4


def fit_to_max_length(dataset, tokenizer, max_length: int | None, name: str = "train", return_counts: bool = False):
    """Fit every example into a `max_length`-token window, like MiniLLM's preprocessing.

    An example that fits is kept as is. One that does not is **dropped** when its prompt takes more than half of the
    window, else its completion is **truncated** (its first tokens kept) so prompt + completion + end tokens fit.
    TRL's GKD collator would otherwise keep the *last* `max_length` tokens (the start of the prompt goes first) and
    raise "no prompt tokens left after truncation" when a completion alone fills the window; SFT would silently
    cut the end. Both hosts get the same examples. Use it with the `max_length` of the trainer's config:

        train = load_task_dataset("dolly/train.jsonl")
        train, counts = fit_to_max_length(train, tokenizer, args.max_length, return_counts=True)

    Args:
        dataset: a `datasets.Dataset` with a `messages` column or `prompt` + `completion` columns (conversational
            or plain strings), as [`load_task_dataset`] returns.
        tokenizer: the tokenizer the trainer uses (its chat template renders conversational prompts).
        max_length: the window in tokens; None returns the dataset unchanged.
        name: the split name used in the log line.
        return_counts: also return a [`FitCounts`] (total, truncated, dropped, kept).

    Returns:
        The fitted dataset, or `(dataset, FitCounts)` with `return_counts=True`. The counts are always logged: at
        INFO level when nothing changed, as a warning when examples were truncated or dropped.
    """
    if max_length is None:
        counts = FitCounts(len(dataset), 0, 0, len(dataset), None)
        return (dataset, counts) if return_counts else dataset
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= _END_TOKENS:
        raise ValueError(f"max_length must be an integer > {_END_TOKENS}, got {max_length!r}.")
    columns = dataset.column_names
    if "messages" in columns:
        prompt_key = "messages"
    elif "prompt" in columns and "completion" in columns:
        prompt_key = "prompt"
    else:
        raise ValueError(
            f"fit_to_max_length needs a `messages` column or `prompt` + `completion` columns; the dataset has "
            f"{columns}. Load task data with hf_taskdistill.data.load_task_dataset."
        )

    def fit(example):
        if prompt_key == "messages":
            prompt, completion = example["messages"][:-1], example["messages"][-1]["content"]
        else:
            prompt, completion = example["prompt"], example["completion"]
            completion = completion if isinstance(completion, str) else completion[-1]["content"]
        if not isinstance(prompt, str):
            prompt = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        budget = max_length - n_prompt - _END_TOKENS
        cut = len(ids) > budget
        keep = not cut or n_prompt <= max_length // 2  # an example that fits is always kept
        cut = cut and keep
        if cut:
            completion = tokenizer.decode(ids[:budget])
            if prompt_key == "messages":
                example["messages"][-1]["content"] = completion
            elif isinstance(example["completion"], str):
                example["completion"] = completion
            else:
                example["completion"][-1]["content"] = completion
        return {**example, "_keep": keep, "_cut": cut}

    total = len(dataset)
    dataset = dataset.map(fit, desc=f"fit {name} to max_length={max_length}")
    n_cut, n_keep = sum(dataset["_cut"]), sum(dataset["_keep"])
    dataset = dataset.filter(lambda e: e["_keep"]).remove_columns(["_keep", "_cut"])
    counts = FitCounts(total=total, truncated=n_cut, dropped=total - n_keep, kept=len(dataset), max_length=max_length)
    if counts.truncated or counts.dropped:
        why = " (dropped: the prompt alone takes over half of the window)" if counts.dropped else ""
        logger.warning("%s: %s%s. Raise max_length to keep more.", name, counts, why)
    else:
        logger.info("%s: all %d examples fit max_length=%d.", name, total, max_length)
    if not len(dataset):
        raise ValueError(f"{name}: no example fits max_length={max_length} (every prompt takes over half of it).")
    return (dataset, counts) if return_counts else dataset


def data_label(source: str | os.PathLike | None) -> str | None:
    """A name for training data that is safe to publish: a Hub dataset id as is; a local file by its name, with its
    folder when the file is named after a split (`../shared/data/dolly/train.jsonl` -> `dolly/train.jsonl`); never a
    path."""
    if not source:
        return None
    from .provenance import is_hub_id

    name = os.fspath(source)
    if is_hub_id(name) and not name.lower().endswith(DATA_FILE_SUFFIXES):
        return name
    path = os.path.normpath(name)
    base, parent = os.path.basename(path), os.path.basename(os.path.dirname(path))
    if parent and (base.split(".")[0].lower() in ("train", "dev", "validation", "valid", "test") or "." not in base):
        return f"{parent}/{base}"
    return base or "local-data"


def describe_task_data(
    source: str | os.PathLike | None,
    dataset=None,
    counts: FitCounts | None = None,
    **details: Any,
) -> dict[str, Any]:
    """The training-data record a model card shows (`UnitSelection.data`): `{"name", "num_examples", ...}`.

    `name` is [`data_label`] of `source` (never a local path); `num_examples` the length of `dataset`; with
    `counts` (from [`fit_to_max_length`]) also `max_length`, `truncated` and `dropped`; `details` (e.g. `task`,
    `template`, `max_samples`) are added when not None.
    """
    record: dict[str, Any] = {"name": data_label(source)}
    if dataset is not None and hasattr(dataset, "__len__"):
        record["num_examples"] = len(dataset)
    if counts is not None and counts.max_length is not None:
        record.update(max_length=counts.max_length, truncated=counts.truncated, dropped=counts.dropped)
    record.update({k: v for k, v in details.items() if v is not None})
    return record


def ensure_chat_template(tokenizer, template: str = "chat"):
    """Install [`PASSTHROUGH_CHAT_TEMPLATE`] for `template="alpaca"`, or when the tokenizer has no chat template.

    Returns the (modified in place) tokenizer.
    """
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}.")
    if template == "alpaca":
        if tokenizer.chat_template not in (None, PASSTHROUGH_CHAT_TEMPLATE):
            logger.info("template='alpaca': replacing the tokenizer's chat template with the passthrough one.")
        tokenizer.chat_template = PASSTHROUGH_CHAT_TEMPLATE
    elif tokenizer.chat_template is None:
        logger.warning(
            "The tokenizer has no chat template: using a passthrough template, so the model sees the bare "
            "instruction. Use template='alpaca' to train and evaluate with MiniLLM's prompt instead."
        )
        tokenizer.chat_template = PASSTHROUGH_CHAT_TEMPLATE
    return tokenizer


def _summary_references(row: Mapping[str, Any], where: str) -> list[str]:
    numbered = sorted((int(m.group(1)), k) for k in row if (m := re.fullmatch(r"summary(\d+)", k)))
    keys = [k for _, k in numbered] or (["summary"] if "summary" in row else [])
    if not keys:
        raise ValueError(f"{where}: missing field 'summary' (or 'summary1', 'summary2', ...).")
    for key in keys:
        if (error := _type_error(key, row[key], str)) is not None:
            raise ValueError(f"{where}: {error}.")
    return [row[k] for k in keys]


def load_eval_set(name: str, data_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One test set of the evaluation protocol, read from `data_dir` (laid out like `../shared/data`).

    Names: `dolly`, `self_inst`, `vicuna`, `sinst`, `unni_slice` (the `uinst_slice/` file: a slice of Unnatural
    Instructions with 1-2-word outputs, never to be reported as UnNI) and `dialogsum`.

    Returns:
        One dict per example: `instruction`, `input` (`""` when absent), `prompt` (the record's own MiniLLM prompt
        when present, else built with the Alpaca template) and `references` (a list: S-NI items can have several,
        DialogSum test items have three).
    """
    if name not in EVAL_SETS:
        hint = " (the available slice is called 'unni_slice')" if "unni" in name.lower() else ""
        raise ValueError(f"Unknown eval set {name!r}{hint}; choose from {sorted(EVAL_SETS)}.")
    path = Path(data_dir) / EVAL_SETS[name]
    if not path.is_file():
        raise FileNotFoundError(f"Eval set {name!r} expects {path}, which does not exist.")
    examples = []
    if name in SUMMARIZATION_EVAL_SETS:
        for lineno, row in _iter_jsonl(path, {"dialogue": str}, {}):
            instruction, input_ = _instruction_and_input(row, "summarization")
            references = _summary_references(row, f"{path}, line {lineno}")
            prompt = build_prompt(instruction, input_, "alpaca")
            examples.append({"instruction": instruction, "input": input_, "prompt": prompt, "references": references})
        return examples
    required = {"instruction": str, "output": (str, list)}
    for _, row in _iter_jsonl(path, required, {"input": str, "prompt": str}):
        instruction, input_ = _instruction_and_input(row, "instruction")
        output = row["output"]
        examples.append(
            {
                "instruction": instruction,
                "input": input_,
                "prompt": row.get("prompt") or build_prompt(instruction, input_, "alpaca"),
                "references": [output] if isinstance(output, str) else list(output),
            }
        )
    return examples
