"""Worker for tests/test_multiprocess.py: run under `torch.distributed.run` (or `accelerate launch`) on CPU/gloo.

Writes, per rank, the selection computed by `select_task_units` and by the trainer, and the student's parameter
change after a few SGD steps, to `<out>/rank<r>.pt`.
"""

import os
import sys


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def build(world_batch: int, per_device: int, out_dir: str):
    """Everything both the 1-process and the n-process runs share (deterministic)."""
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from trl.experimental.utils import DataCollatorForChatML

    from hf_taskdistill import TaskFeatureDistillConfig
    from hf_taskdistill.toy import build_toy_tokenizer, make_toy_examples, tiny_llama, to_messages

    tokenizer = build_toy_tokenizer()
    rows = [
        r
        for r in make_toy_examples(200, seed=3, min_len=4, max_len=4)
        if r["instruction"].split()[2] in ("copy", "reverse", "sort")
    ]
    dataset = Dataset.from_list([to_messages(r) for r in rows[:32]])
    teacher = tiny_llama(len(tokenizer), 32, 3, seed=1)
    student = tiny_llama(len(tokenizer), 16, 2, seed=2)
    batches = list(DataLoader(dataset, batch_size=4, collate_fn=DataCollatorForChatML(tokenizer, max_length=64)))
    args = TaskFeatureDistillConfig(
        output_dir=out_dir, max_steps=2, per_device_train_batch_size=per_device, optim="sgd", learning_rate=1.0,
        lr_scheduler_type="constant", max_grad_norm=0.0, feature_loss_type="mse", feature_loss_weight=5.0,
        selection_num_samples=32, selection_batch_size=4, report_to="none", save_strategy="no", use_cpu=True,
        activation_checkpointing=False, disable_tqdm=True, seed=0, data_seed=0, dataloader_drop_last=True,
    )  # fmt: skip
    return tokenizer, dataset, teacher, student, batches, args


def main(out_dir: str, per_device: int) -> None:
    import torch
    import torch.distributed as dist

    from hf_taskdistill import FeatureDistillTrainer, select_task_units
    from hf_taskdistill.cli import end_process_group

    tokenizer, dataset, teacher, student, batches, args = build(8, per_device, out_dir)
    # the trainer initialises the process group (gloo on CPU) from the launcher's environment
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer = FeatureDistillTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                    processing_class=tokenizer)  # fmt: skip
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    direct = select_task_units(teacher, batches, 16, [(1, 2)], show_progress=False)
    trainer.train()
    delta = {n: (p.detach() - before[n]) for n, p in student.named_parameters()}
    torch.save(
        {
            "world": world,
            "direct_indices": direct.layers[0].indices,
            "direct_scores": direct.full_scores[0],
            "trainer_indices": trainer.unit_selection.layers[0].indices,
            "trainer_scores": trainer.unit_selection.full_scores[0],
            "delta": delta,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    end_process_group()  # a clean gloo teardown: exiting with live gloo threads can abort a rank


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
