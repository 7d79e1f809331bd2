"""ROUGE evaluation under the MiniLLM / DistiLLM protocol (docs: method.md, section 5).

Sampling with temperature 1.0, top-p 1.0, top-k 0, prompts cut to their last 256 tokens, at most 512 tokens in
all, five generation seeds (10, 20, 30, 40, 50), reported as mean (std). Scores are ROUGE F-measures x 100 from
`rouge_score` without a stemmer, the max over an example's references, averaged over examples. MiniLLM's own ROUGE
code and multi-reference rule were not checked, so every result names the implementation and the rule it used.

    hf-taskdistill eval --model_name_or_path outputs/student --data_dir ../shared/data --output results.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .data import (
    EVAL_SETS,
    INSTRUCTION_EVAL_SETS,
    SUMMARIZATION_EVAL_SETS,
    TEMPLATES,
    build_prompt,
    ensure_chat_template,
    load_eval_set,
    subsample,
)


logger = logging.getLogger(__name__)

DEFAULT_SEEDS = (10, 20, 30, 40, 50)
SUMMARIZATION_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
ROUGE_RULE = "F-measure x100; max over references per example; plain mean over examples"
ROUGE_SCALE = "x100"  # every ROUGE number here, in the JSON, the table and the model card: F-measure times 100
UNNI_NOTE = (
    "unni_slice is a 1,050-example slice of Unnatural Instructions with 1-2-word outputs (ROUGE-L is close to exact "
    "match); it is not MiniLLM's UnNI set (10,000 examples, responses of at least 11 tokens): never report or "
    "compare it as UnNI."
)
_EVALUATE_LOAD_TIMEOUT_S = 30.0
_evaluate_rouge: Any = None  # the loaded `evaluate` metric, False once loading failed, None before trying


def _try_evaluate_rouge() -> Any:
    """`evaluate.load("rouge")` once per process, or None. It fails offline (no cached module), never hangs."""
    global _evaluate_rouge
    if _evaluate_rouge is None:
        _evaluate_rouge = False
        try:
            import evaluate

            box: dict[str, Any] = {}

            def _load():
                try:
                    box["metric"] = evaluate.load("rouge")
                except Exception as e:  # offline: FileNotFoundError; a broken install: anything
                    box["error"] = e

            # A daemon thread bounds a download that stalls on a firewalled network (HF_HUB_OFFLINE fails fast).
            thread = threading.Thread(target=_load, daemon=True)
            thread.start()
            thread.join(_EVALUATE_LOAD_TIMEOUT_S)
            if "metric" in box:
                _evaluate_rouge = box["metric"]
            else:
                reason = box.get("error", f"timed out after {_EVALUATE_LOAD_TIMEOUT_S:.0f}s")
                logger.info("evaluate.load('rouge') unavailable (%s); using rouge_score directly.", reason)
        except ImportError as e:
            logger.info("evaluate is not importable (%s); using rouge_score directly.", e)
    return _evaluate_rouge or None


def quiet_absl_logging() -> None:
    """Keep `rouge_score`'s absl INFO lines ("Using default tokenizer.", one per scorer) out of the log."""
    logging.getLogger("absl").setLevel(logging.WARNING)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def rouge_scores(
    predictions: Sequence[str],
    references: Sequence[Sequence[str] | str],
    rouge_types: Sequence[str] = ("rougeL",),
    implementation: str = "auto",
) -> dict[str, Any]:
    """Mean ROUGE F-measure x 100 per type: the max over each example's references, a plain mean over examples.

    Args:
        predictions: one generated text per example.
        references: the reference texts of each example (a bare string counts as one reference).
        rouge_types: e.g. `("rougeL",)` or `("rouge1", "rouge2", "rougeL")`.
        implementation: `"auto"` tries `evaluate.load("rouge")` (per example, `use_aggregator=False`, so no
            bootstrap resampling) and falls back to `"rouge_score"`, i.e. `RougeScorer(rouge_types,
            use_stemmer=False).score(reference, prediction)`. Both give identical numbers.

    Returns:
        `{type: mean score, ..., "n": number of examples, "rouge_impl": which implementation ran}`.
    """
    if implementation not in ("auto", "evaluate", "rouge_score"):
        raise ValueError(f"implementation must be 'auto', 'evaluate' or 'rouge_score', got {implementation!r}.")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists.")
    if not predictions:
        raise ValueError("rouge_scores needs at least one prediction.")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if empty := [i for i, r in enumerate(refs) if not r]:
        raise ValueError(f"Example {empty[0]} has no reference.")
    rouge_types = list(rouge_types)
    quiet_absl_logging()

    metric = _try_evaluate_rouge() if implementation != "rouge_score" else None
    if implementation == "evaluate" and metric is None:
        raise RuntimeError("evaluate.load('rouge') is unavailable (it needs the Hub or a cached module).")
    if metric is not None:
        # evaluate's rouge uses RougeScorer.score_multi for list references: the max F-measure per type.
        computed = metric.compute(
            predictions=list(predictions), references=refs, rouge_types=rouge_types, use_aggregator=False,
            use_stemmer=False,
        )  # fmt: skip
        per_example = {t: [float(x) for x in computed[t]] for t in rouge_types}
        impl = f"evaluate {_version('evaluate')} rouge (rouge_score {_version('rouge_score')}; use_stemmer=False)"
    else:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(rouge_types, use_stemmer=False)
        per_example = {t: [] for t in rouge_types}
        for prediction, example_refs in zip(predictions, refs, strict=True):
            scores = [scorer.score(ref, prediction) for ref in example_refs]  # (target, prediction) order
            for t in rouge_types:
                per_example[t].append(max(s[t].fmeasure for s in scores))
        impl = f"rouge_score {_version('rouge_score')} RougeScorer(use_stemmer=False)"
    result: dict[str, Any] = {t: 100.0 * sum(v) / len(v) for t, v in per_example.items()}
    result.update(n=len(predictions), rouge_impl=impl)
    return result


def _batch_seed(seed: int, batch_index: int) -> int:
    # Per-batch reseeding keeps a batch's samples independent of earlier batches; the large stride keeps the five
    # protocol seeds (10, 20, ...) from sharing streams across batches.
    return seed * 1_000_003 + batch_index


def generate_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    seed: int,
    batch_size: int = 8,
    max_prompt_length: int = 256,
    max_length: int = 512,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    do_sample: bool = True,
    progress: bool = True,
    max_new_tokens: int | None = None,
) -> list[str]:
    """Batched, left-padded generation; returns the decoded completions only, stripped.

    Prompts are fully formatted text (chat template already applied): no special tokens are added. Each prompt is
    cut to its last `max_prompt_length` tokens, and a batch gets `max_length - (padded prompt length)` new tokens,
    as `generate(max_length=...)` does on MiniLLM's left-padded batches (capped by `max_new_tokens` when given, a
    budget knob for CPU runs that departs from the protocol). The checkpoint's own `generation_config`
    sampling defaults (e.g. a repetition penalty) are ignored: only the arguments here apply. Batch `i` is seeded
    with `torch.manual_seed`, so a run is reproducible for a seed, batch size and prompt order.
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"Need 0 < max_prompt_length < max_length, got {max_prompt_length} and {max_length}.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("The tokenizer has neither a pad nor an eos token.")
    eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos_ids |= set(model_eos if isinstance(model_eos, list) else [model_eos] if model_eos is not None else [])
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}
    device = next(model.parameters()).device

    saved_config, was_training = model.generation_config, model.training
    # A fresh config: unset fields fall back to transformers' global defaults, not to the checkpoint's.
    model.generation_config = GenerationConfig(eos_token_id=sorted(eos_ids) or None, pad_token_id=pad_id)
    model.eval()
    responses: list[str] = []
    try:
        bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress)
        for batch_index, start in enumerate(range(0, len(prompts), batch_size)):
            batch = list(prompts[start : start + batch_size])
            encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
            encoded = [ids[-max_prompt_length:] for ids in encoded]  # keep the end: the response header
            if any(len(ids) == 0 for ids in encoded):
                raise ValueError(f"A prompt of batch {batch_index} tokenizes to nothing.")
            width = max(len(ids) for ids in encoded)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(encoded):  # left padding: every prompt ends at column `width`
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids) :] = 1
            config = GenerationConfig(
                max_new_tokens=max_length - width if max_new_tokens is None else min(max_length - width, max_new_tokens), do_sample=do_sample, num_beams=1, pad_token_id=pad_id,
                eos_token_id=sorted(eos_ids) or None, **sampling,
            )  # fmt: skip
            torch.manual_seed(_batch_seed(seed, batch_index))
            with torch.no_grad():
                output = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
                )
            texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
            responses.extend(text.strip() for text in texts)
            bar.update(len(batch))
        bar.close()
    finally:
        model.generation_config = saved_config
        model.train(was_training)
    return responses


def build_eval_prompts(tokenizer, examples: Sequence[Mapping[str, Any]], template: str = "chat") -> list[str]:
    """The prompt text of each example from [`~hf_taskdistill.data.load_eval_set`].

    `"alpaca"`: the MiniLLM prompt (the record's own `prompt` field). `"chat"`: one user turn rendered with the
    tokenizer's chat template and the generation prompt.
    """
    if template == "alpaca":
        return [ex.get("prompt") or build_prompt(ex["instruction"], ex.get("input", ""), "alpaca") for ex in examples]
    if template != "chat":
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}.")
    ensure_chat_template(tokenizer, "chat")  # a no-op when the tokenizer has a chat template
    prompts = []
    for ex in examples:
        message = {"role": "user", "content": build_prompt(ex["instruction"], ex.get("input", ""), "chat")}
        prompts.append(tokenizer.apply_chat_template([message], add_generation_prompt=True, tokenize=False))
    return prompts


def _mean_std(values: list[float]) -> dict[str, Any]:
    """Mean and sample std over seeds; std is None (not 0) for a single seed, where it is undefined."""
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "per_seed": values}


def evaluate_model(
    model,
    tokenizer,
    eval_sets: Mapping[str, Sequence[Mapping[str, Any]]],
    seeds: Sequence[int] = DEFAULT_SEEDS,
    max_samples: float | None = None,
    template: str = "chat",
    batch_size: int = 8,
    max_prompt_length: int = 256,
    max_length: int = 512,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    keep_predictions: bool = False,
    progress: bool = True,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """Generate for every set and seed, and score: ROUGE-L (ROUGE-1/2/L for `dialogsum`), mean and std over seeds.

    Args:
        eval_sets: set name -> examples from [`~hf_taskdistill.data.load_eval_set`].
        seeds: generation seeds; greedy decoding (`do_sample=False`) runs the first one only.
        max_samples: evaluate a fixed seeded subset (seed 0) of each set, e.g. for dev-set checkpoint choice.
        template: `"chat"` or `"alpaca"`, as used in training.
        keep_predictions: also store each seed's generations.

    Returns:
        `{"protocol": {...decoding, seeds, template, rouge rule, scale and implementation, notes}, "sets": {name:
        {"n", "rougeL": {"mean", "std", "per_seed"}, ...}}}`: ROUGE F-measures x 100; std is the sample standard
        deviation over seeds, None for a single seed (greedy decoding runs one).
    """
    seeds = list(seeds) if do_sample else list(seeds)[:1]
    if not seeds:
        raise ValueError("evaluate_model needs at least one seed.")
    results: dict[str, Any] = {"sets": {}}
    impls = set()
    for name, examples in eval_sets.items():
        examples = subsample(examples, max_samples, seed=0)
        prompts = build_eval_prompts(tokenizer, examples, template)
        references = [ex["references"] for ex in examples]
        rouge_types = SUMMARIZATION_ROUGE_TYPES if name in SUMMARIZATION_EVAL_SETS else ("rougeL",)
        per_seed: dict[str, list[float]] = {t: [] for t in rouge_types}
        predictions = {}
        for seed in seeds:
            logger.info("Evaluating %s (n=%d), seed %d", name, len(examples), seed)
            outputs = generate_responses(
                model, tokenizer, prompts, seed, batch_size=batch_size, max_prompt_length=max_prompt_length,
                max_length=max_length, temperature=temperature, top_p=top_p, top_k=top_k, do_sample=do_sample,
                progress=progress, max_new_tokens=max_new_tokens,
            )  # fmt: skip
            scores = rouge_scores(outputs, references, rouge_types)
            impls.add(scores["rouge_impl"])
            for t in rouge_types:
                per_seed[t].append(scores[t])
            if keep_predictions:
                predictions[str(seed)] = outputs
        entry: dict[str, Any] = {"n": len(examples), **{t: _mean_std(v) for t, v in per_seed.items()}}
        if keep_predictions:
            entry["predictions"] = predictions
        results["sets"][name] = entry
    notes = [UNNI_NOTE] if "unni_slice" in eval_sets else []
    if not do_sample:
        notes.append("Greedy decoding: one pass (the seeds do not matter), so there is no std.")
    elif len(seeds) == 1:
        notes.append("One generation seed: no std.")
    decoding: dict[str, Any] = {"do_sample": do_sample}
    if do_sample:
        decoding.update(temperature=temperature, top_p=top_p, top_k=top_k)
    decoding.update(
        max_prompt_length=max_prompt_length,
        max_length=max_length,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    results["protocol"] = {
        "decoding": decoding,
        "seeds": seeds,
        "template": template,
        "max_samples": max_samples,
        "rouge": ROUGE_RULE + "; mean and sample std (ddof=1) over seeds",
        "rouge_scale": ROUGE_SCALE,
        "rouge_impl": " | ".join(sorted(impls)),
        "notes": notes,
    }
    return results


def write_results_json(results: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write `results` as indented, key-sorted JSON (parent folders created)."""
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, sort_keys=True, allow_nan=True)
        f.write("\n")


def _cell(entry: Mapping[str, Any], rouge_type: str) -> str:
    if rouge_type not in entry:
        return "-"
    mean, std = entry[rouge_type]["mean"], entry[rouge_type].get("std")
    if math.isnan(mean):
        return "nan"
    return f"{mean:.2f} ({std:.2f})" if std is not None else f"{mean:.2f} (–)"


def format_results_table(results: Mapping[str, Any]) -> str:
    """A Markdown table: set | n | ROUGE-L F1 x100, mean (std over seeds; "–" for one seed), plus ROUGE-1/2 columns
    when a set has them. Two decimals, as in the model card."""
    sets = results["sets"]
    extra = [t for t in ("rouge1", "rouge2") if any(t in entry for entry in sets.values())]
    header = ["set", "n", "ROUGE-L F1 (x100) mean (std)"] + [f"ROUGE-{t[-1]} F1 (x100) mean (std)" for t in extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in sets.items():
        cells = [name, str(entry["n"]), _cell(entry, "rougeL")] + [_cell(entry, t) for t in extra]
        lines.append("| " + " | ".join(cells) + " |")
    if "unni_slice" in sets:
        lines += ["", "Note: " + UNNI_NOTE]
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hf-taskdistill eval",
        description="ROUGE evaluation of a saved causal LM under the MiniLLM protocol: sampling (T=1, top-p 1, "
        "top-k 0), five seeds, rouge_score ROUGE-L F x100 with the max over references, mean (std) over seeds.",
    )
    parser.add_argument("--model_name_or_path", required=True, help="Local model folder (save_pretrained output).")
    parser.add_argument("--tokenizer_name_or_path", default=None, help="Tokenizer folder; default: the model's.")
    parser.add_argument("--data_dir", default="../shared/data", help="Folder laid out like ../shared/data.")
    parser.add_argument(
        "--eval_sets", nargs="+", default=list(INSTRUCTION_EVAL_SETS), choices=list(EVAL_SETS),
        help="Test sets (unni_slice is a slice of Unnatural Instructions, not UnNI).",
    )  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS), help="Generation seeds.")
    parser.add_argument("--max_samples", type=int, default=None, help="Seeded subset of each set (quick checks).")
    parser.add_argument("--batch_size", type=int, default=8, help="Prompts per generate() call.")
    parser.add_argument("--max_prompt_length", type=int, default=256, help="Prompts keep their last N tokens.")
    parser.add_argument("--max_length", type=int, default=512, help="Prompt plus generated tokens, at most.")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="Cap on generated tokens (CPU budget).")
    parser.add_argument("--template", default="chat", choices=list(TEMPLATES), help="Prompt template of training.")
    parser.add_argument("--greedy", action="store_true", help="Greedy decoding (one pass) instead of sampling.")
    parser.add_argument(
        "--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"], help="Model dtype."
    )
    parser.add_argument("--device", default=None, help="e.g. cpu or cuda:0; default: cuda when available.")
    parser.add_argument("--output", default="eval_results.json", help="Where to write the JSON results.")
    parser.add_argument("--keep_predictions", action="store_true", help="Store the generations in the JSON.")
    parser.add_argument("--no_progress", action="store_true", help="No progress bars.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """`hf-taskdistill eval`: load a local model, run the protocol, print the table and write the JSON."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    eval_sets = {name: load_eval_set(name, args.data_dir) for name in args.eval_sets}
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path or args.model_name_or_path)
    results = evaluate_model(
        model, tokenizer, eval_sets, seeds=args.seeds, max_samples=args.max_samples, template=args.template,
        batch_size=args.batch_size, max_prompt_length=args.max_prompt_length, max_length=args.max_length, max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy, keep_predictions=args.keep_predictions, progress=not args.no_progress,
    )  # fmt: skip
    results["model"] = args.model_name_or_path
    results["protocol"]["dtype"] = args.dtype
    write_results_json(results, args.output)
    print(format_results_table(results))
    print(f"\nROUGE: {results['protocol']['rouge_impl']}; {results['protocol']['rouge']}.")
    if len(results["protocol"]["seeds"]) == 1:
        print("One generation seed: no std (shown as –).")
    print(f"Results written to {args.output}")
    return 0
