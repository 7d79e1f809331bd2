"""Model cards of distilled students: offline substring and metadata assertions, one test per method variant."""

import dataclasses
import json

import pytest
from huggingface_hub import ModelCard

from hf_taskdistill import FeatureDistillSFTTrainer, FeatureDistillTrainer, load_unit_selection
from hf_taskdistill.model_card import (
    ROUGE_LABEL,
    build_model_card,
    data_label,
    missing_card_fields,
    normalize_eval_results,
    plot_unit_scores,
    pruned_init_sentence,
    selection_report_sentence,
)
from hf_taskdistill.provenance import is_hub_id
from hf_taskdistill.report import report_sentence

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
        "text-generation", "dolly", "rouge", 24.61
    )  # fmt: skip
    assert result.metric_name == ROUGE_LABEL == "ROUGE-L F1 (x100)" and result.metric_args["rouge_types"] == ["rougeL"]
    assert f"| Dataset | {ROUGE_LABEL} | Std | Samples |" in text and "| dolly | 24.61 | 0.31 | 500 |" in text
    assert "[test-org/tiny-teacher](https://huggingface.co/test-org/tiny-teacher)" in text
    assert "k = 16 of the teacher's 32 hidden units" in text and "| 1 | 2 | 16 |" in text
    assert "`grad`, the mean of abs(dL/dh_j)" in text and "on 16 training examples" in text
    assert "beta=0.3, lmbda=0: off-policy" in text and "agarwal2024on-policy" in text
    assert "| Feature loss | mse, weight 0.5 |" in text and "| max_steps | 3 |" in text
    assert 'load_unit_selection("tiny-student")' in text  # no hub id yet: the model name stands in
    assert (
        "![Teacher unit scores, selected units highlighted; right: the scores sorted, the k-th marked](unit_scores.png)"
        in text
    )
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
    assert "| dolly | 0.21 | – | – |" in text and card.data.eval_results[0].metric_value == 0.21


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
    for name in (str(tmp_path), "./student", "/abs/path", "", None, "a/b/c"):
        assert not is_hub_id(name)
    assert data_label("../shared/data/dolly/train.jsonl") == "dolly/train.jsonl"
    assert data_label(str(tmp_path / "my_rows.jsonl")) == "my_rows.jsonl" and data_label("org/data") == "org/data"


# A selection as `train` stores it in config.json, with the fields the card reads (no trainer needed).
SELECTION = {
    "format_version": 1, "selection_method": "grad", "teacher_hidden_size": 8, "student_hidden_size": 4,
    "num_samples": 12, "num_tokens": 340, "seed": 0,
    "teacher": {"model_id": None, "revision": None, "local_name": "my-teacher"},
    "student": {"model_id": "org/student-init", "revision": "0123456789abcdef", "local_name": None},
    "data": {"name": "dolly/train.jsonl", "num_examples": 1461, "max_length": 128, "truncated": 31, "dropped": 7},
    "training": {"logit_loss": "jsd", "beta": 0.0, "lmbda": 0.0, "feature_loss_type": "correlation",
                 "feature_loss_weight": 1.0,
                 "hyperparameters": {"learning_rate": 5e-4, "max_steps": 100, "per_device_train_batch_size": 8,
                                     "gradient_accumulation_steps": 1, "max_length": 128, "seed": 0}},
    "layers": [{"student_layer": 3, "teacher_layer": 29, "indices": [0, 2, 5, 7]}],
}  # fmt: skip


def test_card_reads_every_recorded_field_from_the_selection():
    card = build_model_card(dict(SELECTION), repo_id="org/distilled")
    text = str(card)
    assert "not recorded" not in text and "None" not in text
    # A local teacher: a clearly local label, never a link, never in base_model; a Hub student: linked, with revision.
    assert "`my-teacher` (a local checkpoint, not on the Hub)" in text and "huggingface.co/my-teacher" not in text
    assert card.data.distillation["teacher_local_name"] == "my-teacher" and "teacher" not in card.data.distillation
    assert card.data.base_model == "org/student-init"
    assert "[org/student-init](https://huggingface.co/org/student-init) at revision `0123456789abcdef`" in text
    assert (
        "`dolly/train.jsonl` (a local file): 1,461 training examples, fitted to 128 tokens (31 completions "
        "truncated, 7 examples dropped)" in text
    )
    assert card.data.datasets is None  # a local file never reaches the YAML
    assert "beta=0, lmbda=0: off-policy" in text and "| Feature loss | correlation, weight 1 |" in text
    assert "| learning_rate | 0.0005 |" in text and "| max_steps | 100 |" in text and "| seed | 0 |" in text
    stored = load_unit_selection(SELECTION)
    assert missing_card_fields(stored) == []
    older = dataclasses.replace(stored, training={"logit_loss": "jsd"}, data={})
    assert missing_card_fields(older) == ["the training data", "the training hyperparameters"]


def test_hub_teacher_is_linked_with_its_revision():
    selection = dict(SELECTION, teacher={"model_id": "org/teacher", "revision": "abc123", "local_name": None})
    card = build_model_card(selection)
    assert (
        card.data.distillation["teacher"] == "org/teacher" and card.data.distillation["teacher_revision"] == "abc123"
    )
    assert "[org/teacher](https://huggingface.co/org/teacher) at revision `abc123`" in str(card)
    # A path stored by an older version is shown by its folder name only.
    old = dict(SELECTION, teacher={"model_id": "/home/me/models/teacher-sft", "revision": None})
    text = str(build_model_card(old))
    assert "/home/me" not in text and "`teacher-sft` (a local checkpoint, not on the Hub)" in text


def test_rouge_has_one_scale_and_one_rounding():
    """The x100 value of `hf-taskdistill eval` is shown, and stored in model-index, at two decimals; one seed: –."""
    results = {"protocol": {"seeds": [10]}, "sets": {"dolly": {"n": 30, "rougeL": {"mean": 18.83456, "std": None}},
                                                     "vicuna": {"n": 30, "rougeL": {"mean": 7.1, "std": 0.456}}}}  # fmt: skip
    card = build_model_card(dict(SELECTION), eval_results=results)
    text = str(card)
    assert "| dolly | 18.83 | – | 30 |" in text and "| vicuna | 7.10 | 0.46 | 30 |" in text
    values = {r.dataset_name: r.metric_value for r in card.data.eval_results}
    assert values == {"dolly": 18.83, "vicuna": 7.1} and "value: 18.83\n" in text
    assert all(r.metric_name == "ROUGE-L F1 (x100)" for r in card.data.eval_results)


REPORT = {"format_version": 1, "layer": 29, "criterion": "grad", "d_t": 8, "k": 4, "k_grid": [2, 4, 8],
          "nll": {"grad": [3.1, 2.5, 2.0], "random": [3.5, 3.0, 2.0]}, "full_teacher_nll": 2.0,
          "mean_floor_nll": 4.2, "num_examples": 64, "num_tokens": 2048, "pruned": None}  # fmt: skip


def test_selection_report_sentence_and_plot_link():
    sentence = selection_report_sentence(REPORT)
    assert sentence == report_sentence(REPORT)  # one wording: the card repeats what `select --report` prints
    assert sentence == (
        "Keeping 4 of 8 units of teacher layer 29 by `grad` leaves the held-out NLL at 2.500 nats/token; 4 random "
        "units give 3.000; the full teacher 2.000 (every unit at its mean: 4.200; 64 held-out examples, 2,048 tokens)."
    )
    # A k off the grid is described at the nearest grid point, with that point's own numbers.
    assert selection_report_sentence(REPORT, k=3) == report_sentence(REPORT, k=3)
    assert selection_report_sentence(REPORT, k=3).startswith("Keeping 2 of 8 units")
    assert "at 3.100 nats/token; 2 random units give 3.500" in selection_report_sentence({**REPORT, "k": 3})
    assert "Keeping 8 of 8 units" in selection_report_sentence(REPORT, k=8)
    text = str(build_model_card(dict(SELECTION), selection_report=REPORT, report_plot_file="selection_report.png"))
    assert sentence in text and "](selection_report.png)" in text


def test_selection_report_sentence_is_none_without_real_numbers():
    assert selection_report_sentence(None) is None and selection_report_sentence({}) is None
    assert selection_report_sentence({"format_version": 1}) is None
    assert selection_report_sentence({**REPORT, "nll": {"grad": [3.1, 2.5, 2.0]}}) is None  # no random curve
    assert selection_report_sentence({**REPORT, "nll": {**REPORT["nll"], "grad": [3.1, 2.5]}}) is None
    assert selection_report_sentence({**REPORT, "nll": {**REPORT["nll"], "grad": [3.1, float("nan"), 2.0]}}) is None
    assert selection_report_sentence({**REPORT, "full_teacher_nll": None}) is None
    assert selection_report_sentence({**REPORT, "k": "4"}) is None
    # A NaN away from the described k does not hide the sentence.
    assert selection_report_sentence({**REPORT, "nll": {**REPORT["nll"], "grad": [float("nan"), 2.5, 2.0]}})


def test_card_sentence_has_the_pruned_students_nll_before_and_after_recovery():
    pruned = {"hidden_size": 4, "criterion": "activation", "num_parameters": 1234, "nll_before": 4.567,
              "nll_after": 2.891, "recovery_steps": 50}  # fmt: skip
    report = {**REPORT, "nll": {**REPORT["nll"], "activation": [3.3, 2.7, 2.0]}, "pruned": pruned}
    sentence = selection_report_sentence(report)
    assert sentence == report_sentence(report)
    assert sentence.endswith(
        "the 4 most active 2.700; the full teacher 2.000 (every unit at its mean: 4.200; 64 held-out examples, "
        "2,048 tokens). The teacher cut to 4 units (`activation`) starts at 4.567 before training and reaches 2.891 "
        "after 50 distillation steps."
    )
    text = str(build_model_card(dict(SELECTION), selection_report=report))
    assert sentence in text and "None" not in text
    for number in ("2.500", "3.000", "2.700", "2.000", "4.200", "4.567", "2.891", "50 distillation steps"):
        assert number in text
    before_only = selection_report_sentence(
        {**report, "pruned": {**pruned, "nll_after": None, "recovery_steps": None}}
    )
    assert before_only.endswith("starts at 4.567 before training.") and "2.891" not in before_only
    # A malformed pruned block drops only the pruned student's part.
    broken = selection_report_sentence({**report, "pruned": {**pruned, "nll_before": "4.5"}})
    assert broken == report_sentence({**report, "pruned": None}) and "cut to" not in broken


def test_pruned_student_says_how_it_was_cut():
    init = {"criterion": "grad", "residual_indices": [0, 2, 5, 7], "mlp_indices": [[1, 2], [0, 3]],
            "intermediate_size": 2, "hidden_size": 4, "layers_kept": [0, 29],
            "teacher": {"model_id": "org/teacher", "revision": None, "local_name": None}}  # fmt: skip
    selection = load_unit_selection(dict(SELECTION, init=init))
    line = pruned_init_sentence(selection)
    assert line == (
        "The student was cut out of the teacher [org/teacher](https://huggingface.co/org/teacher) "
        "(`hf-taskdistill prune`): criterion `grad`, K = 4 of the teacher's 8 residual units, MLP width 2, 2 teacher "
        "layers kept (0, 29)."
    )
    assert line in str(build_model_card(selection)) and pruned_init_sentence(load_unit_selection(SELECTION)) is None


def test_unit_score_plot_has_the_cut_off_the_sample_count_and_a_sorted_view(tmp_path, monkeypatch):
    import matplotlib.figure
    import torch

    figures = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k))
    )
    selection = load_unit_selection(SELECTION)
    scores = [torch.tensor([0.9, 0.1, 0.8, 0.2, 0.15, 0.7, 0.05, 0.6])]
    assert plot_unit_scores(selection, scores, tmp_path / "p.png") == str(tmp_path / "p.png")
    [fig] = figures
    by_index, ranked = fig.axes
    legend = [t.get_text() for t in by_index.get_legend().get_texts()]
    assert "selected (k=4)" in legend and "cut-off: k-th score 0.6" in legend
    assert "over 12 scoring examples, 340 completion tokens" in fig.get_suptitle()
    line = ranked.get_lines()[0]
    assert list(line.get_ydata()) == sorted(scores[0].tolist(), reverse=True)
    assert "k = 4" in [t.get_text() for t in ranked.get_legend().get_texts()]


def test_plots_live_in_their_own_module_and_stay_importable_from_the_card():
    import subprocess
    import sys

    from hf_taskdistill import model_card, plots, report

    for name in ("PLOT_NAME", "load_scores", "plot_unit_scores", "plot_into"):
        assert getattr(model_card, name) is getattr(plots, name)
    assert report.plot_keep_k_curve is plots.plot_keep_k_curve
    code = "import sys, hf_taskdistill.plots; print(sorted(m for m in sys.modules if m.startswith('hf_taskdistill')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "hf_taskdistill.plots" in loaded
    assert "hf_taskdistill.model_card" not in loaded and "hf_taskdistill.trainer" not in loaded
