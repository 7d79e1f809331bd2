"""The quality benchmark's settings and aggregation (the part that turns result files into the README table)."""

import importlib.util
import json
import os

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality", os.path.join(ROOT, "benchmarks", "quality.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _entry(**metrics):
    return {"n": 3, **{m: {"mean": sum(v) / len(v), "std": 0.0, "per_seed": v} for m, v in metrics.items()}}


def _write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


def test_summarization_preset_switches_window_and_eval_set(quality):
    instr = quality._settings(["--profile", "cpu"])
    summ = quality._settings(["--profile", "cpu", "--task", "summarization"])
    assert instr.eval_sets == ["dolly", "self_inst", "vicuna", "sinst", "unni_slice"] and instr.max_length == 128
    assert summ.eval_sets == ["dialogsum"] and summ.max_length == 320 and summ.max_length - quality.SUMMARY_ROOM > 192
    # an explicit flag still wins over the preset
    assert quality._settings(["--task", "summarization", "--max_length", "256"]).max_length == 256


def test_aggregate_pools_training_and_generation_seeds(quality, tmp_path):
    out = str(tmp_path)
    args = quality._settings(["--output_dir", out, "--seeds", "0", "1", "--methods", "sft", "kd_units",
                              "--eval_sets", "dolly", "dialogsum"])  # fmt: skip
    teacher = {"sets": {"dolly": _entry(rougeL=[10.0, 12.0]),
                        "dialogsum": _entry(rouge1=[30.0, 30.0], rouge2=[9.0, 11.0], rougeL=[25.0, 27.0])}}  # fmt: skip
    _write(os.path.join(out, "teacher", "result.json"), {"before_sft": teacher, "after_sft": teacher,
                                                         "train_seconds": 5.0})  # fmt: skip
    for seed, base in ((0, 1.0), (1, 3.0)):
        _write(os.path.join(out, "runs", f"seed{seed}", "kd_units", "result.json"), {
            "train_seconds": 10.0 * (seed + 1),
            "eval": {"sets": {"dolly": _entry(rougeL=[base, base + 1]),
                              "dialogsum": _entry(rouge1=[base], rouge2=[base], rougeL=[base])}},
        })  # fmt: skip
    summary = quality.aggregate(out, args)
    assert summary["rows"]["kd_units"]["dolly"] == [1.0, 2.0, 3.0, 4.0]
    assert summary["rows"]["kd_units"]["dialogsum/rouge2"] == [1.0, 3.0]
    assert summary["train_seconds"] == {"teacher (SFT)": 5.0, "kd_units": 15.0}
    assert summary["train_seconds_per_seed"] == {"kd_units": [10.0, 20.0]} and summary["training_seeds"] == {
        "kd_units": 2
    }
    assert "sft" not in summary["rows"]  # not run: no row, no crash
    header, _, *lines = summary["table"].splitlines()
    assert (
        header
        == "| method | dolly | dialogsum rouge1 | dialogsum rouge2 | dialogsum rougeL | training seeds | train s (incl. scoring) |"
    )
    assert lines[-1] == "| kd_units | 2.50 ± 1.29 | 2.00 ± 1.41 | 2.00 ± 1.41 | 2.00 ± 1.41 | 2 | 15.0 |"
    with open(os.path.join(out, "results.md")) as f:
        assert f.read().strip() == summary["table"]
