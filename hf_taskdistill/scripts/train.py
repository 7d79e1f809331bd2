"""`hf-taskdistill train --config recipes/<task>/<recipe>.yaml [--any_field value ...]`.

Parses the recipe with TRL's `TrlParser` into `DistillScriptArguments`, `TaskFeatureDistillConfig` and TRL's
`ModelConfig` (command-line flags override the YAML), then runs `FeatureDistillTrainer` (GKD host,
`logit_loss: jsd`, the default) or `FeatureDistillSFTTrainer` (`logit_loss: none`). Works under
`accelerate launch -m hf_taskdistill.cli train --config ...`.
"""

from __future__ import annotations

import sys

from .common import check_model_paths, load_datasets, load_student, load_tokenizer, make_parser


def run(script_args, training_args, model_args):
    """Train, save (the selection goes into `config.json`), optionally push; returns the trainer."""
    from trl import get_peft_config

    from ..provenance import model_reference
    from ..trainer import FeatureDistillSFTTrainer, FeatureDistillTrainer

    if training_args.teacher_model_name_or_path is None and not training_args.teacher_cache:
        raise ValueError("Set the teacher with --teacher_model_name_or_path (a path or Hub id), or --teacher_cache.")
    check_model_paths(model_args, training_args)  # before any data or model is loaded
    sft_host = training_args.logit_loss == "none"
    tokenizer = load_tokenizer(script_args, model_args, training_args)
    train, evaluation, data = load_datasets(
        script_args, training_args, "prompt_completion" if sft_host else "messages", tokenizer=tokenizer,
        return_description=True,
    )  # fmt: skip
    trainer_cls = FeatureDistillSFTTrainer if sft_host else FeatureDistillTrainer
    trainer = trainer_cls(
        model=load_student(script_args, model_args, training_args),
        teacher_model=training_args.teacher_model_name_or_path,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        dataset_name=data["name"],
    )
    if trainer.unit_selection is not None:  # the card of `push` reads these records from config.json
        selection = trainer.unit_selection
        selection.data = {**{k: v for k, v in (selection.data or {}).items() if v is not None}, **data}
        if script_args.student_config_overrides:  # fresh weights: the named model lent its config only
            selection.student = {"model_id": None, "revision": None, "local_name": None,
                                 "config_from": model_reference(model_args.model_name_or_path, model_args.model_revision),
                                 "config_overrides": dict(script_args.student_config_overrides)}  # fmt: skip
        selection.attach_to(trainer.model)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if getattr(trainer.model, "merge_and_unload", None) is not None and model_args.use_peft:
        trainer.save_model(f"{training_args.output_dir}/adapter")  # adapter + task_distill.json sidecar
        trainer.model = trainer.model.merge_and_unload()  # the selection stays on the merged config
    trainer.save_model(training_args.output_dir)
    where = "selection in config.json: task_distill" if trainer.unit_selection is not None else "no feature term"
    trainer.accelerator.print(f"Model saved to {training_args.output_dir} ({where}).")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=data["name"])  # a label, never a local path
    trainer.end()
    return trainer


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(prog="hf-taskdistill train")
    script_args, training_args, model_args = parser.parse_args_and_config(
        args=argv if argv is not None else sys.argv[1:]
    )
    run(script_args, training_args, model_args)
    return 0
