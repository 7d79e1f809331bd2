"""CUDA checks (skipped without a GPU): the CPU invariants hold on the device, in fp32 and under bf16 autocast."""

import pytest
import torch
from datasets import Dataset

from hf_taskdistill import FeatureDistillSFTTrainer, FeatureDistillTrainer
from hf_taskdistill.toy import tiny_llama, to_messages, to_prompt_completion

from .conftest import make_config
from .test_trainer import _equal_length_rows, _snapshot


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("trainer_cls", [FeatureDistillTrainer, FeatureDistillSFTTrainer])
def test_batch_1_x_ga_8_matches_8_x_1_on_cuda(tokenizer, tmp_path, trainer_cls):
    rows = _equal_length_rows()
    convert = to_messages if trainer_cls is FeatureDistillTrainer else to_prompt_completion
    dataset = Dataset.from_list([convert(r) for r in rows])
    teacher = tiny_llama(len(tokenizer), 32, 3, seed=1)
    deltas = []
    for bs, ga in ((8, 1), (1, 8)):
        student = tiny_llama(len(tokenizer), 16, 2, seed=2)
        args = make_config(tmp_path / f"{bs}", use_cpu=False, per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                           max_steps=1, optim="sgd", learning_rate=1.0, feature_loss_type="mse", feature_loss_weight=5.0,
                           selection_num_samples=8, lr_scheduler_type="constant", max_grad_norm=0.0)  # fmt: skip
        trainer = trainer_cls(
            model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
        )
        assert next(trainer.model.parameters()).is_cuda
        before = _snapshot(student)
        trainer.train()
        deltas.append({n: p.detach() - before[n] for n, p in student.named_parameters()})
    num = sum((deltas[0][n] - deltas[1][n]).norm() ** 2 for n in deltas[0]) ** 0.5
    den = sum(deltas[0][n].norm() ** 2 for n in deltas[0]) ** 0.5
    assert den > 0 and float(num / den) < 1e-4


@gpu
@pytest.mark.gpu
def test_bf16_training_and_scoring_on_cuda(student, teacher, tokenizer, messages_dataset, tmp_path):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    args = make_config(tmp_path, use_cpu=False, bf16=True, max_steps=2)
    trainer = FeatureDistillTrainer(model=student, teacher_model=teacher.to(torch.bfloat16), args=args,
                                    train_dataset=messages_dataset, processing_class=tokenizer)  # fmt: skip
    trainer.train()
    values = [h["feature_loss"] for h in trainer.state.log_history if "feature_loss" in h]
    assert values and all(v == v for v in values)
    assert trainer.unit_selection.diagnostics["peak_memory_kind"] == "cuda_max_allocated"
