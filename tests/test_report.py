"""The selection report (`hf_taskdistill.report`, `hf-taskdistill select --report`) on tiny models.

The NLL references here are computed independently of `report.py`: HF's own `labels=` loss for the full teacher,
and a hand-written hook for the all-mean floor.
"""

import json
import os
import pathlib

import pytest
import torch
import yaml
from datasets import Dataset
from torch.utils.data import DataLoader
from trl.experimental.utils import DataCollatorForChatML

import hf_taskdistill.report as report_mod
from hf_taskdistill.report import (
    PLOT_NAME,
    REPORT_NAME,
    default_k_grid,
    keep_k_curve,
    load_report,
    model_nll,
    report_sentence,
    write_report,
)
from hf_taskdistill.scoring import select_task_units
from hf_taskdistill.toy import make_toy_examples, tiny_llama, to_messages


REQUIRED_KEYS = {"format_version", "layer", "criterion", "d_t", "k", "k_grid", "nll", "full_teacher_nll",
                 "mean_floor_nll", "num_examples", "num_tokens", "pruned"}  # fmt: skip


def _batches(rows, tokenizer, bs=8):
    ds = Dataset.from_list([to_messages(r) for r in rows])
    return list(DataLoader(ds, batch_size=bs, collate_fn=DataCollatorForChatML(tokenizer, max_length=64)))


@pytest.fixture(scope="module")
def data(tokenizer):
    rows = make_toy_examples(64, seed=0)
    return _batches(rows[:32], tokenizer), _batches(rows[32:], tokenizer)


@pytest.fixture(scope="module")
def trained_teacher(tokenizer):
    """A 32-wide, 3-layer teacher trained for 150 steps on other toy rows (~2 s): its units matter for the task."""
    torch.manual_seed(0)
    teacher = tiny_llama(len(tokenizer), hidden_size=32, num_layers=3, seed=1)
    train = _batches(make_toy_examples(512, seed=7), tokenizer, bs=16)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for step in range(150):
        b = train[step % len(train)]
        teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss.backward()
        opt.step()
        opt.zero_grad()
    teacher.requires_grad_(False)
    return teacher.eval()


def _hf_nll(model, batches):
    """Completion NLL per token from HF's own shifted `labels=` loss (mean per batch, re-weighted by its count)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            count = int((b["labels"][:, 1:] != -100).sum())
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
            total += float(out.loss) * count
            n += count
    return total / n


def _all_mean_nll(model, scoring, heldout, layer):
    """The floor by hand: the layer's output replaced by the per-unit mean over the scoring completion tokens."""
    rows = []
    block = model.model.layers[layer]
    handle = block.register_forward_hook(lambda m, a, o: rows.append(o.detach()))
    with torch.no_grad():
        for b in scoring:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            mask = torch.zeros_like(b["labels"], dtype=torch.bool)
            mask[:, :-1] = b["labels"][:, 1:] != -100
            rows[-1] = rows[-1][mask].double()
    handle.remove()
    mean = torch.cat(rows).mean(0).float()
    handle = block.register_forward_hook(lambda m, a, o: mean.expand_as(o).clone())
    try:
        return _hf_nll(model, heldout)
    finally:
        handle.remove()


@pytest.mark.parametrize("layer", [2, 0])  # last layer (head only above it) and a layer with two layers above it
def test_full_width_is_the_teacher_and_no_unit_is_the_mean_floor(teacher, data, layer):
    scoring, heldout = data
    sel = select_task_units(teacher, scoring, 8, [(1, layer)], show_progress=False)
    report = keep_k_curve(teacher, scoring, heldout, layer, {"grad": sel.full_scores[0]}, k=8)
    plain = _hf_nll(teacher, heldout)
    assert report["engine"] == "replay"
    assert report["k_grid"][-1] == 32 and 8 in report["k_grid"]
    assert report["full_teacher_nll"] == pytest.approx(plain, abs=1e-6)
    for name, values in report["nll"].items():
        assert values[-1] == pytest.approx(plain, abs=1e-6), name
    assert report["mean_floor_nll"] == pytest.approx(_all_mean_nll(teacher, scoring, heldout, layer), abs=1e-5)
    assert set(report["nll"]) == {"grad", "random", "activation", "grad_bottom"}
    assert report["num_tokens"] == sum(int((b["labels"][:, 1:] != -100).sum()) for b in heldout)
    assert report["num_examples"] == 32 and report["num_scoring_examples"] == 32
    assert teacher.training  # mode restored
    assert model_nll(teacher, heldout)["nll"] == pytest.approx(plain, abs=1e-6)


def test_replay_equals_the_hooked_forward_at_every_point(teacher, data):
    scoring, heldout = data
    scores = {"grad": torch.rand(32, generator=torch.Generator().manual_seed(0))}
    fast = keep_k_curve(teacher, scoring, heldout, 1, scores, k_grid=[1, 5, 16], engine="replay")
    slow = keep_k_curve(teacher, scoring, heldout, 1, scores, k_grid=[1, 5, 16], engine="hook")
    assert slow["engine"] == "hook"
    for name in fast["nll"]:
        assert fast["nll"][name] == pytest.approx(slow["nll"][name], abs=1e-5), name
    assert fast["mean_floor_nll"] == pytest.approx(slow["mean_floor_nll"], abs=1e-5)
    # the curve moves with k: the points are not all the teacher
    assert len(set(fast["nll"]["random"])) == 3


def test_a_replay_that_does_not_reproduce_the_model_falls_back_to_hooks(teacher, data, monkeypatch):
    scoring, heldout = data
    scores = {"grad": torch.arange(32.0)}
    reference = keep_k_curve(teacher, scoring, heldout, 2, scores, k_grid=[4, 32], engine="hook")
    monkeypatch.setattr(report_mod, "_final_norm_and_head", lambda model: (None, model.get_output_embeddings()))
    with pytest.raises(RuntimeError, match="engine='hook'"):
        keep_k_curve(teacher, scoring, heldout, 2, scores, k_grid=[4, 32], engine="replay")
    fallback = keep_k_curve(teacher, scoring, heldout, 2, scores, k_grid=[4, 32])
    assert fallback["engine"] == "hook"
    assert fallback["nll"] == reference["nll"]


@pytest.mark.parametrize("method", ["grad", "grad_x_act"])
def test_scored_units_beat_their_bottom_k_on_a_trained_teacher(trained_teacher, data, method):
    scoring, heldout = data
    sel = select_task_units(trained_teacher, scoring, 4, [(1, 2)], method=method, show_progress=False)
    grid = [1, 2, 4, 8, 16, 24]
    report = keep_k_curve(trained_teacher, scoring, heldout, 2, {method: sel.full_scores[0]}, k_grid=grid)
    top, bottom, rand = (report["nll"][n] for n in (method, f"{method}_bottom", "random"))
    assert report["full_teacher_nll"] < report["mean_floor_nll"] - 0.5  # the teacher learnt the task
    assert all(t < b for t, b in zip(top, bottom, strict=True)), (top, bottom)
    assert sum(t < r for t, r in zip(top, rand, strict=True)) >= 4, (top, rand)


def test_random_and_activation_references(teacher, data):
    scoring, heldout = data
    a = keep_k_curve(teacher, scoring, heldout, 2, None, k_grid=[4, 16], seed=3)
    b = keep_k_curve(teacher, scoring, heldout, 2, None, k_grid=[4, 16], seed=3)
    c = keep_k_curve(teacher, scoring, heldout, 2, None, k_grid=[4, 16], seed=4)
    assert a["criterion"] == "random" and set(a["nll"]) == {"random", "activation"}
    assert a["nll"] == b["nll"] and a["nll"]["random"] != c["nll"]["random"]
    # activation = mean |h| over the scoring completion tokens: the 4 units it keeps are the 4 largest
    stats = report_mod.unit_statistics(teacher, scoring, 2)
    biggest = set(torch.topk(stats["mean_abs"], 4).indices.tolist())
    only = torch.tensor([i in biggest for i in range(32)])
    held = report_mod._HeldOut(teacher, heldout, 2, show_progress=False)
    nll = float(held.hooked(only, stats["mean"].float())) / held.num_tokens
    assert a["nll"]["activation"][0] == pytest.approx(nll, abs=1e-5)


def test_packed_batches_pass_position_ids(teacher, tokenizer, data):
    """A padding-free packed row (position_ids restart per example, no attention mask) gives the padded NLL."""
    rows = make_toy_examples(4, seed=3)
    padded = _batches(rows, tokenizer, bs=1)
    ids, labels, pos = [], [], []
    for b in padded:
        keep = b["attention_mask"][0].bool()
        ids.append(b["input_ids"][0][keep])
        labels.append(b["labels"][0][keep])
        pos.append(torch.arange(int(keep.sum())))
    packed = [
        {"input_ids": torch.cat(ids)[None], "labels": torch.cat(labels)[None], "position_ids": torch.cat(pos)[None]}
    ]
    scoring, _ = data
    a = keep_k_curve(teacher, scoring, packed, 1, None, k_grid=[32])
    b = keep_k_curve(teacher, scoring, padded, 1, None, k_grid=[32])
    assert a["num_tokens"] == b["num_tokens"]
    assert a["full_teacher_nll"] == pytest.approx(b["full_teacher_nll"], abs=1e-5)
    assert a["nll"]["random"][0] == pytest.approx(b["full_teacher_nll"], abs=1e-5)


def test_bad_input_is_an_error_before_any_forward(teacher, data, monkeypatch):
    scoring, heldout = data

    def no_forward(*args, **kwargs):
        raise AssertionError("a forward ran before the input was checked")

    monkeypatch.setattr(report_mod, "unit_statistics", no_forward)
    masked = [{**b, "labels": torch.full_like(b["labels"], -100)} for b in heldout]
    cases = [
        (dict(heldout_batches=[]), "held-out set is empty"),
        (dict(heldout_batches=masked), "no completion token"),
        (dict(scores={"grad": torch.zeros(16)}), r"shape \(32,\)"),
        (dict(k_grid=[0, 8]), r"1\.\.32"),
        (dict(k_grid=[8, 33]), r"1\.\.32"),
        (dict(layer=3), r"0\.\.2"),
        (dict(scores={"random": torch.zeros(32)}), "reserved"),
        (dict(criterion="grad_x_act"), "not among the scores"),
    ]
    for overrides, match in cases:
        kwargs = dict(teacher=teacher, scoring_batches=scoring, heldout_batches=heldout, layer=2,
                      scores={"grad": torch.zeros(32)}, k_grid=[8])  # fmt: skip
        kwargs.update(overrides)
        with pytest.raises(ValueError, match=match):
            keep_k_curve(**kwargs)


def test_default_grid():
    assert default_k_grid(576, 256) == [36, 72, 144, 216, 256, 288, 432, 576]
    assert default_k_grid(32) == [2, 4, 8, 12, 16, 24, 32]


def test_files_and_sentence(teacher, data, tmp_path):
    scoring, heldout = data
    report = keep_k_curve(teacher, scoring, heldout, 2, {"grad": torch.arange(32.0)}, k=8)
    report["pruned"] = {"hidden_size": 16, "criterion": "grad", "num_parameters": 1234, "nll_before": 4.5,
                        "nll_after": None, "recovery_steps": None}  # fmt: skip
    json_path, png_path = write_report(report, tmp_path)
    assert os.path.basename(json_path) == REPORT_NAME and os.path.basename(png_path) == PLOT_NAME
    stored = json.loads(pathlib.Path(json_path).read_text())
    assert REQUIRED_KEYS <= set(stored) and stored["format_version"] == 1
    assert all(len(v) == len(stored["k_grid"]) for v in stored["nll"].values())
    assert load_report(tmp_path) == stored and load_report(tmp_path / "nowhere") is None
    assert pathlib.Path(png_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sentence = report_sentence(stored)
    i = stored["k_grid"].index(8)
    assert sentence.startswith("Keeping 8 of 32 units of teacher layer 2 by `grad`")
    for value in (stored["nll"]["grad"][i], stored["nll"]["random"][i], stored["full_teacher_nll"], 4.5):
        assert f"{value:.3f}" in sentence


# ----- the CLI: hf-taskdistill select --report -----

RECIPE = {
    "task": "instruction",
    "prompt_template": "chat",
    "max_length": 64,
    "per_device_train_batch_size": 4,
    "selection_num_samples": 16,
    "activation_checkpointing": False,
    "use_cpu": True,
    "bf16": False,
    "report_to": "none",
    "disable_tqdm": True,
    "seed": 0,
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("report_cli")
    for name, width, layers in (("teacher", 32, 3), ("student", 16, 2)):
        model = tiny_llama(len(tokenizer), hidden_size=width, num_layers=layers, seed=width)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_toy_examples(40, seed=0)))
    recipe = dict(RECIPE, model_name_or_path=str(root / "student"), teacher_model_name_or_path=str(root / "teacher"),
                  train_file=str(root / "train.jsonl"))  # fmt: skip
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def test_select_report_end_to_end(workspace, tmp_path, capsys):
    from hf_taskdistill.cli import main

    out = tmp_path / "sel"
    argv = ["select", "--config", str(workspace / "recipe.yaml"), "--output_dir", str(out), "--report",
            "--report_num_samples", "12"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / REPORT_NAME).read_text())
    assert REQUIRED_KEYS <= set(report) and (out / PLOT_NAME).is_file()
    assert report["k"] == 16 and report["d_t"] == 32 and report["layer"] == 2 and report["criterion"] == "grad"
    assert report["num_examples"] == 12 and report["num_scoring_examples"] == 16  # held out of the 40 rows
    assert report["pruned"] is None
    assert report_sentence(report) in printed
    selection = json.loads((out / "task_distill.json").read_text())
    assert selection["diagnostics"]["keep_k"]["k"] == 16
    assert selection["diagnostics"]["keep_k"]["full_teacher_nll"] == report["full_teacher_nll"]
    # Provenance: a local teacher is a label, never a path, in every file written.
    expected = {"model_id": None, "revision": None, "local_name": "teacher"}
    assert selection["teacher"] == expected and report["teacher"] == expected
    written = list(out.iterdir())
    assert {p.name for p in written} >= {
        "task_distill.json",
        "task_distill_scores.safetensors",
        REPORT_NAME,
        PLOT_NAME,
    }
    for path in written:
        data = path.read_bytes()
        for leak in (str(workspace), str(tmp_path), str(pathlib.Path.home())):
            assert leak.encode() not in data, (path.name, leak)


def test_select_without_report_records_no_path(workspace, tmp_path):
    from hf_taskdistill.cli import main

    out = tmp_path / "plain"
    assert main(["select", "--config", str(workspace / "recipe.yaml"), "--output_dir", str(out)]) == 0
    assert not (out / REPORT_NAME).exists()
    text = (out / "task_distill.json").read_text()
    assert str(workspace) not in text and json.loads(text)["teacher"]["local_name"] == "teacher"


def test_select_report_with_a_pruned_width(workspace, tmp_path, capsys):
    from hf_taskdistill.cli import main

    out = tmp_path / "pruned"
    argv = ["select", "--config", str(workspace / "recipe.yaml"), "--output_dir", str(out), "--report",
            "--report_num_samples", "12", "--report_prune_hidden_size", "16", "--report_k_grid", "4", "16", "32"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["k_grid"] == [4, 16, 32]
    pruned = report["pruned"]
    assert pruned["hidden_size"] == 16 and pruned["criterion"] and pruned["recovery_steps"] is None
    assert pruned["num_parameters"] > 0 and pruned["nll_before"] > 0 and pruned["nll_after"] is None
    assert f"{pruned['nll_before']:.3f}" in capsys.readouterr().out
    for path in out.iterdir():
        assert str(workspace).encode() not in path.read_bytes(), path.name


def test_select_report_recovery_trains_the_cut_on_rows_outside_the_held_out_ones(workspace, tmp_path, capsys):
    from hf_taskdistill.cli import main

    out = tmp_path / "recovered"
    # a recipe that loads the teacher with init kwargs (as the real recipes do): the recovery reuses the loaded one
    recipe = yaml.safe_load((workspace / "recipe.yaml").read_text())
    (tmp_path / "recipe.yaml").write_text(
        yaml.safe_dump({**recipe, "teacher_model_init_kwargs": {"dtype": "float32"}})
    )
    argv = ["select", "--config", str(tmp_path / "recipe.yaml"), "--output_dir", str(out), "--report",
            "--report_num_samples", "12", "--report_prune_hidden_size", "16", "--report_k_grid", "16", "32",
            "--recovery_steps", "3", "--learning_rate", "0.01"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    pruned = json.loads((out / REPORT_NAME).read_text())["pruned"]
    assert pruned["recovery_steps"] == 3 and pruned["nll_after"] is not None and pruned["recovery_train_loss"]
    # three steps at lr 0.01 from a random-init toy teacher's cut: the held-out NLL moves (and the report says so)
    assert abs(pruned["nll_after"] - pruned["nll_before"]) > 1e-3
    assert f"reaches {pruned['nll_after']:.3f} after 3 distillation steps" in printed
    assert not any(p.name.startswith("checkpoint") for p in out.iterdir())  # nothing of the recovery is saved


def test_select_report_errors_come_before_scoring(workspace, tmp_path, monkeypatch, capsys):
    import hf_taskdistill.scoring
    from hf_taskdistill.cli import main
    from hf_taskdistill.scripts.select import main as select_main

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before checking the report's arguments")

    monkeypatch.setattr(hf_taskdistill.scoring, "select_task_units", no_scoring)
    base = ["--config", str(workspace / "recipe.yaml"), "--output_dir", str(tmp_path / "x"), "--report"]
    cases = [
        (["--selection_num_samples", "40"], "held-out examples"),
        (["--report_prune_hidden_size", "64"], "larger than the teacher"),
        (["--report_prune_hidden_size", "17"], "Nearest valid sizes"),
        (["--report_prune_hidden_size", "16", "--report_prune_criterion", "magic"], "criterion must be one of"),
        (["--report_k_grid", "8", "40"], r"1\.\.32"),
        (["--recovery_steps", "2"], "report_prune_hidden_size"),
    ]
    for flags, match in cases:
        with pytest.raises(ValueError, match=match):
            select_main(base + flags)
    # through the console script: one line, no traceback
    assert main(["select", *base, "--selection_num_samples", "40"]) == 2
    assert "held-out examples" in capsys.readouterr().err


def _other_architecture(name, vocab_size):
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if name == "qwen2":  # q/k/v biases, tied embeddings
        config = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                             tie_word_embeddings=True, pad_token_id=0)  # fmt: skip
        return Qwen2ForCausalLM(config).eval()
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=3, n_head=2, n_positions=128, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()  # `.h` blocks, `ln_f`; dropout off for the HF reference


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_other_architectures_replay_exactly(tokenizer, data, arch):
    model = _other_architecture(arch, len(tokenizer))
    scoring, heldout = data
    scores = {"grad": torch.arange(32.0)}
    for layer in (2, 0):
        fast = keep_k_curve(model, scoring, heldout, layer, scores, k_grid=[4, 16, 32])
        slow = keep_k_curve(model, scoring, heldout, layer, scores, k_grid=[4, 16, 32], engine="hook")
        assert fast["engine"] == "replay"
        assert fast["full_teacher_nll"] == pytest.approx(_hf_nll(model, heldout), abs=1e-6)
        for name in fast["nll"]:
            assert fast["nll"][name] == pytest.approx(slow["nll"][name], abs=1e-5), (arch, layer, name)
