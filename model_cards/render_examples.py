"""Render the example cards in this folder from tiny toy models (CPU, under a minute, offline).

    HF_HUB_OFFLINE=1 python model_cards/render_examples.py

Each example trains a tiny student for a few steps on the generated toy task (`hf_taskdistill.toy`), then writes the
card and the unit-score plot exactly as `trainer.push_to_hub()` would (`grad_gkd`, `grad_x_act_sft`), or as
`hf-taskdistill push` generates it from the saved directory's `config.json` (`push_generated`, with a keep-k
`selection_report.json`; written with `push --dry_run`, no network), and copies them here. No real data or model;
the numbers in the cards (scores, NLLs, timings) describe these toy runs only.
"""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
from datasets import Dataset

from hf_taskdistill import FeatureDistillSFTTrainer, FeatureDistillTrainer, TaskFeatureDistillConfig
from hf_taskdistill.toy import (
    build_toy_tokenizer,
    make_toy_examples,
    tiny_llama,
    to_messages,
    to_prompt_completion,
)


HERE = Path(__file__).resolve().parent
EXAMPLES = {
    # name: (trainer class, row format, config overrides)
    "grad_gkd": (FeatureDistillTrainer, to_messages, {"selection_method": "grad"}),
    "grad_x_act_sft": (
        FeatureDistillSFTTrainer,
        to_prompt_completion,
        {"selection_method": "grad_x_act", "feature_layers": [0, 1, 1, 2], "feature_loss_type": "mse"},
    ),
    "push_generated": (FeatureDistillTrainer, to_messages, {"selection_method": "grad", "beta": 0.0}),
}
EVAL = {"protocol": {"seeds": [10]}, "sets": {"toy": {"n": 64, "rougeL": {"mean": 41.237, "std": None}}}}


def _keep_k_report(trainer, model_dir: Path) -> None:
    """`selection_report.json` / `.png` of the toy teacher into `model_dir` (skipped if `hf_taskdistill.report` is
    unavailable)."""
    try:
        from hf_taskdistill.report import keep_k_curve, write_report
    except ImportError as e:
        print(f"no keep-k report ({e})")
        return
    batches = trainer._scoring_batches()
    selection = trainer.unit_selection
    layer = selection.layers[0]
    report = keep_k_curve(trainer._fd_teacher, batches[: len(batches) // 2], batches[len(batches) // 2 :],
                          layer.teacher_layer, {selection.selection_method: selection.full_scores[0]},
                          k=selection.k, seed=0)  # fmt: skip
    write_report(report, model_dir)


def render(name: str, work: Path) -> None:
    trainer_cls, to_row, overrides = EXAMPLES[name]
    torch.manual_seed(0)
    tokenizer = build_toy_tokenizer()
    rows = [to_row(r) for r in make_toy_examples(64, seed=0)]
    data_file = work / "toy_task.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Saved and reloaded, so the card names them as local checkpoints rather than "not recorded".
    tiny_llama(len(tokenizer), hidden_size=32, num_layers=3, seed=1).save_pretrained(work / "tiny-teacher")
    tiny_llama(len(tokenizer), hidden_size=16, num_layers=2, seed=2).save_pretrained(work / "tiny-student")
    args = TaskFeatureDistillConfig(
        output_dir=str(work / "out"),
        hub_model_id=f"your-namespace/tiny-student-{name.replace('_', '-')}",
        max_steps=5,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        max_length=64,
        selection_num_samples=64,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        activation_checkpointing=False,
        **overrides,
    )
    trainer = trainer_cls(
        model=str(work / "tiny-student"),
        teacher_model=str(work / "tiny-teacher"),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        dataset_name="toy_task.jsonl",  # a label for the card; never a path
    )
    trainer.train()
    trainer.save_model()
    target = HERE / name
    target.mkdir(exist_ok=True)
    if name == "push_generated":  # the card `hf-taskdistill push` makes from config.json alone
        from hf_taskdistill.hub import push_distilled

        _keep_k_report(trainer, work / "out")
        dry = work / "dry_run"
        push_distilled(work / "out", trainer.args.hub_model_id, dry_run_dir=dry, license="apache-2.0",
                       eval_results=EVAL)  # fmt: skip
        files = ["README.md", "unit_scores.png"] + (
            ["selection_report.png"] if (dry / "selection_report.png").exists() else []
        )
        for file in files:
            shutil.copy(dry / file, target / file)
    else:
        trainer.create_model_card(dataset_name=str(data_file), license="apache-2.0")
        for file in ("README.md", "unit_scores.png"):
            shutil.copy(work / "out" / file, target / file)
    print(f"wrote {target}")


def main(names: list[str]) -> None:
    for name in names or list(EXAMPLES):
        with tempfile.TemporaryDirectory() as tmp:
            render(name, Path(tmp))


if __name__ == "__main__":
    main(sys.argv[1:])
