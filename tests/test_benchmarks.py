"""The quality benchmark's settings and aggregation (the part that turns result files into the README table)."""

import importlib.util
import json
import os
import time

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


# ----- the second design (benchmarks/quality2.py): paired differences and aggregation -----
@pytest.fixture(scope="module")
def quality2():
    spec = importlib.util.spec_from_file_location("quality2", os.path.join(ROOT, "benchmarks", "quality2.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tables(quality2):
    """benchmarks/quality2_tables.py (the design's arms and every table), importable once quality2 is loaded."""
    import quality2_tables

    return quality2_tables


def _run(arm, seed, nll, correct, tokens, rouge=None):
    summary = {"nll": sum(nll) / sum(tokens), "accuracy": 100 * sum(correct) / sum(tokens)}
    return {"arm": arm, "seed": seed, "train_seconds": 1.0, "eval_seconds": 1.0, "dev_summary": summary,
            "dev": {"nll": nll, "correct": correct, "tokens": tokens},
            "rouge": None if rouge is None else {"per_example": {"rougeL": rouge},
                                                 "mean": {"rougeL": sum(rouge) / len(rouge)}}}  # fmt: skip


def test_paired_difference_is_per_token_and_paired(tables):
    tokens = [10, 20, 30, 40]
    y = [5.0, 9.0, 20.0, 8.0]
    x = [v - 0.1 * t for v, t in zip(y, tokens, strict=True)]  # x better by exactly 0.1 nats on every token
    r = tables.paired_difference(x, y, tokens, n_boot=500)
    assert r["diff"] == pytest.approx(-0.1) and r["ci95"] == pytest.approx([-0.1, -0.1])
    assert r["excludes_zero"] and r["n_examples"] == 4 and r["n_seeds"] == 1
    # the examples differ a lot from each other, but pairing removes that: a noisy unpaired gap would not
    noisy = tables.paired_difference([1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0], [1, 1, 1, 1], n_boot=500)
    assert noisy["diff"] == pytest.approx(0.0) and not noisy["excludes_zero"]
    assert noisy["ci95"][0] < 0 < noisy["ci95"][1]
    # two seeds: the mean of the per-seed differences; one resampling of the examples for both seeds
    pooled = tables.paired_difference([x, y], [y, y], tokens, n_boot=500)
    assert pooled["per_seed"] == pytest.approx([-0.1, 0.0]) and pooled["diff"] == pytest.approx(-0.05)
    assert pooled["ci95"] == pytest.approx([-0.05, -0.05])
    # ... while the seed-level t interval counts the seed-to-seed spread: -0.05 +- 12.706 * 0.0707 / sqrt(2)
    assert pooled["seed_ci95"] == pytest.approx([-0.05 - 0.6353, -0.05 + 0.6353], abs=1e-3)
    assert r["seed_ci95"] is None
    assert tables.harness.seed_interval([1.0, 2.0, 3.0]) == pytest.approx([2 - 4.303 / 3**0.5, 2 + 4.303 / 3**0.5])
    with pytest.raises(ValueError, match="equal shapes"):
        tables.paired_difference(x, y[:3], tokens)
    assert tables.per_token([1.0, 3.0], [2, 2]) == 1.0
    assert tables.gap_closed(start=9.0, arm=5.0, teacher=1.0) == 0.5 and tables.gap_closed(2.0, 1.0, 2.0) is None


def test_compare_runs_pairs_shared_seeds_and_refuses_unpaired(tables):
    tokens = [4, 4, 2]
    runs = {
        "A": {0: _run("A", 0, [4.0, 4.0, 2.0], [1, 1, 0], tokens, rouge=[10.0, 20.0, 30.0]),
              1: _run("A", 1, [4.0, 4.0, 2.0], [1, 1, 0], tokens, rouge=[10.0, 20.0, 30.0])},
        "C": {0: _run("C", 0, [2.0, 2.0, 1.0], [2, 2, 1], tokens, rouge=[12.0, 22.0, 32.0])},
    }  # fmt: skip
    (row,) = tables.compare_runs(runs)  # only C - A has both arms, on seed 0 only
    assert row["x"] == "C" and row["y"] == "A" and row["seeds"] == [0]
    assert row["nll"]["pooled"]["diff"] == pytest.approx(-0.5)  # 5 nats fewer over 10 tokens
    assert row["accuracy"]["pooled"]["diff"] == pytest.approx(30.0)  # 3 more correct of 10, in points
    assert row["rougeL"]["pooled"]["diff"] == pytest.approx(2.0)
    runs["C"][0]["dev"]["tokens"] = [4, 4, 3]
    with pytest.raises(ValueError, match="not paired"):
        tables.compare_runs(runs)


def test_quality2_deadline_may_be_after_midnight(quality2):
    at = lambda h, m: time.struct_time((2026, 12, 1, h, m, 0, 1, 335, 0))  # noqa: E731
    assert quality2.seconds_until("01:30", at(23, 0)) == 9000  # tomorrow's 01:30 (was -77,400: nothing started)
    assert quality2.seconds_until("22:00", at(23, 0)) == -3600  # an hour ago: passed
    assert quality2.seconds_until("23:30", at(23, 0)) == 1800


def test_quality2_aggregate_table_and_resume_guard(quality2, tables, tmp_path):
    out = str(tmp_path / "res")
    args = quality2.settings(["--profile", "tiny", "--output_dir", out, "--arms", "A", "B", "C", "--seeds", "0"])
    tokens = [5, 5]
    for arm, nll in (("A", [10.0, 10.0]), ("C", [8.0, 9.0])):
        _write(os.path.join(out, "runs", "seed0", f"{arm}.json"), _run(arm, 0, nll, [1, 2], tokens))
    for name, nll in (("teacher", [5.0, 5.0]), ("task", [15.0, 15.0]), ("activation", [15.0, 15.0])):
        _write(os.path.join(out, "reference", f"{name}.json"),
               {"name": name, "eval_seconds": 1.0, **_run(name, 0, nll, [0, 0], tokens)})  # fmt: skip
    summary = tables.aggregate(args)
    assert summary["arms"]["C"]["nll"] == [1.7] and summary["arms"]["C"]["gap_closed"] == pytest.approx(0.65)
    assert summary["arms"]["A"]["gap_closed"] == pytest.approx(0.5)
    assert [(c["x"], c["y"]) for c in summary["comparisons"]] == [("C", "A")]
    assert summary["missing"] == ["B/seed0"]
    table = tables.arm_table(summary).splitlines()  # the README's per-task table, from the same summary
    assert (
        table[2].startswith("| teacher | – | 1.0000 |")
        and "| **C (ours: task init, kd_units)** | 0 | 1.7000 |" in table[-1]
    )
    assert table[-1].endswith("| 65.0% |")  # no ROUGE measured: no ROUGE columns
    (row,) = tables.comparison_table(summary).splitlines()[2:]
    assert row.startswith("| C − A | our method vs the Minitron-style anchor | -0.3000 [") and "| – | seed 0 |" in row
    runs = {"A": {0: {}, 1: {}}, "E": {0: {}}}  # E is a one-seed arm: not missing at seed 1; C is seeded
    plan = tables.training_plan(["A", "E"], [0, 1], arms_given=False)  # a default run trains the design...
    assert plan == [("A", 0), ("E", 0), ("A", 1)]
    assert tables.training_plan(["E"], [0, 1], arms_given=True) == [("E", 0), ("E", 1)]  # ...--arms: every seed
    gpu = quality2.settings(["--profile", "gpu"])  # one command: the design, the references, then the ROUGE pass
    assert gpu.full and gpu.rouge_items_pass == 500 and gpu.rouge_gen_seeds == [10, 20] and len(gpu.rouge_sets) == 5
    assert quality2.settings(["--profile", "cpu"]).rouge_items_pass == 0
    with pytest.raises(SystemExit, match="one task at a time"):
        quality2.run(["--profile", "gpu", "--task", "all", "--output_dir", out])
    assert tables.missing_runs(runs, ["A", "C", "E", "F"], [0, 1]) == ["C/seed0", "F/seed0", "C/seed1"]
    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    assert "| C - A | our method vs the Minitron-style anchor | 0 | -0.3000 [" in md and "**Partial**" in md
    _write(os.path.join(out, "settings.json"), {"steps": 4, "batch_size": 2})
    quality2.check_resume(args)  # same settings: resumes
    with pytest.raises(SystemExit, match="steps: 4 there, 8 now"):
        quality2.check_resume(quality2.settings(["--profile", "tiny", "--output_dir", out, "--steps", "8"]))


def _rouge_record(name, per_set):
    """`per_set`: {set: {decoding: [per item rougeL]}} as the `--rouge_eval` pass writes it."""
    return {"model": name, "n_per_set": 2, "sets": {
        st: {dec: {"per_example": {"rougeL": v}, "mean": {"rougeL": sum(v) / len(v)}} for dec, v in decs.items()}
        for st, decs in per_set.items()}}  # fmt: skip


def test_rouge_pass_files_aggregate_paired_over_items_of_every_set(quality2, tables, tmp_path):
    out = str(tmp_path / "res")
    args = quality2.settings(["--profile", "tiny", "--output_dir", out, "--arms", "A", "C", "--seeds", "0", "1",
                              "--rouge_sets", "dolly", "vicuna"])  # fmt: skip
    a = {"dolly": {"greedy": [10.0, 20.0], "sample10": [8.0, 8.0], "sample20": [10.0, 10.0]},
         "vicuna": {"greedy": [30.0, 40.0], "sample10": [6.0, 6.0], "sample20": [6.0, 6.0]}}  # fmt: skip
    c = {st: {dec: [v + 1.0 for v in vals] for dec, vals in decs.items()} for st, decs in a.items()}
    _write(os.path.join(out, "rouge", "teacher.json"), _rouge_record("teacher", a))
    for seed in (0, 1):
        _write(os.path.join(out, "rouge", f"seed{seed}", "A.json"), _rouge_record(f"seed{seed}/A", a))
    _write(os.path.join(out, "rouge", "seed0", "C.json"), _rouge_record("seed0/C", c))
    rouge = tables.load_rouge(out)
    assert set(rouge) == {"teacher", "A", "C"} and sorted(rouge["A"]) == [0, 1]
    # items of both sets in order; sampled = mean over the generation seeds per item
    assert tables.rouge_vector(rouge["A"][0], ["dolly", "vicuna"], "greedy") == [10.0, 20.0, 30.0, 40.0]
    assert tables.rouge_vector(rouge["A"][0], ["dolly", "vicuna"], "sampled") == [9.0, 9.0, 6.0, 6.0]
    assert tables.rouge_vector(rouge["A"][0], ["dolly", "self_inst"], "greedy") is None  # a set not measured
    summary = tables.aggregate(args)["rouge"]
    assert summary["arms"]["A"]["cells"] == {"dolly": "15.00", "vicuna": "35.00", "all": "25.00", "sampled": "7.50"}
    (row,) = summary["comparisons"]  # C - A, on the one seed both have
    assert row["seeds"] == [0] and row["greedy"]["n_examples"] == 4
    assert row["greedy"]["diff"] == pytest.approx(1.0) and row["sampled"]["diff"] == pytest.approx(1.0)
    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    assert "| C - A | 0 | all | 4 | +1.00 [+1.00, +1.00] * | +1.00 [+1.00, +1.00] * |" in md
    # a set measured for C but not for A: the comparison pools the sets both have
    del rouge["A"][0]["sets"]["vicuna"]
    _, part = tables.rouge_section(rouge, ["dolly", "vicuna"], n_boot=200)
    (row,) = part["comparisons"]
    assert (
        row["sets"] == ["dolly"] and row["greedy"]["n_examples"] == 2 and row["greedy"]["diff"] == pytest.approx(1.0)
    )
    assert "| teacher | – | 15.00 | 35.00 | 25.00 | 7.50 |" in md


def test_headline_table_reads_results_of_each_task(tables):
    def diff(d, lo, hi, seed_ci=None):
        return {"diff": d, "ci95": [lo, hi], "excludes_zero": lo > 0 or hi < 0, "seed_ci95": seed_ci}

    dolly = {"task": "dolly", "comparisons": [
        {"x": "C", "y": "A", "seeds": [0, 1, 2], "nll": {"pooled": diff(0.25, 0.2, 0.3, [0.19, 0.31])}}],
        "rouge": {"comparisons": [{"x": "C", "y": "A", "greedy": diff(-1.5, -3.0, -0.25)}]}}  # fmt: skip
    dsum = {"task": "dialogsum", "comparisons": [
        {"x": "C", "y": "A", "seeds": [0], "nll": {"pooled": diff(0.2, 0.1, 0.3)}},
        {"x": "C", "y": "D", "seeds": [0], "nll": {"pooled": diff(-0.05, -0.06, -0.04)}}]}  # fmt: skip
    md = tables.headline([dolly, dsum]).splitlines()
    assert md[0].count("Δ dev NLL") == 2 and len(md) == 4  # header, rule, C - A, C - D (the others: nowhere run)
    assert md[2] == ("| C − A (ours vs Minitron-style) | +0.250 [+0.200, +0.300] * (3 seeds); seeds [+0.190, +0.310] * "
                     "| -1.50 [-3.00, -0.25] * | +0.200 [+0.100, +0.300] * (1 seed) | not run |")  # fmt: skip
    assert md[3].startswith("| C − D (units vs projector) | not run | not run | -0.050 [-0.060, -0.040] * (1 seed)")


def test_budget_check_pairs_the_same_arm_and_comparison_across_budgets(tables):
    tokens = [4, 4, 2]
    short = {
        "A": {0: _run("A", 0, [4.0, 4.0, 2.0], [1, 1, 0], tokens)},
        "C": {
            0: _run("C", 0, [6.0, 6.0, 3.0], [1, 1, 0], tokens),
            1: _run("C", 1, [6.0, 6.0, 3.0], [1, 1, 0], tokens),
        },
    }
    long = {"A": {0: _run("A", 0, [2.0, 2.0, 1.0], [1, 1, 0], tokens)},
            "C": {0: _run("C", 0, [3.0, 3.0, 1.5], [1, 1, 0], tokens)}, "D": {0: _run("D", 0, [1.0, 1.0, 1.0], [1, 1, 0], tokens)}}  # fmt: skip
    budget = tables.budget_comparison(short, long, n_boot=200)
    by_arm = {r["arm"]: r for r in budget["arms"]}
    assert set(by_arm) == {"A", "C"}  # D ran at one budget only
    assert by_arm["A"]["change"]["diff"] == pytest.approx(-0.5) and by_arm["A"]["seeds"] == [0]
    assert by_arm["C"]["change"]["diff"] == pytest.approx(-0.75) and by_arm["C"]["seeds"] == [0]  # seed 1: short only
    (c,) = budget["comparisons"]  # C - A only: the other headline pairs miss an arm at one budget
    assert (c["x"], c["y"], c["seeds"]) == ("C", "A", [0])
    assert c["short"]["diff"] == pytest.approx(0.5) and c["long"]["diff"] == pytest.approx(0.25)
    assert c["change"]["diff"] == pytest.approx(-0.25) and c["change"]["ci95"] == pytest.approx([-0.25, -0.25])
    two = tables.budget_comparison({**short, "A": {**short["A"], 1: short["A"][0]}},
                                   {**long, "A": {**long["A"], 1: _run("A", 1, [3.0, 3.0, 1.5], [1, 1, 0], tokens)}},
                                   n_boot=200)  # fmt: skip
    assert two["arms"][0]["change"]["per_seed"] == pytest.approx([-0.5, -0.25])  # A, seeds 0 and 1
    assert "; seeds [" in tables.budget_table(two, 250, 500).splitlines()[2]  # several seeds: the seed-level interval
    md = tables.budget_table(budget, 250, 500).splitlines()
    assert md[0] == "| arm | seeds | dev NLL, 250 steps | dev NLL, 500 steps | 500 steps − 250 steps |"
    assert md[2].startswith("| A | 0 | 1.0000 | 0.5000 | -0.5000 [-0.5000, -0.5000] *")
    assert md[-1].startswith("| C − A (ours vs Minitron-style) | 0 | +0.5000") and md[-1].endswith(
        "-0.2500 [-0.2500, -0.2500] * |"
    )


def test_fill_markers_refills_only_marked_spans(tables):
    text = "intro\n<!-- quality2:headline -->\nold\n<!-- /quality2:headline -->\nkept\n"
    out, filled = tables.fill_markers(text, {"headline": "| new |", "dolly-arms": "| arms |"})
    assert (
        filled == ["headline"]
        and out == "intro\n<!-- quality2:headline -->\n| new |\n<!-- /quality2:headline -->\nkept\n"
    )
    assert tables.fill_markers(out, {"headline": "| new |"})[0] == out  # idempotent
    with pytest.raises(ValueError, match="has no <!-- /quality2:headline -->"):
        tables.fill_markers("<!-- quality2:headline -->\nold\n", {"headline": "x"})


def test_cut_report_energy_outliers_and_overlap(tables):
    act_sq = [[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]]  # 2 norm inputs x 4 residual units
    mlp_act = [[1.0, 1.0, 1.0, 5.0]]  # 1 layer x 4 neurons
    cuts = {"activation": {"residual": [0, 1], "mlp": [[3, 0]]}, "task": {"residual": [1, 2], "mlp": [[0, 1]]}}
    r = tables.cut_report(act_sq, mlp_act, cuts, outliers=1)
    assert r["activation"]["residual_energy"] == pytest.approx(0.7) and r["task"]["residual_energy"] == pytest.approx(
        0.5
    )
    assert r["activation"]["outliers_kept"] == 1 and r["task"]["outliers_kept"] == 0  # unit 0 carries the most
    assert r["activation"]["mlp_energy"] == pytest.approx(0.75) and r["task"]["mlp_energy"] == pytest.approx(0.25)
    assert r["task"]["residual_overlap"] == 0.5 and r["task"]["mlp_overlap"] == 0.5
    assert r["activation"]["residual_overlap"] == 1.0


# ----- the speed and memory benchmark's report (benchmarks/speed_memory_report.py) -----
def test_speed_memory_report_rebuilds_the_committed_cpu_report(tmp_path, monkeypatch):
    """The committed CPU result's Markdown is what the report module writes from its JSON (the targets, verdicts
    and tables are derived, not hand-edited); a changed target flips its verdict."""
    import argparse

    spec = importlib.util.spec_from_file_location("speed_memory", os.path.join(ROOT, "benchmarks", "speed_memory.py"))
    speed_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed_memory)  # (puts benchmarks/ on sys.path: the report module imports by name)
    import speed_memory_report as report

    stored = os.path.join(ROOT, "benchmarks", "results", "speed_memory", "cpu")
    with open(stored + ".json") as f:
        results = json.load(f)
    saved = argparse.Namespace(**{**results["settings"], "output_dir": str(tmp_path)})
    report.write_report(saved, results, speed_memory.__doc__)
    with open(stored + ".md") as f:
        assert (tmp_path / "cpu.md").read_text() == f.read()
    rows = {r["what"]: r for r in report.summary_rows(results)}
    row = rows["gkd_off: step time fd / plain TRL"]
    assert row["verdict"] == "pass" and row["value"] <= report.TARGETS["time"]
    monkeypatch.setattr(report, "TARGETS", dict(report.TARGETS, time=row["value"] - 0.001))
    assert report.summary_rows(results)[0]["verdict"].startswith("MISS")
