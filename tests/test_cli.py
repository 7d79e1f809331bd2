"""`hf-taskdistill train | select | eval` end to end on tiny saved models and JSONL files written by the test.

Nothing here reads `../shared/data`: the data is the generated toy task in the Dolly / MiniLLM JSONL shape, and the
models are the toy Llamas of `hf_taskdistill.toy` saved to disk, so the CLI loads them like real checkpoints.
"""

import json
import os
import pathlib
import re
import runpy
import subprocess
import sys
import types

import pytest
import yaml

from hf_taskdistill.cli import main


RECIPE = {
    "task": "instruction",
    "prompt_template": "chat",
    "max_length": 64,
    "per_device_train_batch_size": 4,
    "max_steps": 2,
    "learning_rate": 1.0e-2,
    "selection_num_samples": 8,
    "logging_steps": 1,
    "activation_checkpointing": False,
    "use_cpu": True,
    "bf16": False,
    "report_to": "none",
    "save_strategy": "no",
    "disable_tqdm": True,
    "seed": 0,
}


def _write_jsonl(path: pathlib.Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _indices(model_dir) -> list[list[int]]:
    config = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
    return [layer["indices"] for layer in config["task_distill"]["layers"]]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Saved tiny teacher (32 wide, 3 layers) and student (16 wide, 2 layers), Dolly-shaped JSONL and a recipe."""
    from hf_taskdistill.data import build_prompt
    from hf_taskdistill.toy import build_toy_tokenizer, make_toy_examples, tiny_llama

    root = tmp_path_factory.mktemp("cli")
    tokenizer = build_toy_tokenizer()
    for name, model in (
        ("teacher", tiny_llama(len(tokenizer), hidden_size=32, num_layers=3, seed=1)),
        ("student", tiny_llama(len(tokenizer), hidden_size=16, num_layers=2, seed=2)),
    ):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    _write_jsonl(root / "train.jsonl", make_toy_examples(24, seed=0))
    test_rows = [
        {**r, "prompt": build_prompt(r["instruction"], r["input"], "alpaca")} for r in make_toy_examples(6, seed=1)
    ]
    _write_jsonl(root / "data" / "dolly" / "test.jsonl", test_rows)  # laid out like ../shared/data
    recipe = dict(RECIPE, model_name_or_path=str(root / "student"), teacher_model_name_or_path=str(root / "teacher"),
                  train_file=str(root / "train.jsonl"), output_dir=str(root / "unused"))  # fmt: skip
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return types.SimpleNamespace(root=root, recipe=str(root / "recipe.yaml"), data_dir=str(root / "data"))


@pytest.fixture(scope="module")
def trained(workspace):
    out = workspace.root / "out"
    assert main(["train", "--config", workspace.recipe, "--output_dir", str(out)]) == 0
    return out


def test_train_saves_the_selection(trained):
    config = json.loads((trained / "config.json").read_text())
    info = config["task_distill"]
    assert (
        info["selection_method"] == "grad" and info["student_hidden_size"] == 16 and info["teacher_hidden_size"] == 32
    )
    assert info["layers"][0]["student_layer"] == 1 and info["layers"][0]["teacher_layer"] == 2  # last <-> last
    (indices,) = _indices(trained)
    assert len(indices) == 16 and indices == sorted(indices) and all(0 <= i < 32 for i in indices)
    assert (trained / "tokenizer.json").is_file()


def test_select_then_train_reuses_the_selection(workspace, trained, tmp_path, monkeypatch):
    import hf_taskdistill.trainer

    selection_dir = tmp_path / "sel"
    assert main(["select", "--config", workspace.recipe, "--output_dir", str(selection_dir)]) == 0
    stored = json.loads((selection_dir / "task_distill.json").read_text())
    file_indices = [layer["indices"] for layer in stored["layers"]]
    # `select` runs the trainer's scoring pass (same data subset, collator, layer and k).
    assert file_indices == _indices(trained)

    def no_scoring(*args, **kwargs):
        raise AssertionError("train re-scored the teacher instead of reusing --selection_path")

    monkeypatch.setattr(hf_taskdistill.trainer, "select_task_units", no_scoring)
    out = tmp_path / "reused"
    argv = ["train", "--config", workspace.recipe, "--output_dir", str(out),
            "--selection_path", str(selection_dir / "task_distill.json")]  # fmt: skip
    assert main(argv) == 0
    assert _indices(out) == file_indices


def test_logit_loss_none_uses_the_sft_host(workspace, tmp_path, monkeypatch):
    from hf_taskdistill.trainer import FeatureDistillSFTTrainer, FeatureDistillTrainer

    def gkd_init(self, *args, **kwargs):
        raise AssertionError("logit_loss none must not build the GKD host")

    used = []
    sft_init = FeatureDistillSFTTrainer.__init__

    def spy(self, *args, **kwargs):
        used.append(type(self).__name__)
        sft_init(self, *args, **kwargs)

    monkeypatch.setattr(FeatureDistillTrainer, "__init__", gkd_init)
    monkeypatch.setattr(FeatureDistillSFTTrainer, "__init__", spy)
    out = tmp_path / "sft"
    assert main(["train", "--config", workspace.recipe, "--output_dir", str(out), "--logit_loss", "none"]) == 0
    assert used == ["FeatureDistillSFTTrainer"]
    assert len(_indices(out)[0]) == 16


@pytest.mark.parametrize(
    "variant, flags",
    [
        ("logit_only", ["--feature_loss_weight", "0"]),
        ("projector", ["--feature_projector", "true", "--feature_loss_type", "mse"]),
    ],
)
def test_baseline_variants(workspace, tmp_path, capsys, variant, flags):
    out = tmp_path / variant
    assert main(["train", "--config", workspace.recipe, "--output_dir", str(out), *flags]) == 0
    config = json.loads((out / "config.json").read_text())
    if variant == "logit_only":  # no hooks, no scoring, nothing stored
        assert "task_distill" not in config and "(no feature term)" in capsys.readouterr().out
    else:  # the projector is trained with the student but never saved with it
        assert config["task_distill"]["selection_method"] == "projector"
        assert not any("projector" in name for name in _weight_names(out))


def _weight_names(model_dir) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(pathlib.Path(model_dir) / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


def test_eval_prints_the_table_and_writes_json(workspace, trained, tmp_path, capsys):
    results_path = tmp_path / "results.json"
    argv = ["eval", "--model_name_or_path", str(trained), "--data_dir", workspace.data_dir, "--eval_sets", "dolly",
            "--seeds", "10", "--max_samples", "4", "--max_new_tokens", "8", "--template", "chat", "--device", "cpu",
            "--output", str(results_path), "--no_progress"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "dolly" in printed and "|" in printed and f"Results written to {results_path}" in printed
    assert "(–)" in printed and "(0.00)" not in printed and "One generation seed: no std" in printed
    results = json.loads(results_path.read_text())
    entry = results["sets"]["dolly"]
    assert entry["n"] == 4 and entry["rougeL"]["per_seed"] and 0 <= entry["rougeL"]["mean"] <= 100
    assert results["model"] == str(trained)


def test_long_examples_are_fitted_to_max_length(tokenizer):
    """Without the fit, TRL's GKD collator raises on a completion that fills the window (seen on real Dolly data)."""
    from datasets import Dataset
    from trl.experimental.utils import DataCollatorForChatML

    from hf_taskdistill.data import fit_to_max_length
    from hf_taskdistill.toy import make_toy_examples, to_messages, to_prompt_completion

    long_answer = {"instruction": "please do copy : the list", "input": "a b", "output": " ".join("abcdefgh" * 5)}
    long_prompt = {"instruction": "please do copy : the list", "input": " ".join("abcdefgh" * 3), "output": "a " * 20}
    rows = make_toy_examples(4, seed=0) + [long_answer, long_prompt]
    messages = Dataset.from_list([to_messages(r) for r in rows])
    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=40)
    with pytest.raises(ValueError, match="no prompt tokens left"):
        collator([messages[4]])

    fitted, counts = fit_to_max_length(messages, tokenizer, 40, return_counts=True)
    assert len(fitted) == 5  # the long prompt is dropped, everything else kept
    assert (counts.total, counts.truncated, counts.dropped, counts.kept) == (6, 1, 1, 5)
    assert fitted[:4]["messages"] == messages[:4]["messages"]  # short examples are untouched
    answer = fitted[4]["messages"][-1]["content"].split()
    assert 0 < len(answer) < 40 and answer == long_answer["output"].split()[: len(answer)]  # the start is kept
    batch = collator(list(fitted))
    assert batch["input_ids"].shape[1] <= 40 and ((batch["labels"] != -100).sum(dim=1) > 0).all()

    completions = fit_to_max_length(Dataset.from_list([to_prompt_completion(r) for r in rows]), tokenizer, 40)
    assert [c[-1]["content"] for c in completions["completion"]] == [m[-1]["content"] for m in fitted["messages"]]


def test_unknown_command(capsys):
    assert main(["distil"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_console_script_help(monkeypatch, capsys):
    import hf_taskdistill.cli

    script = pathlib.Path(sys.executable).with_name("hf-taskdistill")
    if not script.is_file():
        pytest.skip(f"console script not installed next to {sys.executable} (pip install -e .)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TRL_EXPERIMENTAL_SILENCE="1")
    commands = {
        "top": [str(script), "--help"],
        "train": [str(script), "train", "--help"],
    }
    # Started together: each pays the torch/transformers import (seconds), so running them in turn triples it.
    procs = {k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for k, c in commands.items()}  # fmt: skip
    out = {}
    for key, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{commands[key]}: {stderr[-2000:]}"
        out[key] = stdout
    assert all(c in out["top"] for c in ("train", "select", "eval", "push", "demo"))
    # The `accelerate launch -m hf_taskdistill.cli` form, in this process (a third interpreter costs seconds).
    monkeypatch.setattr(sys, "argv", ["hf_taskdistill.cli", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(hf_taskdistill.cli.__file__, run_name="__main__")
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == out["top"].strip()
    for flag in ("--train_file", "--student_config_overrides", "--selection_method", "--feature_loss_weight",
                 "--teacher_model_name_or_path", "--use_peft"):  # fmt: skip
        assert flag in out["train"]


def test_top_level_help_and_light_modules_do_not_import_trl():
    """The package resolves its public names on first use: `--help` and the pure modules stay light."""
    code = (
        "import sys, hf_taskdistill, hf_taskdistill.losses, hf_taskdistill.cli as c; c.main(['--help']); "
        "assert 'trl' not in sys.modules and 'datasets' not in sys.modules, 'heavy import'; "
        "from hf_taskdistill import *; import hf_taskdistill as h; "
        "assert all(getattr(h, n) is not None for n in h.__all__) and 'trl' in sys.modules; print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def _one_line_error(err: str, command: str) -> str:
    """The single error line (progress bars may precede it on stderr); no traceback."""
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith(f"hf-taskdistill {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_user_mistakes_print_one_line_and_exit_2(workspace, tmp_path, capsys):
    missing = str(tmp_path / "no-such-teacher")
    argv = ["train", "--config", workspace.recipe, "--output_dir", str(tmp_path / "o"),
            "--teacher_model_name_or_path", missing]  # fmt: skip
    assert main(argv) == 2
    assert missing in _one_line_error(capsys.readouterr().err, "train")

    corrupt = tmp_path / "task_distill.json"
    corrupt.write_text(json.dumps({"format_version": 1, "selection_method": "grad", "teacher_hidden_size": 32,
                                   "student_hidden_size": 16, "layers": [{"student_layer": 1, "teacher_layer": 2,
                                                                           "indices": [40]}]}))  # fmt: skip
    assert main(["train", "--config", workspace.recipe, "--output_dir", str(tmp_path / "o2"),
                 "--selection_path", str(corrupt)]) == 2  # fmt: skip
    assert "layers[0].indices" in _one_line_error(capsys.readouterr().err, "train")  # SelectionFormatError

    assert main(["push", "--model_dir", str(tmp_path / "nothing"), "--repo_id", "org/x"]) == 2
    assert "is not a directory" in _one_line_error(capsys.readouterr().err, "push")

    assert main(["eval", "--data_dir", "x"]) == 2  # argparse: a required flag is missing
    err = capsys.readouterr().err
    assert "hf-taskdistill eval: error: the following arguments are required: --model_name_or_path" in err


def test_debug_shows_the_traceback_and_bugs_keep_theirs(tmp_path, monkeypatch, capsys):
    import hf_taskdistill.hub

    with pytest.raises(FileNotFoundError, match="is not a directory"):
        main(["push", "--debug", "--model_dir", str(tmp_path / "nothing"), "--repo_id", "org/x"])
    with pytest.raises(FileNotFoundError):
        main(["--debug", "push", "--model_dir", str(tmp_path / "nothing"), "--repo_id", "org/x"])

    def bug(argv):
        raise TypeError("a bug, not a user mistake")

    monkeypatch.setattr(hf_taskdistill.hub, "main", bug)
    with pytest.raises(TypeError):
        main(["push"])


def test_a_launched_command_ends_its_process_group(tmp_path, monkeypatch):
    """Under a launcher the CLI destroys the process group after a command succeeds (a rank exiting with live gloo
    threads can abort after its work is saved: CI, stop 20), and leaves it alone after a failure (the other ranks
    may never reach the barrier)."""
    import torch.distributed as dist

    import hf_taskdistill.hub

    monkeypatch.setattr(hf_taskdistill.hub, "main", lambda argv: 0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        assert main(["push"]) == 0
        assert not dist.is_initialized()
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous2", rank=0, world_size=1)
        monkeypatch.setattr(hf_taskdistill.hub, "main", lambda argv: (_ for _ in ()).throw(ValueError("bad value")))
        assert main(["push"]) == 2
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert main(["push"]) == 2  # no process group: nothing to end


def test_demo_reports_progress_through_every_phase(tmp_path, capsys):
    assert main(["demo", "--quick", "--output_dir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "[2/4] training the teacher (hidden 64, 4 layers) with TRL's SFTTrainer, 20 steps ..." in out
    assert re.search(r"^      teacher: step 4/20, loss \d+\.\d{3}  \(\d+s\)$", out, flags=re.MULTILINE)
    assert re.search(r"^      KD \+ task-selected units: step \d+/10, loss", out, flags=re.MULTILINE)
    assert "[3/4] student (hidden 24) KD + task-selected units: scoring the teacher units, then 10 steps ..." in out
    assert "[4/4] held-out task metrics" in out and (tmp_path / "demo" / "results.json").is_file()
