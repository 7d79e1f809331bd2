"""`hf-taskdistill select --config recipe.yaml [--output_dir DIR]`: score teacher units only.

Runs the same scoring pass as training (same data, collator, layers and k) and writes `task_distill.json` (and the
raw scores) into `--output_dir`. A later `train` reuses it with `--selection_path DIR/task_distill.json`, skipping
the scoring. Under `torch.distributed` every rank scores its share and all ranks get identical indices.
"""

from __future__ import annotations

import os
import sys

from .common import load_datasets, load_tokenizer, make_parser


def run(script_args, training_args, model_args):
    """Score and save; returns the `UnitSelection`."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl.experimental.utils import DataCollatorForChatML

    from ..hooks import resolve_layer_index
    from ..scoring import select_task_units

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
    pairs = []
    for s, t in training_args.layer_pairs:
        if n_s is None and s < 0:
            raise ValueError("Negative student layer indices need the student config (--model_name_or_path).")
        pairs.append((s if n_s is None else resolve_layer_index(s, n_s, "student"),
                      resolve_layer_index(t, t_cfg.num_hidden_layers, "teacher")))  # fmt: skip
    train, _ = load_datasets(script_args, training_args, "messages", tokenizer=tokenizer)
    n = min(training_args.selection_num_samples, len(train))
    subset = train.shuffle(seed=training_args.selection_seed).select(range(n))
    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=training_args.max_length)
    batch_size = training_args.selection_batch_size or training_args.per_device_train_batch_size
    batches = list(DataLoader(subset, batch_size=batch_size, collate_fn=collator))
    selection = select_task_units(
        teacher, batches, num_units=k, layer_pairs=pairs, method=training_args.selection_method,
        order=training_args.selection_order, seed=training_args.selection_seed, student_hidden_size=d_s,
        teacher_id=teacher_id, teacher_revision=getattr(teacher.config, "_commit_hash", None),
        show_progress=not training_args.disable_tqdm,
    )  # fmt: skip
    if training_args.should_save:
        selection.save(training_args.output_dir)
        print(f"Selection ({selection.selection_method}, k={k}, layers {pairs}) written to "
              f"{os.path.join(training_args.output_dir, 'task_distill.json')}; diagnostics {selection.diagnostics}")  # fmt: skip
    return selection


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(prog="hf-taskdistill select")
    script_args, training_args, model_args = parser.parse_args_and_config(
        args=argv if argv is not None else sys.argv[1:]
    )
    run(script_args, training_args, model_args)
    return 0
