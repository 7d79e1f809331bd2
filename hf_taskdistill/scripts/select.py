"""`hf-taskdistill select --config recipe.yaml [--output_dir DIR] [--report]`: score teacher units only.

Runs the same scoring pass as training (same data, collator, layers and k) and writes `task_distill.json` (and the
raw scores) into `--output_dir`. A later `train` reuses it with `--selection_path DIR/task_distill.json`, skipping
the scoring. Under `torch.distributed` every rank scores its share and all ranks get identical indices.

With `--report`, examples outside the scoring subset are held out and the keep-k curve of the scored teacher layer
is measured on them (`hf_taskdistill.report`): `selection_report.json` and `selection_report.png` are written next
to `task_distill.json`, and its one-sentence summary is printed. `--report_prune_hidden_size K` adds the held-out NLL
of the teacher cut to K units before training, and `--recovery_steps N` (alias of `--report_recovery_steps`) its NLL
after N steps of the recipe's own distillation from the cut (same host, losses and optimiser settings as `train`; the
student keeps its cut's units, nothing is saved).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from .common import DistillScriptArguments, load_datasets, load_tokenizer


@dataclass
class SelectReportArguments:
    """Options of the selection report (`hf-taskdistill select --report`)."""

    report: bool = field(
        default=False,
        metadata={"help": "Also measure the keep-k curve on held-out examples and write selection_report.json/.png."},
    )
    report_num_samples: int = field(
        default=128, metadata={"help": "Held-out examples for the report (training rows outside the scoring subset)."}
    )
    report_k_grid: list[int] | None = field(
        default=None, metadata={"help": "Widths of the curve (default: 7 fractions of d_T from 1/16 to 1, plus k)."}
    )
    report_prune_hidden_size: int | None = field(
        default=None,
        metadata={"help": "Also report the NLL of the teacher cut to this width (hf_taskdistill.pruning), untrained."},
    )
    report_prune_criterion: str | None = field(
        default=None,
        metadata={"help": "Criterion of that cut: grad, grad_x_act, fisher, activation or random (default: the "
                  "default of `hf-taskdistill prune`)."},
    )  # fmt: skip
    report_recovery_steps: int | None = field(
        default=None,
        metadata={"aliases": ["--recovery_steps"],
                  "help": "Also report the cut student's NLL after this many steps of the recipe's distillation (on "
                  "training rows outside the held-out examples). Needs --report_prune_hidden_size."},
    )  # fmt: skip

    def __post_init__(self):
        if self.report_num_samples < 1:
            raise ValueError(f"report_num_samples must be >= 1, got {self.report_num_samples}.")
        if self.report_prune_hidden_size is not None and self.report_prune_hidden_size < 1:
            raise ValueError(f"report_prune_hidden_size must be >= 1, got {self.report_prune_hidden_size}.")
        if self.report_recovery_steps is not None and self.report_recovery_steps < 1:
            raise ValueError(f"report_recovery_steps must be >= 1, got {self.report_recovery_steps}.")


def make_select_parser():
    from trl import ModelConfig, TrlParser

    from ..config import TaskFeatureDistillConfig

    return TrlParser(
        (DistillScriptArguments, TaskFeatureDistillConfig, ModelConfig, SelectReportArguments),
        prog="hf-taskdistill select",
    )


def _check_report_args(report_args: SelectReportArguments, teacher_config, k: int) -> None:
    """Errors a user can fix, raised before any scoring."""
    d_t = teacher_config.get_text_config().hidden_size
    for width in report_args.report_k_grid or []:
        if not 1 <= width <= d_t:
            raise ValueError(f"--report_k_grid values must lie in 1..{d_t} (the teacher's hidden size), got {width}.")
    if report_args.report_prune_hidden_size is None:
        if report_args.report_recovery_steps is not None:
            raise ValueError(
                "--recovery_steps trains the pruned student: give its width with --report_prune_hidden_size K."
            )
        return
    if not report_args.report:
        raise ValueError("--report_prune_hidden_size is part of the report: add --report.")
    try:
        from ..pruning import DEFAULT_CRITERION, check_prune_request
    except ImportError as e:
        raise ValueError(
            f"--report_prune_hidden_size needs hf_taskdistill.pruning, which this install lacks ({e}). Drop the "
            "flag, or update hf_taskdistill."
        ) from None
    report_args.report_prune_criterion = report_args.report_prune_criterion or DEFAULT_CRITERION
    # architecture, width (valid for the config, <= d_T) and criterion
    check_prune_request(
        teacher_config, report_args.report_prune_hidden_size, criterion=report_args.report_prune_criterion
    )


def run(script_args, training_args, model_args, report_args: SelectReportArguments | None = None):
    """Score and save; returns the `UnitSelection`."""
    import torch
    from datasets import concatenate_datasets
    from torch.utils.data import DataLoader
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl.experimental.utils import DataCollatorForChatML

    from ..hooks import resolve_layer_index
    from ..provenance import model_reference
    from ..scoring import select_task_units

    report_args = report_args or SelectReportArguments()
    teacher_id = training_args.teacher_model_name_or_path
    if teacher_id is None:
        raise ValueError("Set the teacher with --teacher_model_name_or_path (a path or Hub id).")
    if model_args.model_name_or_path is None and training_args.selection_num_units is None:
        raise ValueError("Give the student (--model_name_or_path) or k (--selection_num_units).")
    tokenizer = load_tokenizer(script_args, model_args, training_args)
    init_kwargs = dict(training_args.teacher_model_init_kwargs or {})
    if init_kwargs.get("dtype") not in (None, "auto"):
        init_kwargs["dtype"] = getattr(torch, init_kwargs["dtype"])
    teacher = AutoModelForCausalLM.from_pretrained(teacher_id, **init_kwargs)
    device = training_args.device
    teacher.to(device)
    t_cfg = teacher.config.get_text_config()
    if model_args.model_name_or_path is not None:
        s_cfg = AutoConfig.from_pretrained(model_args.model_name_or_path).get_text_config()
        for key, value in (script_args.student_config_overrides or {}).items():
            setattr(s_cfg, key, value)
        d_s, n_s = s_cfg.hidden_size, s_cfg.num_hidden_layers
    else:
        d_s, n_s = training_args.selection_num_units, None
    k = training_args.selection_num_units or d_s
    _check_report_args(report_args, teacher.config, k)
    pairs = []
    for s, t in training_args.layer_pairs:
        if n_s is None and s < 0:
            raise ValueError("Negative student layer indices need the student config (--model_name_or_path).")
        pairs.append((s if n_s is None else resolve_layer_index(s, n_s, "student"),
                      resolve_layer_index(t, t_cfg.num_hidden_layers, "teacher")))  # fmt: skip
    train, _ = load_datasets(script_args, training_args, "messages", tokenizer=tokenizer)
    n = min(training_args.selection_num_samples, len(train))
    shuffled = train.shuffle(seed=training_args.selection_seed)
    subset = shuffled.select(range(n))
    if report_args.report and len(train) <= n:
        raise ValueError(
            f"--report needs held-out examples, but all {len(train)} training examples are in the scoring subset "
            f"(selection_num_samples={training_args.selection_num_samples}). Lower --selection_num_samples or give "
            "more data."
        )
    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=training_args.max_length)
    batch_size = training_args.selection_batch_size or training_args.per_device_train_batch_size
    batches = list(DataLoader(subset, batch_size=batch_size, collate_fn=collator))
    selection = select_task_units(
        teacher, batches, num_units=k, layer_pairs=pairs, method=training_args.selection_method,
        order=training_args.selection_order, seed=training_args.selection_seed, student_hidden_size=d_s,
        teacher_id=teacher_id, teacher_revision=getattr(teacher.config, "_commit_hash", None),
        show_progress=not training_args.disable_tqdm,
    )  # fmt: skip
    # A Hub id (with its revision) only when it is one; a local folder becomes a label, never its path.
    selection.teacher = model_reference(teacher_id, getattr(teacher.config, "_commit_hash", None))
    if training_args.should_save:
        selection.save(training_args.output_dir)
        print(f"Selection ({selection.selection_method}, k={k}, layers {pairs}) written to "
              f"{os.path.join(training_args.output_dir, 'task_distill.json')}; diagnostics {selection.diagnostics}")  # fmt: skip
    if report_args.report:
        held = shuffled.select(range(n, min(len(train), n + report_args.report_num_samples)))
        heldout = list(DataLoader(held, batch_size=batch_size, collate_fn=collator))
        # the recovery trains on the rows outside the held-out ones (the scoring subset last)
        rest = shuffled.select(range(n + len(held), len(train)))
        recovery = concatenate_datasets([rest, subset]) if len(rest) else subset
        _report(teacher, selection, batches, heldout, report_args, training_args, k, recovery, tokenizer)
        if training_args.should_save:
            selection.save(training_args.output_dir)  # now with the report's summary in its diagnostics
    return selection


def _recover(student, teacher, tokenizer, dataset, training_args, steps: int):
    """`steps` steps of the recipe's distillation from the cut, as `train` would run it (the GKD host, or the SFT
    host for `logit_loss: none`); the student reuses the units of its `init` block. Nothing is saved or pushed."""
    import tempfile

    from ..config import TaskFeatureDistillConfig
    from ..trainer import FeatureDistillSFTTrainer, FeatureDistillTrainer

    with tempfile.TemporaryDirectory() as tmp:
        args = TaskFeatureDistillConfig.from_training_args(
            training_args, output_dir=tmp, max_steps=steps, save_strategy="no", eval_strategy="no", report_to="none",
            push_to_hub=False, logging_steps=max(1, steps // 4), selection_path=None, teacher_cache=None,
            resume_from_checkpoint=None, teacher_model_init_kwargs=None,  # the teacher is already loaded
        )  # fmt: skip
        host = FeatureDistillSFTTrainer if args.logit_loss == "none" else FeatureDistillTrainer
        trainer = host(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                       processing_class=tokenizer)  # fmt: skip
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer.model, losses


def _report(teacher, selection, batches, heldout, report_args, training_args, k, recovery=None, tokenizer=None):
    """The keep-k curve (and the pruned student's NLL) of the deepest scored layer; written and summarised."""
    from ..provenance import model_reference
    from ..report import keep_k_curve, model_nll, report_sentence, write_report

    i = max(range(len(selection.layers)), key=lambda j: selection.layers[j].teacher_layer)
    method = selection.selection_method
    scores = {method: selection.full_scores[i]} if selection.full_scores is not None else None
    report = keep_k_curve(
        teacher, batches, heldout, selection.layers[i].teacher_layer, scores, k_grid=report_args.report_k_grid,
        criterion=method, k=k, seed=training_args.selection_seed, show_progress=not training_args.disable_tqdm,
    )  # fmt: skip
    report["teacher"] = selection.teacher or model_reference(None)
    if report_args.report_prune_hidden_size is not None:
        from ..pruning import prune_teacher

        criterion, width = report_args.report_prune_criterion, report_args.report_prune_hidden_size
        result = prune_teacher(teacher, batches, hidden_size=width, criterion=criterion,
                               seed=training_args.selection_seed, teacher_reference=report["teacher"])  # fmt: skip
        report["pruned"] = {
            "hidden_size": width,
            "criterion": criterion,
            "num_parameters": int(result.num_parameters),
            "nll_before": round(model_nll(result.model, heldout)["nll"], 6),
            "nll_after": None,
            "recovery_steps": None,
        }
        steps = report_args.report_recovery_steps
        if steps:
            student, losses = _recover(result.model, teacher, tokenizer, recovery, training_args, steps)
            report["pruned"].update(nll_after=round(model_nll(student, heldout)["nll"], 6), recovery_steps=steps,
                                    recovery_train_loss=[round(x, 6) for x in losses])  # fmt: skip
            del student
        del result
    at = report["k_grid"].index(k)
    selection.diagnostics["keep_k"] = {
        "layer": report["layer"],
        "k": k,
        "nll_at_k": {name: values[at] for name, values in report["nll"].items()},
        "full_teacher_nll": report["full_teacher_nll"],
        "mean_floor_nll": report["mean_floor_nll"],
        "num_examples": report["num_examples"],
        "num_tokens": report["num_tokens"],
    }
    sentence = report_sentence(report)
    if training_args.should_save:
        json_path, png_path = write_report(report, training_args.output_dir)
        print(f"Selection report written to {json_path}" + (f" and {png_path}" if png_path else ""))
    print(sentence)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = make_select_parser()
    script_args, training_args, model_args, report_args = parser.parse_args_and_config(
        args=argv if argv is not None else sys.argv[1:]
    )
    run(script_args, training_args, model_args, report_args)
    return 0
