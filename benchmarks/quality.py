"""Quality benchmark: task-selected units vs SFT, logit KD, learned projector and random units, on real data.

One teacher (SmolLM2-135M-Instruct from its GGUF, sha256-checked, SFT'd on the task first) and one student
architecture (a fresh, narrower Llama on the teacher's tokenizer). Within a training seed every method starts from
the same student initialisation, sees the same data order and gets the same step budget. Each (seed, method) writes
`runs/seed<s>/<method>/result.json`, so an interrupted run resumes where it stopped. The aggregate goes to
`results.json` and `results.md` (method x eval set, mean +- std over training seeds x generation seeds).

    python benchmarks/quality.py --profile cpu --output_dir local/bench/dolly-cpu   # ~75 min on 2 idle CPU cores
    python benchmarks/quality.py --profile cpu --task summarization --output_dir local/bench/dialogsum-cpu  # ~30 min
    python benchmarks/quality.py --profile gpu --output_dir local/bench/dolly-gpu   # the full protocol

Methods: sft (cross-entropy only), kd (GKD generalized JSD, off-policy, beta=0: forward KL), kd_projector
(KD + learned Linear(d_S, d_T) onto the whole teacher layer, correlation loss), kd_projector_mse (same, MSE),
kd_random (KD + seeded random units), kd_units (KD + gradient-selected units, the method), kd_units_gxa
(grad_x_act scores), kd_units_mse (the method with MSE).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time


GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
ALL_METHODS = (
    "sft",
    "kd",
    "kd_projector",
    "kd_projector_mse",
    "kd_random",
    "kd_units",
    "kd_units_gxa",
    "kd_units_mse",
)
METHOD_CONFIG = {
    "sft": dict(logit_loss="none", feature_loss_weight=0.0),
    "kd": dict(feature_loss_weight=0.0),
    "kd_projector": dict(feature_projector=True, feature_loss_type="correlation"),
    "kd_projector_mse": dict(feature_projector=True, feature_loss_type="mse"),
    "kd_random": dict(selection_method="random", feature_loss_type="correlation"),
    "kd_units": dict(selection_method="grad", feature_loss_type="correlation"),
    "kd_units_gxa": dict(selection_method="grad_x_act", feature_loss_type="correlation"),
    "kd_units_mse": dict(selection_method="grad", feature_loss_type="mse"),
}
SUMMARY_ROOM = 64  # tokens a DialogSum training example must leave for its summary (90% of summaries fit in 54)
PROFILES = {
    # 2 CPU cores, about an hour: a slice of every knob (stated in the results file)
    "cpu": dict(train_samples=2000, teacher_steps=60, student_steps=100, batch_size=8, max_length=128,
                student_hidden=256, student_layers=4, seeds=[0], gen_seeds=[10, 20], eval_samples=30,
                max_new_tokens=48, selection_num_samples=128, learning_rate=5e-4, teacher_learning_rate=1e-4,
                eval_sets=["dolly", "self_inst", "vicuna", "sinst", "unni_slice"],
                methods=["sft", "kd", "kd_projector", "kd_random", "kd_units"]),
    # one GPU: full Dolly train, 3 seeds, all five eval sets, the protocol's 5 generation seeds
    "gpu": dict(train_samples=None, teacher_steps=2000, student_steps=3000, batch_size=32, max_length=512,
                student_hidden=256, student_layers=8, seeds=[0, 1, 2], gen_seeds=[10, 20, 30, 40, 50],
                eval_samples=None, max_new_tokens=256, selection_num_samples=1024, learning_rate=5e-4,
                teacher_learning_rate=5e-5, eval_sets=["dolly", "self_inst", "vicuna", "sinst", "unni_slice"],
                methods=list(ALL_METHODS)),
}  # fmt: skip
# DialogSum prompts are whole dialogues (median 192 SmolLM2 tokens, 90th percentile 327): longer windows; the CPU
# profile trades batch size and steps for them to stay near the instruction run's token budget
SUMMARIZATION = {
    "cpu": dict(max_length=320, batch_size=4, teacher_steps=40, student_steps=60, max_new_tokens=64,
                eval_sets=["dialogsum"]),
    "gpu": dict(max_length=512, max_new_tokens=128, eval_sets=["dialogsum"]),
}  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu", help="preset sizes; flags below override")
    p.add_argument("--output_dir", default="benchmarks/results/dolly-cpu")
    p.add_argument("--data_dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    p.add_argument("--task", choices=["instruction", "summarization"], default="instruction")
    p.add_argument("--gguf", default="local/smollm2-135m-instruct-q4_1.gguf", help="SmolLM2-135M-Instruct GGUF file")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: <data_dir>/tokenizers/smollm2)")
    for name in ("train_samples", "teacher_steps", "student_steps", "batch_size", "max_length", "student_hidden",
                 "student_layers", "eval_samples", "max_new_tokens", "selection_num_samples"):  # fmt: skip
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--learning_rate", type=float, default=None)
    p.add_argument("--teacher_learning_rate", type=float, default=None)
    p.add_argument("--feature_loss_weight", type=float, default=1.0)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (student init, data order)")
    p.add_argument("--gen_seeds", type=int, nargs="+", default=None, help="generation seeds")
    p.add_argument("--eval_sets", nargs="+", default=None)
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--aggregate_only", action="store_true", help="only rebuild results.json/.md from finished runs")
    return p


def _settings(argv) -> argparse.Namespace:
    args = _parser().parse_args(argv)
    preset = dict(PROFILES[args.profile])
    if args.task == "summarization":
        preset.update(SUMMARIZATION[args.profile])
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.tokenizer = args.tokenizer or os.path.join(args.data_dir, "tokenizers", "smollm2")
    return args


def _write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # one per process: two processes of one run may write the same file
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dense_teacher(args, out: str) -> str:
    """Dequantise the GGUF once into a safetensors folder (the base teacher)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target = os.path.join(out, "teacher-base")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    digest = _sha256(args.gguf)
    if digest != GGUF_SHA256:
        raise SystemExit(f"{args.gguf}: sha256 {digest} != expected {GGUF_SHA256}; see ../shared/data/README.md")
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(args.gguf)), gguf_file=os.path.basename(args.gguf), dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )  # fmt: skip
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(target)
    return target


def _data(args, fmt: str, seed: int, tokenizer):
    """Task data in the trainer's format, each example cut to fit `max_length` tokens.

    Long completions are truncated (their first tokens kept) and examples whose prompt leaves too little room are
    dropped (instruction: prompt over half the window; summarization, whose prompts are whole dialogues: less than
    `SUMMARY_ROOM` tokens left for the summary); otherwise TRL's collators would drop the prompt or the completion.
    """
    from hf_taskdistill.data import load_task_dataset

    name = "dolly" if args.task == "instruction" else "dialogsum"
    source = os.path.join(args.data_dir, name, "train.jsonl")
    data = load_task_dataset(source, task=args.task, format="messages", template="chat", max_samples=args.train_samples,
                             seed=seed)  # fmt: skip

    def fit(example):
        user, assistant = example["messages"]
        prompt = tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        budget = args.max_length - n_prompt - 4  # room for the end-of-turn tokens
        ids = tokenizer(assistant["content"], add_special_tokens=False)["input_ids"]
        limit = args.max_length // 2 if args.task == "instruction" else args.max_length - SUMMARY_ROOM
        keep = n_prompt <= limit and budget > 0
        text = tokenizer.decode(ids[: max(budget, 0)]) if keep else ""
        return {"messages": [user, {"role": "assistant", "content": text}], "keep": keep}

    data = data.map(fit).filter(lambda e: e["keep"]).remove_columns("keep")
    if fmt == "prompt_completion":
        data = data.map(
            lambda e: {"prompt": e["messages"][:1], "completion": e["messages"][1:]}, remove_columns="messages"
        )
    return data


def _evaluate(model, tokenizer, args, eval_sets) -> dict:
    from hf_taskdistill.evaluation import evaluate_model

    model.eval()
    return evaluate_model(
        model, tokenizer, eval_sets, seeds=args.gen_seeds, max_samples=args.eval_samples, template="chat",
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=False,
    )  # fmt: skip


def _train_config(args, run_dir: str, seed: int, steps: int, lr: float, **extra):
    from hf_taskdistill import TaskFeatureDistillConfig

    kwargs = dict(
        output_dir=run_dir, max_steps=steps, per_device_train_batch_size=args.batch_size, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=max(steps // 20, 1), max_length=args.max_length, beta=0.0,
        logging_steps=max(steps // 10, 1), save_strategy="no", report_to="none", activation_checkpointing=False,
        seed=seed, data_seed=seed, selection_num_samples=args.selection_num_samples, selection_seed=seed,
        feature_loss_weight=args.feature_loss_weight, disable_tqdm=True,
    )  # fmt: skip
    kwargs.update(extra)
    return TaskFeatureDistillConfig(**kwargs)


def _student(teacher_dir: str, args, seed: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(teacher_dir)
    heads = max(args.student_hidden // 64, 1)
    overrides = dict(hidden_size=args.student_hidden, intermediate_size=args.student_hidden * 3,
                     num_hidden_layers=args.student_layers, num_attention_heads=heads,
                     num_key_value_heads=max(heads // 2, 1), head_dim=64)  # fmt: skip
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config), overrides


def run(argv=None) -> dict:
    args = _settings(argv)
    if args.aggregate_only:
        return aggregate(os.path.abspath(args.output_dir), args)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from transformers.utils import logging as hf_logging
    from trl import SFTTrainer

    from hf_taskdistill import FeatureDistillSFTTrainer, FeatureDistillTrainer
    from hf_taskdistill.data import load_eval_set

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    eval_sets = {name: load_eval_set(name, args.data_dir) for name in args.eval_sets}
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    _write_json(os.path.join(out, "settings.json"), {**vars(args), "device": device, "torch": torch.__version__})

    base_dir = _dense_teacher(args, out)
    teacher_res = os.path.join(out, "teacher", "result.json")
    teacher_dir = os.path.join(out, "teacher", "model")
    if not os.path.isfile(teacher_res):
        t0 = time.perf_counter()
        teacher = AutoModelForCausalLM.from_pretrained(base_dir).to(device)
        log("teacher zero-shot evaluation")
        before = _evaluate(teacher, tokenizer, args, eval_sets)
        log(f"teacher SFT: {args.teacher_steps} steps")
        cfg = _train_config(
            args, os.path.join(out, "teacher", "run"), 0, args.teacher_steps, args.teacher_learning_rate
        )
        sft = SFTTrainer(
            model=teacher,
            args=cfg,
            train_dataset=_data(args, "prompt_completion", 0, tokenizer),
            processing_class=tokenizer,
        )
        sft.remove_callback(PrinterCallback)
        sft.train()
        sft.save_model(teacher_dir)
        train_seconds = time.perf_counter() - t0
        log("teacher evaluation after SFT")
        after = _evaluate(teacher, tokenizer, args, eval_sets)
        _write_json(teacher_res, {"before_sft": before, "after_sft": after, "train_seconds": round(train_seconds, 1)})
        del teacher, sft
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).to(device)
    teacher.requires_grad_(False)

    for seed in args.seeds:
        for method in args.methods:
            res_path = os.path.join(out, "runs", f"seed{seed}", method, "result.json")
            if os.path.isfile(res_path):
                log(f"seed {seed} {method}: done already")
                continue
            log(f"seed {seed} {method}: training {args.student_steps} steps")
            student, overrides = _student(teacher_dir, args, seed)  # identical init for every method of a seed
            extra = dict(METHOD_CONFIG[method])
            sft_host = extra.get("logit_loss") == "none"
            cfg = _train_config(args, os.path.join(out, "runs", f"seed{seed}", method), seed, args.student_steps,
                                args.learning_rate, **extra)  # fmt: skip
            t0 = time.perf_counter()
            trainer_cls = FeatureDistillSFTTrainer if sft_host else FeatureDistillTrainer
            trainer = trainer_cls(model=student, teacher_model=teacher, args=cfg, processing_class=tokenizer,
                                  train_dataset=_data(args, "prompt_completion" if sft_host else "messages", seed, tokenizer))  # fmt: skip
            init_seconds = time.perf_counter() - t0
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            train_seconds = time.perf_counter() - t0
            trainer.save_model(os.path.join(out, "runs", f"seed{seed}", method, "model"))
            log(f"seed {seed} {method}: evaluating")
            scores = _evaluate(trainer.model, tokenizer, args, eval_sets)
            sel = trainer.unit_selection
            _write_json(res_path, {
                "method": method, "seed": seed, "config": METHOD_CONFIG[method], "student": overrides,
                "train_seconds": round(train_seconds, 1), "setup_seconds_incl_scoring": round(init_seconds, 1),
                "scoring": sel.diagnostics if sel is not None else None,
                "final_logs": [h for h in trainer.state.log_history if "loss" in h][-1:],
                "eval": scores,
            })  # fmt: skip
            del trainer, student
    return aggregate(out, args)


def _columns(eval_sets) -> list[tuple[str, str, str]]:
    """(column key, eval set, metric): ROUGE-L for instruction sets, ROUGE-1/2/L for summarization sets."""
    from hf_taskdistill.evaluation import SUMMARIZATION_EVAL_SETS, SUMMARIZATION_ROUGE_TYPES

    cols = []
    for name in eval_sets:
        if name in SUMMARIZATION_EVAL_SETS:
            cols += [(f"{name}/{m}", name, m) for m in SUMMARIZATION_ROUGE_TYPES]
        else:
            cols.append((name, name, "rougeL"))
    return cols


def _row(sets: dict, cols) -> dict[str, list[float]]:
    """Per-generation-seed scores of each column, from the `sets` dict written by `evaluate_model`."""
    return {
        key: [float(v) for v in sets.get(name, {}).get(metric, {}).get("per_seed", [])] for key, name, metric in cols
    }


def aggregate(out: str, args) -> dict:
    """Collect every result.json into results.json and a Markdown table."""
    cols = _columns(args.eval_sets)
    rows, costs, per_seed_seconds, seeds_done = {}, {}, {}, {}
    teacher_path = os.path.join(out, "teacher", "result.json")
    if os.path.isfile(teacher_path):
        with open(teacher_path) as f:
            teacher = json.load(f)
        for label, key in (("teacher (zero-shot)", "before_sft"), ("teacher (SFT)", "after_sft")):
            rows[label] = _row(teacher[key]["sets"], cols)
        costs["teacher (SFT)"] = teacher["train_seconds"]
    for method in args.methods:
        per_col, seconds = {}, []
        for seed in args.seeds:
            path = os.path.join(out, "runs", f"seed{seed}", method, "result.json")
            if not os.path.isfile(path):
                continue
            with open(path) as f:
                res = json.load(f)
            seconds.append(res["train_seconds"])
            for key, values in _row(res["eval"]["sets"], cols).items():
                per_col.setdefault(key, []).extend(values)
        if per_col:
            rows[method] = per_col
            costs[method] = round(statistics.mean(seconds), 1)
            per_seed_seconds[method] = seconds
            seeds_done[method] = len(seconds)
    fmt = lambda v: f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.2f}" if v else "–"  # noqa: E731
    header = [key if metric == "rougeL" and "/" not in key else f"{name} {metric}" for key, name, metric in cols]
    lines = ["| method | " + " | ".join(header) + " | training seeds | train s (incl. scoring) |",
             "|---" * (len(cols) + 3) + "|"]  # fmt: skip
    for name, per_col in rows.items():
        cells = " | ".join(fmt(per_col.get(key, [])) for key, _, _ in cols)
        lines.append(f"| {name} | {cells} | {seeds_done.get(name, '–')} | {costs.get(name, '–')} |")
    table = "\n".join(lines)
    metrics = sorted({m for _, _, m in cols})
    summary = {"metric": f"{'/'.join(metrics)} F x100 (rouge_score, no stemmer, max over references)", "table": table,
               "rows": rows, "train_seconds": costs, "train_seconds_per_seed": per_seed_seconds,
               "training_seeds": seeds_done}  # fmt: skip
    _write_json(os.path.join(out, "results.json"), summary)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return summary


if __name__ == "__main__":
    run(sys.argv[1:])
