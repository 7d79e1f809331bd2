"""`hf-taskdistill prune --teacher_model_name_or_path T --train_file data.jsonl --hidden_size K --output_dir DIR`.

Cuts a narrower student out of the teacher at task-scored residual units (and optionally MLP neurons and layers),
see `hf_taskdistill.pruning`. Data arguments are those of `select` (a recipe via `--config`, or `--train_file` /
`--dataset_name`, `--selection_num_samples`, `--selection_seed`, `--max_length`, `--selection_batch_size`). Every
size is validated before the teacher's weights are loaded. The output is a `save_pretrained` directory whose
`config.json` carries `task_distill` (with the `init` block), so `train` reuses the indices without re-scoring.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ..pruning import NORM_RESCALES
from ..unit_scores import AGGREGATIONS, CRITERIA
from .common import DistillScriptArguments, load_datasets, load_tokenizer


@dataclass
class PruneArguments:
    """The student's sizes and how the units are ranked (`hf-taskdistill prune`)."""

    hidden_size: int | None = field(default=None, metadata={"help": "K, the student's hidden size (required)."})
    intermediate_size: int | None = field(
        default=None, metadata={"help": "M, the student's MLP width (default: the teacher's, no MLP cut)."}
    )
    num_layers: int | None = field(
        default=None,
        metadata={"help": "N, the student's layer count (default: all). Keeps the N layers of largest block "
                  "importance 1 - cos(input, output), in order."},
    )  # fmt: skip
    criterion: str | None = field(
        default=None,
        metadata={"help": "Residual / MLP unit score (default: the library's best after recovery).",
                  "choices": list(CRITERIA)},
    )  # fmt: skip
    mlp_criterion: str | None = field(
        default=None,
        metadata={"help": "MLP neuron score, when it should differ from --criterion (default: the same); e.g. a "
                  "task-scored stream with `activation` MLP neurons.",
                  "choices": list(CRITERIA)},
    )  # fmt: skip
    aggregation: str | None = field(
        default=None,
        metadata={"help": "How the per-norm scores are combined over the residual stream.",
                  "choices": list(AGGREGATIONS)},
    )  # fmt: skip
    norm_rescale: str | None = field(
        default=None,
        metadata={"help": "rms: rescale each norm weight for the smaller RMS of the kept units; lsq: the factor that "
                  "brings the readers' outputs closest to the teacher's (one more pass); none: raw cut.",
                  "choices": list(NORM_RESCALES)},
    )  # fmt: skip
    keep_outliers: int = field(default=0, metadata={"help": "Always keep this many units of largest mean square."})


def make_prune_parser():
    from trl import ModelConfig, TrlParser

    from ..config import TaskFeatureDistillConfig

    return TrlParser((DistillScriptArguments, PruneArguments, TaskFeatureDistillConfig, ModelConfig),
                     prog="hf-taskdistill prune")  # fmt: skip


def run(script_args, prune_args, training_args, model_args):
    """Validate, score, cut and save; returns the `PruneResult`."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl.experimental.utils import DataCollatorForChatML

    from .. import pruning
    from ..provenance import model_reference

    teacher_id = training_args.teacher_model_name_or_path
    if teacher_id is None:
        raise ValueError("Set the teacher with --teacher_model_name_or_path (a path or Hub id).")
    if prune_args.hidden_size is None:
        raise ValueError("Set the student's width with --hidden_size K.")
    if prune_args.mlp_criterion is not None and prune_args.intermediate_size is None:
        raise ValueError("--mlp_criterion scores the MLP neurons of an MLP cut: give --intermediate_size M too.")
    options = dict(
        criterion=prune_args.criterion or pruning.DEFAULT_CRITERION,
        aggregation=prune_args.aggregation,  # None: the criterion's default
        norm_rescale=prune_args.norm_rescale or pruning.DEFAULT_NORM_RESCALE,
    )
    # Every size and choice is checked on the config alone, before any weight or data is loaded.
    pruning.check_prune_request(AutoConfig.from_pretrained(teacher_id), prune_args.hidden_size,
                                prune_args.intermediate_size, prune_args.num_layers, **options)  # fmt: skip
    tokenizer = load_tokenizer(script_args, model_args, training_args)
    train, _ = load_datasets(script_args, training_args, "messages", tokenizer=tokenizer)
    n = min(training_args.selection_num_samples, len(train))
    if n < 1:
        raise ValueError("The scoring set is empty: give data and --selection_num_samples >= 1.")
    subset = train.shuffle(seed=training_args.selection_seed).select(range(n))
    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=training_args.max_length)
    batch_size = training_args.selection_batch_size or training_args.per_device_train_batch_size
    batches = list(DataLoader(subset, batch_size=batch_size, collate_fn=collator))
    init_kwargs = dict(training_args.teacher_model_init_kwargs or {})
    if init_kwargs.get("dtype") not in (None, "auto"):
        init_kwargs["dtype"] = getattr(torch, init_kwargs["dtype"])
    teacher = AutoModelForCausalLM.from_pretrained(teacher_id, **init_kwargs).to(training_args.device)
    reference = model_reference(teacher_id, getattr(teacher.config, "_commit_hash", None))
    result = pruning.prune_teacher(
        teacher, batches, prune_args.hidden_size, prune_args.intermediate_size, prune_args.num_layers,
        seed=training_args.selection_seed, keep_outliers=prune_args.keep_outliers, teacher_reference=reference,
        mlp_criterion=prune_args.mlp_criterion, **options,
    )  # fmt: skip
    teacher_params = sum(p.numel() for p in teacher.parameters())
    if training_args.should_save:
        pruning.save_pruned(result, training_args.output_dir, tokenizer=tokenizer)
    init = result.init
    mlp = f" (MLP {init['mlp_criterion']})" if init.get("mlp_criterion") not in (None, init["criterion"]) else ""
    print(
        f"Pruned student: hidden {init['hidden_size']}, intermediate {init['intermediate_size']}, "
        f"{init['num_layers']} layers, {result.num_parameters} parameters (teacher {teacher_params}); "
        f"criterion {init['criterion']}{mlp}, aggregation {init['aggregation']}, norm_rescale {init['norm_rescale']}, "
        f"{init['num_samples']} scoring examples; written to {training_args.output_dir}"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = make_prune_parser()
    script_args, prune_args, training_args, model_args = parser.parse_args_and_config(
        args=argv if argv is not None else sys.argv[1:]
    )
    run(script_args, prune_args, training_args, model_args)
    return 0
