"""Render the example cards in this folder from tiny toy models (CPU, under a minute, offline).

    HF_HUB_OFFLINE=1 python model_cards/render_examples.py

Each example trains a tiny student for a few steps on the generated toy task (`hf_taskdistill.toy`), then writes the
card and the unit-score plot exactly as `trainer.push_to_hub()` would, and copies them here. No real data or model;
the numbers in the cards (scores, timings) describe these toy runs only.
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
}


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
    )
    trainer.train()
    trainer.save_model()
    trainer.create_model_card(dataset_name=str(data_file), license="apache-2.0")
    target = HERE / name
    target.mkdir(exist_ok=True)
    for file in ("README.md", "unit_scores.png"):
        shutil.copy(work / "out" / file, target / file)
    print(f"wrote {target}")


def main(names: list[str]) -> None:
    for name in names or list(EXAMPLES):
        with tempfile.TemporaryDirectory() as tmp:
            render(name, Path(tmp))


if __name__ == "__main__":
    main(sys.argv[1:])
