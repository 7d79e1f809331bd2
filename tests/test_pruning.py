"""`hf_taskdistill.pruning` and `hf-taskdistill prune` on tiny Llama / Qwen2 / Mistral models built from configs."""

import json
import pathlib

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, MistralConfig, Qwen2Config

from hf_taskdistill import pruning
from hf_taskdistill.pruning import (
    CRITERIA,
    aggregate_scores,
    check_prune_request,
    norm_rescale_factors,
    prune_teacher,
    save_pruned,
    score_residual_units,
)
from hf_taskdistill.selection import load_unit_selection

from .conftest import make_config


VOCAB = 48


def _tiny(cls, tie=True, hidden=32, layers=3, seed=0):
    config = cls(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie,
                 max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3)  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():  # non-trivial norm weights, so a wrong slice or scale shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def _batches(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, VOCAB, (2, 12), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # left padding
        labels = ids.clone()
        labels[:, :5] = -100
        labels[mask == 0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


ARCHS = [(LlamaConfig, True), (LlamaConfig, False), (Qwen2Config, True), (Qwen2Config, False), (MistralConfig, False)]


@pytest.mark.parametrize("cls, tie", ARCHS, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("criterion", ["grad", "activation"])
def test_full_size_cut_is_exact(cls, tie, criterion):
    teacher = _tiny(cls, tie)
    batches = _batches()
    result = prune_teacher(teacher, batches, hidden_size=32, criterion=criterion)
    assert type(result.model) is type(teacher)
    assert result.init["residual_indices"] == list(range(32)) and result.init["layers_kept"] == [0, 1, 2]
    assert result.num_parameters == sum(p.numel() for p in teacher.parameters())
    for batch in batches:
        torch.testing.assert_close(_logits(result.model, batch), _logits(teacher, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls, tie, k", [(LlamaConfig, True, 24), (Qwen2Config, False, 20), (MistralConfig, True, 28)])
def test_narrow_cut_keeps_teacher_slices(cls, tie, k):
    teacher = _tiny(cls, tie)
    result = prune_teacher(teacher, _batches(), hidden_size=k, intermediate_size=20, criterion="grad_x_act",
                           norm_rescale="none")  # fmt: skip
    s, init = result.model, result.init
    res = torch.tensor(init["residual_indices"])
    assert len(res) == k and res.tolist() == sorted(res.tolist()) and len(set(res.tolist())) == k
    assert s.config.hidden_size == k and s.config.intermediate_size == 20 and s.config.head_dim == 8
    assert s.config.num_attention_heads == 4 and s.config.num_key_value_heads == 2
    T, S = teacher.model, s.model
    torch.testing.assert_close(S.embed_tokens.weight, T.embed_tokens.weight[:, res], rtol=0, atol=0)
    torch.testing.assert_close(s.lm_head.weight, teacher.lm_head.weight[:, res], rtol=0, atol=0)
    torch.testing.assert_close(S.norm.weight, T.norm.weight[res], rtol=0, atol=0)
    for i in range(3):
        ta, sa = T.layers[i], S.layers[i]
        mi = torch.tensor(init["mlp_indices"][i])
        assert mi.tolist() == sorted(mi.tolist()) and len(mi) == 20
        torch.testing.assert_close(sa.self_attn.q_proj.weight, ta.self_attn.q_proj.weight[:, res], rtol=0, atol=0)
        torch.testing.assert_close(sa.self_attn.v_proj.weight, ta.self_attn.v_proj.weight[:, res], rtol=0, atol=0)
        torch.testing.assert_close(sa.self_attn.o_proj.weight, ta.self_attn.o_proj.weight[res], rtol=0, atol=0)
        torch.testing.assert_close(sa.mlp.up_proj.weight, ta.mlp.up_proj.weight[mi][:, res], rtol=0, atol=0)
        torch.testing.assert_close(sa.mlp.down_proj.weight, ta.mlp.down_proj.weight[res][:, mi], rtol=0, atol=0)
        torch.testing.assert_close(sa.input_layernorm.weight, ta.input_layernorm.weight[res], rtol=0, atol=0)
        if cls is Qwen2Config:  # q/k/v biases belong to the (whole) heads
            torch.testing.assert_close(sa.self_attn.k_proj.bias, ta.self_attn.k_proj.bias, rtol=0, atol=0)
    assert (s.lm_head.weight.data_ptr() == S.embed_tokens.weight.data_ptr()) == tie
    # the count the CLI prints, from the architecture's formula
    heads = 4 * 8 + 2 * 2 * 8
    expected = VOCAB * k * (1 if tie else 2) + k + 3 * (2 * k + k * heads + 32 * k + 3 * k * 20)
    if cls is Qwen2Config:
        expected += 3 * heads
    assert result.num_parameters == expected == sum(p.numel() for p in s.parameters())


def test_norm_rescale_matches_the_kept_rms():
    act_sq = torch.tensor([[1.0, 4.0, 9.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    scales = norm_rescale_factors(act_sq, [1, 2])
    torch.testing.assert_close(scales, torch.tensor([(6.5 / 4.0) ** 0.5, 1.0], dtype=torch.float64))
    teacher = _tiny(LlamaConfig)
    result = prune_teacher(teacher, _batches(), hidden_size=16, criterion="activation", norm_rescale="rms")
    res = torch.tensor(result.init["residual_indices"])
    scale = result.init["norm_scales"][0]  # layer 0's input_layernorm
    assert scale != 1.0
    torch.testing.assert_close(result.model.model.layers[0].input_layernorm.weight,
                               teacher.model.layers[0].input_layernorm.weight[res] * scale)  # fmt: skip


def test_rms_rescale_brings_the_cut_closer_to_the_teacher():
    teacher, batches = _tiny(LlamaConfig, hidden=64, seed=3), _batches(4)
    errors = {}
    for rescale in ("none", "rms"):
        student = prune_teacher(teacher, batches, hidden_size=32, criterion="random", norm_rescale=rescale).model
        errors[rescale] = sum(float((_logits(student, b) - _logits(teacher, b)).pow(2).mean()) for b in batches)
    assert errors["rms"] < errors["none"]


@pytest.mark.parametrize("cls", [LlamaConfig, Qwen2Config])
def test_least_squares_norm_scales(cls):
    teacher, batches = _tiny(cls, hidden=64, seed=4), _batches(2)
    full = prune_teacher(teacher, batches, hidden_size=64, criterion="activation", norm_rescale="lsq")
    torch.testing.assert_close(torch.tensor(full.init["norm_scales"]), torch.ones(7), atol=1e-5, rtol=0)
    for b in batches:
        torch.testing.assert_close(_logits(full.model, b), _logits(teacher, b), atol=1e-5, rtol=1e-5)
    # K < d: the factor minimises the readers' squared error, so nudging it either way makes the error larger
    indices = prune_teacher(teacher, batches, hidden_size=32, criterion="activation", norm_rescale="none").init[
        "residual_indices"
    ]
    c = pruning.least_squares_norm_scales(teacher, batches, indices)
    idx = torch.tensor(indices)
    caught = []
    handle = teacher.model.norm.register_forward_hook(lambda m, a, o: caught.append((a[0], o)))
    for b in batches:
        _logits(teacher, b)
    handle.remove()

    def error(scale):
        total = 0.0
        for x, y in caught:
            xs = x[..., idx]
            y_cut = teacher.model.norm.weight[idx] * xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + 1e-6)
            w = teacher.lm_head.weight
            total += float((y @ w.T - scale * y_cut @ w[:, idx].T).pow(2).sum())
        return total

    best = float(c[-1])
    assert error(best) < error(best * 1.05) and error(best) < error(best * 0.95)


def test_aggregations():
    per = torch.tensor([[1.0, 3.0, 0.0], [10.0, 0.0, 10.0]])
    torch.testing.assert_close(aggregate_scores(per, "sum"), torch.tensor([11.0, 3.0, 10.0], dtype=torch.float64))
    torch.testing.assert_close(aggregate_scores(per, "sum_normalized"),
                               torch.tensor([0.75, 0.75, 0.5], dtype=torch.float64))  # fmt: skip
    torch.testing.assert_close(aggregate_scores(per, "max_normalized"),
                               torch.tensor([0.5, 0.75, 0.5], dtype=torch.float64))  # fmt: skip
    torch.testing.assert_close(aggregate_scores(per, "last"), per[1].double())
    # defaults as benchmarked: Minitron's plain sum for magnitude, per-norm-normalised sums for gradient scores
    assert pruning.default_aggregation("activation") == "sum" == pruning.default_aggregation("random")
    assert pruning.default_aggregation("fisher") == "sum_normalized" == pruning.default_aggregation("grad_x_act")
    result = prune_teacher(_tiny(LlamaConfig), _batches(1), hidden_size=16)
    assert result.init["criterion"] == pruning.DEFAULT_CRITERION and result.init["norm_rescale"] == "rms"
    assert result.init["aggregation"] == pruning.default_aggregation(pruning.DEFAULT_CRITERION)


def test_scores_shapes_and_activation_is_minitron():
    teacher, batches = _tiny(LlamaConfig), _batches()
    for criterion in CRITERIA:
        scores = score_residual_units(teacher, batches, criterion=criterion, aggregation="sum_normalized")
        assert scores.per_layer.shape == (7, 32) and scores.aggregated.shape == (32,)
        assert scores.mlp.shape == (3, 48) and torch.isfinite(scores.per_layer).all()
        assert (scores.aggregated > 0).all()
    # The final norm's output is the last hidden state: mean |y| over each sequence, L2 over examples.
    act = score_residual_units(teacher, batches, criterion="activation")
    per_example = []
    for b in batches:
        with torch.no_grad():
            y = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        output_hidden_states=True).hidden_states[-1]  # fmt: skip
        w = b["attention_mask"].double()
        per_example.append((w[..., None] * y.double().abs()).sum(1) / w.sum(1, keepdim=True))
    torch.testing.assert_close(act.last_layer, torch.cat(per_example).pow(2).sum(0).sqrt(), rtol=1e-5, atol=1e-6)
    a = score_residual_units(teacher, batches, criterion="random", seed=1).aggregated
    b = score_residual_units(teacher, batches, criterion="random", seed=1).aggregated
    assert torch.equal(a, b) and not torch.equal(
        a, score_residual_units(teacher, batches, "random", seed=2).aggregated
    )


def test_grad_scores_leave_the_teacher_untouched():
    teacher = _tiny(LlamaConfig)
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    score_residual_units(teacher, _batches(), criterion="fisher")
    assert all(p.grad is None and torch.equal(p, before[n]) for n, p in teacher.named_parameters())


def test_depth_keeps_the_most_important_layers_in_order():
    teacher = _tiny(LlamaConfig, layers=4)
    result = prune_teacher(teacher, _batches(), hidden_size=32, num_layers=2, criterion="grad")
    kept = result.init["layers_kept"]
    assert len(kept) == 2 and kept == sorted(kept) and result.model.config.num_hidden_layers == 2
    for s, t in enumerate(kept):
        torch.testing.assert_close(result.model.model.layers[s].mlp.gate_proj.weight,
                                   teacher.model.layers[t].mlp.gate_proj.weight, rtol=0, atol=0)  # fmt: skip
    assert result.selection.layers[0].student_layer == 1 and result.selection.layers[0].teacher_layer == 3


def _no_scoring(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("scored before validating")

    monkeypatch.setattr(pruning, "collect_unit_statistics", fail)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden_size": 33}, "larger than the teacher's"),
        ({"hidden_size": 30}, r"Nearest valid sizes: \[24, 28, 32\]"),
        ({"hidden_size": 32, "num_layers": 4}, "the teacher has 3 layers"),
        ({"hidden_size": 32, "intermediate_size": 49}, "intermediate_size must be in 1..48"),
        ({"hidden_size": 32, "criterion": "magnitude"}, "criterion must be one of"),
        ({"hidden_size": 0}, "hidden_size must be >= 1"),
    ],
)
def test_bad_requests_fail_before_scoring(monkeypatch, kwargs, match):
    _no_scoring(monkeypatch)
    with pytest.raises(ValueError, match=match):
        prune_teacher(_tiny(LlamaConfig), _batches(), **kwargs)


def test_qwen2_and_mistral_accept_any_width_with_explicit_head_dim():
    for cls in (Qwen2Config, MistralConfig):
        config = check_prune_request(_tiny(cls).config, 30)
        assert config.hidden_size == 30 and config.head_dim == 8


def test_empty_scoring_set_and_unsupported_architecture(monkeypatch):
    _no_scoring(monkeypatch)
    with pytest.raises(ValueError, match="scoring set is empty"):
        prune_teacher(_tiny(LlamaConfig), [], hidden_size=16)
    masked = [{**b, "labels": torch.full_like(b["labels"], -100)} for b in _batches(1)]
    with pytest.raises(ValueError, match="no completion token"):
        prune_teacher(_tiny(LlamaConfig), masked, hidden_size=16)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4))
    with pytest.raises(ValueError, match="supports LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM"):
        prune_teacher(gpt2, _batches(), hidden_size=16)


@pytest.fixture
def pruned_dir(tmp_path, tokenizer):
    from hf_taskdistill.toy import tiny_llama

    teacher = tiny_llama(len(tokenizer), hidden_size=32, num_layers=3, seed=1)
    teacher.config._name_or_path = str(tmp_path / "my-teacher")  # a local path: must never be written
    ids = tokenizer(["user please do copy : the list a b c assistant a b c"], return_tensors="pt")["input_ids"]
    labels = ids.clone()
    labels[:, :9] = -100
    result = prune_teacher(teacher, [{"input_ids": ids, "labels": labels}], hidden_size=16, criterion="grad")
    out = tmp_path / "pruned"
    save_pruned(result, out, tokenizer=tokenizer)
    return teacher, result, out, ids


def test_saved_student_reloads_with_its_selection(pruned_dir):
    _, result, out, ids = pruned_dir
    text = (out / "config.json").read_text()
    assert str(out.parent) not in text and "my-teacher" in text  # the folder name, never the path
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits)
    selection = load_unit_selection(out)
    assert selection.layers[0].indices == result.init["residual_indices"]
    assert selection.layers[0].student_layer == 2 and selection.layers[0].teacher_layer == 2
    assert selection.selection_method == "grad" and selection.student_hidden_size == 16
    assert selection.init["teacher"] == {"model_id": None, "revision": None, "local_name": "my-teacher"}
    assert selection.init["num_parameters"] == sum(p.numel() for p in reloaded.parameters())
    assert len(selection.layers[0].teacher_std) == 16
    assert (out / "tokenizer.json").is_file() and "Pruned student" in (out / "README.md").read_text()


def test_pruned_student_trains_with_its_indices(pruned_dir, tokenizer, messages_dataset, tmp_path, monkeypatch):
    import hf_taskdistill.trainer as trainer_module
    from hf_taskdistill import FeatureDistillTrainer

    teacher, result, out, _ = pruned_dir
    monkeypatch.setattr(trainer_module, "select_task_units", lambda *a, **k: pytest.fail("re-scored"))
    trainer = FeatureDistillTrainer(model=str(out), teacher_model=teacher, args=make_config(tmp_path, max_steps=2),
                                    train_dataset=messages_dataset, processing_class=tokenizer,
                                    unit_selection=str(out))  # fmt: skip
    assert trainer.unit_selection.layers[0].indices == result.init["residual_indices"]
    trainer.train()
    losses = [h["feature_loss"] for h in trainer.state.log_history if "feature_loss" in h]
    assert len(losses) == 2 and all(v == v for v in losses)


def test_cli_prune_end_to_end(tmp_path, tokenizer, capsys):
    from hf_taskdistill.cli import main
    from hf_taskdistill.toy import make_toy_examples, tiny_llama

    teacher_dir = tmp_path / "teacher"
    tiny_llama(len(tokenizer), hidden_size=32, num_layers=3, seed=1, num_attention_heads=4).save_pretrained(
        teacher_dir
    )
    tokenizer.save_pretrained(teacher_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_toy_examples(12, seed=0)))
    out = tmp_path / "student"
    argv = ["prune", "--teacher_model_name_or_path", str(teacher_dir), "--train_file", str(data),
            "--hidden_size", "16", "--intermediate_size", "40", "--num_layers", "2", "--criterion", "fisher",
            "--selection_num_samples", "8", "--per_device_train_batch_size", "4", "--max_length", "64",
            "--output_dir", str(out), "--use_cpu", "true", "--report_to", "none"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    assert f"{n} parameters" in printed
    init = json.loads(pathlib.Path(out / "config.json").read_text())["task_distill"]["init"]
    assert init["criterion"] == "fisher" and init["num_samples"] == 8 and len(init["layers_kept"]) == 2
    assert init["mlp_criterion"] == "fisher" and "(MLP" not in printed
    assert model.config.hidden_size == 16 and model.config.intermediate_size == 40 and model.config.head_dim == 8
    # reported in one line (status 2) before any weight or data is loaded
    assert main(argv[:-6] + ["--hidden_size", "18", "--output_dir", str(tmp_path / "bad")]) == 2
    assert "Nearest valid sizes: [12, 16, 20, 24]" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    # a task-scored stream with activation-scored MLP neurons (and the least-squares norm scales): the same units,
    # other neurons
    mixed = tmp_path / "mixed"
    flags = ["--mlp_criterion", "activation", "--norm_rescale", "lsq", "--output_dir", str(mixed)]
    assert main([*argv[:-6], *flags, *argv[-4:]]) == 0
    assert "criterion fisher (MLP activation)" in capsys.readouterr().out
    no_mlp_cut = [a for a in argv[:-6] if a not in ("--intermediate_size", "40")]
    assert main([*no_mlp_cut, "--mlp_criterion", "activation", "--output_dir", str(tmp_path / "bad2")]) == 2
    assert "give --intermediate_size M too" in capsys.readouterr().err and not (tmp_path / "bad2").exists()
    mixed_init = json.loads((mixed / "config.json").read_text())["task_distill"]["init"]
    assert mixed_init["mlp_criterion"] == "activation" and mixed_init["norm_rescale"] == "lsq"
    assert (
        mixed_init["residual_indices"] == init["residual_indices"] and mixed_init["mlp_indices"] != init["mlp_indices"]
    )


def test_benchmark_plan_and_table(tmp_path, monkeypatch):
    import argparse
    import importlib.util

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "pruning.py"
    spec = importlib.util.spec_from_file_location("pruning_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    runs = bench.plan(argparse.Namespace(tasks=["dolly", "dialogsum"], rescale="rms"))
    recovered = {(r["task"], r["k"], r["m"], r["criterion"]) for r in runs if r["recover"] and r["rescale"] == "rms"}
    for task in ("dolly", "dialogsum"):
        for k, m in ((288, None), (288, 1024), (432, None), (432, 1024)):
            assert {c for t, kk, mm, c in recovered if (t, kk, mm) == (task, k, m)} == set(bench.CRITERIA)
    monkeypatch.setattr(bench, "OUT", tmp_path)
    (tmp_path / "dolly").mkdir()
    (tmp_path / "dolly" / "teacher.json").write_text(json.dumps(dict(
        task="dolly", teacher_dev_nll=2.5, num_dev=4, num_scoring=2, steps=1, batch_size=1, lr=1e-4, max_length=64,
        hardware="cpu")))  # fmt: skip
    run = bench._run("dolly", 288, None, "fisher", True)
    record = dict(run, aggregation="sum_normalized", num_parameters=67_000_000, cut_nll=9.0, recovered_nll=5.5,
                  seconds=3.0)  # fmt: skip
    (tmp_path / "dolly" / f"{bench.run_name(run)}.json").write_text(json.dumps(record))
    bench.write_table()
    table = (tmp_path / "results.md").read_text()
    assert "| 288 | 1536 | fisher | sum_normalized | rms | 67.0M | 9.000 | 5.500 | 3 |" in table


def test_pruned_student_reuses_its_units_by_itself_and_matches_every_layer(pruned_dir, tokenizer, messages_dataset,
                                                                           tmp_path, monkeypatch):  # fmt: skip
    """No `unit_selection=` needed: the student's own `init` block names its units; `feature_layers="all"` pairs every
    student layer with the teacher layer it was cut from, on the same residual units."""
    import hf_taskdistill.trainer as trainer_module
    from hf_taskdistill import FeatureDistillTrainer

    teacher, result, out, _ = pruned_dir
    monkeypatch.setattr(trainer_module, "select_task_units", lambda *a, **k: pytest.fail("re-scored"))
    plain = FeatureDistillTrainer(model=str(out), teacher_model=teacher, args=make_config(tmp_path, max_steps=1),
                                  train_dataset=messages_dataset, processing_class=tokenizer)  # fmt: skip
    assert plain.unit_selection.layers[0].indices == result.init["residual_indices"]
    kept = result.init["layers_kept"]
    args = make_config(tmp_path / "all", max_steps=2, feature_layers="all")
    every = FeatureDistillTrainer(model=str(out), teacher_model=teacher, args=args, train_dataset=messages_dataset,
                                  processing_class=tokenizer)  # fmt: skip
    pairs = [(ls.student_layer, ls.teacher_layer) for ls in every.unit_selection.layers]
    assert pairs == list(enumerate(kept)) and len(pairs) == len(kept) > 1
    assert all(ls.indices == result.init["residual_indices"] for ls in every.unit_selection.layers)
    every.train()
    losses = [h["feature_loss"] for h in every.state.log_history if "feature_loss" in h]
    assert len(losses) == 2 and all(v == v for v in losses)
