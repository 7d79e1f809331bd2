"""The TRL contract: every input path TRL's SFTTrainer and GKDTrainer accept works with the feature loss on.

Each case runs our trainer twice (feature loss on, and off) and, where the parent accepts the same inputs, the parent
TRL trainer once on the same seed: with the feature loss off our host must log the parent's losses exactly.
Cases are small (2 steps of tiny models) so the module stays inside the default suite's budget.
"""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainingArguments
from trl import SFTConfig, SFTTrainer
from trl.experimental.gkd import GKDConfig, GKDTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from hf_taskdistill import FeatureDistillSFTTrainer, FeatureDistillTrainer, TaskFeatureDistillConfig
from hf_taskdistill.scoring import select_task_units
from hf_taskdistill.toy import make_toy_examples, tiny_llama, to_messages, to_prompt_completion

from .conftest import make_config


STEPS = 2
COMMON = dict(max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2, report_to="none", logging_steps=1,
              bf16=False, max_length=64, save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)  # fmt: skip


def _student(tokenizer):
    return tiny_llama(len(tokenizer), hidden_size=16, num_layers=2, seed=2)


def _teacher(tokenizer):
    return tiny_llama(len(tokenizer), hidden_size=32, num_layers=3, seed=1)


def _losses(trainer, key="loss"):
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


def _assert_feature_trained(trainer):
    values = _losses(trainer, "feature_loss")
    assert len(values) == STEPS and all(v == v and v > 0 for v in values), values
    assert trainer.unit_selection is not None and trainer.unit_selection.k == 16


# ----- datasets in every format SFT takes -----
def _rows(n=32):
    return make_toy_examples(n, seed=0)


def _text_ds(tokenizer):
    rows = [to_messages(r) for r in _rows()]
    return Dataset.from_list([{"text": tokenizer.apply_chat_template(r["messages"], tokenize=False)} for r in rows])


def _pc_ds(tokenizer):
    return Dataset.from_list([to_prompt_completion(r) for r in _rows()])


def _messages_ds(tokenizer):
    return Dataset.from_list([to_messages(r) for r in _rows()])


def _ids_ds(tokenizer):
    rows = []
    for r in _rows():
        m = to_messages(r)["messages"]
        prompt = tokenizer.apply_chat_template(m[:-1], add_generation_prompt=True, tokenize=False)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(m[-1]["content"] + " <|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)})
    return Dataset.from_list(rows)


SFT_CASES = {
    # name: (dataset builder, config overrides, dataset transform)
    "text": (_text_ds, {}, None),
    "prompt_completion": (_pc_ds, {}, None),
    "messages": (_messages_ds, {}, None),
    "input_ids": (_ids_ds, {}, None),
    "packing_bfd": (_pc_ds, {"packing": True}, None),
    "packing_wrapped": (_pc_ds, {"packing": True, "packing_strategy": "wrapped"}, None),
    "padding_free": (_pc_ds, {"padding_free": True, "max_length": None}, None),
    "completion_only_loss_off": (_pc_ds, {"completion_only_loss": False}, None),
    "iterable": (_pc_ds, {}, lambda ds: ds.to_iterable_dataset()),
    "grad_accumulation": (_pc_ds, {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2}, None),
}


@pytest.mark.parametrize("case", list(SFT_CASES))
def test_sft_host_input_path(case, tokenizer, tmp_path):
    build, overrides, transform = SFT_CASES[case]
    transform = transform or (lambda ds: ds)
    kwargs = {**COMMON, **overrides, "output_dir": str(tmp_path / "x")}

    ours = FeatureDistillSFTTrainer(model=_student(tokenizer), teacher_model=_teacher(tokenizer),
                                    args=TaskFeatureDistillConfig(**kwargs, selection_num_samples=8),
                                    train_dataset=transform(build(tokenizer)), processing_class=tokenizer)  # fmt: skip
    ours.train()
    _assert_feature_trained(ours)

    off = FeatureDistillSFTTrainer(model=_student(tokenizer), teacher_model=_teacher(tokenizer),
                                   args=TaskFeatureDistillConfig(**kwargs, feature_loss_weight=0),
                                   train_dataset=transform(build(tokenizer)), processing_class=tokenizer)  # fmt: skip
    off.train()
    parent = SFTTrainer(model=_student(tokenizer), args=SFTConfig(**kwargs), train_dataset=transform(build(tokenizer)),
                        processing_class=tokenizer)  # fmt: skip
    parent.train()
    assert _losses(off) == _losses(parent) and len(_losses(parent)) == STEPS


def test_packed_scores_equal_unpacked_scores(tokenizer, teacher):
    """Scoring a padding-free / packed batch feeds the teacher the sequence boundaries: documents never attend to
    each other, so the scores equal those of the same examples padded (fp32, max abs difference < 1e-6)."""
    examples = []
    for r in _rows(8):
        m = to_messages(r)["messages"]
        p = tokenizer(tokenizer.apply_chat_template(m[:-1], add_generation_prompt=True, tokenize=False))["input_ids"]
        c = tokenizer(m[-1]["content"])["input_ids"]
        examples.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    packed = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    a = select_task_units(teacher, [padded(examples[:4]), padded(examples[4:])], 8, [(1, 2)], show_progress=False)
    b = select_task_units(teacher, [packed(examples[:4]), packed(examples[4:])], 8, [(1, 2)], show_progress=False)
    assert a.num_tokens == b.num_tokens > 0
    assert a.layers[0].indices == b.layers[0].indices
    assert torch.allclose(a.full_scores[0], b.full_scores[0], atol=1e-6, rtol=0)
    # The boundaries matter: the same packed row without them (one long document) scores differently.
    naive = packed(examples[:4])
    for key in [k for k in naive if k != "input_ids" and k != "labels"]:
        naive.pop(key)
    c = select_task_units(teacher, [naive, packed(examples[4:])], 8, [(1, 2)], show_progress=False)
    assert (c.full_scores[0] - a.full_scores[0]).abs().max() > 1e-3


GKD_CASES = {
    "messages": ({}, None),
    "iterable": ({}, lambda ds: ds.to_iterable_dataset()),
    "grad_accumulation": ({"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2}, None),
}


@pytest.mark.parametrize("case", list(GKD_CASES))
def test_gkd_host_input_path(case, tokenizer, tmp_path):
    overrides, transform = GKD_CASES[case]
    transform = transform or (lambda ds: ds)
    kwargs = {**COMMON, **overrides, "output_dir": str(tmp_path / "x"), "lmbda": 0.0}
    ours = FeatureDistillTrainer(model=_student(tokenizer), teacher_model=_teacher(tokenizer),
                                 args=TaskFeatureDistillConfig(**kwargs, selection_num_samples=8),
                                 train_dataset=transform(_messages_ds(tokenizer)), processing_class=tokenizer)  # fmt: skip
    ours.train()
    _assert_feature_trained(ours)
    off = FeatureDistillTrainer(model=_student(tokenizer), teacher_model=_teacher(tokenizer),
                                args=TaskFeatureDistillConfig(**kwargs, feature_loss_weight=0),
                                train_dataset=transform(_messages_ds(tokenizer)), processing_class=tokenizer)  # fmt: skip
    off.train()
    parent = GKDTrainer(model=_student(tokenizer), teacher_model=_teacher(tokenizer), args=GKDConfig(**kwargs),
                        train_dataset=transform(_messages_ds(tokenizer)), processing_class=tokenizer)  # fmt: skip
    parent.train()
    assert _losses(off) == _losses(parent) and len(_losses(parent)) == STEPS


# ----- evaluation datasets, PEFT, args and model given in other forms -----
@pytest.mark.parametrize("host", ["sft", "gkd"])
def test_eval_dataset_single_and_dict(host, tokenizer, tmp_path):
    cls, build = (FeatureDistillSFTTrainer, _pc_ds) if host == "sft" else (FeatureDistillTrainer, _messages_ds)
    args = make_config(tmp_path, max_steps=1, per_device_eval_batch_size=4)
    trainer = cls(model=_student(tokenizer), teacher_model=_teacher(tokenizer), args=args,
                  train_dataset=build(tokenizer), processing_class=tokenizer,
                  eval_dataset={"a": build(tokenizer).select(range(8)), "b": build(tokenizer).select(range(8, 12))})  # fmt: skip
    trainer.train()
    metrics = trainer.evaluate()
    for name in ("a", "b"):
        assert metrics[f"eval_{name}_feature_loss"] > 0 and metrics[f"eval_{name}_loss"] > 0, metrics
        if host == "sft":  # TRL's own metrics get the set's prefix too (TRL alone logs them all as eval_entropy)
            assert f"eval_{name}_entropy" in metrics
    assert metrics["eval_a_feature_loss"] != metrics["eval_b_feature_loss"]
    single = trainer.evaluate(eval_dataset=build(tokenizer).select(range(8)))
    assert single["eval_feature_loss"] > 0 and single["eval_loss"] > 0


@pytest.mark.parametrize("host", ["sft", "gkd"])
def test_peft_student(host, tokenizer, tmp_path):
    cls, build = (FeatureDistillSFTTrainer, _pc_ds) if host == "sft" else (FeatureDistillTrainer, _messages_ds)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = cls(model=_student(tokenizer), teacher_model=_teacher(tokenizer), args=make_config(tmp_path, max_steps=2),
                  train_dataset=build(tokenizer), processing_class=tokenizer, peft_config=lora)  # fmt: skip
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    _assert_feature_trained(trainer)
    assert before and all("lora" in n for n in before)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)


@pytest.mark.parametrize("host", ["sft", "gkd"])
def test_args_none_and_models_as_paths(host, tokenizer, tmp_path, monkeypatch):
    cls, build = (FeatureDistillSFTTrainer, _pc_ds) if host == "sft" else (FeatureDistillTrainer, _messages_ds)
    _student(tokenizer).save_pretrained(tmp_path / "student")
    _teacher(tokenizer).save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "student")
    monkeypatch.chdir(tmp_path)  # args=None writes into ./student-distilled, as TRL writes ./<model>-SFT
    trainer = cls(model=str(tmp_path / "student"), teacher_model=str(tmp_path / "teacher"),
                  train_dataset=build(tokenizer).select(range(8)), processing_class=tokenizer)  # fmt: skip
    assert isinstance(trainer.args, TaskFeatureDistillConfig)
    assert trainer.args.output_dir.endswith("student-distilled")
    assert trainer.unit_selection.k == 16 and trainer.unit_selection.teacher["local_name"] == "teacher"
    trainer.args.max_steps, trainer.args.logging_steps, trainer.args.report_to = 1, 1, []
    trainer.train()
    assert len(_losses(trainer, "feature_loss")) >= 1


@pytest.mark.parametrize(
    ("host", "parent_args"),
    [("sft", TrainingArguments), ("sft", SFTConfig), ("gkd", TrainingArguments), ("gkd", GKDConfig)],
)
def test_parent_configs_are_converted(host, parent_args, tokenizer, tmp_path):
    cls, build = (FeatureDistillSFTTrainer, _pc_ds) if host == "sft" else (FeatureDistillTrainer, _messages_ds)
    kwargs = dict(output_dir=str(tmp_path / "x"), max_steps=1, per_device_train_batch_size=4, learning_rate=3e-3,
                  report_to="none", use_cpu=True, bf16=False, save_strategy="no", weight_decay=0.05, seed=7,
                  logging_steps=1)  # fmt: skip
    args = parent_args(**kwargs)
    trainer = cls(model=_student(tokenizer), teacher_model=_teacher(tokenizer), args=args,
                  train_dataset=build(tokenizer), processing_class=tokenizer)  # fmt: skip
    converted = trainer.args
    assert isinstance(converted, TaskFeatureDistillConfig)
    assert (converted.learning_rate, converted.weight_decay, converted.seed, converted.max_steps) == (3e-3, 0.05, 7, 1)
    assert converted.feature_loss_weight == 1.0 and converted.selection_method == "grad"
    trainer.train()
    assert len(_losses(trainer, "feature_loss")) == 1


def test_wrong_args_type_names_the_fix(tokenizer, tmp_path):
    with pytest.raises(TypeError, match=r"TaskFeatureDistillConfig\(output_dir="):
        FeatureDistillSFTTrainer(model=_student(tokenizer), teacher_model=_teacher(tokenizer), args={"lr": 1},
                                 train_dataset=_pc_ds(tokenizer), processing_class=tokenizer)  # fmt: skip
