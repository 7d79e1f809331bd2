"""Worker for tests/test_fsdp.py: run under `accelerate launch --config_file recipes/accelerate_configs/fsdp_cpu.yaml`
(FSDP2, gloo, 2 CPU processes), under a CPU copy of zero3.yaml with DS_ACCELERATOR=cpu (DeepSpeed ZeRO-3), or as
plain `python` for the 1-process reference.

For each host (GKD off-policy, SFT) it runs, with the same tiny teacher / student and the same global batch:
`units` (selection + 4 SGD steps, a checkpoint at step 2, `save_model`), `resume` (a fresh student resumed from that
checkpoint to step 4), `projector` (the learned-projector baseline, 2 steps, a checkpoint at step 1, `save_model`) and
`projector_resume` (resumed from that checkpoint). Per rank it writes the selections, the student's weights before
and after (gathered), how the teacher / projector parameters are held (DTensor shard, ZeRO-3 partition) and the
projector's weights to `<out>/rank<r>.pt`.

    python tests/fsdp_worker.py OUT PER_DEVICE_BATCH [HOSTS] [VARIANTS]   (comma-separated lists)
"""

import os
import sys
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

MAX_STEPS = 4
SAVE_STEPS = 2


def enable_fsdp_on_cpu() -> None:
    """Let accelerate run its FSDP path on CPU processes (gloo), as it does on GPUs.

    accelerate 1.15 turns a launch with `distributed_type: FSDP` into FSDP only for accelerator devices:
    `AcceleratorState.__init__` upgrades MULTI_GPU / MULTI_XPU / ... to FSDP, never MULTI_CPU, so on CPU the same
    launch silently trains with DDP. This promotes MULTI_CPU to FSDP when the launcher asked for FSDP
    (`ACCELERATE_USE_FSDP=true`, the env `accelerate launch` derives from the config) and keeps the plugin accelerate
    built from that config; everything after it (`fsdp2_prepare_model`, `get_state_dict`, checkpoint save/load) is
    accelerate's and torch's own FSDP2 code, unpatched. Test-harness only: nothing in hf_taskdistill depends on it.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or getattr(AcceleratorState, "_fsdp_cpu", 0):
        return
    original = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = __init__
    AcceleratorState._fsdp_cpu = True


def _full(tensor):
    """The whole tensor: an FSDP2 DTensor shard or a ZeRO-3 partition is gathered (a collective: every rank calls
    it, in the same order)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return tensor.full_tensor().detach().clone()
    if hasattr(tensor, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor]):
            return tensor.detach().clone()
    return tensor.detach().clone()


def _weights(model):
    return {n: _full(p) for n, p in model.named_parameters()}


def _placement(param) -> dict:
    """How a parameter is held on this rank: a DTensor (FSDP2), a ZeRO-3 partition, or a whole tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return {
            "type": "DTensor",
            "placements": [str(p) for p in param.placements],
            "local_shape": tuple(param.to_local().shape),
            "global_shape": tuple(param.shape),
        }
    if hasattr(param, "ds_id"):
        return {
            "type": "zero3",
            "placements": [str(param.ds_status)],
            "local_shape": (param.ds_tensor.numel(),),
            "global_shape": tuple(param.ds_shape),
        }
    return {"type": type(param).__name__, "placements": None, "local_shape": tuple(param.shape)}


def build(host: str, per_device: int, output_dir: str, **overrides):
    """The deterministic pieces every run shares: tokenizer, dataset, teacher, student, config."""
    from datasets import Dataset

    from hf_taskdistill import TaskFeatureDistillConfig
    from hf_taskdistill.toy import (
        build_toy_tokenizer,
        make_toy_examples,
        tiny_llama,
        to_messages,
        to_prompt_completion,
    )

    tokenizer = build_toy_tokenizer()
    rows = [
        r
        for r in make_toy_examples(200, seed=3, min_len=4, max_len=4)
        if r["instruction"].split()[2] in ("copy", "reverse", "sort")
    ][:32]
    # DeepSpeed on CPU (DS_ACCELERATOR=cpu): accelerate disables DeepSpeed when `cpu=True`, and without a backend it
    # counts one process while DeepSpeed counts all of them, so: use_cpu=False and ddp_backend="gloo".
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    to_row = to_messages if host == "gkd" else to_prompt_completion
    dataset = Dataset.from_list([to_row(r) for r in rows])
    teacher = tiny_llama(len(tokenizer), 32, 3, seed=1)
    student = tiny_llama(len(tokenizer), 16, 2, seed=2)
    kwargs = dict(
        output_dir=output_dir, max_steps=MAX_STEPS, per_device_train_batch_size=per_device, optim="sgd",
        optim_args="momentum=0.9",
        learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
        feature_loss_type="mse", feature_loss_weight=5.0, max_length=64, selection_num_samples=32,
        selection_batch_size=4, report_to="none", save_strategy="no", use_cpu=not deepspeed, bf16=False,
        ddp_backend="gloo" if deepspeed else None,
        activation_checkpointing=False, disable_tqdm=True, seed=0, data_seed=0, dataloader_drop_last=True,
        logging_steps=1,
    )  # fmt: skip
    kwargs.update(overrides)
    return tokenizer, dataset, teacher, student, TaskFeatureDistillConfig(**kwargs)


def run(host: str, variant: str, per_device: int, out_dir: str) -> dict:
    from hf_taskdistill import FeatureDistillSFTTrainer, FeatureDistillTrainer

    trainer_cls = FeatureDistillTrainer if host == "gkd" else FeatureDistillSFTTrainer
    run_dir = os.path.join(out_dir, f"{host}_{variant}")
    overrides, resume = {}, None
    if variant == "units":
        overrides = {"save_strategy": "steps", "save_steps": SAVE_STEPS}
    elif variant == "resume":
        resume = os.path.join(out_dir, f"{host}_units", f"checkpoint-{SAVE_STEPS}")
    elif variant == "projector":
        overrides = {"feature_projector": True, "max_steps": 2, "save_strategy": "steps", "save_steps": 1}
    elif variant == "projector_resume":
        overrides = {"feature_projector": True, "max_steps": 2}
        resume = os.path.join(out_dir, f"{host}_projector", "checkpoint-1")
    tokenizer, dataset, teacher, student, args = build(host, per_device, run_dir, **overrides)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    start = time.perf_counter()
    trainer = trainer_cls(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                          processing_class=tokenizer)  # fmt: skip
    record = {
        "selection_method": trainer.unit_selection.selection_method,
        "distributed_type": trainer.accelerator.distributed_type.value,
        "fsdp_version": trainer.accelerator.state.fsdp_plugin.fsdp_version if trainer.is_fsdp_enabled else None,
        "teacher_placement": _placement(next(trainer.teacher_model.parameters())),
        "before": before,
    }
    if not variant.startswith("projector"):
        record["indices"] = [ls.indices for ls in trainer.unit_selection.layers]
        record["scores"] = [s.clone() for s in trainer.unit_selection.full_scores]
    projector_before = None
    if variant.startswith("projector"):
        projector_before = {n: p.detach().clone() for n, p in trainer._projector().named_parameters()}
    trainer.train(resume_from_checkpoint=resume)
    model = trainer.model
    record["global_step"] = trainer.state.global_step
    record["weights"] = {n: w for n, w in _weights(model).items() if not n.startswith("fd_proj.")}
    if variant.startswith("projector"):
        projector = trainer._projector()
        record["projector_placement"] = {n: _placement(p) for n, p in projector.named_parameters()}
        record["projector_before"] = projector_before
        record["projector_after"] = {n: _full(p) for n, p in projector.named_parameters()}
    if not variant.endswith("resume"):
        trainer.save_model(os.path.join(run_dir, "final"))  # collective under FSDP: every rank calls it
    record["seconds"] = time.perf_counter() - start
    return record


def main(out_dir: str, per_device: int, hosts: list[str], variants: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from hf_taskdistill.cli import end_process_group

    torch.set_num_threads(1)
    enable_fsdp_on_cpu()
    results = {}
    for host in hosts:
        for variant in variants:
            results[f"{host}_{variant}"] = run(host, variant, per_device, out_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    results["world"] = world
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    end_process_group()  # a rank exiting with live gloo threads can abort after its results are written


if __name__ == "__main__":
    # argv: out_dir per_device_batch [hosts, comma-separated] [variants, comma-separated]
    hosts = sys.argv[3].split(",") if len(sys.argv) > 3 else ["gkd", "sft"]
    variants = sys.argv[4].split(",") if len(sys.argv) > 4 else ["units", "resume", "projector", "projector_resume"]
    main(sys.argv[1], int(sys.argv[2]), hosts, variants)
