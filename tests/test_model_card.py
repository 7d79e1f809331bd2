"""Model cards of distilled students: offline substring and metadata assertions, one test per method variant."""

import json

import pytest
from huggingface_hub import ModelCard

from hf_taskdistill import FeatureDistillSFTTrainer, FeatureDistillTrainer
from hf_taskdistill.model_card import is_hub_id, normalize_eval_results

from .conftest import make_config


# The shape `hf-taskdistill eval` writes.
EVAL = {
    "protocol": {"seeds": [10, 20], "template": "chat"},
    "sets": {"dolly": {"n": 500, "rougeL": {"mean": 24.61, "std": 0.31, "per_seed": [24.4, 24.8]}}},
}


def _card(trainer, **kwargs):
    trainer.create_model_card(**kwargs)
    path = f"{trainer.args.output_dir}/README.md"
    with open(path) as f:
        text = f.read()
    return text, ModelCard.load(path)


def _common(text, card):
    assert "None" not in text and "licence" not in text
    assert {"distillation", "trl", "feature-distillation", "hf_taskdistill"} <= set(card.data.tags)
    assert "saadi2025taskbased" in text and "vonwerra2020trl" in text and "2507.10155" in text
    for package in ("hf_taskdistill:", "TRL:", "Transformers:", "PEFT:", "PyTorch:", "huggingface_hub:"):
        assert f"- {package} " in text


@pytest.fixture
def named_teacher(teacher):
    teacher.config._name_or_path = "test-org/tiny-teacher"
    return teacher


def test_grad_card(tmp_path, tokenizer, student, named_teacher, messages_dataset):
    args = make_config(tmp_path, feature_loss_type="mse", feature_loss_weight=0.5, beta=0.3)
    trainer = FeatureDistillTrainer(model=student, teacher_model=named_teacher, args=args,
                                    train_dataset=messages_dataset, processing_class=tokenizer)  # fmt: skip
    text, card = _card(trainer, model_name="tiny-student", dataset_name="test-org/toy-task", license="apache-2.0",
                       finetuned_from="test-org/student-init", eval_results=EVAL, unknown_kwarg=1)  # fmt: skip
    _common(text, card)
    data = card.data
    assert data.license == "apache-2.0" and data.base_model == "test-org/student-init"
    assert data.datasets == ["test-org/toy-task"] and data.pipeline_tag == "text-generation"
    assert data.distillation == {
        "method": "task-selected-units", "teacher": "test-org/tiny-teacher", "logit_loss": "generalized_jsd",
        "beta": 0.3, "lmbda": 0.0, "selection_method": "grad", "num_units": 16, "layer_pairs": [[1, 2]],
        "feature_loss": "mse", "feature_loss_weight": 0.5,
    }  # fmt: skip
    [result] = data.eval_results
    assert (result.task_type, result.dataset_name, result.metric_type, result.metric_value) == (
        "text-generation", "dolly", "rougeL", 24.61
    )  # fmt: skip
    assert "| dolly | 24.61 | 0.31 | 500 |" in text
    assert "[test-org/tiny-teacher](https://huggingface.co/test-org/tiny-teacher)" in text
    assert "k = 16 of the teacher's 32 hidden units" in text and "| 1 | 2 | 16 |" in text
    assert "`grad`, the mean of abs(dL/dh_j)" in text and "on 16 training examples" in text
    assert "beta=0.3, lmbda=0: off-policy" in text and "agarwal2024on-policy" in text
    assert "| Feature loss | mse, weight 0.5 |" in text and "| max_steps | 3 |" in text
    assert 'load_unit_selection("tiny-student")' in text  # no hub id yet: the model name stands in
    assert "![Teacher unit scores, selected units highlighted](unit_scores.png)" in text
    with open(tmp_path / "out" / "unit_scores.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"
    assert "## License\n\napache-2.0" in text


def test_random_card(tmp_path, tokenizer, student, teacher, messages_dataset):
    trainer = FeatureDistillTrainer(model=student, teacher_model=teacher, args=make_config(tmp_path, selection_method="random"),
                                    train_dataset=messages_dataset, processing_class=tokenizer)  # fmt: skip
    text, card = _card(trainer)
    _common(text, card)
    assert card.data.distillation["method"] == "random-units" and card.data.base_model is None
    assert "random teacher units (seeded ablation baseline" in text and "drawn at random" in text
    assert "No unit-score plot: the `random` baseline" in text and "unit_scores.png" not in text
    assert not (tmp_path / "out" / "unit_scores.png").exists()
    assert "license" not in card.data.to_dict() and "## Evaluation" not in text and "model-index" not in text
    assert "a teacher whose id was not recorded" in text


def test_projector_card(tmp_path, tokenizer, student, named_teacher, messages_dataset):
    args = make_config(tmp_path, feature_projector=True)
    trainer = FeatureDistillTrainer(model=student, teacher_model=named_teacher, args=args,
                                    train_dataset=messages_dataset, processing_class=tokenizer)  # fmt: skip
    text, card = _card(trainer, license="mit")
    _common(text, card)
    assert card.data.distillation["method"] == "projector" and card.data.license == "mit"
    assert "learned-projector baseline" in text and "| 1 | 2 | all |" in text
    assert "No unit-score plot: the projector baseline" in text


def test_logit_only_card(tmp_path, tokenizer, student, named_teacher, messages_dataset):
    args = make_config(tmp_path, feature_loss_weight=0.0)
    trainer = FeatureDistillTrainer(model=student, teacher_model=named_teacher, args=args,
                                    train_dataset=messages_dataset, processing_class=tokenizer)  # fmt: skip
    text, card = _card(trainer, eval_results={"dolly": 0.21})
    _common(text, card)
    assert card.data.distillation == {"method": "logit-only", "teacher": "test-org/tiny-teacher",
                                      "logit_loss": "generalized_jsd", "beta": 0.5, "lmbda": 0.0}  # fmt: skip
    assert "logit-only distillation (no feature term)" in text
    assert "### Unit selection" not in text and "load_unit_selection(" not in text
    assert "| dolly | 0.21 | - | - |" in text and card.data.eval_results[0].metric_value == 0.21


def test_sft_host_grad_x_act_card(tmp_path, tokenizer, student, named_teacher, prompt_completion_dataset):
    args = make_config(tmp_path, selection_method="grad_x_act")
    trainer = FeatureDistillSFTTrainer(model=student, teacher_model=named_teacher, args=args,
                                       train_dataset=prompt_completion_dataset, processing_class=tokenizer)  # fmt: skip
    text, card = _card(trainer, tags=["my-tag"])
    _common(text, card)
    assert {"sft", "my-tag"} <= set(card.data.tags)
    assert card.data.distillation["logit_loss"] == "none" and "beta" not in card.data.distillation
    assert "none (cross-entropy on the gold completions, SFT host)" in text
    assert "`grad_x_act`, the mean of abs(h_j * dL/dh_j)" in text and "agarwal2024" not in text
    assert "cross-entropy(gold completion) + 1 * correlation loss" in text


def test_eval_results_are_read_tolerantly(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(EVAL))
    assert normalize_eval_results(str(path)) == [{"dataset": "dolly", "value": 24.61, "std": 0.31, "n": 500}]
    flat = normalize_eval_results({"dolly": 0.2, "vicuna": {"rougeL": 0.3}, "sinst": {"mean": 0.4}, "note": "x"})
    assert [(r["dataset"], r["value"]) for r in flat] == [("dolly", 0.2), ("vicuna", 0.3), ("sinst", 0.4)]
    assert normalize_eval_results({"results": {"dolly": {"rouge_l": {"mean": 0.5}}}})[0]["value"] == 0.5
    with pytest.raises(TypeError):
        normalize_eval_results([0.1])


def test_only_hub_ids_reach_the_metadata(tmp_path):
    assert is_hub_id("org/name") and is_hub_id("gpt2")
    for name in (str(tmp_path), "./student", "/abs/path", "data.jsonl", "", None, "a/b/c"):
        assert not is_hub_id(name)
