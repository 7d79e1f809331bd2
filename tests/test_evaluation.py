"""ROUGE against hand-computed values, generation on a tiny Llama, the results table and the eval CLI end to end."""

import copy
import json
import re
import sys
import types

import pytest
import torch

from hf_taskdistill import evaluation
from hf_taskdistill.data import load_eval_set, read_jsonl
from hf_taskdistill.evaluation import (
    UNNI_NOTE,
    evaluate_model,
    format_results_table,
    generate_responses,
    rouge_scores,
    write_results_json,
)


# --- ROUGE --------------------------------------------------------------------------------------------------------

# rouge_score lower-cases and keeps [a-z0-9]+ tokens.
# Ex. 1: "the cat sat on the mat" vs "the cat is on the mat": 6 tokens each, LCS = the cat on the mat = 5,
#   P = R = 5/6, F = 83.33. Unigram overlap 5 -> ROUGE-1 83.33. Bigrams: {the cat, on the, the mat} of 5 -> 60.
# Ex. 2: "a b c d" vs refs "x y" (F = 0) and "a c": LCS = 2, P = 2/4, R = 2/2, F = 2PR/(P+R) = 66.67; the max is
#   66.67. ROUGE-1 the same; ROUGE-2: no shared bigram -> 0.
# Means: ROUGE-L = ROUGE-1 = (83.33 + 66.67) / 2 = 75.0; ROUGE-2 = (60 + 0) / 2 = 30.0.
PREDICTIONS = ["the cat sat on the mat", "a b c d"]
REFERENCES = [["the cat is on the mat"], ["x y", "a c"]]


def test_rouge_hand_computed_and_multi_reference_max():
    scores = rouge_scores(PREDICTIONS, REFERENCES, ("rouge1", "rouge2", "rougeL"), implementation="rouge_score")
    assert scores["rougeL"] == pytest.approx(75.0)
    assert scores["rouge1"] == pytest.approx(75.0)
    assert scores["rouge2"] == pytest.approx(30.0)
    assert scores["n"] == 2 and scores["rouge_impl"].startswith("rouge_score")
    # The second example alone: max(0, 66.67), whatever the order of the references.
    assert rouge_scores(["a b c d"], [["a c", "x y"]], implementation="rouge_score")["rougeL"] == pytest.approx(
        200 / 3
    )


def test_rouge_normalisation_and_edge_cases():
    def rouge_l(prediction, reference):
        return rouge_scores([prediction], [reference], implementation="rouge_score")["rougeL"]

    assert rouge_l("The CAT, sat!", "the cat sat") == pytest.approx(100.0)  # case and punctuation ignored
    assert rouge_l("", "the cat") == 0.0
    assert rouge_l("cats", "cat") == 0.0  # no stemmer
    # "b a" vs "a b c": LCS 1, P = 1/2, R = 1/3, F = 2 * (1/6) / (5/6) = 0.4
    assert rouge_l("b a", "a b c") == pytest.approx(40.0)
    with pytest.raises(ValueError, match="2 predictions but 1"):
        rouge_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no reference"):
        rouge_scores(["a"], [[]])
    with pytest.raises(ValueError):
        rouge_scores([], [])


def fake_evaluate(load):
    module = types.ModuleType("evaluate")
    module.load = load
    return module


def test_rouge_auto_falls_back_when_evaluate_cannot_load(monkeypatch):
    def load(name):
        raise FileNotFoundError(f"Couldn't find a module script at ./{name}/{name}.py")

    monkeypatch.setitem(sys.modules, "evaluate", fake_evaluate(load))
    monkeypatch.setattr(evaluation, "_evaluate_rouge", None)
    scores = rouge_scores(PREDICTIONS, REFERENCES)
    assert scores["rougeL"] == pytest.approx(75.0)
    assert scores["rouge_impl"].startswith("rouge_score")
    with pytest.raises(RuntimeError, match="unavailable"):
        rouge_scores(PREDICTIONS, REFERENCES, implementation="evaluate")


def test_rouge_uses_evaluate_per_example_when_it_loads(monkeypatch):
    """A stand-in for evaluate's rouge module (per-example F with score_multi): both paths must agree."""
    from rouge_score import rouge_scorer

    calls = []

    class Metric:
        def compute(self, predictions, references, rouge_types, use_aggregator, use_stemmer):
            calls.append((use_aggregator, use_stemmer))
            scorer = rouge_scorer.RougeScorer(rouge_types, use_stemmer=use_stemmer)
            scores = [scorer.score_multi(r, p) for r, p in zip(references, predictions, strict=True)]
            return {t: [s[t].fmeasure for s in scores] for t in rouge_types}

    monkeypatch.setitem(sys.modules, "evaluate", fake_evaluate(lambda name: Metric()))
    monkeypatch.setattr(evaluation, "_evaluate_rouge", None)
    types_ = ("rouge1", "rouge2", "rougeL")
    via_evaluate = rouge_scores(PREDICTIONS, REFERENCES, types_)
    direct = rouge_scores(PREDICTIONS, REFERENCES, types_, implementation="rouge_score")
    assert calls == [(False, False)]
    assert via_evaluate["rouge_impl"].startswith("evaluate")
    assert {t: via_evaluate[t] for t in types_} == pytest.approx({t: direct[t] for t in types_})


# --- generation ---------------------------------------------------------------------------------------------------

PROMPTS = ["please do copy : the list a b c", "reverse : a", "please do sort : the list a b c d e f g h"]
GEN = dict(max_prompt_length=16, max_length=32, progress=False)


@pytest.fixture
def model(student):
    return student


def test_generation_is_deterministic_for_a_seed(model, tokenizer):
    first = generate_responses(model, tokenizer, PROMPTS, seed=10, batch_size=2, **GEN)
    assert first == generate_responses(model, tokenizer, PROMPTS, seed=10, batch_size=2, **GEN)
    assert first != generate_responses(model, tokenizer, PROMPTS, seed=20, batch_size=2, **GEN)
    assert len(first) == 3 and all(isinstance(t, str) and t == t.strip() for t in first)


def test_generation_left_pads_and_returns_only_completions(model, tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "right"
    model.generation_config.repetition_penalty = 5.0  # a checkpoint default the protocol must ignore
    model.train()
    batched = generate_responses(model, tok, PROMPTS, seed=0, batch_size=3, do_sample=False, **GEN)
    single = [generate_responses(model, tok, [p], seed=0, batch_size=1, do_sample=False, **GEN)[0] for p in PROMPTS]
    assert batched == single  # left padding: a padded batch decodes like each prompt alone
    assert tok.padding_side == "right" and model.training and model.generation_config.repetition_penalty == 5.0

    # Only the completion: the same tokens as a plain greedy generate() on the lone prompt, minus the prompt.
    ids = tok(PROMPTS[1], add_special_tokens=False, return_tensors="pt")["input_ids"]
    model.generation_config.repetition_penalty = 1.0
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32 - ids.shape[1])
    assert single[1] == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_generation_keeps_the_last_prompt_tokens(model, tokenizer):
    long_prompt = "please do the list a b c d e f g h sort"
    cut = generate_responses(model, tokenizer, [long_prompt], 0, do_sample=False, max_prompt_length=4, max_length=24)
    tail = generate_responses(model, tokenizer, ["f g h sort"], 0, do_sample=False, max_prompt_length=4, max_length=24)
    assert cut == tail
    with pytest.raises(ValueError, match="max_prompt_length"):
        generate_responses(model, tokenizer, PROMPTS, 0, max_prompt_length=32, max_length=32)


# --- evaluate_model, table, JSON ----------------------------------------------------------------------------------

EXAMPLES = [
    {"instruction": "please do copy", "input": "a b", "prompt": "please do copy : a b", "references": ["a b"]},
    {"instruction": "please do reverse", "input": "c d", "prompt": "please do reverse : c d", "references": ["d c"]},
    {"instruction": "please do first", "input": "e f", "prompt": "please do first : e f", "references": ["e", "f"]},
]


def test_evaluate_model_structure(model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, "_evaluate_rouge", False)  # skip evaluate's import (~3 s); tested when slow
    sets = {"dolly": EXAMPLES, "unni_slice": EXAMPLES[:2], "dialogsum": EXAMPLES[:1]}
    results = evaluate_model(model, tokenizer, sets, seeds=(10, 20), template="alpaca", batch_size=2, **GEN)
    assert results["sets"]["dolly"]["n"] == 3 and results["sets"]["unni_slice"]["n"] == 2
    entry = results["sets"]["dolly"]["rougeL"]
    assert len(entry["per_seed"]) == 2 and entry["mean"] == pytest.approx(sum(entry["per_seed"]) / 2)
    assert set(results["sets"]["dialogsum"]) == {"n", "rouge1", "rouge2", "rougeL"}
    protocol = results["protocol"]
    assert protocol["seeds"] == [10, 20] and protocol["decoding"]["top_k"] == 0
    assert protocol["rouge_impl"] and UNNI_NOTE in protocol["notes"]

    table = format_results_table(results)
    assert table.splitlines()[0] == (
        "| set | n | ROUGE-L F1 (x100) mean (std) | ROUGE-1 F1 (x100) mean (std) | ROUGE-2 F1 (x100) mean (std) |"
    )
    assert re.search(r"\| dolly \| 3 \| \d+\.\d\d \(\d+\.\d\d\) \| - \| - \|", table)
    assert "not MiniLLM's UnNI" in table

    write_results_json(results, tmp_path / "sub" / "results.json")
    assert json.loads((tmp_path / "sub" / "results.json").read_text()) == json.loads(json.dumps(results))

    greedy = evaluate_model(
        model, tokenizer, {"dolly": EXAMPLES}, seeds=(10, 20), do_sample=False, max_samples=2, **GEN
    )
    assert greedy["protocol"]["seeds"] == [10] and greedy["sets"]["dolly"]["n"] == 2
    assert greedy["sets"]["dolly"]["rougeL"]["std"] is None and "temperature" not in greedy["protocol"]["decoding"]
    assert re.search(r"\| dolly \| 2 \| \d+\.\d\d \(–\) \|", format_results_table(greedy))  # no "(0.00)"
    assert protocol["rouge_scale"] == "x100"


def test_format_results_table_by_hand():
    results = {"sets": {"vicuna": {"n": 80, "rougeL": {"mean": 15.254, "std": 0.3333, "per_seed": []}}}}
    assert (
        format_results_table(results)
        == "| set | n | ROUGE-L F1 (x100) mean (std) |\n|---|---|---|\n| vicuna | 80 | 15.25 (0.33) |"
    )


def test_one_seed_has_no_std_and_rouge_is_x100(model, tokenizer, monkeypatch, caplog):
    """A single seed reports std None ("–"), never 0.00; a perfect answer scores 100, not 1; absl stays quiet."""
    import logging

    monkeypatch.setattr(evaluation, "_evaluate_rouge", False)
    monkeypatch.setattr(evaluation, "generate_responses", lambda model, tok, prompts, seed, **kw: ["a b", "x", "e"])
    caplog.set_level(logging.INFO)
    results = evaluate_model(model, tokenizer, {"dolly": EXAMPLES}, seeds=(10,), **GEN)
    entry = results["sets"]["dolly"]["rougeL"]
    assert entry["std"] is None and entry["mean"] == pytest.approx(200 / 3)  # 100, 0, 100 -> x100 scale
    assert "One generation seed: no std." in results["protocol"]["notes"]
    assert format_results_table(results).splitlines()[-1] == "| dolly | 3 | 66.67 (–) |"
    assert "Using default tokenizer" not in caplog.text


# --- CLI ----------------------------------------------------------------------------------------------------------


def test_eval_help_works(capsys):
    with pytest.raises(SystemExit) as exit_:
        evaluation.main(["--help"])
    assert exit_.value.code == 0
    assert "--model_name_or_path" in capsys.readouterr().out


def test_eval_cli_end_to_end(tmp_path, tokenizer, student, capsys, monkeypatch):
    monkeypatch.setattr(evaluation, "_evaluate_rouge", False)
    from hf_taskdistill.cli import main as cli_main

    student.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    for folder in ("dolly", "uinst_slice"):
        (tmp_path / "data" / folder).mkdir(parents=True)
        rows = [{"instruction": e["instruction"], "input": e["input"], "output": e["references"][0]} for e in EXAMPLES]
        (tmp_path / "data" / folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "results.json"
    code = cli_main(
        ["eval", "--model_name_or_path", str(tmp_path / "model"), "--data_dir", str(tmp_path / "data"),
         "--eval_sets", "dolly", "unni_slice", "--seeds", "10", "20", "--batch_size", "2", "--max_prompt_length",
         "16", "--max_length", "32", "--device", "cpu", "--output", str(output), "--no_progress", "--keep_predictions"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| set | n | ROUGE-L F1 (x100) mean (std) |" in printed and "| unni_slice | 3 |" in printed
    results = json.loads(output.read_text())
    assert set(results["sets"]) == {"dolly", "unni_slice"} and results["protocol"]["seeds"] == [10, 20]
    assert len(results["sets"]["dolly"]["predictions"]["20"]) == 3
    assert results["protocol"]["template"] == "chat" and results["model"] == str(tmp_path / "model")


# --- real files (../shared/data) ----------------------------------------------------------------------------------


def _lcs_f(prediction: str, reference: str) -> float:
    """An independent ROUGE-L F: rouge_score's tokenisation (lower case, [a-z0-9]+ runs) and a plain LCS table."""
    pred, ref = (re.findall(r"[a-z0-9]+", text.lower()) for text in (prediction, reference))
    if not pred or not ref:
        return 0.0
    prev = [0] * (len(ref) + 1)
    for p in pred:
        cur = [0]
        for j, r in enumerate(ref):
            cur.append(prev[j] + 1 if p == r else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(pred) + len(ref))


@pytest.mark.slow
def test_rouge_agrees_with_rouge_score_and_an_independent_lcs_on_real_sets(shared_data):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for name in ("dolly", "sinst", "dialogsum"):
        examples = load_eval_set(name, shared_data)[:150]
        predictions = [(ex["instruction"] + " " + ex["input"])[:300] for ex in examples]  # a weak "model"
        references = [ex["references"] for ex in examples]
        ours = rouge_scores(predictions, references, implementation="rouge_score")["rougeL"]
        direct = [
            max(scorer.score(r, p)["rougeL"].fmeasure for r in refs)
            for p, refs in zip(predictions, references, strict=True)
        ]
        independent = [max(_lcs_f(p, r) for r in refs) for p, refs in zip(predictions, references, strict=True)]
        assert ours == pytest.approx(100 * sum(direct) / len(direct), abs=1e-9), name
        assert ours == pytest.approx(100 * sum(independent) / len(independent), abs=1e-9), name
        assert 0 < ours < 100
    outputs = [r["output"] for r in read_jsonl(shared_data / "dolly/test.jsonl", ["output"])[:100]]
    perfect = rouge_scores(outputs, [[o] for o in outputs], implementation="rouge_score")
    assert perfect["rougeL"] == pytest.approx(100)


@pytest.mark.slow
def test_real_evaluate_load_fails_offline_and_falls_back(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(evaluation, "_evaluate_rouge", None)
    scores = rouge_scores(PREDICTIONS, REFERENCES)
    assert scores["rougeL"] == pytest.approx(75.0)
    assert scores["rouge_impl"].startswith(("rouge_score", "evaluate"))  # evaluate only with a cached module
