"""The README's Quick start, executed as written with tiny models and a small Dolly-shaped JSONL.

Only the four settings at the top of the block (`TEACHER`, `TRAIN_FILE`, `OUTPUT_DIR`, `STUDENT`) are replaced, by
rewriting those assignments in the parsed code; every other line runs unchanged.
"""

import ast
import json
import pathlib
import re

import pytest


README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SETTINGS = ("TEACHER", "TRAIN_FILE", "OUTPUT_DIR", "STUDENT")


def quickstart_code() -> str:
    """The first ```python block of the README's "## Quick start" section."""
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Quick start\n(.*?)^## ", text, flags=re.DOTALL | re.MULTILINE)
    assert section, "README.md has no '## Quick start' section"
    block = re.search(r"```python\n(.*?)```", section.group(1), flags=re.DOTALL)
    assert block, "the Quick start has no python code block"
    return block.group(1)


def with_settings(code: str, **values) -> str:
    """`code` with the top-level assignments `NAME = ...` of `values` replaced (each must exist exactly once)."""
    tree = ast.parse(code)
    seen = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in values:
                node.value = ast.parse(repr(values[name]), mode="eval").body
                seen.append(name)
    assert sorted(seen) == sorted(values), f"the Quick start must assign each of {sorted(values)} once, got {seen}"
    return ast.unparse(tree)


def test_quickstart_block_has_its_settings_at_the_top():
    code = quickstart_code()
    tree = ast.parse(code)
    names = [n.targets[0].id for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)]
    assert names[: len(SETTINGS)] == list(SETTINGS)
    assert "../shared/data/dolly/train.jsonl" in code and "fit_to_max_length" in code and "load_task_dataset" in code


def test_readme_quickstart_runs(tmp_path, monkeypatch, capsys):
    from hf_taskdistill.toy import build_toy_tokenizer, make_toy_examples, tiny_llama

    tokenizer = build_toy_tokenizer()
    teacher_dir = tmp_path / "teacher"
    tiny_llama(len(tokenizer), hidden_size=32, num_layers=3, seed=1).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    rows = make_toy_examples(24, seed=0)
    rows[0] = {**rows[0], "output": " ".join(["a"] * 300)}  # an answer longer than the window: truncated
    train_file = tmp_path / "dolly" / "train.jsonl"
    train_file.parent.mkdir()
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "student-distilled"
    student = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=8)  # fmt: skip
    code = with_settings(
        quickstart_code(), TEACHER=str(teacher_dir), TRAIN_FILE=str(train_file), OUTPUT_DIR=str(out), STUDENT=student
    )
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (Quick start)", "exec"), {"__name__": "__quickstart__"})  # noqa: S102

    printed = capsys.readouterr().out
    assert "1 of 24 completions truncated and 0 examples dropped to fit max_length=256" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 16 and config["num_hidden_layers"] == 2
    info = config["task_distill"]
    indices = info["layers"][0]["indices"]
    assert len(indices) == 16 and str(indices[:10]) in printed
    assert info["teacher_hidden_size"] == 32 and info["selection_method"] == "grad"
    assert str(tmp_path) not in (out / "config.json").read_text()  # a local teacher is never stored by its path


@pytest.mark.slow
def test_quickstart_code_compiles_against_the_real_teacher_config():
    """With the real SmolLM2 folder (git-ignored `local/`), the README's narrowed config builds a 256-wide student."""
    from transformers import AutoConfig

    teacher = pathlib.Path(__file__).resolve().parents[1] / "local" / "smollm2-135m-instruct"
    if not (teacher / "config.json").is_file():
        pytest.skip(f"{teacher} is absent (recipes/README.md, 'CPU recipe set-up')")
    namespace: dict = {}
    settings = [n for n in ast.parse(quickstart_code()).body if isinstance(n, ast.Assign)][: len(SETTINGS)]
    exec(compile(ast.Module(body=settings, type_ignores=[]), "README.md", "exec"), namespace)  # noqa: S102
    config = AutoConfig.from_pretrained(teacher)
    config.update(namespace["STUDENT"])
    assert config.hidden_size == 256 and config.num_attention_heads * config.head_dim == 256
