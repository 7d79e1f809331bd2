import json

import pytest
import torch
from torch.utils.data import DataLoader
from trl.experimental.utils import DataCollatorForChatML

from hf_taskdistill import SelectionFormatError, UnitSelection, load_unit_selection, select_task_units
from hf_taskdistill.selection import CONFIG_KEY, SIDECAR_NAME


def _batches(dataset, tokenizer, bs=4):
    return list(DataLoader(dataset, batch_size=bs, collate_fn=DataCollatorForChatML(tokenizer, max_length=64)))


def _plant(teacher, unit, gain=40.0):
    # the final norm scales last-layer unit `unit` before the LM head: the task loss now depends on it most
    with torch.no_grad():
        teacher.model.norm.weight[unit] = gain


@pytest.mark.parametrize("method", ["grad", "grad_x_act"])
def test_planted_relevant_unit_is_found(teacher, tokenizer, messages_dataset, method):
    _plant(teacher, 13)
    sel = select_task_units(teacher, _batches(messages_dataset, tokenizer), num_units=4, layer_pairs=[(1, 2)],
                            method=method, show_progress=False)  # fmt: skip
    layer = sel.layers[0]
    assert 13 in layer.indices
    assert layer.scores[layer.indices.index(13)] == max(layer.scores)
    assert sel.full_scores[0].argmax().item() == 13
    assert sel.num_tokens > 0 and sel.num_samples == len(messages_dataset)
    assert layer.indices == sorted(layer.indices)  # selection_order="index"


def test_order_by_score(teacher, tokenizer, messages_dataset):
    _plant(teacher, 5)
    sel = select_task_units(teacher, _batches(messages_dataset, tokenizer), 6, [(1, 2)], order="score",
                            show_progress=False)  # fmt: skip
    assert sel.layers[0].indices[0] == 5
    assert sel.layers[0].scores == sorted(sel.layers[0].scores, reverse=True)


def test_scoring_is_deterministic_and_leaves_teacher_untouched(teacher, tokenizer, messages_dataset):
    batches = _batches(messages_dataset, tokenizer)
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    a = select_task_units(teacher, batches, 8, [(0, 0), (1, 2)], show_progress=False)
    b = select_task_units(teacher, batches, 8, [(0, 0), (1, 2)], show_progress=False)
    assert [x.indices for x in a.layers] == [x.indices for x in b.layers]
    assert torch.equal(a.full_scores[1], b.full_scores[1])
    for n, p in teacher.named_parameters():
        assert p.grad is None and torch.equal(p, before[n])
    assert teacher.training  # mode restored
    assert set(a.diagnostics) >= {"scoring_seconds", "peak_memory_mb", "split_half_overlap", "selected_score_share"}
    assert 0.0 <= a.diagnostics["split_half_overlap"][0] <= 1.0


def test_scores_match_a_direct_autograd_reference(teacher, tokenizer, messages_dataset):
    """The leaf-at-the-tapped-layer trick gives the same |dL/dh| as differentiating from the embeddings."""
    batch = _batches(messages_dataset, tokenizer, bs=32)[0]
    sel = select_task_units(teacher, [batch], 32, [(1, 1)], show_progress=False)
    captured = {}
    handle = teacher.model.layers[1].register_forward_hook(
        lambda m, a, o: captured.setdefault("h", o[0] if isinstance(o, tuple) else o)
    )
    teacher.eval()
    embeds = teacher.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    logits = teacher(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), reduction="sum"
    )
    (grad,) = torch.autograd.grad(loss, captured["h"])
    handle.remove()
    mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
    mask[:, :-1] = batch["labels"][:, 1:] != -100
    expected = grad[mask].abs().mean(0)
    assert torch.allclose(sel.full_scores[0], expected, rtol=1e-4, atol=1e-6)


def test_random_selection_is_seeded(teacher, tokenizer, messages_dataset):
    batches = _batches(messages_dataset, tokenizer)
    a = select_task_units(teacher, batches, 8, [(1, 2)], method="random", seed=3, show_progress=False)
    b = select_task_units(teacher, None, 8, [(1, 2)], method="random", seed=3, show_progress=False)
    c = select_task_units(teacher, None, 8, [(1, 2)], method="random", seed=4, show_progress=False)
    assert a.layers[0].indices == b.layers[0].indices != c.layers[0].indices
    assert len(set(a.layers[0].indices)) == 8
    assert a.layers[0].teacher_std is not None and b.layers[0].teacher_std is None  # stats need data


def test_wider_student_than_teacher_is_an_actionable_error(teacher):
    with pytest.raises(ValueError, match="selection_num_units"):
        select_task_units(teacher, None, 64, [(1, 2)], method="random")


def test_no_completion_token_is_an_error(teacher, tokenizer, messages_dataset):
    batch = _batches(messages_dataset, tokenizer)[0]
    batch["labels"][:] = -100
    with pytest.raises(ValueError, match="no completion token"):
        select_task_units(teacher, [batch], 4, [(1, 2)], show_progress=False)


def test_round_trip_through_dict_config_and_files(teacher, tokenizer, messages_dataset, student, tmp_path):
    sel = select_task_units(teacher, _batches(messages_dataset, tokenizer), 16, [(1, 2)], show_progress=False)
    d = sel.to_dict()
    json.dumps(d)  # JSON-safe
    assert d["format_version"] == 1 and d["layers"][0]["indices"] == sel.layers[0].indices
    assert UnitSelection.from_dict(d) == sel
    sel.attach_to(student)
    student.save_pretrained(tmp_path / "m")
    from transformers import AutoConfig, AutoModelForCausalLM

    assert load_unit_selection(tmp_path / "m") == sel
    assert load_unit_selection(AutoConfig.from_pretrained(tmp_path / "m")) == sel
    assert load_unit_selection(AutoModelForCausalLM.from_pretrained(tmp_path / "m")) == sel
    assert load_unit_selection(str(tmp_path / "m" / "config.json")) == sel
    sel.save(tmp_path / "adapter")
    assert load_unit_selection(tmp_path / "adapter") == sel
    assert (tmp_path / "adapter" / "task_distill_scores.safetensors").is_file()


def _valid_dict():
    return {
        "format_version": 1, "selection_method": "grad", "teacher_hidden_size": 8, "student_hidden_size": 4,
        "layers": [{"student_layer": 1, "teacher_layer": 2, "indices": [0, 3, 5, 7]}],
    }  # fmt: skip


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.pop("format_version"), "format_version"),
        (lambda d: d.update(selection_method="magic"), "selection_method"),
        (lambda d: d["layers"][0].update(indices=[0, 3, 3, 7]), "indices"),
        (lambda d: d["layers"][0].update(indices=[0, 3, 5, 8]), "indices"),
        (lambda d: d["layers"][0].update(indices=[0, -1]), "indices"),
        (lambda d: d["layers"][0].update(indices=[0, 1, 2, 3, 4]), "indices"),
        (lambda d: d["layers"][0].update(indices=["a"]), "indices"),
        (lambda d: d["layers"][0].update(scores=[1.0]), "scores"),
        (lambda d: d["layers"][0].update(teacher_std=[1.0, 2.0, float("nan"), 1.0]), "teacher_std"),
        (lambda d: d["layers"][0].pop("teacher_layer"), "teacher_layer"),
        (lambda d: d.update(layers=[]), "layers"),
        (lambda d: d.update(teacher_hidden_size="8"), "teacher_hidden_size"),
    ],
)
def test_corrupt_selection_names_the_field(mutate, field):
    d = _valid_dict()
    mutate(d)
    with pytest.raises(SelectionFormatError, match=f"`[^`]*{field}`"):
        UnitSelection.from_dict(d)


def test_newer_format_version_asks_for_upgrade():
    d = _valid_dict()
    d["format_version"] = 99
    with pytest.raises(SelectionFormatError, match="Upgrade"):
        UnitSelection.from_dict(d)


def test_unknown_keys_warn_once(caplog):
    d = _valid_dict()
    d["from_the_future"] = 1
    with caplog.at_level("WARNING"):
        UnitSelection.from_dict(d)
    assert "from_the_future" in caplog.text


def test_missing_selection_is_a_clear_error(tmp_path, student):
    student.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=CONFIG_KEY):
        load_unit_selection(tmp_path / "plain")
    with pytest.raises(ValueError, match=SIDECAR_NAME):
        load_unit_selection(tmp_path)
