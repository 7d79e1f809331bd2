"""Worker for tests/test_fsdp_cache.py: the teacher cache built and trained from under
`accelerate launch --config_file recipes/accelerate_configs/fsdp_cpu.yaml` (FSDP2, gloo, 2 CPU processes), or as plain
`python` for the 1-process reference.

Per host (GKD off-policy: top-K logits and units; SFT: units only) it
1. builds a teacher cache of the 32 training examples into `<out>/cache_<host>` with `build_teacher_cache` (rank and
   world from torch.distributed: every rank runs the whole, unsharded teacher on its examples i % world == rank and
   writes its own shards; the last rank to finish, rank 0 after the barrier, writes the header);
2. trains the student 4 SGD steps from the cache in `<train_from>/cache_<host>` (default: its own; the 1-process
   reference is pointed at the 2-process caches, so both runs read the same files), `teacher_model=None`, with the
   feature loss on, and calls `save_model` (a collective under FSDP) into `<out>/<host>_units/final`.

Per rank it writes what the build returned, the student's weights before and after (gathered), the selection the
trainer took from the cache and how the engine ran to `<out>/rank<r>.pt`. The data, models and optimiser settings are
those of tests/fsdp_worker.py (imported, not copied).

    python tests/fsdp_cache_worker.py OUT PER_DEVICE_BATCH [TRAIN_FROM]
"""

import os
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # fsdp_worker, next to this file

HOSTS = ("gkd", "sft")
TOP_K = {"gkd": 8, "sft": 0}  # GKD: top-K logits (K < V: top-K + tail) and units; SFT: units only
TEACHER_NAME = "org/tiny-teacher"  # recorded in the header (an in-memory teacher has no name)
WAIT_S = 300


def cache_selection():
    """The units both caches store: two layer pairs (student 0 -> teacher 1, student 1 -> teacher 2), 16 of the
    teacher's 32 units each, fixed (the selection itself is tested by test_fsdp.py)."""
    import random

    from hf_taskdistill.selection import LayerSelection, UnitSelection

    layers = [
        LayerSelection(s, t, sorted(random.Random(s).sample(range(32), 16)), teacher_std=[1.0] * 16)
        for s, t in ((0, 1), (1, 2))
    ]
    return UnitSelection(layers=layers, selection_method="random", teacher_hidden_size=32, student_hidden_size=16)


def build_cache(host: str, directory: str) -> dict:
    """One host's cache, built with the collator GKD trains with (TRL's `DataCollatorForChatML`) over the `messages`
    form of the training rows: the CLI's `cache` command does the same for both hosts."""
    import torch.distributed as dist
    from fsdp_worker import build
    from trl.experimental.utils import DataCollatorForChatML

    from hf_taskdistill.cache import TeacherCache
    from hf_taskdistill.cache_build import build_teacher_cache

    tokenizer, messages, teacher, _, args = build("gkd", 1, os.path.join(os.path.dirname(directory), "unused"))
    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=args.max_length)
    start = time.perf_counter()
    cache = build_teacher_cache(teacher, messages, collator, directory, tokenizer=tokenizer,
                                selection=cache_selection(), top_k=TOP_K[host], dtype="float32", batch_size=4,
                                shard_size=6, teacher_name_or_path=TEACHER_NAME, show_progress=False)  # fmt: skip
    record = {
        "returned": None if cache is None else type(cache).__name__,
        "process_group": (dist.get_backend(), dist.get_world_size()) if dist.is_initialized() else None,
        "seconds": time.perf_counter() - start,
    }
    if dist.is_initialized():
        dist.barrier()
    record["num_examples"] = len(TeacherCache(directory))  # every rank reads the merged view after the barrier
    return record


def _wait_for(directory: str) -> None:
    """The 1-process reference trains from the 2-process caches: wait until their header is written."""
    from hf_taskdistill.cache import HEADER_NAME

    deadline = time.monotonic() + WAIT_S
    while not os.path.isfile(os.path.join(directory, HEADER_NAME)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"No complete teacher cache in {directory} after {WAIT_S} s.")
        time.sleep(0.2)


def train(host: str, cache_dir: str, per_device: int, out_dir: str) -> dict:
    """4 steps from the cache (`teacher_model=None`, feature loss on), then `save_model`."""
    from fsdp_worker import _weights, build

    from hf_taskdistill import FeatureDistillSFTTrainer, FeatureDistillTrainer

    _wait_for(cache_dir)
    trainer_cls = FeatureDistillTrainer if host == "gkd" else FeatureDistillSFTTrainer
    run_dir = os.path.join(out_dir, f"{host}_units")
    tokenizer, dataset, _, student, args = build(host, per_device, run_dir, teacher_cache=cache_dir)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    start = time.perf_counter()
    trainer = trainer_cls(model=student, teacher_model=None, args=args, train_dataset=dataset,
                          processing_class=tokenizer)  # fmt: skip
    record = {
        "distributed_type": trainer.accelerator.distributed_type.value,
        "fsdp_version": trainer.accelerator.state.fsdp_plugin.fsdp_version if trainer.is_fsdp_enabled else None,
        "teacher_model": trainer.teacher_model,
        "indices": [ls.indices for ls in trainer.unit_selection.layers],
        "before": before,
    }
    trainer.train()
    record["global_step"] = trainer.state.global_step
    record["losses"] = [h for h in trainer.state.log_history if "loss" in h]
    record["weights"] = _weights(trainer.model)
    trainer.save_model(os.path.join(run_dir, "final"))  # collective under FSDP: every rank calls it
    record["seconds"] = time.perf_counter() - start
    return record


def main(out_dir: str, per_device: int, train_from: str) -> None:
    import torch
    import torch.distributed as dist
    from accelerate import PartialState
    from fsdp_worker import enable_fsdp_on_cpu

    from hf_taskdistill.cli import end_process_group

    torch.set_num_threads(1)
    enable_fsdp_on_cpu()
    PartialState(cpu=True)  # under the launcher: the gloo process group the cache build takes its rank and world from
    results = {}
    for host in HOSTS:
        results[f"{host}_build"] = build_cache(host, os.path.join(out_dir, f"cache_{host}"))
    for host in HOSTS:
        results[f"{host}_units"] = train(host, os.path.join(train_from, f"cache_{host}"), per_device, out_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    results["world"] = dist.get_world_size() if dist.is_initialized() else 1
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    end_process_group()  # a rank exiting with live gloo threads can abort after its results are written (CI, stop 20)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else sys.argv[1])
