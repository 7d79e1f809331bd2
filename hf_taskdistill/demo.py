"""`hf-taskdistill demo`: the offline embedded default, end to end on CPU in a few minutes.

1. Generate an instruction-style task (`reverse : k c f a` -> `a f c k`, seven operations) and a word tokenizer.
2. Train a small teacher on it with TRL's `SFTTrainer` (hidden 64, 4 layers).
3. Distil a narrower student (hidden 24, 2 layers) three ways from the same initialisation, data order and budget:
   logit KD only (GKD generalized JSD), KD + random units, KD + task-selected units (the method).
4. Print exact match and ROUGE-L on held-out examples, and save the method's student (its `config.json` carries the
   selected unit indices under `task_distill`).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-taskdistill demo", description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", default="demo_output", help="where the students and results are written")
    p.add_argument("--train_examples", type=int, default=3000)
    p.add_argument("--eval_examples", type=int, default=300)
    p.add_argument("--teacher_steps", type=int, default=600)
    p.add_argument("--student_steps", type=int, default=300)
    p.add_argument("--student_hidden", type=int, default=24)
    p.add_argument("--feature_loss_weight", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny budget, for smoke tests (numbers are meaningless)")
    return p


def _greedy_answers(model, tokenizer, rows, batch_size: int = 64) -> list[str]:
    import torch

    from .toy import to_messages

    model.eval()
    tokenizer.padding_side = "left"
    answers = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        prompts = [
            tokenizer.apply_chat_template(to_messages(r)["messages"][:1], add_generation_prompt=True, tokenize=False)
            for r in chunk
        ]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        for seq in out[:, enc["input_ids"].shape[1] :]:
            answers.append(tokenizer.decode(seq, skip_special_tokens=True).strip())
    return answers


def score_answers(model, tokenizer, rows) -> dict[str, float]:
    """Exact match and ROUGE-L F (rouge_score, no stemmer), in percent, with greedy decoding."""
    from rouge_score import rouge_scorer

    from .evaluation import quiet_absl_logging

    quiet_absl_logging()
    answers = _greedy_answers(model, tokenizer, rows)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = list(zip(answers, [r["output"] for r in rows], strict=True))
    exact = sum(a == ref for a, ref in pairs) / len(rows)
    rouge = sum(scorer.score(ref, a)["rougeL"].fmeasure for a, ref in pairs) / len(rows)
    return {"exact_match": round(100 * exact, 2), "rougeL": round(100 * rouge, 2)}


def _progress_callback(phase: str, start: float):
    """A `TrainerCallback` printing one line per logging step: the phase, step/max_steps, loss, elapsed seconds."""
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is None or not state.is_world_process_zero:
                return
            print(f"      {phase}: step {state.global_step}/{state.max_steps}, loss {loss:.3f}  "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)  # fmt: skip

    return _Progress()


def _common_args(output_dir: str, steps: int, seed: int, **extra):
    from .config import TaskFeatureDistillConfig

    kwargs = dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=32,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        warmup_steps=20,
        max_length=64,
        logging_steps=max(steps // 5, 1),
        save_strategy="no",
        report_to="none",
        activation_checkpointing=False,
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
    )
    kwargs.update(extra)
    return TaskFeatureDistillConfig(**kwargs)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.train_examples, args.eval_examples, args.teacher_steps, args.student_steps = 256, 32, 20, 10
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback
    from transformers.utils import logging as hf_logging
    from trl import SFTTrainer

    from .selection import load_unit_selection
    from .toy import build_toy_tokenizer, make_toy_examples, tiny_llama, to_messages, to_prompt_completion
    from .trainer import FeatureDistillTrainer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or max(os.cpu_count() or 1, 1))
    start = time.perf_counter()
    out = os.path.abspath(args.output_dir)
    tokenizer = build_toy_tokenizer()
    vocab = len(tokenizer)
    train_rows = make_toy_examples(args.train_examples, seed=args.seed)
    eval_rows = make_toy_examples(args.eval_examples, seed=args.seed + 10_000)
    messages = Dataset.from_list([to_messages(r) for r in train_rows])

    print(f"[1/4] task: {len(train_rows)} generated training examples, e.g. {train_rows[0]}", flush=True)
    print(f"[2/4] training the teacher (hidden 64, 4 layers) with TRL's SFTTrainer, {args.teacher_steps} steps ...",
          flush=True)  # fmt: skip
    teacher = tiny_llama(vocab, hidden_size=64, num_layers=4, seed=args.seed)
    teacher_args = _common_args(f"{out}/teacher", args.teacher_steps, args.seed, completion_only_loss=True)
    sft = SFTTrainer(model=teacher, args=teacher_args, processing_class=tokenizer,
                     train_dataset=Dataset.from_list([to_prompt_completion(r) for r in train_rows]))  # fmt: skip
    sft.remove_callback(PrinterCallback)
    sft.add_callback(_progress_callback("teacher", start))
    sft.train()
    teacher_score = score_answers(teacher, tokenizer, eval_rows)
    print(f"[2/4] teacher (hidden 64, 4 layers) trained: {teacher_score}  ({time.perf_counter() - start:.0f}s)",
          flush=True)  # fmt: skip

    variants = [
        ("logit KD only", {"feature_loss_weight": 0.0}),
        ("KD + random units", {"selection_method": "random"}),
        ("KD + task-selected units", {"selection_method": "grad"}),
    ]
    results = {"teacher (hidden 64)": teacher_score}
    method_dir = None
    for name, extra in variants:
        student = tiny_llama(vocab, hidden_size=args.student_hidden, num_layers=2, seed=args.seed + 1)
        run_dir = f"{out}/" + name.replace(" ", "_").replace("+", "plus")
        print(f"[3/4] student (hidden {args.student_hidden}) {name}: "
              f"{'scoring the teacher units, then ' if extra.get('selection_method') == 'grad' else ''}"
              f"{args.student_steps} steps ...", flush=True)  # fmt: skip
        cfg = _common_args(run_dir, args.student_steps, args.seed, beta=0.5, selection_num_samples=256,
                           feature_loss_weight=extra.pop("feature_loss_weight", args.feature_loss_weight), **extra)  # fmt: skip
        trainer = FeatureDistillTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=messages,
                                        processing_class=tokenizer)  # fmt: skip
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(_progress_callback(name, start))
        trainer.train()
        results[name] = score_answers(student, tokenizer, eval_rows)
        if trainer.unit_selection is not None:
            trainer.save_model(f"{run_dir}/final")
            method_dir = f"{run_dir}/final"
        print(
            f"[3/4] student (hidden {args.student_hidden}) {name}: {results[name]}  ({time.perf_counter() - start:.0f}s)",
            flush=True,
        )

    width = max(len(k) for k in results)
    print(f"\n[4/4] held-out task metrics ({len(eval_rows)} examples, greedy):")
    print(f"  {'model':<{width}}  exact match  ROUGE-L")
    for name, score in results.items():
        print(f"  {name:<{width}}  {score['exact_match']:>11.2f}  {score['rougeL']:>7.2f}")
    selection = load_unit_selection(method_dir)
    layer = selection.layers[0]
    print(f"\nSaved the task-selected student to {method_dir}")
    print(f"  config.json -> task_distill: teacher layer {layer.teacher_layer} -> student layer {layer.student_layer}, "
          f"k={layer.k}, first indices {layer.indices[:8]}, split-half overlap "
          f"{selection.diagnostics.get('split_half_overlap')}")  # fmt: skip
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(
            {"results": results, "args": vars(args), "seconds": round(time.perf_counter() - start, 1)}, f, indent=2
        )
    print(f"Total {time.perf_counter() - start:.0f}s; results in {out}/results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
