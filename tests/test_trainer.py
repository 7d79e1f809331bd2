import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from hf_taskdistill import FeatureDistillSFTTrainer, FeatureDistillTrainer, SelectionFormatError, load_unit_selection
from hf_taskdistill.toy import make_toy_examples, solve, tiny_llama, to_messages, to_prompt_completion

from .conftest import make_config


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_teacher_frozen(teacher, before):
    for n, p in teacher.named_parameters():
        assert p.grad is None, n
        assert torch.equal(p, before[n]), n


def _logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def test_gkd_off_policy_trains_student_only(student, teacher, tokenizer, messages_dataset, tmp_path):
    t_before, s_before = _snapshot(teacher), _snapshot(student)
    trainer = FeatureDistillTrainer(model=student, teacher_model=teacher, args=make_config(tmp_path),
                                    train_dataset=messages_dataset, processing_class=tokenizer)  # fmt: skip
    trainer.train()
    moved = [n for n, p in student.named_parameters() if not torch.equal(p, s_before[n])]
    assert len(moved) == len(s_before)
    _assert_teacher_frozen(teacher, t_before)
    for key in ("feature_loss", "feature_corr", "jsd_loss", "loss"):
        values = _logged(trainer, key)
        assert len(values) == 3 and all(v == v for v in values), key  # finite, one per step
    assert student.config.task_distill["layers"][0]["teacher_layer"] == 2  # last of 3
    assert student.config.task_distill["layers"][0]["student_layer"] == 1  # last of 2
    assert len(student.config.task_distill["layers"][0]["indices"]) == 16  # k = d_S
    training = student.config.task_distill["training"]
    assert training["logit_loss"] == "jsd" and training["beta"] == 0.5 and training["lmbda"] == 0.0
    assert training["feature_loss_type"] == "correlation" and training["feature_loss_weight"] == 1.0


def test_gkd_on_policy_generates_and_distils(student, teacher, tokenizer, messages_dataset, tmp_path, monkeypatch):
    calls = []
    original = FeatureDistillTrainer.generate_on_policy_outputs

    def counting(model, inputs, generation_config):
        calls.append(1)
        return original(model, inputs, generation_config)

    monkeypatch.setattr(FeatureDistillTrainer, "generate_on_policy_outputs", staticmethod(counting))
    args = make_config(tmp_path, lmbda=1.0, max_new_tokens=6, temperature=1.0, max_steps=2)
    trainer = FeatureDistillTrainer(model=student, teacher_model=teacher, args=args, train_dataset=messages_dataset,
                                    processing_class=tokenizer)  # fmt: skip
    s_before = _snapshot(student)
    trainer.train()
    assert len(calls) == 2
    assert all(v == v for v in _logged(trainer, "feature_loss"))
    assert any(not torch.equal(p, s_before[n]) for n, p in student.named_parameters())


def test_sft_host_trains_with_cross_entropy(student, teacher, tokenizer, prompt_completion_dataset, tmp_path):
    t_before, s_before = _snapshot(teacher), _snapshot(student)
    args = make_config(tmp_path, feature_loss_type="nmse", feature_layers=[0, 1, 1, 2])
    trainer = FeatureDistillSFTTrainer(model=student, teacher_model=teacher, args=args,
                                       train_dataset=prompt_completion_dataset, processing_class=tokenizer)  # fmt: skip
    trainer.train()
    assert all(not torch.equal(p, s_before[n]) for n, p in student.named_parameters())
    _assert_teacher_frozen(teacher, t_before)
    assert len(_logged(trainer, "ce_loss")) == 3 and len(_logged(trainer, "feature_loss")) == 3
    assert student.config.task_distill["training"]["logit_loss"] == "none"
    assert [(layer["student_layer"], layer["teacher_layer"]) for layer in student.config.task_distill["layers"]] == [
        (0, 1),
        (1, 2),
    ]


def test_sft_baseline_without_feature_term_runs_no_teacher(
    student, teacher, tokenizer, prompt_completion_dataset, tmp_path
):
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    args = make_config(tmp_path, feature_loss_weight=0.0)
    trainer = FeatureDistillSFTTrainer(model=student, teacher_model=teacher, args=args,
                                       train_dataset=prompt_completion_dataset, processing_class=tokenizer)  # fmt: skip
    trainer.train()
    assert calls == [] and trainer.unit_selection is None
    assert not hasattr(student.config, "task_distill")
    assert "feature_loss" not in trainer.state.log_history[0]


def _equal_length_rows(n=8):
    rows = make_toy_examples(64, seed=3, min_len=4, max_len=4)
    rows = [r for r in rows if r["instruction"].split()[2] in ("copy", "reverse", "sort")][:n]
    assert len(rows) == n and all(len(solve("copy", r["input"].split())) == 4 for r in rows)
    return rows


@pytest.mark.parametrize(("trainer_cls", "loss_type"), [(FeatureDistillTrainer, "mse"), (FeatureDistillSFTTrainer, "mse"),
                                                        (FeatureDistillTrainer, "correlation")])  # fmt: skip
def test_feature_term_is_gradient_accumulation_invariant(tokenizer, teacher, tmp_path, trainer_cls, loss_type):
    """One step of batch 8 x GA 1 and of batch 4 x GA 2 (plain SGD) move the student the same way."""
    rows = _equal_length_rows()
    convert = to_messages if trainer_cls is FeatureDistillTrainer else to_prompt_completion
    dataset = Dataset.from_list([convert(r) for r in rows])
    results = []
    for bs, ga in ((8, 1), (4, 2)):
        student = tiny_llama(len(tokenizer), 16, 2, seed=2)
        args = make_config(tmp_path / f"{bs}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=1,
                           optim="sgd", learning_rate=1.0, feature_loss_type=loss_type, feature_loss_weight=5.0,
                           selection_num_samples=8, lr_scheduler_type="constant", max_grad_norm=0.0)  # fmt: skip
        trainer = trainer_cls(
            model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
        )
        before = _snapshot(student)
        trainer.train()
        results.append({n: p.detach() - before[n] for n, p in student.named_parameters()})
    tol = 1e-5 if loss_type == "mse" else 0.25
    num = sum((results[0][n] - results[1][n]).norm() ** 2 for n in results[0]) ** 0.5
    den = sum(results[0][n].norm() ** 2 for n in results[0]) ** 0.5
    print("GA relative difference", loss_type, float(num / den))
    assert den > 0 and (num / den) < tol, float(num / den)


def test_save_load_round_trip_and_reuse(student, teacher, tokenizer, messages_dataset, tmp_path, monkeypatch):
    trainer = FeatureDistillTrainer(model=student, teacher_model=teacher, args=make_config(tmp_path, max_steps=1),
                                    train_dataset=messages_dataset, processing_class=tokenizer)  # fmt: skip
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    with open(out / "config.json") as f:
        stored = json.load(f)["task_distill"]
    assert stored["format_version"] == 1
    assert stored["layers"][0]["indices"] == trainer.unit_selection.layers[0].indices
    assert (out / "task_distill_scores.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert load_unit_selection(reloaded) == trainer.unit_selection

    # a stored selection is reused: no scoring pass
    import hf_taskdistill.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "select_task_units", lambda *a, **k: pytest.fail("re-scored"))
    args = make_config(tmp_path / "again", max_steps=1, selection_path=str(out))
    again = FeatureDistillTrainer(model=tiny_llama(len(tokenizer), 16, 2, seed=5), teacher_model=teacher, args=args,
                                  train_dataset=messages_dataset, processing_class=tokenizer)  # fmt: skip
    assert again.unit_selection == trainer.unit_selection
    again.train()


def test_random_units_baseline_records_method(student, teacher, tokenizer, messages_dataset, tmp_path):
    args = make_config(tmp_path, max_steps=1, selection_method="random", selection_seed=11)
    trainer = FeatureDistillTrainer(model=student, teacher_model=teacher, args=args, train_dataset=messages_dataset,
                                    processing_class=tokenizer)  # fmt: skip
    trainer.train()
    assert student.config.task_distill["selection_method"] == "random"
    assert student.config.task_distill["seed"] == 11


def test_projector_baseline_trains_saves_apart_and_resumes(student, teacher, tokenizer, messages_dataset, tmp_path):
    args = make_config(tmp_path, feature_projector=True, feature_loss_type="mse", save_strategy="steps", save_steps=2,
                       max_steps=2)  # fmt: skip
    trainer = FeatureDistillTrainer(model=student, teacher_model=teacher, args=args, train_dataset=messages_dataset,
                                    processing_class=tokenizer)  # fmt: skip
    proj = student.fd_proj["0"].weight
    assert proj.shape == (32, 16)
    before = proj.detach().clone()
    trainer.train()
    assert not torch.equal(proj, before)  # trained with the student
    assert any(p is proj for g in trainer.optimizer.param_groups for p in g["params"])
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert (ckpt / "_feature_projector.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(ckpt / "model.safetensors", "pt") as f:
        assert not any(k.startswith("fd_proj") for k in f.keys())
    assert load_unit_selection(ckpt).selection_method == "projector"
    reloaded = AutoModelForCausalLM.from_pretrained(ckpt)  # no unexpected-key trouble
    assert not hasattr(reloaded, "fd_proj")

    # resume: the projector comes back from the checkpoint
    args2 = make_config(tmp_path, feature_projector=True, feature_loss_type="mse", max_steps=3)
    resumed = FeatureDistillTrainer(model=tiny_llama(len(tokenizer), 16, 2, seed=9), teacher_model=teacher, args=args2,
                                    train_dataset=messages_dataset, processing_class=tokenizer)  # fmt: skip
    loaded = {}
    original = resumed._load_from_checkpoint

    def spy(path, model=None):
        original(path, model)
        loaded["w"] = resumed.model.fd_proj["0"].weight.detach().clone()

    resumed._load_from_checkpoint = spy
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert torch.allclose(loaded["w"], proj.detach())


def test_lora_student_keeps_indices(student, teacher, tokenizer, messages_dataset, tmp_path):
    from peft import AutoPeftModelForCausalLM, LoraConfig

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = FeatureDistillTrainer(model=student, teacher_model=teacher, args=make_config(tmp_path, max_steps=2),
                                    train_dataset=messages_dataset, processing_class=tokenizer, peft_config=peft_config)  # fmt: skip
    trainer.train()
    selection = trainer.unit_selection
    adapter_dir = tmp_path / "adapter"
    trainer.save_model(str(adapter_dir))
    assert (adapter_dir / "adapter_config.json").is_file() and not (adapter_dir / "config.json").exists()
    assert load_unit_selection(adapter_dir) == selection  # the sidecar travels with the adapter
    merged = trainer.model.merge_and_unload()
    assert load_unit_selection(merged) == selection
    merged.save_pretrained(tmp_path / "merged")
    assert load_unit_selection(tmp_path / "merged") == selection
    # the base model is saved first so the adapter can be reloaded offline
    student.save_pretrained(tmp_path / "base")
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "base")
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))
    assert isinstance(AutoPeftModelForCausalLM.from_pretrained(adapter_dir), torch.nn.Module)


# ----- bad input: clear errors before any training step -----
def _make(trainer_cls, student, teacher, tokenizer, dataset, tmp_path, **cfg):
    return trainer_cls(model=student, teacher_model=teacher, args=make_config(tmp_path, **cfg), train_dataset=dataset,
                       processing_class=tokenizer)  # fmt: skip


@pytest.mark.parametrize("trainer_cls", [FeatureDistillTrainer, FeatureDistillSFTTrainer])
def test_vocab_mismatch(trainer_cls, teacher, tokenizer, messages_dataset, tmp_path):
    other = tiny_llama(len(tokenizer) + 3, 16, 2)
    with pytest.raises(ValueError, match="Vocabulary mismatch.*shared tokenizer"):
        _make(trainer_cls, other, teacher, tokenizer, messages_dataset, tmp_path)


def test_student_wider_than_teacher(teacher, tokenizer, messages_dataset, tmp_path):
    wide = tiny_llama(len(tokenizer), 64, 2)
    with pytest.raises(ValueError, match="wider than the teacher.*selection_num_units"):
        _make(FeatureDistillTrainer, wide, teacher, tokenizer, messages_dataset, tmp_path)
    # the documented way out: match only k <= d_T units
    trainer = _make(FeatureDistillTrainer, wide, teacher, tokenizer, messages_dataset, tmp_path, selection_num_units=32,
                    max_steps=1)  # fmt: skip
    trainer.train()
    assert len(trainer.unit_selection.layers[0].indices) == 32


@pytest.mark.parametrize("layers", [[2, -1], [-1, 3], [0, -4]])
def test_layer_index_out_of_range(student, teacher, tokenizer, messages_dataset, tmp_path, layers):
    with pytest.raises(ValueError, match="layer index .* out of range"):
        _make(FeatureDistillTrainer, student, teacher, tokenizer, messages_dataset, tmp_path, feature_layers=layers)


def test_missing_dataset_columns(student, teacher, tokenizer, prompt_completion_dataset, tmp_path):
    with pytest.raises(ValueError, match="messages.*load_task_dataset"):
        _make(FeatureDistillTrainer, student, teacher, tokenizer, prompt_completion_dataset, tmp_path)
    with pytest.raises(ValueError, match="prompt\\+completion or messages"):
        _make(FeatureDistillSFTTrainer, student, teacher, tokenizer, Dataset.from_list([{"question": "a"}]), tmp_path)


def test_corrupt_stored_indices(student, teacher, tokenizer, messages_dataset, tmp_path):
    bad = {"format_version": 1, "selection_method": "grad", "teacher_hidden_size": 32, "student_hidden_size": 16,
           "layers": [{"student_layer": 1, "teacher_layer": 2, "indices": [1, 1, 2]}]}  # fmt: skip
    path = tmp_path / "task_distill.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(SelectionFormatError, match="layers\\[0\\].indices.*duplicate"):
        _make(FeatureDistillTrainer, student, teacher, tokenizer, messages_dataset, tmp_path, selection_path=str(path))


def test_stored_selection_for_another_teacher(student, teacher, tokenizer, messages_dataset, tmp_path):
    other = {"format_version": 1, "selection_method": "grad", "teacher_hidden_size": 64, "student_hidden_size": 16,
             "layers": [{"student_layer": 1, "teacher_layer": 2, "indices": list(range(16))}]}  # fmt: skip
    path = tmp_path / "task_distill.json"
    path.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="hidden size 64.*Re-run the selection"):
        _make(FeatureDistillTrainer, student, teacher, tokenizer, messages_dataset, tmp_path, selection_path=str(path))


def test_wrong_host_for_logit_loss(student, teacher, tokenizer, messages_dataset, tmp_path):
    with pytest.raises(ValueError, match="use FeatureDistillSFTTrainer"):
        _make(FeatureDistillTrainer, student, teacher, tokenizer, messages_dataset, tmp_path, logit_loss="none")


def test_local_teacher_path_is_stored_by_folder_name_only(student, teacher, tokenizer, messages_dataset, tmp_path):
    teacher.save_pretrained(tmp_path / "private" / "my-teacher")
    args = make_config(tmp_path, max_steps=1, teacher_model_init_kwargs={"dtype": "float32"})
    trainer = FeatureDistillTrainer(model=student, teacher_model=str(tmp_path / "private" / "my-teacher"), args=args,
                                    train_dataset=messages_dataset, processing_class=tokenizer)  # fmt: skip
    # A local folder is a local label, never a Hub id (no link to a repo that does not exist) and never a path.
    assert trainer.unit_selection.teacher == {"model_id": None, "revision": None, "local_name": "my-teacher"}
    assert str(tmp_path) not in json.dumps(student.config.task_distill)


@pytest.mark.parametrize("trainer_cls", [FeatureDistillTrainer, FeatureDistillSFTTrainer])
def test_feature_path_adds_no_host_sync(trainer_cls, student, teacher, tokenizer, messages_dataset,
                                        prompt_completion_dataset, tmp_path, monkeypatch):  # fmt: skip
    """Our additions to each step (feature term, host-loss logging) queue tensors and never wait for the device;
    the queued values reach the logs as plain floats at logging time."""
    from .sync_ops import HostSyncRecorder

    dataset = messages_dataset if trainer_cls is FeatureDistillTrainer else prompt_completion_dataset
    trainer = trainer_cls(model=student, teacher_model=teacher, args=make_config(tmp_path, max_steps=2, logging_steps=2),
                          train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    syncs = []
    for name in ("_feature_term", "_log_host"):
        original = getattr(trainer, name)

        def recorded(*args, _original=original, **kwargs):
            with HostSyncRecorder() as rec:
                result = _original(*args, **kwargs)
            syncs.extend(rec.syncs)
            return result

        monkeypatch.setattr(trainer, name, recorded)
    trainer.train()
    assert syncs == []
    host = "jsd_loss" if trainer_cls is FeatureDistillTrainer else "ce_loss"
    for key in ("feature_loss", "feature_corr", host):
        (value,) = _logged(trainer, key)
        assert type(value) is float and value == value, key


# ----- a user's first hour: provenance, conflicts with a stored selection, missing paths -----
def test_reused_selection_keeps_scores_and_records_provenance(student, teacher, tokenizer, messages_dataset,
                                                               tmp_path):  # fmt: skip
    from hf_taskdistill.selection import SCORES_NAME

    first = FeatureDistillTrainer(model=student, teacher_model=teacher, args=make_config(tmp_path, max_steps=1),
                                  train_dataset=messages_dataset, processing_class=tokenizer, dataset_name="toy/ops")  # fmt: skip
    first.train()
    first.save_model(str(tmp_path / "first"))
    assert (tmp_path / "first" / SCORES_NAME).is_file()
    stored = load_unit_selection(str(tmp_path / "first"))
    assert stored.full_scores is not None and stored.full_scores[0].shape == (32,)
    assert stored.data["name"] == "toy/ops" and stored.data["num_examples"] == len(messages_dataset)
    hyper = stored.training["hyperparameters"]
    assert hyper["learning_rate"] == 1e-2 and hyper["max_steps"] == 1 and hyper["per_device_train_batch_size"] == 4

    (tmp_path / "first" / "selection_report.json").write_text('{"format_version": 1}')  # as `select --report`
    fresh = tiny_llama(len(tokenizer), hidden_size=16, num_layers=2, seed=3)
    args = make_config(tmp_path / "b", max_steps=1, selection_path=str(tmp_path / "first"))
    second = FeatureDistillTrainer(model=fresh, teacher_model=teacher, args=args, train_dataset=messages_dataset,
                                   processing_class=tokenizer)  # fmt: skip
    second.save_model(str(tmp_path / "second"))
    again = load_unit_selection(str(tmp_path / "second"))
    assert torch.equal(again.full_scores[0], stored.full_scores[0])  # the card's plot survives the reuse
    assert (tmp_path / "second" / "selection_report.json").read_text() == '{"format_version": 1}'  # and the report
    assert again.layers[0].indices == stored.layers[0].indices


def test_stored_selection_conflicts_name_both_values(student, teacher, tokenizer, messages_dataset, tmp_path):
    first = FeatureDistillTrainer(model=student, teacher_model=teacher, args=make_config(tmp_path, max_steps=1),
                                  train_dataset=messages_dataset, processing_class=tokenizer)  # fmt: skip
    first.save_model(str(tmp_path / "sel"))  # layer pair (1, 2), k = 16
    sel = str(tmp_path / "sel")

    def make(model, **kw):
        return FeatureDistillTrainer(model=model, teacher_model=teacher, args=make_config(tmp_path / "x", **kw),
                                     train_dataset=messages_dataset, processing_class=tokenizer)  # fmt: skip

    with pytest.raises(ValueError, match=r"\[\(0, 1\)\].*stored selection was made for \[\(1, 2\)\]"):
        make(tiny_llama(len(tokenizer), hidden_size=16, num_layers=2, seed=3), selection_path=sel,
             feature_layers=[0, 1])  # fmt: skip
    wider = tiny_llama(len(tokenizer), hidden_size=24, num_layers=2, seed=3)
    with pytest.raises(ValueError, match=r"k=16 units, but the student's hidden size is 24.*selection_num_units=16"):
        make(wider, selection_path=sel)
    with pytest.raises(ValueError, match=r"selection_num_units=8, but the stored selection holds k=16"):
        make(
            tiny_llama(len(tokenizer), hidden_size=16, num_layers=2, seed=3), selection_path=sel, selection_num_units=8
        )
    # The documented way out: match only the first k units of the wider student; the record says 24.
    ok = make(tiny_llama(len(tokenizer), hidden_size=24, num_layers=2, seed=3), selection_path=sel,
              selection_num_units=16)  # fmt: skip
    assert ok.unit_selection.k == 16 and ok.unit_selection.student_hidden_size == 24


@pytest.mark.parametrize("who", ["teacher", "student"])
def test_missing_local_model_path_is_named(who, student, teacher, tokenizer, messages_dataset, tmp_path):
    missing = str(tmp_path / "no-such-dir" / "model")
    models = {"model": student, "teacher_model": teacher}
    models["teacher_model" if who == "teacher" else "model"] = missing
    with pytest.raises(FileNotFoundError, match=f"{who} '{missing}' is not an existing local directory"):
        FeatureDistillTrainer(**models, args=make_config(tmp_path), train_dataset=messages_dataset,
                              processing_class=tokenizer)  # fmt: skip
    # A relative path that looks like a Hub id ("local/teacher") is read as one; offline, the error says so.
    models["teacher_model" if who == "teacher" else "model"] = "local-missing/teacher"
    with pytest.raises(OSError, match=r"'local-missing/teacher', read as a Hub repo id \(HF_HUB_OFFLINE is set"):
        FeatureDistillTrainer(**models, args=make_config(tmp_path), train_dataset=messages_dataset,
                              processing_class=tokenizer)  # fmt: skip
