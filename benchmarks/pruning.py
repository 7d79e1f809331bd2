"""Pruning benchmark: SmolLM2-135M-Instruct cut to K residual units (and M MLP neurons) by every criterion.

For each task (Dolly, DialogSum from `../shared/data`) the teacher is scored once on `--num_scoring` training
examples (one forward/backward pass gives every criterion's statistics). Each run cuts a student with
`hf_taskdistill.pruning.prune_teacher` and measures the dev NLL per completion token on `--num_dev` held-out dev
examples right after the cut and, for recovery runs, after `--steps` steps of plain cross-entropy on gold completions
with the project's `FeatureDistillSFTTrainer` (`feature_loss_weight=0`; logit KD through `FeatureDistillTrainer`
took 13 s a step on the shared CPU, too slow for the grid), the same steps, data and seed for every criterion. Resumable: a run whose JSON exists is skipped. Single-threaded.

    OMP_NUM_THREADS=1 python benchmarks/pruning.py            # all phases, then the table
    OMP_NUM_THREADS=1 python benchmarks/pruning.py --keep_k_only   # only the keep-k table of every criterion
    python benchmarks/pruning.py --table_only                  # rebuild results.md from the JSON files

The keep-k phase (first, a few minutes per task) draws the selection report's keep-k curve of the teacher's last
layer on the same dev examples for every criterion's last-layer scores (`aggregation="last"`), beside the report's
own `activation` (mean |h|), `random` and `grad` bottom-k references: `<task>/keep_k.json`.

Results: `benchmarks/results/pruning/<task>/<run>.json` and `benchmarks/results/pruning/results.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "local" / "smollm2-135m-instruct"
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "benchmarks" / "results" / "pruning"
CACHE = ROOT / "local" / "bench" / "pruning"
TASKS = {"dolly": ("instruction", 192), "dialogsum": ("summarization", 256)}  # task kind, max_length
CRITERIA = ("activation", "grad", "grad_x_act", "fisher", "random", "hybrid")
AGGS = ("sum", "sum_normalized", "max_normalized", "last")
MLP_WIDTH = 1024  # of 1536: the MLP-pruning runs


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_task(task: str, tokenizer, args):
    from hf_taskdistill.data import fit_to_max_length, load_task_dataset

    kind, max_length = TASKS[task]
    common = dict(task=kind, format="messages", template="chat", seed=0)
    train = load_task_dataset(DATA / task, split="train", **common)
    train = train.shuffle(seed=0).select(range(args.num_scoring + args.steps * args.batch_size + 600))
    train = fit_to_max_length(train, tokenizer, max_length)
    scoring = train.select(range(args.num_scoring))
    recovery = train.select(range(args.num_scoring, min(len(train), args.num_scoring + args.steps * args.batch_size)))
    # Dolly: a seeded subset of 120 dev examples; DialogSum: all 500 (about half have a dialogue short enough)
    pool = args.num_dev + 20 if task == "dolly" else None
    dev = load_task_dataset(DATA / task, split="dev", max_samples=pool, **common)
    dev = fit_to_max_length(dev, tokenizer, max_length, name="dev")
    dev = dev.select(range(min(args.num_dev, len(dev))))
    return scoring, recovery, dev, max_length


def batches_of(dataset, tokenizer, max_length, batch_size):
    from torch.utils.data import DataLoader
    from trl.experimental.utils import DataCollatorForChatML

    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=max_length)
    return list(DataLoader(dataset, batch_size=batch_size, collate_fn=collator))


def dev_nll(model, batches) -> float:
    """Mean NLL per gold completion token (labels shifted as in the trainer)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            targets = F.pad(b["labels"][:, 1:], (0, 1), value=-100)
            total += float(
                F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
            )
            count += int((targets != -100).sum())
    return total / count


def recover(student, teacher, tokenizer, recovery, max_length, args):
    """`--steps` steps of the project's SFT host with `feature_loss_weight=0` (plain CE on the gold completions)."""
    from hf_taskdistill import FeatureDistillSFTTrainer, TaskFeatureDistillConfig

    with tempfile.TemporaryDirectory() as tmp:
        config = TaskFeatureDistillConfig(
            output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, feature_loss_weight=0.0,
            lmbda=0.0, max_length=max_length, logging_steps=max(1, args.steps // 4), save_strategy="no",
            report_to="none", use_cpu=True, bf16=False, disable_tqdm=True, seed=0, activation_checkpointing=False,
            dataloader_num_workers=0,
        )  # fmt: skip
        trainer = FeatureDistillSFTTrainer(model=student, teacher_model=teacher, args=config,
                                           train_dataset=recovery, processing_class=tokenizer)  # fmt: skip
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer.model, losses


def _run(task, k, m, criterion, recover, aggregation=None, rescale="rms", outliers=0):
    return dict(task=task, k=k, m=m, criterion=criterion, aggregation=aggregation, rescale=rescale,
                outliers=outliers, recover=recover)  # fmt: skip


def plan(args):
    """Runs in priority order across tasks (so a partial benchmark still answers the main question).

    Recovered runs use `--rescale` (chosen from the careful-cut ablation that runs first).
    """
    rescale, tasks = args.rescale, args.tasks
    first = ("activation", "fisher", "random", "grad_x_act", "hybrid")  # `grad` (clearly worst) last
    order = []
    if "dolly" in tasks:  # 1. the careful cut (cut only): raw, RMS-matched and least-squares norm scales
        order += [_run("dolly", 288, None, c, False, rescale=ns)
                  for c in ("activation", "grad", "grad_x_act", "fisher") for ns in ("none", "rms", "lsq")]  # fmt: skip
    # 2. every criterion, recovered, K=288, no MLP cut (the NLL right after the cut is recorded too); on Dolly also
    # the other norm scales, recovered
    for task in tasks:
        order += [_run(task, 288, None, c, True, rescale=rescale) for c in first]
        if task == "dolly":
            order += [_run(task, 288, None, c, True, rescale="lsq") for c in ("activation", "grad_x_act")]
            other = [ns for ns in ("none", "rms") if ns != rescale]
            order += [_run(task, 288, None, c, True, rescale=ns) for ns in other for c in CRITERIA]
    for task in tasks:
        order += [_run(task, 288, None, "grad", True, rescale=rescale)]
    # 3. MLP pruning, then the wider student, then both
    for k, m in ((288, MLP_WIDTH), (432, None), (432, MLP_WIDTH)):
        for task in tasks:
            order += [_run(task, k, m, c, True, rescale=rescale) for c in first + ("grad",)]
    if "dolly" in tasks:  # 4. aggregations of the task-aware criteria and outlier units (cut only)
        order += [_run("dolly", 288, None, c, False, aggregation=a, rescale=rescale)
                  for c in ("grad", "grad_x_act", "fisher") for a in ("sum", "max_normalized", "last")]  # fmt: skip
        order += [_run("dolly", 288, None, "activation", False, aggregation="sum_normalized", rescale=rescale)]
        order += [_run("dolly", 288, None, c, False, outliers=8, rescale=rescale) for c in ("grad", "grad_x_act")]
    if "dolly" in tasks:  # 5. recovery of the other aggregation
        order += [_run("dolly", 288, None, c, True, aggregation="sum", rescale=rescale)
                  for c in ("grad_x_act", "fisher", "grad")]  # fmt: skip
    return order


DEFAULT_AGG = {"activation": "sum", "random": "sum"}  # Minitron sums over layers; task-aware default below
TASK_AWARE_AGG = "sum_normalized"


def run_name(r) -> str:
    agg = r["aggregation"] or DEFAULT_AGG.get(r["criterion"], TASK_AWARE_AGG)
    extra = f"_out{r['outliers']}" if r.get("outliers") else ""
    return (f"k{r['k']}_m{r['m'] or 'full'}_{r['criterion']}_{agg}_{r['rescale']}{extra}"
            f"{'_rec' if r['recover'] else '_cut'}")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--num_scoring", type=int, default=64)
    parser.add_argument("--num_dev", type=int, default=100)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rescale", default="rms", choices=["none", "rms", "lsq"], help="Of the recovered runs.")
    parser.add_argument("--max_runs", type=int, default=None, help="Stop after this many new runs.")
    parser.add_argument("--deadline", type=str, default=None, help="HH:MM (UTC): start no run after this time.")
    parser.add_argument("--table_only", action="store_true")
    parser.add_argument("--keep_k_only", action="store_true", help="Only the keep-k phase.")
    args = parser.parse_args(argv)
    if not args.table_only:
        run_all(args)
    write_table()
    return 0


def prepare_task(task, teacher, tokenizer, args):
    """Data, teacher dev NLL and the (cached) scoring statistics of one task."""
    import torch

    from hf_taskdistill.pruning import collect_unit_statistics

    (OUT / task).mkdir(parents=True, exist_ok=True)
    scoring, recovery, dev, max_length = load_task(task, tokenizer, args)
    dev_batches = batches_of(dev, tokenizer, max_length, 8)
    meta_file = OUT / task / "teacher.json"
    if not meta_file.exists():
        t0 = time.perf_counter()
        nll = dev_nll(teacher, dev_batches)
        meta = dict(task=task, teacher_dev_nll=nll, eval_seconds=time.perf_counter() - t0, num_dev=len(dev),
                    num_scoring=len(scoring), num_recovery_examples=len(recovery), steps=args.steps,
                    batch_size=args.batch_size, lr=args.lr, max_length=max_length,
                    dev_tokens=sum(int((b["labels"] != -100).sum()) for b in dev_batches),
                    hardware=f"{platform.processor() or platform.machine()}, 1 thread, torch {torch.__version__}")  # fmt: skip
        meta_file.write_text(json.dumps(meta, indent=2))
        log(f"{task}: teacher dev NLL {nll:.4f} ({meta['eval_seconds']:.0f} s)")
    scoring_batches = batches_of(scoring, tokenizer, max_length, 4)
    stats_file = CACHE / f"{task}_stats_{args.num_scoring}.pt"
    if stats_file.exists():
        stats = torch.load(stats_file, weights_only=False)
    else:
        t0 = time.perf_counter()
        stats = collect_unit_statistics(teacher, scoring_batches, need_grad=True)
        torch.save(stats, stats_file)
        meta = json.loads(meta_file.read_text())
        meta["scoring_seconds"] = time.perf_counter() - t0
        meta_file.write_text(json.dumps(meta, indent=2))
        log(f"{task}: scoring pass {meta['scoring_seconds']:.0f} s")
    return stats, scoring_batches, recovery, dev_batches, max_length


def run_all(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_taskdistill.pruning import prune_teacher

    torch.set_num_threads(1)
    CACHE.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    teacher = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    new_runs, contexts = 0, {}
    for task in args.tasks:
        if not (OUT / task / "keep_k.json").exists():
            contexts[task] = contexts.get(task) or prepare_task(task, teacher, tokenizer, args)
            keep_k_phase(task, teacher, *contexts[task][:2], contexts[task][3])
    if args.keep_k_only:
        return
    for r in plan(args):
        task = r["task"]
        if (OUT / task / f"{run_name(r)}.json").exists():
            continue
        if args.deadline and time.strftime("%H:%M", time.gmtime()) >= args.deadline:
            log("deadline reached; stopping")
            return
        if args.max_runs is not None and new_runs >= args.max_runs:
            return
        if task not in contexts:
            contexts[task] = prepare_task(task, teacher, tokenizer, args)
        stats, scoring_batches, recovery, dev_batches, max_length = contexts[task]
        out = OUT / task / f"{run_name(r)}.json"
        agg = r["aggregation"] or DEFAULT_AGG.get(r["criterion"], TASK_AWARE_AGG)
        t0 = time.perf_counter()
        # the statistics are reused; the batches serve the `lsq` calibration pass only
        result = prune_teacher(
            teacher,
            scoring_batches,
            r["k"],
            r["m"],
            criterion=r["criterion"],
            aggregation=agg,
            norm_rescale=r["rescale"],
            keep_outliers=r["outliers"],
            stats=stats,
            seed=0,
        )
        student = result.model
        record = dict(r, aggregation=agg, num_parameters=result.num_parameters,
                      cut_nll=dev_nll(student, dev_batches))  # fmt: skip
        record["cut_seconds"] = time.perf_counter() - t0
        if r["recover"]:
            t1 = time.perf_counter()
            student, losses = recover(student, teacher, tokenizer, recovery, max_length, args)
            record["recovery_seconds"] = time.perf_counter() - t1
            record["train_loss"] = losses
            record["recovered_nll"] = dev_nll(student, dev_batches)
        record["seconds"] = time.perf_counter() - t0
        out.write_text(json.dumps(record, indent=2))
        new_runs += 1
        log(f"{task} {run_name(r)}: cut {record['cut_nll']:.3f}"
            + (f" -> recovered {record['recovered_nll']:.3f}" if r["recover"] else "")
            + f" ({record['seconds']:.0f} s)")  # fmt: skip
        write_table()


KEEP_K_GRID = (36, 72, 144, 216, 288, 432, 576)


def keep_k_phase(task, teacher, stats, scoring_batches, dev_batches) -> None:
    """Keep-k curves of the last layer for every scored criterion (`hf_taskdistill.report.keep_k_curve`)."""
    from hf_taskdistill.pruning import scores_from_statistics
    from hf_taskdistill.report import keep_k_curve

    t0 = time.perf_counter()
    scores = {c: scores_from_statistics(stats, c, "last").last_layer.float()
              for c in CRITERIA if c not in ("activation", "random")}  # fmt: skip
    layer = teacher.config.num_hidden_layers - 1
    report = keep_k_curve(teacher, scoring_batches, dev_batches, layer, scores, k_grid=KEEP_K_GRID,
                          criterion="grad", k=288, seed=0)  # fmt: skip
    report["seconds_total"] = round(time.perf_counter() - t0, 1)
    (OUT / task / "keep_k.json").write_text(json.dumps(report, indent=2))
    log(f"{task}: keep-k curves of {sorted(report['nll'])} ({report['seconds_total']:.0f} s)")


def _keep_k_lines(task_dir) -> list[str]:
    path = task_dir / "keep_k.json"
    if not path.exists():
        return []
    rep = json.loads(path.read_text())
    names = list(rep["nll"])
    lines = [(f"Keep-k curve of teacher layer {rep['layer']} (dev NLL when only the top-k units of the layer's output "
             f"are kept and the rest set to their scoring-data mean; {rep['num_examples']} dev examples, "
             f"{rep['num_tokens']} tokens; full teacher {rep['full_teacher_nll']:.3f}, all units at their mean "
             f"{rep['mean_floor_nll']:.3f}; last-layer scores of each criterion, `activation` = mean |h| of the "
             f"layer output; {rep['seconds_total']:.0f} s):"), "",
             "| k | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]  # fmt: skip
    for i, k in enumerate(rep["k_grid"]):
        row = [rep["nll"][n][i] for n in names]
        best = min(v for n, v in zip(names, row, strict=True) if not n.endswith("_bottom"))
        cells = [f"**{v:.3f}**" if v == best and k < rep["d_t"] else f"{v:.3f}" for v in row]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_table() -> None:
    lines = ["# Pruning benchmark (SmolLM2-135M-Instruct)", ""]
    for task_dir in sorted(p for p in OUT.iterdir() if p.is_dir()) if OUT.exists() else []:
        meta_file = task_dir / "teacher.json"
        if not meta_file.exists():
            continue
        meta = json.loads(meta_file.read_text())
        recs = [json.loads(f.read_text()) for f in sorted(task_dir.glob("k*.json")) if f.name != "keep_k.json"]
        header = (
            f"Teacher dev NLL {meta['teacher_dev_nll']:.3f} per completion token ({meta['num_dev']} dev examples, "
            f"{meta.get('dev_tokens', '?')} tokens, max_length {meta['max_length']}); scoring on "
            f"{meta['num_scoring']} train examples ({meta.get('scoring_seconds', 0):.0f} s); recovery "
            f"{meta['steps']} steps x {meta['batch_size']} examples, lr {meta['lr']} constant, plain CE on the gold "
            f"completions (SFT host, feature_loss_weight 0); {meta['hardware']}."
        )
        columns = (
            "| K | M | criterion | aggregation | norm rescale | params | NLL after cut | NLL after recovery | s |"
        )
        sizes = sorted({(r["k"], r["m"] or 1536) for r in recs if r["recover"]})
        todo = [run_name(r) for r in plan(argparse.Namespace(tasks=[meta["task"]], rescale="rms"))
                if not (task_dir / f"{run_name(r)}.json").exists()]  # fmt: skip
        coverage = (f"Recovered runs exist for (K, M) = {', '.join(f'({k}, {m})' for k, m in sizes) or 'none'}; "
                    + (f"{len(todo)} runs of the plan (`plan()`) are missing: {', '.join(todo)}." if todo
                       else "every run of the plan (`plan()`) is here."))  # fmt: skip
        lines += [f"## {meta['task']}", "", *_keep_k_lines(task_dir), header, "", coverage, "", columns,
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        recs.sort(key=lambda r: (not r["recover"], r["k"], r["m"] or 0, r["rescale"] != "rms", r["criterion"],
                                 r["aggregation"]))  # fmt: skip
        for r in recs:
            rec = f"{r['recovered_nll']:.3f}" if "recovered_nll" in r else ""
            lines.append(f"| {r['k']} | {r['m'] or 1536} | {r['criterion']} | {r['aggregation']} | {r['rescale']} | "
                         f"{r['num_parameters'] / 1e6:.1f}M | {r['cut_nll']:.3f} | {rec} | {r['seconds']:.0f} |")  # fmt: skip
        lines.append("")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
