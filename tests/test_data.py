"""Strict JSONL reading, the Alpaca template, TRL dataset formats and the eval-set loaders (tiny files in tmp_path)."""

import copy
import json

import pytest

from hf_taskdistill.data import (
    PASSTHROUGH_CHAT_TEMPLATE,
    PROMPT_NO_INPUT,
    SUMMARIZATION_INSTRUCTION,
    FitCounts,
    build_prompt,
    describe_task_data,
    ensure_chat_template,
    fit_to_max_length,
    load_eval_set,
    load_task_dataset,
    read_jsonl,
    subsample,
    to_messages,
)


def write_lines(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


DOLLY_ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
]
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n"
    "2 and 3\n\n### Response:\n"
)
NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nName a colour.\n\n### Response:\n"
)


# --- read_jsonl ---------------------------------------------------------------------------------------------------


def test_read_jsonl_reads_objects_and_skips_blank_lines(tmp_path):
    path = write_lines(tmp_path / "ok.jsonl", [DOLLY_ROWS[0], "", "   ", DOLLY_ROWS[1]])
    rows = read_jsonl(path, ["instruction", "output"], {"input": str})
    assert rows == DOLLY_ROWS[:2]


@pytest.mark.parametrize(
    "lines, required, expected",
    [
        ([DOLLY_ROWS[0], '{"instruction": "x", "output": '], ["instruction", "output"], ["line 2", "invalid JSON"]),
        (["[1, 2]"], ["output"], ["line 1", "expected a JSON object, got list"]),
        ([DOLLY_ROWS[0], "", {"instruction": "x"}], ["instruction", "output"], ["line 3", "missing field 'output'"]),
        ([{"output": ["a", "b"]}], {"output": str}, ["line 1", "'output' must be a string, got list"]),
        ([{"output": ["a", 3]}], {"output": (str, list)}, ["'output' must be a string or a non-empty list", "item 1"]),
        ([{"output": []}], {"output": list}, ["'output' must be a non-empty list of strings, got an empty list"]),
        ([{"output": "a", "input": 5}], {"output": str}, ["line 1", "'input' must be a string, got int"]),
    ],
    ids=["bad-json", "not-object", "missing", "list-for-str", "bad-item", "empty-list", "optional-bad-type"],
)
def test_read_jsonl_errors_name_file_line_and_field(tmp_path, lines, required, expected):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError) as err:
        read_jsonl(path, required, optional_fields={"input": str})
    message = str(err.value)
    assert str(path) in message
    for part in expected:
        assert part in message


# --- templates and formats ----------------------------------------------------------------------------------------


def test_alpaca_template_is_minillms():
    assert build_prompt("Name a colour.", "", "alpaca") == NO_INPUT
    assert build_prompt("Add the numbers.", "2 and 3", "alpaca") == WITH_INPUT
    assert build_prompt("Braces {x} stay.", "", "alpaca") == PROMPT_NO_INPUT.replace(
        "{instruction}", "Braces {x} stay."
    )
    assert build_prompt("Add the numbers.", "2 and 3", "chat") == "Add the numbers.\n\n2 and 3"
    assert build_prompt("Say hi.", "", "chat") == "Say hi."
    with pytest.raises(ValueError, match="template"):
        build_prompt("x", "", "vicuna")


def test_load_task_dataset_formats(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", DOLLY_ROWS)

    messages = load_task_dataset(path, format="messages", template="chat")
    assert messages.column_names == ["messages"]
    assert messages[1]["messages"] == [
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    chat_pc = load_task_dataset(path, format="prompt_completion", template="chat")
    assert chat_pc[0] == {
        "prompt": [{"role": "user", "content": "Name a colour."}],
        "completion": [{"role": "assistant", "content": "Blue."}],
    }
    alpaca_pc = load_task_dataset(tmp_path, format="prompt_completion", template="alpaca", split="train")
    assert alpaca_pc[0] == {"prompt": NO_INPUT, "completion": "Blue."}
    assert alpaca_pc[1] == {"prompt": WITH_INPUT, "completion": "5"}
    assert to_messages(alpaca_pc[1]) == {
        "messages": [{"role": "user", "content": WITH_INPUT}, {"role": "assistant", "content": "5"}]
    }
    assert to_messages(chat_pc[0]) == {"messages": chat_pc[0]["prompt"] + chat_pc[0]["completion"]}


def test_summarization_dataset(tmp_path):
    rows = [{"fname": "t0", "dialogue": "#Person1#: Hi.\n#Person2#: Hello.", "summary": "They greet.", "topic": "x"}]
    path = write_lines(tmp_path / "dialogsum.jsonl", rows)
    ds = load_task_dataset(path, task="summarization", format="prompt_completion", template="alpaca")
    assert ds[0]["prompt"] == build_prompt(SUMMARIZATION_INSTRUCTION, rows[0]["dialogue"], "alpaca")
    assert ds[0]["completion"] == "They greet."
    ds = load_task_dataset(path, task="summarization", format="messages", template="chat")
    assert ds[0]["messages"][0]["content"] == f"{SUMMARIZATION_INSTRUCTION}\n\n{rows[0]['dialogue']}"
    with pytest.raises(ValueError, match="line 1: missing field 'summary'"):
        load_task_dataset(write_lines(tmp_path / "nosum.jsonl", [{"dialogue": "x"}]), task="summarization")


def test_alpaca_messages_render_to_the_raw_prompt(tmp_path, tokenizer):
    """What TRL's GKD collator does: prompt = template(messages[:-1], generation prompt), full = template(all)."""
    tok = ensure_chat_template(copy.deepcopy(tokenizer), "alpaca")
    assert tok.chat_template == PASSTHROUGH_CHAT_TEMPLATE
    ds = load_task_dataset(write_lines(tmp_path / "t.jsonl", DOLLY_ROWS), format="messages", template="alpaca")
    messages = ds[1]["messages"]
    prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(messages, tokenize=False)
    assert prompt == WITH_INPUT
    assert full == WITH_INPUT + "5" + tok.eos_token


def test_ensure_chat_template_keeps_or_installs(tokenizer, caplog):
    tok = copy.deepcopy(tokenizer)
    original = tok.chat_template
    assert ensure_chat_template(tok, "chat").chat_template == original
    tok.chat_template = None
    with caplog.at_level("WARNING", logger="hf_taskdistill.data"):
        ensure_chat_template(tok, "chat")
    assert tok.chat_template == PASSTHROUGH_CHAT_TEMPLATE
    assert "no chat template" in caplog.text
    with pytest.raises(ValueError):
        ensure_chat_template(tok, "chatml")


def test_subsample_is_seeded_ordered_and_nested():
    items = list(range(100))
    small, large = subsample(items, 5, seed=3), subsample(items, 0.1, seed=3)
    assert len(small) == 5 and len(large) == 10
    assert small == sorted(small) and set(small) <= set(large)
    assert small == subsample(items, 5, seed=3) != subsample(items, 5, seed=4)
    assert subsample(items, None) == items == subsample(items, 1000)
    for bad in (0, -1, 1.5, 0.0):
        with pytest.raises(ValueError):
            subsample(items, bad)
    for bad in (True, "5"):
        with pytest.raises(TypeError):
            subsample(items, bad)


def test_load_task_dataset_max_samples_and_argument_checks(tmp_path):
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(20)]
    path = write_lines(tmp_path / "t.jsonl", rows)
    ds = load_task_dataset(path, format="prompt_completion", template="alpaca", max_samples=0.25, seed=1)
    assert len(ds) == 5
    assert [r["completion"] for r in ds] == [r["output"] for r in subsample(rows, 0.25, seed=1)]
    for kwargs in ({"task": "qa"}, {"format": "text"}, {"template": "llama"}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            load_task_dataset(path, **kwargs)
    with pytest.raises(FileNotFoundError):
        load_task_dataset(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="no records"):
        load_task_dataset(write_lines(tmp_path / "empty.jsonl", []))


def test_hub_source_goes_through_load_dataset(monkeypatch):
    """Offline stand-in for `datasets.load_dataset`: databricks-dolly-15k column names are mapped."""
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"instruction": "Q", "context": "C", "response": "A", "category": "qa"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_task_dataset("databricks/databricks-dolly-15k", format="prompt_completion", template="alpaca")
    assert calls == [("databricks/databricks-dolly-15k", "train")]
    assert ds[0] == {"prompt": build_prompt("Q", "C", "alpaca"), "completion": "A"}


# --- eval sets ----------------------------------------------------------------------------------------------------


def make_data_dir(root):
    """A tiny folder laid out like ../shared/data."""
    write_lines(root / "dolly/test.jsonl", [{**DOLLY_ROWS[1], "prompt": WITH_INPUT, "topic": "qa"}])
    write_lines(root / "vicuna/test.jsonl", [{"instruction": "Name a colour.", "category": "x", "output": "Red"}])
    write_lines(root / "sinst/test.jsonl", [{"instruction": "Title it.", "input": "Text.", "output": ["A", "B"]}])
    write_lines(root / "uinst_slice/test.jsonl", [{"instruction": "Yes or no?", "input": "x", "output": "Yes"}])
    dialog = {"fname": "t0", "dialogue": "#Person1#: Hi."}
    write_lines(root / "dialogsum/test.jsonl", [{**dialog, "summary2": "S2", "summary10": "S10", "summary1": "S1"}])
    return root


def test_load_eval_set_shapes(tmp_path):
    root = make_data_dir(tmp_path)
    (dolly,) = load_eval_set("dolly", root)
    assert dolly == {"instruction": "Add the numbers.", "input": "2 and 3", "prompt": WITH_INPUT, "references": ["5"]}
    (vicuna,) = load_eval_set("vicuna", root)
    assert vicuna["input"] == "" and vicuna["prompt"] == NO_INPUT and vicuna["references"] == ["Red"]
    assert load_eval_set("sinst", root)[0]["references"] == ["A", "B"]
    assert load_eval_set("unni_slice", root)[0]["references"] == ["Yes"]
    (dialog,) = load_eval_set("dialogsum", root)
    assert dialog["references"] == ["S1", "S2", "S10"]
    assert dialog["prompt"] == build_prompt(SUMMARIZATION_INSTRUCTION, "#Person1#: Hi.", "alpaca")


def test_load_eval_set_errors(tmp_path):
    root = make_data_dir(tmp_path)
    with pytest.raises(ValueError, match="unni_slice"):
        load_eval_set("UnNI", root)
    with pytest.raises(FileNotFoundError, match="self_inst"):
        load_eval_set("self_inst", root)
    write_lines(root / "dialogsum/test.jsonl", [{"dialogue": "x", "summary1": "a"}, {"dialogue": "y"}])
    with pytest.raises(ValueError, match="line 2: missing field 'summary'"):
        load_eval_set("dialogsum", root)
    write_lines(root / "sinst/test.jsonl", [{"instruction": "x", "output": 3}])
    with pytest.raises(ValueError, match="line 1: field 'output' must be a string or a non-empty list"):
        load_eval_set("sinst", root)


# --- real files (../shared/data) ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_alpaca_template_reproduces_every_minillm_prompt(shared_data):
    for relative in ("dolly/test.jsonl", "dolly/dev.jsonl", "self_inst/test.jsonl", "vicuna/test.jsonl"):
        rows = read_jsonl(shared_data / relative, ["instruction", "prompt"], {"input": str})
        mismatches = [
            i for i, r in enumerate(rows) if build_prompt(r["instruction"], r.get("input", "")) != r["prompt"]
        ]
        assert not mismatches, f"{relative}: rows {mismatches[:5]} differ"
    assert len(read_jsonl(shared_data / "dolly/test.jsonl", ["prompt"])) == 500


@pytest.mark.slow
def test_real_eval_sets_load(shared_data):
    sizes = {"dolly": 500, "self_inst": 242, "vicuna": 80, "sinst": 1694, "unni_slice": 1050, "dialogsum": 500}
    for name, n in sizes.items():
        examples = load_eval_set(name, shared_data)
        assert len(examples) == n, name
        assert all(ex["references"] and ex["prompt"].endswith("### Response:\n") for ex in examples), name
        if name in ("sinst", "unni_slice"):  # the `prompt` kept from the file equals the rebuilt one
            assert all(ex["prompt"] == build_prompt(ex["instruction"], ex["input"]) for ex in examples), name
    assert sum(len(ex["references"]) > 1 for ex in load_eval_set("sinst", shared_data)) == 388
    assert {len(ex["references"]) for ex in load_eval_set("dialogsum", shared_data)} == {3}


@pytest.mark.slow
def test_real_training_files_load(shared_data):
    dolly = load_task_dataset(shared_data / "dolly", format="prompt_completion", template="alpaca")
    assert len(dolly) == 11435
    assert len(load_task_dataset(shared_data / "dolly", max_samples=0.05)) == 572
    dialogsum = load_task_dataset(shared_data / "dialogsum", task="summarization", split="dev")
    assert len(dialogsum) == 500


def test_fit_to_max_length_counts_logs_and_checks(tmp_path, tokenizer, caplog):
    import logging

    rows = [
        {"instruction": "please do copy : the list", "input": "a b", "output": "a b"},  # fits
        {"instruction": "please do copy : the list", "input": "a b", "output": " ".join("abcdefgh" * 5)},  # cut
        {"instruction": "please do copy", "input": " ".join("abcdefgh" * 5), "output": "a b"},  # dropped
    ]
    path = write_lines(tmp_path / "dolly" / "train.jsonl", rows)
    for fmt in ("messages", "prompt_completion"):
        dataset = load_task_dataset(path, format=fmt)
        with caplog.at_level(logging.INFO, logger="hf_taskdistill.data"):
            fitted, counts = fit_to_max_length(dataset, tokenizer, 40, return_counts=True)
        assert counts == FitCounts(total=3, truncated=1, dropped=1, kept=2, max_length=40) and len(fitted) == 2
        assert "train: 1 of 3 completions truncated and 1 examples dropped to fit max_length=40" in caplog.text
        caplog.clear()
    assert fit_to_max_length(dataset, tokenizer, None) is dataset  # no window: unchanged
    with caplog.at_level(logging.INFO, logger="hf_taskdistill.data"):
        assert len(fit_to_max_length(dataset.select([0]), tokenizer, 40, name="dev")) == 1
    assert "dev: all 1 examples fit max_length=40." in caplog.text
    with pytest.raises(ValueError, match="no example fits max_length=40"):
        fit_to_max_length(dataset.select([2]), tokenizer, 40)
    with pytest.raises(ValueError, match="load_task_dataset"):
        fit_to_max_length(dataset.rename_column("prompt", "question"), tokenizer, 40)
    with pytest.raises(ValueError, match="max_length must be an integer"):
        fit_to_max_length(dataset, tokenizer, 2)
    record = describe_task_data(path, fitted, counts, task="instruction", template=None)
    assert record == {"name": "dolly/train.jsonl", "num_examples": 2, "max_length": 40, "truncated": 1,
                      "dropped": 1, "task": "instruction"}  # fmt: skip
    assert str(tmp_path) not in json.dumps(record)
