"""Training runs from a teacher cache (`teacher_cache=`) against the online teacher, for both hosts, step by step.

With K = V and fp32 storage the cache holds everything the online teacher computes, so the logged losses and the
trained weights after several optimizer steps must equal the online run's (fp32 tolerances). test_cache_trainer.py
checks single-batch losses and gradients; test_cache.py the top-K + tail math against a direct computation.
"""

import random

import pytest
import torch
from datasets import Dataset
from trl.experimental.utils import DataCollatorForChatML

from hf_taskdistill import FeatureDistillSFTTrainer, FeatureDistillTrainer
from hf_taskdistill.cache import TeacherCacheError
from hf_taskdistill.cache_build import build_teacher_cache
from hf_taskdistill.selection import LayerSelection, UnitSelection
from hf_taskdistill.toy import make_toy_examples, tiny_llama, to_messages, to_prompt_completion

from .conftest import make_config


def _selection(d_t=32, k=16, seed=0):
    indices = sorted(random.Random(seed).sample(range(d_t), k))
    return UnitSelection(layers=[LayerSelection(1, 2, indices, teacher_std=[1.0] * k)], selection_method="random",
                         teacher_hidden_size=d_t, student_hidden_size=16)  # fmt: skip


def _new_student(tokenizer):
    return tiny_llama(len(tokenizer), hidden_size=16, num_layers=2, seed=2)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _losses(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


def _config(tmp_path, **kw):
    return make_config(tmp_path, max_steps=3, feature_loss_type="mse", optim="sgd", learning_rate=0.05, **kw)


def _assert_same_run(cached, online, keys):
    for key in keys:
        torch.testing.assert_close(_losses(cached, key), _losses(online, key), rtol=1e-5, atol=1e-6, msg=key)
    a, b = _weights(cached.model), _weights(online.model)
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_gkd_host_trains_from_full_cache_like_online(beta, teacher, tokenizer, tmp_path):
    data = Dataset.from_list([to_messages(r) for r in make_toy_examples(24, seed=0)])
    selection = _selection()
    build_teacher_cache(teacher, data, DataCollatorForChatML(tokenizer=tokenizer, max_length=64), tmp_path / "cache",
                        tokenizer=tokenizer, selection=selection, top_k=len(tokenizer), dtype="float32",
                        batch_size=8, show_progress=False)  # fmt: skip
    online = FeatureDistillTrainer(model=_new_student(tokenizer), teacher_model=teacher, args=_config(tmp_path, beta=beta),
                                   train_dataset=data, processing_class=tokenizer, unit_selection=selection)  # fmt: skip
    online.train()
    cached = FeatureDistillTrainer(model=_new_student(tokenizer), teacher_model=None,
                                   args=_config(tmp_path, beta=beta, teacher_cache=str(tmp_path / "cache")),
                                   train_dataset=data, processing_class=tokenizer)  # fmt: skip
    assert cached.teacher_model is None and cached.unit_selection.layers[0].indices == selection.layers[0].indices
    cached.train()
    _assert_same_run(cached, online, ("jsd_loss", "feature_loss", "loss"))


def test_sft_host_trains_from_cache_like_online(teacher, tokenizer, tmp_path):
    data = Dataset.from_list([to_prompt_completion(r) for r in make_toy_examples(24, seed=0)])
    selection = _selection()
    online = FeatureDistillSFTTrainer(model=_new_student(tokenizer), teacher_model=teacher, args=_config(tmp_path),
                                      train_dataset=data, processing_class=tokenizer, unit_selection=selection)  # fmt: skip
    # The SFT host tokenises in dataset preparation: cache what its own collator makes of its prepared dataset.
    build_teacher_cache(teacher, online.train_dataset, online.data_collator, tmp_path / "cache", tokenizer=tokenizer,
                        selection=selection, top_k=0, dtype="float32", max_length=64, batch_size=8,
                        show_progress=False)  # fmt: skip
    online.train()
    cached = FeatureDistillSFTTrainer(model=_new_student(tokenizer), teacher_model=None,
                                      args=_config(tmp_path, teacher_cache=str(tmp_path / "cache")),
                                      train_dataset=data, processing_class=tokenizer)  # fmt: skip
    cached.train()
    _assert_same_run(cached, online, ("ce_loss", "feature_loss", "loss"))
    record = cached.unit_selection.training["teacher_cache"]
    assert record["top_k"] == 0 and record["dtype"] == "float32"


def test_cache_errors_before_the_first_step(teacher, tokenizer, tmp_path):
    data = Dataset.from_list([to_messages(r) for r in make_toy_examples(12, seed=0)])
    build_teacher_cache(teacher, data, DataCollatorForChatML(tokenizer=tokenizer, max_length=64), tmp_path / "cache",
                        tokenizer=tokenizer, selection=_selection(), top_k=8, dtype="bfloat16", batch_size=4,
                        show_progress=False)  # fmt: skip
    cache = str(tmp_path / "cache")

    def make(dataset=data, **kw):
        return FeatureDistillTrainer(model=_new_student(tokenizer), args=_config(tmp_path, teacher_cache=cache, **kw),
                                     train_dataset=dataset, processing_class=tokenizer)  # fmt: skip

    with pytest.raises(TeacherCacheError, match="max_length"):
        make(max_length=32)
    with pytest.raises(TeacherCacheError):
        make(dataset=Dataset.from_list([to_messages(r) for r in make_toy_examples(14, seed=0)]))  # 2 never cached
    with pytest.raises(
        ValueError,
        match=r"feature_layers=\[\[0, 1\]\] does not match the layer pairs the teacher cache holds, \[\(1, 2\)\]",
    ):
        make(feature_layers=[0, 1])
    assert make(feature_layers=[-1, -1]).unit_selection.layers[0].teacher_layer == 2  # negatives resolve as online
    trainer = make()  # the matching run trains (K = 8 < V: top-K + tail, bf16 storage)
    trainer.train()
    assert len(_losses(trainer, "jsd_loss")) == 3 and all(v == v for v in _losses(trainer, "jsd_loss"))


def test_projector_baseline_trains_from_a_full_layer_cache(teacher, tokenizer, tmp_path):
    data = Dataset.from_list([to_messages(r) for r in make_toy_examples(12, seed=0)])
    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=64)
    for name, full in (("units", False), ("full", True)):
        build_teacher_cache(teacher, data, collator, tmp_path / name, tokenizer=tokenizer, selection=_selection(),
                            top_k=8, dtype="float32", full_layer=full, batch_size=4, show_progress=False)  # fmt: skip

    def make(cache):
        args = _config(tmp_path / cache, teacher_cache=str(tmp_path / cache), feature_projector=True)
        return FeatureDistillTrainer(model=_new_student(tokenizer), args=args, train_dataset=data,
                                     processing_class=tokenizer)  # fmt: skip

    with pytest.raises(ValueError, match="needs whole teacher layers.*--full_layer"):
        make("units")
    trainer = make("full")
    assert trainer.unit_selection.selection_method == "projector" and trainer._projector() is not None
    before = trainer._projector()["0"].weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, trainer._projector()["0"].weight) and len(_losses(trainer, "feature_loss")) == 3
