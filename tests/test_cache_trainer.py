"""Training from a teacher cache: single-batch losses and gradients against the online teacher, and the errors.

Design under test (hf_taskdistill/cache.py, hf_taskdistill/sparse_kd.py):
- `TaskFeatureDistillConfig(teacher_cache=DIR)`; `lmbda > 0` or `seq_kd` with a cache raises in `__post_init__`.
- `__init__`: no teacher is loaded; `open_teacher_cache(DIR, tokenizer=..., selection=..., max_length=...,
  teacher=args.teacher_model_name_or_path, need_logits=<GKD host>, dataset=self.train_dataset,
  collator=self.data_collator)`, then `self.data_collator = cache.wrap_collator(self.data_collator)`; the selection
  defaults to `cache.selection`.
- `compute_loss`: `cached = cache.pop_batch(inputs, self.unit_selection)` first; GKD host: the logit term is
  `sparse_generalized_jsd_loss(logits, cached.topk_ids, cached.topk_logprobs, cached.tail_logprob,
  valid_positions(labels), beta) / num_items_in_batch`; both hosts: `cached.units` replaces the teacher tap outputs.
"""

import copy

import pytest
import torch
from trl.experimental.utils import DataCollatorForChatML

from hf_taskdistill import FeatureDistillSFTTrainer, FeatureDistillTrainer
from hf_taskdistill.cache import TeacherCacheError
from hf_taskdistill.cache_build import build_teacher_cache

from .conftest import make_config


def _selection(teacher, student, tokenizer, dataset, tmp_path):
    trainer = FeatureDistillTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=make_config(tmp_path),
                                    train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    return trainer.unit_selection


def _cache(teacher, tokenizer, dataset, selection, path, top_k=None):
    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=64)
    return build_teacher_cache(teacher, dataset, collator, path, tokenizer=tokenizer, selection=selection,
                               top_k=len(tokenizer) if top_k is None else top_k, dtype="float32",
                               show_progress=False)  # fmt: skip


def _loss_and_grads(trainer, rows):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    inputs = trainer._prepare_inputs(trainer.data_collator(rows))
    n = (inputs["labels"][:, 1:] != -100).sum()
    loss = trainer.compute_loss(model, inputs, num_items_in_batch=n)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _assert_same(online, cached):
    torch.testing.assert_close(cached[0], online[0], rtol=1e-5, atol=1e-6)
    assert online[1].keys() == cached[1].keys()
    for key in online[1]:
        torch.testing.assert_close(cached[1][key], online[1][key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_host_from_full_vocabulary_cache_equals_online(student, teacher, tokenizer, messages_dataset, tmp_path,
                                                          beta):  # fmt: skip
    selection = _selection(teacher, student, tokenizer, messages_dataset, tmp_path / "sel")
    _cache(teacher, tokenizer, messages_dataset, selection, tmp_path / "cache")
    online = FeatureDistillTrainer(model=copy.deepcopy(student), teacher_model=teacher, unit_selection=selection,
                                   args=make_config(tmp_path / "a", beta=beta), train_dataset=messages_dataset,
                                   processing_class=tokenizer)  # fmt: skip
    cached = FeatureDistillTrainer(model=copy.deepcopy(student), teacher_model=None,
                                   args=make_config(tmp_path / "b", beta=beta, teacher_cache=str(tmp_path / "cache")),
                                   train_dataset=messages_dataset, processing_class=tokenizer)  # fmt: skip
    rows = [messages_dataset[i] for i in (5, 0, 17, 3)]
    _assert_same(_loss_and_grads(online, rows), _loss_and_grads(cached, rows))


def test_sft_host_from_cache_equals_online(student, teacher, tokenizer, messages_dataset, prompt_completion_dataset,
                                           tmp_path):  # fmt: skip
    selection = _selection(teacher, student, tokenizer, messages_dataset, tmp_path / "sel")
    _cache(teacher, tokenizer, messages_dataset, selection, tmp_path / "cache", top_k=0)  # units only
    online = FeatureDistillSFTTrainer(model=copy.deepcopy(student), teacher_model=teacher, unit_selection=selection,
                                      args=make_config(tmp_path / "a"), train_dataset=prompt_completion_dataset,
                                      processing_class=tokenizer)  # fmt: skip
    cached = FeatureDistillSFTTrainer(model=copy.deepcopy(student), teacher_model=None,
                                      args=make_config(tmp_path / "b", teacher_cache=str(tmp_path / "cache")),
                                      train_dataset=prompt_completion_dataset, processing_class=tokenizer)  # fmt: skip
    rows = [cached.train_dataset[i] for i in (2, 9, 4)]
    _assert_same(_loss_and_grads(online, rows), _loss_and_grads(cached, rows))


def test_training_from_cache_runs_without_a_teacher(student, teacher, tokenizer, messages_dataset, tmp_path):
    selection = _selection(teacher, student, tokenizer, messages_dataset, tmp_path / "sel")
    _cache(teacher, tokenizer, messages_dataset, selection, tmp_path / "cache", top_k=8)
    args = make_config(tmp_path / "b", teacher_cache=str(tmp_path / "cache"), gradient_accumulation_steps=2)
    trainer = FeatureDistillTrainer(model=student, teacher_model=None, args=args, train_dataset=messages_dataset,
                                    processing_class=tokenizer)  # fmt: skip
    trainer.train()
    assert all(h["jsd_loss"] == h["jsd_loss"] for h in trainer.state.log_history if "jsd_loss" in h)
    assert student.config.task_distill["layers"][0]["indices"] == selection.layers[0].indices


def test_cache_mismatches_raise_before_the_first_step(student, teacher, tokenizer, messages_dataset, tmp_path):
    selection = _selection(teacher, student, tokenizer, messages_dataset, tmp_path / "sel")
    _cache(teacher, tokenizer, messages_dataset.select(range(20)), selection, tmp_path / "cache", top_k=8)
    with pytest.raises(TeacherCacheError, match="lacks 12 of the 32 training examples"):
        FeatureDistillTrainer(model=student, teacher_model=None, train_dataset=messages_dataset,
                              args=make_config(tmp_path / "b", teacher_cache=str(tmp_path / "cache")),
                              processing_class=tokenizer)  # fmt: skip
    with pytest.raises(TeacherCacheError, match="max_length"):
        FeatureDistillTrainer(model=student, teacher_model=None, train_dataset=messages_dataset.select(range(20)),
                              args=make_config(tmp_path / "c", teacher_cache=str(tmp_path / "cache"), max_length=32),
                              processing_class=tokenizer)  # fmt: skip


@pytest.mark.parametrize("overrides", [{"lmbda": 0.5}, {"seq_kd": True}])
def test_on_policy_with_a_cache_is_refused(tmp_path, overrides):
    with pytest.raises(ValueError, match="teacher must see the student's own samples|on-policy"):
        make_config(tmp_path, teacher_cache=str(tmp_path / "cache"), **overrides)
