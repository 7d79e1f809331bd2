"""Quality benchmark, second design: students cut out of the teacher, paired teacher-forced metrics with power.

One teacher (SmolLM2-135M-Instruct, `local/smollm2-135m-instruct`), one student shape cut out of it with
`hf_taskdistill.pruning.prune_teacher` (K residual units, M MLP neurons, N layers), and one teacher cache
(`hf_taskdistill.cache_build.build_teacher_cache`: top-K log-probs + the *whole* last teacher layer, so every arm's units
and the projector read the same cache). Every arm trains the same shape, on the same examples in the same order,
for the same steps, seed by seed; only the initialisation and the loss differ:

    A  activation-pruned init (Minitron's cut), logit KD only        (the anchor)
    B  task-pruned init, logit KD only
    C  task-pruned init, logit KD + feature loss on the same units  (our method: student unit i <-> teacher S_i)
    D  task-pruned init, logit KD + learned projector onto the whole teacher layer (the paper's baseline)
    E  random-pruned init, logit KD + feature loss on its own units
    F  task-pruned init, SFT only (cross-entropy on the gold completion, no teacher)
    G  activation-pruned init, logit KD + feature loss on its own units
    fresh_kd / fresh_units / fresh_projector: a fresh-initialised student of the same shape (continuity rows)

Logit KD is GKD's generalized JSD with beta=0 (forward KL), off-policy, over the cached teacher top-K + tail bucket;
the feature loss is the project's correlation loss at the last layer pair. Metrics: teacher-forced NLL per
completion token and token accuracy on held-out dev examples (per example, so arms are compared *paired*: the same
examples, a bootstrap over examples; per training seed and pooled over seeds), optionally greedy ROUGE-L on test
items. Each (task, arm, seed) writes `runs/seed<s>/<arm>.json`; a rerun skips finished parts; `--aggregate_only`
rebuilds `results.json` / `results.md` from them. Heavy artefacts (scoring statistics, pruned students, the cache)
live under `local/bench/quality2/` and are reused.

    OMP_NUM_THREADS=1 python benchmarks/quality2.py --profile tiny                 # smoke test of --full, ~3 min
    OMP_NUM_THREADS=1 python benchmarks/quality2.py --profile cpu --task dolly     # the CPU design, resumable
    python benchmarks/quality2.py --profile cpu --task dolly --aggregate_only      # tables only
    python benchmarks/quality2.py --profile gpu --task all                         # the whole design on a GPU

A default run trains the design: A, B, C, D and G at every seed, the one-question arms (E, F, fresh rows) at the
first; `--arms` trains the arms given at every seed. `--full` (the tiny and gpu profiles' default) makes one command
of the whole design: those runs, the references (teacher and untrained inits), then the ROUGE pass.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # (benchmarks/harness.py: env, hardware line, write_results)
import quality  # (benchmarks/quality.py, the first design: training config, JSON writer, ROUGE eval)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = {"dolly": "instruction", "dialogsum": "summarization"}
# arm -> (initialisation, loss)
ARMS = {
    "A": ("activation", "kd"),
    "B": ("task", "kd"),
    "C": ("task", "kd_units"),
    "D": ("task", "kd_projector"),
    "E": ("random", "kd_units"),
    "F": ("task", "sft"),
    "G": ("activation", "kd_units"),
    "fresh_kd": ("fresh", "kd"),
    "fresh_units": ("fresh", "kd_units"),
    "fresh_projector": ("fresh", "kd_projector"),
}
# init -> how it is cut: (residual criterion, aggregation, MLP criterion; None = the residual's), from the settings
CUTS = {
    "activation": lambda a: ("activation", "sum", None),
    "random": lambda a: ("random", "sum", None),
    "task": lambda a: (a.task_criterion, a.task_aggregation, None),
    # the two halves of the cut swapped (untrained references, `--references`): which half costs the task cut its start?
    "task_res": lambda a: (a.task_criterion, a.task_aggregation, "activation"),  # task units, Minitron's MLP
    "act_res": lambda a: ("activation", "sum", a.task_criterion),  # Minitron's units, task MLP
}
INSTRUCTION_SETS = ("dolly", "self_inst", "vicuna", "sinst", "unni_slice")  # the protocol's five test sets
DEFAULT_ORDER = ["A", "B", "C", "D", "G", "E", "F", "fresh_kd", "fresh_units", "fresh_projector"]
# the design's seeded arms: every training seed (>= 3); every other arm answers its question at the first seed
SEEDED_ARMS = ("A", "B", "C", "D", "G")
# (x, y, question): the paired difference x - y answers it
COMPARISONS = [
    ("C", "A", "our method vs the Minitron-style anchor"),
    ("C", "B", "feature term on the same units vs none (task-pruned init)"),
    ("C", "D", "units vs learned projector"),
    ("C", "E", "task units vs random units"),
    ("B", "A", "task-pruned vs activation-pruned init (KD only)"),
    ("G", "A", "feature term on the anchor's own student"),
    ("C", "F", "KD + units vs SFT only"),
    ("fresh_units", "fresh_kd", "units vs none on a fresh student"),
    ("fresh_units", "fresh_projector", "units vs projector on a fresh student"),
]
PROFILES = {
    # real model, toy budget: checks every stage end to end in a few minutes
    "tiny": dict(hidden_size=288, intermediate_size=256, num_layers=4, steps=4, batch_size=2, max_length=128,
                 num_scoring=8, num_dev=12, rouge_samples=4, max_new_tokens=16, learning_rate=1e-4, seeds=[0],
                 top_k=16, rouge_items=2, full=True),
    # 2 CPU cores: K = 288 of 576, MLP 768 of 1536, all 30 layers (47.4M parameters)
    "cpu": dict(hidden_size=288, intermediate_size=768, num_layers=None, steps=500, batch_size=4, max_length=192,
                num_scoring=64, num_dev=500, rouge_samples=0, max_new_tokens=64, learning_rate=1e-4,
                seeds=[0, 1, 2], top_k=64, rouge_items=100, full=False),
    # one GPU: the same design, full MLP, more steps, ROUGE on the test set
    "gpu": dict(hidden_size=288, intermediate_size=None, num_layers=None, steps=3000, batch_size=16, max_length=512,
                num_scoring=256, num_dev=1000, rouge_samples=0, max_new_tokens=256, learning_rate=1e-4,
                seeds=[0, 1, 2], top_k=64, rouge_items=500, full=True),
}  # fmt: skip


TEACHER_SFT_STEPS = {"tiny": 2, "cpu": 100, "gpu": 1000}  # DialogSum only
# DialogSum prompts are whole dialogues (median ~190 tokens) and `fit_to_max_length` drops an example whose prompt
# takes over half the window: a longer window keeps most of them
# (the dev window is longer still, so that all 500 dev dialogues are scored; training windows stay short on a CPU)
TASK_PRESETS = {"dialogsum": {"tiny": dict(max_length=384, eval_max_length=1024),
                              "cpu": dict(max_length=384, eval_max_length=1024),
                              "gpu": dict(max_length=768, eval_max_length=1024)}}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# pure statistics (tested in tests/test_benchmarks.py)
# ----------------------------------------------------------------------------------------------------------------
# The paired statistics and the teacher-forced pass live in the shared harness (same code as speed_memory/cache).
per_token = harness.per_token
paired_difference = harness.paired_difference


def gap_closed(start: float, arm: float, teacher: float) -> float | None:
    """Share of the start-to-teacher gap an arm closes: (start - arm) / (start - teacher); None without a gap."""
    gap = start - teacher
    return None if abs(gap) < 1e-12 else (start - arm) / gap


def missing_runs(runs: dict, arms, seeds) -> list[str]:
    """The design's (arm, seed) runs not in `runs`, as "arm/seed<s>": the seeded arms (`SEEDED_ARMS`) at every
    seed, the other arms (one-seed questions: E, F, the fresh rows) at the first seed only."""
    return [f"{arm}/seed{s}" for s in seeds for arm in arms
            if (arm in SEEDED_ARMS or s == seeds[0]) and s not in runs.get(arm, {})]  # fmt: skip


def training_plan(arms, seeds, arms_given: bool) -> list[tuple[str, int]]:
    """The (arm, seed) runs to train, seed by seed: every arm at every seed when `--arms` was given, else the design
    (`SEEDED_ARMS` at every seed, the other arms at the first), so a default run trains what `missing_runs` asks."""
    if arms_given:
        return [(arm, s) for s in seeds for arm in arms]
    return [(arm, s) for s in seeds for arm in arms if arm in SEEDED_ARMS or s == seeds[0]]


def compare_runs(runs: dict, comparisons=COMPARISONS, n_boot: int = 2000) -> list[dict]:
    """Paired differences for every comparison whose two arms share seeds.

    `runs[arm][seed]` is a result with `dev` = {"nll": [...], "correct": [...], "tokens": [...]}. Per comparison:
    the NLL difference (x - y, nats per token: negative means x is better) and the token-accuracy difference
    (x - y, points: positive means x is better), per seed and pooled over the shared seeds.
    """
    out = []
    for x, y, question in comparisons:
        seeds = sorted(set(runs.get(x, {})) & set(runs.get(y, {})))
        if not seeds:
            continue
        tokens = runs[x][seeds[0]]["dev"]["tokens"]
        for s in seeds:
            if runs[x][s]["dev"]["tokens"] != tokens or runs[y][s]["dev"]["tokens"] != tokens:
                raise ValueError(f"{x} and {y} (seed {s}) were evaluated on different dev tokens: not paired.")
        row = {"x": x, "y": y, "question": question, "seeds": seeds}
        rouge = [runs[a][s].get("rouge") for a in (x, y) for s in seeds]
        if all(r is not None for r in rouge):
            for t in rouge[0]["per_example"]:
                xs = [runs[x][s]["rouge"]["per_example"][t] for s in seeds]
                ys = [runs[y][s]["rouge"]["per_example"][t] for s in seeds]
                row[t] = {"pooled": paired_difference(xs, ys, [1] * len(xs[0]), n_boot=n_boot)}
        for metric, scale in (("nll", 1.0), ("correct", 100.0)):
            xs = [runs[x][s]["dev"][metric] for s in seeds]
            ys = [runs[y][s]["dev"][metric] for s in seeds]
            pooled = paired_difference(xs, ys, tokens, n_boot=n_boot)
            by_seed = {
                str(s): paired_difference([a], [b], tokens, n_boot=n_boot)
                for s, a, b in zip(seeds, xs, ys, strict=True)
            }
            if scale != 1.0:
                for r in (pooled, *by_seed.values()):
                    r["diff"] *= scale
                    r["ci95"] = [v * scale for v in r["ci95"]]
                    r["per_seed"] = [v * scale for v in r["per_seed"]]
                    if r.get("seed_ci95"):
                        r["seed_ci95"] = [v * scale for v in r["seed_ci95"]]
            row["accuracy" if metric == "correct" else "nll"] = {"pooled": pooled, "per_seed": by_seed}
        out.append(row)
    return out


# ----------------------------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    p.add_argument(
        "--task",
        choices=[*sorted(TASKS), "all"],
        default="dolly",
        help="all: both tasks, one after the other (default output and work directories)",
    )
    p.add_argument("--output_dir", default=None, help="default: benchmarks/results/quality2/<task>-<profile>")
    p.add_argument("--work_dir", default=None, help="heavy artefacts; default: local/bench/quality2/<task>-<profile>")
    p.add_argument("--data_dir", default=os.path.join(ROOT, "..", "shared", "data"))
    p.add_argument("--teacher", default=os.path.join(ROOT, "local", "smollm2-135m-instruct"),
                   help="teacher directory (for DialogSum a task-SFT'd teacher where one exists)")  # fmt: skip
    for name in ("hidden_size", "intermediate_size", "num_layers", "steps", "batch_size", "max_length",
                 "num_scoring", "num_dev", "rouge_samples", "max_new_tokens", "top_k"):  # fmt: skip
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--learning_rate", type=float, default=None)
    p.add_argument("--teacher_sft_steps", type=int, default=None, help="fine-tune the teacher on the task first")
    p.add_argument("--teacher_learning_rate", type=float, default=5e-5)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=None)
    # the pruning benchmark's best task-aware criterion after recovery (Dolly: fisher/rms 5.47 at M=1536, 5.77 at
    # M=1024; grad_x_act 6.01 / 5.97), with its default norm scales; the first quality2 run used grad_x_act / none
    p.add_argument("--task_criterion", default="fisher", help="criterion of the task-pruned init (B, C, D, F)")
    p.add_argument("--task_aggregation", default="sum_normalized")
    p.add_argument("--norm_rescale", default="rms", choices=["none", "rms", "lsq"], help="of every cut")
    p.add_argument("--feature_loss_weight", type=float, default=1.0)
    p.add_argument("--feature_loss_type", default="correlation")
    p.add_argument("--eval_batch_size", type=int, default=8)
    p.add_argument("--eval_max_length", type=int, default=None, help="dev window (default: max_length)")
    p.add_argument("--eval_inits", action="store_true", help="also evaluate the untrained inits and the teacher")
    p.add_argument("--deadline", default=None, help="HH:MM UTC: start no part that is not expected to end by then")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rouge_eval", type=int, default=0, metavar="N",
                   help="the ROUGE pass: the first N items of every test set (--rouge_sets), for every saved student "
                   "of --seeds x --arms and the teacher; resumable, and never retrains")  # fmt: skip
    p.add_argument(
        "--rouge_sets",
        nargs="+",
        default=None,
        help="default: dolly self_inst vicuna sinst unni_slice (Dolly task), dialogsum (DialogSum task)",
    )
    p.add_argument(
        "--rouge_gen_seeds",
        type=int,
        nargs="*",
        default=[],
        help="sampled decoding (temperature 1) per seed, besides greedy; the protocol uses 10 20 ...",
    )
    p.add_argument(
        "--rouge_items",
        type=int,
        default=None,
        help="items per test set of the ROUGE pass that a --full run ends with (profile default)",
    )
    p.add_argument("--full", action="store_true", default=None,
                   help="the whole design in one command: the design's runs (seeded arms at every seed, the others "
                   "at the first), the references, then the ROUGE pass (greedy + sampled seeds 10 20, every test "
                   "set); the default of the tiny and gpu profiles")  # fmt: skip
    p.add_argument("--aggregate_only", action="store_true")
    p.add_argument("--headline", nargs="+", metavar="OUTPUT_DIR", default=None,
                   help="print the README's tables (headline, per task: arms, paired differences) from these "
                   "output directories' results.json (one per task) and exit")  # fmt: skip
    p.add_argument("--references", nargs="+", choices=["teacher", *CUTS, "fresh"], default=None,
                   help="evaluate these untrained inits (and/or the teacher) on dev and exit, no training")  # fmt: skip
    p.add_argument("--cut_report", action="store_true",
                   help="how the saved cuts differ (energy kept, outlier units, overlap): <output_dir>/cuts.md, seconds")  # fmt: skip
    p.add_argument("--write_readme", default=None, metavar="PATH",
                   help="with --headline: refill the <!-- quality2:NAME --> ... <!-- /quality2:NAME --> spans of PATH")  # fmt: skip
    p.add_argument("--prepare_only", action="store_true",
                   help="stop after the shared parts (scoring, cuts, cache): then arms can run in parallel processes")  # fmt: skip
    return p


def settings(argv=None) -> argparse.Namespace:
    """Parsed flags over the profile's preset; output and work directories filled in."""
    args = _parser().parse_args(argv)
    preset = {**PROFILES[args.profile], **TASK_PRESETS.get(args.task, {}).get(args.profile, {})}
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.teacher_sft_steps is None:  # the first design found SFT changes the teacher on DialogSum, not on Dolly
        args.teacher_sft_steps = TEACHER_SFT_STEPS[args.profile] if args.task == "dialogsum" else 0
    args.arms_given = args.arms is not None
    args.arms = args.arms or list(DEFAULT_ORDER)
    if args.full and not args.rouge_eval:  # (an explicit --rouge_eval stays the ROUGE pass alone)
        args.rouge_items_pass = args.rouge_items
        args.rouge_gen_seeds = args.rouge_gen_seeds or [10, 20]
    else:
        args.rouge_items_pass = 0
    args.rouge_sets = args.rouge_sets or (["dialogsum"] if args.task == "dialogsum" else list(INSTRUCTION_SETS))
    name = f"{args.task}-{args.profile}"
    args.work_dir = args.work_dir or os.path.join(ROOT, "local", "bench", "quality2", name)
    # the smoke test's tables stay out of the committed results
    results = os.path.join(args.work_dir, "results") if args.profile == "tiny" else None
    args.output_dir = args.output_dir or results or os.path.join(ROOT, "benchmarks", "results", "quality2", name)
    # names quality._train_config reads
    args.selection_num_samples = args.num_scoring
    return args


# ----------------------------------------------------------------------------------------------------------------
# data and evaluation
# ----------------------------------------------------------------------------------------------------------------
def load_data(args, tokenizer):
    """(scoring, train, dev) as `messages` datasets fitted to `max_length`: the scoring examples and the
    `steps x batch_size` training examples are disjoint seeded draws from train; dev is the first `num_dev` dev
    examples that fit (deterministic, the same for every arm)."""
    from hf_taskdistill.data import fit_to_max_length, load_task_dataset

    kind = TASKS[args.task]
    common = dict(task=kind, format="messages", template="chat", seed=0)
    need = args.num_scoring + args.steps * args.batch_size
    train = load_task_dataset(os.path.join(args.data_dir, args.task), split="train", **common)
    train = train.shuffle(seed=0).select(range(min(len(train), int(need * 1.4) + 64)))
    train = fit_to_max_length(train, tokenizer, args.max_length)
    if len(train) < need:
        raise SystemExit(f"only {len(train)} training examples fit max_length={args.max_length}, {need} needed")
    scoring = train.select(range(args.num_scoring))
    train = train.select(range(args.num_scoring, need))
    dev = load_task_dataset(os.path.join(args.data_dir, args.task), split="dev", **common)
    dev = fit_to_max_length(dev, tokenizer, args.eval_max_length or args.max_length, name="dev")
    dev = dev.select(range(min(args.num_dev, len(dev))))
    return scoring, train, dev


def _collator(tokenizer, max_length):
    from trl.experimental.utils import DataCollatorForChatML

    return DataCollatorForChatML(tokenizer=tokenizer, max_length=max_length)


_batches = harness.length_batches
teacher_forced = harness.teacher_forced


def greedy_rouge(model, tokenizer, args) -> dict | None:
    """Greedy ROUGE-L (ROUGE-1/2/L on DialogSum) per test example, on the first `rouge_samples` test items (inline,
    at the end of each arm; `--rouge_eval` is the separate pass over saved students on every test set)."""
    if not args.rouge_samples:
        return None
    from hf_taskdistill.data import load_eval_set

    examples = load_eval_set(args.task, args.data_dir)[: args.rouge_samples]
    per = harness.rouge_per_example(model, tokenizer, examples, rouge_types(args.task), batch_size=args.eval_batch_size,
                                    max_new_tokens=args.max_new_tokens)  # fmt: skip
    return {"n": len(examples), "max_new_tokens": args.max_new_tokens, "per_example": per,
            "mean": {t: sum(v) / len(v) for t, v in per.items()}}  # fmt: skip


def rouge_types(task: str) -> tuple[str, ...]:
    from hf_taskdistill.evaluation import SUMMARIZATION_ROUGE_TYPES

    return tuple(SUMMARIZATION_ROUGE_TYPES) if task == "dialogsum" else ("rougeL",)


def dev_summary(dev: dict) -> dict:
    return {"nll": per_token(dev["nll"], dev["tokens"]), "accuracy": 100 * per_token(dev["correct"], dev["tokens"]),
            "n_examples": len(dev["tokens"]), "n_tokens": int(sum(dev["tokens"]))}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# the parts: scoring statistics, pruned students, cache, arms
# ----------------------------------------------------------------------------------------------------------------
class Bench:
    """State shared by the parts of one (task, profile) run; every part is skipped when its output exists."""

    def __init__(self, args):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        self.args = args
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        os.makedirs(args.work_dir, exist_ok=True)
        os.makedirs(args.output_dir, exist_ok=True)
        self.tokenizer = AutoTokenizer.from_pretrained(args.teacher)
        self.teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).to(self.device).eval()
        self.collator = _collator(self.tokenizer, args.max_length)
        self.timings = self._load_timings()
        self.scoring, self.train, self.dev = load_data(args, self.tokenizer)
        if args.teacher_sft_steps:
            self.teacher = self.sft_teacher()
        self.teacher.requires_grad_(False)
        dev_collator = _collator(self.tokenizer, args.eval_max_length or args.max_length)
        self.dev_batches = _batches(self.dev, dev_collator, args.eval_batch_size)

    def sft_teacher(self):
        """The teacher fine-tuned on the task first (`--teacher_sft_steps` SFT steps on the training examples, the
        first design's recipe for DialogSum), saved once under the work directory and reused."""
        import torch
        from transformers import AutoModelForCausalLM, PrinterCallback
        from trl import SFTTrainer

        out = os.path.join(self.args.work_dir, "teacher-sft")
        if not os.path.isfile(os.path.join(out, "config.json")):
            a = self.args
            harness.log(f"teacher SFT: {a.teacher_sft_steps} steps x {a.batch_size}")
            t0 = time.perf_counter()
            data = self.train.map(lambda e: {"prompt": e["messages"][:1], "completion": e["messages"][1:]},
                                  remove_columns="messages")  # fmt: skip
            cfg = quality._train_config(a, os.path.join(a.work_dir, "teacher-sft-run"), 0, a.teacher_sft_steps,
                                        a.teacher_learning_rate, use_cpu=self.device == "cpu", bf16=False,
                                        dataloader_num_workers=0, feature_loss_weight=0.0)  # fmt: skip
            trainer = SFTTrainer(model=self.teacher, args=cfg, train_dataset=data, processing_class=self.tokenizer)
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            trainer.save_model(out)
            self.tokenizer.save_pretrained(out)
            self._timed("teacher_sft", time.perf_counter() - t0)
        self.args.teacher = out
        return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(self.device).eval()

    # ----- bookkeeping -----
    def _timings_path(self) -> str:
        return os.path.join(self.args.output_dir, "timings.json")

    def _load_timings(self) -> dict:
        path = self._timings_path()
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        return {}

    def _timed(self, part: str, seconds: float) -> None:
        # re-read first: another process of the same run (one per core) may have added its parts since
        self.timings = {**self._load_timings(), part: round(seconds, 1)}
        quality._write_json(self._timings_path(), self.timings)

    def fits(self, part: str, estimate: float | None) -> bool:
        """False when `--deadline` would be passed by a part expected to take `estimate` seconds."""
        if not self.args.deadline or estimate is None:
            return True
        hh, mm = map(int, self.args.deadline.split(":"))
        now = time.gmtime()
        left = (hh * 60 + mm) * 60 - (now.tm_hour * 3600 + now.tm_min * 60 + now.tm_sec)
        if estimate > left:
            harness.log(
                f"{part}: expected {estimate:.0f} s, {max(left, 0)} s left before {self.args.deadline}: skipped"
            )
            return False
        return True

    # ----- scoring statistics and the three cuts -----
    def statistics(self):
        import torch

        from hf_taskdistill.pruning import collect_unit_statistics

        path = os.path.join(self.args.work_dir, "scoring_stats.pt")
        if os.path.isfile(path):
            return torch.load(path, weights_only=False)
        t0 = time.perf_counter()
        batches = [b for _, b in _batches(self.scoring, self.collator, 4, sort=False)]
        stats = collect_unit_statistics(self.teacher, batches, need_grad=True, mlp=True)
        torch.save(stats, path)
        self._timed("scoring_pass", time.perf_counter() - t0)
        return stats

    def student_dir(self, init: str) -> str:
        return os.path.join(self.args.work_dir, "students", init)

    def prune(self, init: str) -> str:
        """The pruned student `init` (a `CUTS` name) saved with `save_pruned`; its directory."""
        from hf_taskdistill.pruning import prune_teacher, save_pruned

        out = self.student_dir(init)
        if os.path.isfile(os.path.join(out, "config.json")):
            return out
        a = self.args
        criterion, aggregation, mlp_criterion = CUTS[init](a)
        stats = self.statistics()
        t0 = time.perf_counter()
        result = prune_teacher(self.teacher, None, a.hidden_size, a.intermediate_size, a.num_layers,
                               criterion=criterion, aggregation=aggregation, norm_rescale=a.norm_rescale, seed=0,
                               stats=stats, teacher_reference=a.teacher, mlp_criterion=mlp_criterion)  # fmt: skip
        save_pruned(result, out, tokenizer=self.tokenizer)
        self._timed(f"prune_{init}", time.perf_counter() - t0)
        mlp = f", MLP {mlp_criterion}" if mlp_criterion else ""
        harness.log(f"pruned {init} ({criterion}/{aggregation}{mlp}): {result.num_parameters / 1e6:.1f}M parameters")
        return out

    def fresh_dir(self, seed: int) -> str:
        """A fresh-initialised student of the pruned shape (seeded), saved once per seed."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        out = os.path.join(self.args.work_dir, "students", f"fresh-seed{seed}")
        if os.path.isfile(os.path.join(out, "config.json")):
            return out
        config = AutoConfig.from_pretrained(self.prune("task"))
        if hasattr(config, "task_distill"):
            del config.task_distill
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        return out

    # ----- the teacher cache -----
    def cache_dir(self) -> str:
        return os.path.join(self.args.work_dir, "teacher_cache")

    def cache(self) -> str:
        """One full-layer cache (the whole last teacher layer + top-K log-probs) shared by every arm."""
        from hf_taskdistill.cache import HEADER_NAME, TeacherCache
        from hf_taskdistill.cache_build import build_teacher_cache
        from hf_taskdistill.selection import load_unit_selection

        out = self.cache_dir()
        if os.path.isfile(os.path.join(out, HEADER_NAME)):
            TeacherCache(out)  # integrity check (a damaged cache raises, naming the shard)
            return out
        selection = load_unit_selection(self.prune("task"))
        # rows grouped by length: the teacher pass pads little (the cache is keyed by token hash, order-free)
        lengths = [len(self.collator([self.train[i]])["input_ids"][0]) for i in range(len(self.train))]
        ordered = self.train.select(sorted(range(len(self.train)), key=lambda i: lengths[i]))
        t0 = time.perf_counter()
        cache = build_teacher_cache(self.teacher, ordered, self.collator, out, tokenizer=self.tokenizer,
                                    selection=selection, top_k=self.args.top_k, dtype="bfloat16", full_layer=True,
                                    template="chat", batch_size=self.args.eval_batch_size, show_progress=False,
                                    teacher_name_or_path=self.args.teacher)  # fmt: skip
        seconds = time.perf_counter() - t0
        self._timed("cache_build", seconds)
        harness.log(
            f"teacher cache: {len(cache)} examples, {cache.bytes_per_token():.0f} bytes/token, {seconds:.0f} s"
        )
        return out

    # ----- one arm -----
    def run_path(self, arm: str, seed: int) -> str:
        return os.path.join(self.args.output_dir, "runs", f"seed{seed}", f"{arm}.json")

    def estimate(self, arm: str) -> float | None:
        done = [v for k, v in self.timings.items() if k.startswith("arm_")]
        return None if not done else max(done) * 1.1

    def run_arm(self, arm: str, seed: int) -> dict | None:
        from transformers import PrinterCallback

        from hf_taskdistill import FeatureDistillSFTTrainer, FeatureDistillTrainer
        from hf_taskdistill.selection import UnitSelection, load_unit_selection

        path = self.run_path(arm, seed)
        if os.path.isfile(path):
            harness.log(f"{arm} seed {seed}: done already")
            return None
        if not self.fits(f"{arm} seed {seed}", self.estimate(arm)):
            return None
        a = self.args
        init, loss = ARMS[arm]
        student = self.fresh_dir(seed) if init == "fresh" else self.prune(init)
        cache = self.cache()
        units_from = self.prune("task") if init == "fresh" else student  # a fresh student learns the task units
        extra = dict(use_cpu=self.device == "cpu", bf16=False, dataloader_num_workers=0, lmbda=0.0,
                     feature_loss_type=a.feature_loss_type)  # fmt: skip
        unit_selection = None
        if loss == "kd":
            extra.update(feature_loss_weight=0.0)
        elif loss == "kd_units":
            unit_selection = load_unit_selection(units_from)
        elif loss == "kd_projector":
            extra.update(feature_projector=True)
            s = load_unit_selection(self.prune("task"))
            unit_selection = UnitSelection(layers=[type(s.layers[0])(s.layers[0].student_layer, s.layers[0].teacher_layer, None)],
                                           selection_method="projector", teacher_hidden_size=s.teacher_hidden_size,
                                           student_hidden_size=s.student_hidden_size)  # fmt: skip
        elif loss == "sft":
            extra.update(feature_loss_weight=0.0, logit_loss="none")
        run_dir = os.path.join(a.work_dir, "runs", f"seed{seed}", arm)
        harness.log(f"{arm} seed {seed}: {init} init, {loss}, {a.steps} steps x {a.batch_size}")
        t0 = time.perf_counter()
        if loss == "sft":
            # the SFT host (cross-entropy on the completion; the in-memory teacher is never run with weight 0)
            data = self.train.map(lambda e: {"prompt": e["messages"][:1], "completion": e["messages"][1:]},
                                  remove_columns="messages")  # fmt: skip
            cfg = quality._train_config(a, run_dir, seed, a.steps, a.learning_rate, **extra)
            trainer = FeatureDistillSFTTrainer(model=student, teacher_model=self.teacher, args=cfg, train_dataset=data,
                                               processing_class=self.tokenizer)  # fmt: skip
        else:
            cfg = quality._train_config(a, run_dir, seed, a.steps, a.learning_rate, teacher_cache=cache, **extra)
            trainer = FeatureDistillTrainer(model=student, teacher_model=None, args=cfg, train_dataset=self.train,
                                            processing_class=self.tokenizer, unit_selection=unit_selection)  # fmt: skip
        trainer.remove_callback(PrinterCallback)
        setup = time.perf_counter() - t0
        trainer.train()
        train_seconds = time.perf_counter() - t0
        trainer.model.save_pretrained(self.saved_student(arm, seed))  # for the ROUGE pass (`--rouge_eval`)
        t1 = time.perf_counter()
        dev = teacher_forced(trainer.model, self.dev_batches, len(self.dev))
        rouge = greedy_rouge(trainer.model, self.tokenizer, a)
        eval_seconds = time.perf_counter() - t1
        sel = trainer.unit_selection
        model_cfg = trainer.model.config
        result = {
            "task": a.task, "arm": arm, "seed": seed, "init": init, "loss": loss,
            "init_criterion": (model_cfg.task_distill or {}).get("init", {}).get("criterion")
            if isinstance(getattr(model_cfg, "task_distill", None), dict) else None,
            "shape": {"hidden_size": model_cfg.hidden_size, "intermediate_size": model_cfg.intermediate_size,
                      "num_layers": model_cfg.num_hidden_layers,
                      "num_parameters": sum(p.numel() for n, p in trainer.model.named_parameters() if "fd_proj" not in n)},
            "steps": a.steps, "batch_size": a.batch_size, "learning_rate": a.learning_rate,
            "tokens_seen": self.train_tokens(),
            "feature_pairs": None if sel is None else [(ls.student_layer, ls.teacher_layer, ls.k) for ls in sel.layers],
            "train_seconds": round(train_seconds, 1), "setup_seconds": round(setup, 1),
            "eval_seconds": round(eval_seconds, 1),
            "final_logs": [h for h in trainer.state.log_history if "loss" in h][-3:],
            "dev_summary": dev_summary(dev), "dev": dev, "rouge": rouge,
        }  # fmt: skip
        quality._write_json(path, result)
        self._timed(f"arm_{arm}_seed{seed}", train_seconds + eval_seconds)
        s = result["dev_summary"]
        harness.log(f"{arm} seed {seed}: dev NLL {s['nll']:.4f}, acc {s['accuracy']:.2f}% "
                    f"(train {train_seconds:.0f} s, eval {eval_seconds:.0f} s)")  # fmt: skip
        del trainer
        return result

    def saved_student(self, arm: str, seed: int) -> str:
        return os.path.join(self.args.work_dir, "runs", f"seed{seed}", arm, "final")

    def rouge_pass(self) -> None:
        """ROUGE per test item of the teacher and every saved student of `--seeds` x `--arms`, on the first
        `--rouge_eval` items of each `--rouge_sets` set, greedy and per `--rouge_gen_seeds` sampled; one JSON per
        model under `<output_dir>/rouge/`, written after each (set, decoding), so a rerun resumes."""
        import torch
        from transformers import AutoModelForCausalLM

        from hf_taskdistill.data import load_eval_set

        a = self.args
        sets = {name: load_eval_set(name, a.data_dir)[: a.rouge_eval] for name in a.rouge_sets}
        decodings = ["greedy"] + [f"sample{s}" for s in a.rouge_gen_seeds]
        models = [("teacher", None)] + [
            (f"seed{s}/{arm}", self.saved_student(arm, s)) for s in a.seeds for arm in a.arms
        ]
        for name, path in models:
            if path is not None and not os.path.isfile(os.path.join(path, "config.json")):
                if os.path.isfile(self.run_path(name.split("/")[1], int(name[4:].split("/")[0]))):
                    harness.log(f"ROUGE {name}: its student was not saved (run before students were kept): skipped")
                continue
            out = os.path.join(a.output_dir, "rouge", f"{name}.json")
            record = _read_json(out) if os.path.isfile(out) else {"model": name, "n_per_set": a.rouge_eval,
                                                                          "max_new_tokens": a.max_new_tokens, "sets": {}}  # fmt: skip
            todo = [(st, d) for st in sets for d in decodings if d not in record["sets"].get(st, {})]
            if not todo:
                continue
            if not self.fits(f"ROUGE {name}", self.timings.get("rouge_model")):
                return
            model = self.teacher if path is None else AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            model.to(self.device)
            t0 = time.perf_counter()
            for st, dec in todo:
                t1 = time.perf_counter()
                seed = 0 if dec == "greedy" else int(dec[6:])
                per = harness.rouge_per_example(model, self.tokenizer, sets[st], rouge_types(a.task), seed=seed,
                                                do_sample=dec != "greedy", batch_size=a.eval_batch_size,
                                                max_new_tokens=a.max_new_tokens)  # fmt: skip
                record["sets"].setdefault(st, {})[dec] = {"per_example": per, "seconds": round(time.perf_counter() - t1, 1),
                                                          "mean": {t: sum(v) / len(v) for t, v in per.items()}}  # fmt: skip
                quality._write_json(out, record)
                harness.log(
                    f"ROUGE {name} {st} {dec}: " + ", ".join(f"{t} {sum(v) / len(v):.2f}" for t, v in per.items())
                )
            self._timed("rouge_model", time.perf_counter() - t0)
            if path is not None:
                del model

    def train_tokens(self) -> dict:
        if not hasattr(self, "_train_tokens"):
            total = completion = 0
            for _, b in _batches(self.train, self.collator, 64, sort=False):
                total += int(b["attention_mask"].sum())
                completion += int((b["labels"] != -100).sum())
            self._train_tokens = {"examples": len(self.train), "tokens": total, "completion_tokens": completion,
                                  "epochs": self.args.steps * self.args.batch_size / len(self.train)}  # fmt: skip
        return self._train_tokens

    def eval_reference(self, name: str) -> None:
        """Dev metrics of the teacher and of each untrained init (start points of the gap)."""
        from transformers import AutoModelForCausalLM

        path = os.path.join(self.args.output_dir, "reference", f"{name}.json")
        if os.path.isfile(path):
            return
        # a student's evaluation time from the finished arms (ROUGE included); the teacher has ~3x the parameters
        evals = [r["eval_seconds"] for arm in _load_runs(self.args.output_dir).values() for r in arm.values()]
        est = self.timings.get(f"reference_{name}") or (
            max(evals) * (3.0 if name == "teacher" else 1.0) if evals else None
        )
        if not self.fits(f"reference {name}", est):
            return
        t0 = time.perf_counter()
        model = self.teacher if name == "teacher" else AutoModelForCausalLM.from_pretrained(
            self.fresh_dir(0) if name == "fresh" else self.prune(name))  # fmt: skip
        dev = teacher_forced(model, self.dev_batches, len(self.dev))
        rouge = greedy_rouge(model, self.tokenizer, self.args)
        seconds = time.perf_counter() - t0
        quality._write_json(path, {"name": name, "dev_summary": dev_summary(dev), "dev": dev, "rouge": rouge,
                                   "eval_seconds": round(seconds, 1)})  # fmt: skip
        self._timed(f"reference_{name}", seconds)
        harness.log(f"reference {name}: dev NLL {dev_summary(dev)['nll']:.4f} ({seconds:.0f} s)")


RESUME_KEYS = ("task", "hidden_size", "intermediate_size", "num_layers", "steps", "batch_size", "max_length",
               "num_scoring", "num_dev", "rouge_samples", "max_new_tokens", "learning_rate", "top_k",
               "task_criterion", "task_aggregation", "norm_rescale", "feature_loss_weight", "feature_loss_type",
               "eval_batch_size", "eval_max_length", "teacher_sft_steps", "teacher_learning_rate")  # fmt: skip


def check_resume(args) -> None:
    """Refuse to add runs with other settings to an output directory (its runs would no longer be paired)."""
    path = os.path.join(args.output_dir, "settings.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        stored = json.load(f)
    diff = {k: (stored.get(k), getattr(args, k)) for k in RESUME_KEYS if k in stored and stored[k] != getattr(args, k)}
    if diff:
        text = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
        raise SystemExit(f"{args.output_dir} holds runs made with other settings ({text}): pass the same flags to "
                         "resume, or another --output_dir (and --work_dir).")  # fmt: skip


def run(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = settings(argv)
    if args.cut_report:
        return run_cut_report(args)
    if args.headline:
        summaries = [_read_json(os.path.join(d, "results.json")) for d in args.headline]
        blocks = generated_blocks(summaries)
        for d, sm in zip(args.headline, summaries, strict=True):  # the `--cut_report` table, where it ran
            if os.path.isfile(os.path.join(d, "cuts.md")):
                with open(os.path.join(d, "cuts.md")) as f:
                    blocks[f"{sm['task']}-cuts"] = f.read().rstrip()
        if args.write_readme:
            with open(args.write_readme) as f:
                text, filled = fill_markers(f.read(), blocks)
            with open(args.write_readme, "w") as f:
                f.write(text)
            print(f"{args.write_readme}: refilled {', '.join(filled) or 'nothing (no quality2 markers)'}")
        else:
            print("\n\n".join(f"<!-- quality2:{name} -->\n{body}" for name, body in blocks.items()))
        return blocks
    if args.task == "all":
        if any(a.split("=")[0] in ("--output_dir", "--work_dir") for a in argv):
            raise SystemExit("--task all uses each task's default --output_dir and --work_dir: run one task at a time "
                             "to choose them.")  # fmt: skip
        return {task: run([*argv, "--task", task]) for task in TASKS}  # (the last --task wins)
    if args.aggregate_only:
        return aggregate(args)
    harness.benchmark_env(args.threads)
    check_resume(args)
    bench = Bench(args)
    quality._write_json(os.path.join(args.output_dir, "settings.json"), {
        **{k: v for k, v in vars(args).items() if k not in ("output_dir", "work_dir", "data_dir", "teacher")},
        "teacher": os.path.basename(os.path.normpath(args.teacher)), "hardware": harness.hardware_line(
            bench.device, args.threads), "train": bench.train_tokens(), "num_dev_examples": len(bench.dev),
    })  # fmt: skip
    for init in ("activation", "task", "random"):
        bench.prune(init)
    bench.cache()
    if args.prepare_only:
        return {}
    if args.references:  # untrained cuts (and the teacher) only, no training
        for name in args.references:
            bench.eval_reference(name)
        return aggregate(args)
    if args.rouge_eval:  # the ROUGE pass alone, over the saved students
        bench.rouge_pass()
        return aggregate(args)
    for arm, seed in training_plan(args.arms, args.seeds, args.arms_given):
        bench.run_arm(arm, seed)
    if args.eval_inits or args.full:
        # the teacher, then the untrained init of every arm asked for (the start points of "gap closed")
        inits = {ARMS[arm][0] for arm in args.arms}
        for name in ["teacher"] + [n for n in (*CUTS, "fresh") if n in inits]:
            bench.eval_reference(name)
    if args.rouge_items_pass:  # a --full run ends with the ROUGE pass over every student it trained
        args.rouge_eval = args.rouge_items_pass
        bench.rouge_pass()
    return aggregate(args)


# ----------------------------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------------------------
def _load_runs(out: str) -> dict:
    runs: dict = {}
    root = os.path.join(out, "runs")
    for seed_dir in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        for name in sorted(os.listdir(os.path.join(root, seed_dir))):
            if name.endswith(".json"):
                with open(os.path.join(root, seed_dir, name)) as f:
                    res = json.load(f)
                runs.setdefault(res["arm"], {})[res["seed"]] = res
    return runs


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _load_rouge(out: str) -> dict:
    """{"teacher": record, "A": {seed: record}, ...} from `<out>/rouge/` (the `--rouge_eval` pass)."""
    root, found = os.path.join(out, "rouge"), {}
    if os.path.isfile(os.path.join(root, "teacher.json")):
        found["teacher"] = _read_json(os.path.join(root, "teacher.json"))
    for seed_dir in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if seed_dir.startswith("seed") and os.path.isdir(os.path.join(root, seed_dir)):
            for name in sorted(os.listdir(os.path.join(root, seed_dir))):
                found.setdefault(name[: -len(".json")], {})[int(seed_dir[4:])] = _read_json(
                    os.path.join(root, seed_dir, name)
                )
    return found


def rouge_vector(record: dict, sets, decoding: str, rouge_type: str = "rougeL") -> list[float] | None:
    """Per-item scores over `sets` in order (`decoding`: "greedy", or "sampled" = mean over the sampled seeds per
    item); None when the record lacks one of them."""
    vec = []
    for st in sets:
        got = record["sets"].get(st, {})
        runs = [v for k, v in got.items() if (k == "greedy" if decoding == "greedy" else k.startswith("sample"))]
        if not runs:
            return None
        per = [r["per_example"][rouge_type] for r in runs]
        vec += [sum(col) / len(col) for col in zip(*per, strict=True)]
    return vec


def rouge_section(rouge: dict, sets, rouge_type: str = "rougeL", n_boot: int = 2000) -> tuple[list[str], dict]:
    """Markdown lines and a summary: mean ROUGE per arm and set (over training seeds), and the paired differences
    of the comparisons over the items of every set (bootstrap over items, seeds shared by both arms)."""
    import statistics

    if not rouge:
        return [], {}
    records = [rouge["teacher"]] if "teacher" in rouge else []
    records += [r for arm in ARMS for r in rouge.get(arm, {}).values()]
    sets = [st for st in sets if any(st in r["sets"] for r in records)]  # the sets some model was measured on
    lines = ["", (f"Greedy {rouge_type} (x 100) on the first items of each test set (`--rouge_eval`), mean over "
                  "training seeds; `sampled`: temperature-1 sampling, mean over generation seeds and sets."), "",
             "| model | seeds | " + " | ".join(sets) + " | all sets | sampled |", "|---" * (len(sets) + 4) + "|"]  # fmt: skip
    summary: dict = {"arms": {}, "comparisons": []}

    def cells(records):
        row = []
        for st in [*sets, None]:
            vals = [rouge_vector(r, [st] if st else sets, "greedy", rouge_type) for r in records]
            vals = [statistics.mean(v) for v in vals if v]
            row.append(f"{statistics.mean(vals):.2f}" if vals else "–")
        sampled = [v for v in (rouge_vector(r, sets, "sampled", rouge_type) for r in records) if v]
        row.append(f"{statistics.mean(statistics.mean(v) for v in sampled):.2f}" if sampled else "–")
        return row

    if "teacher" in rouge:
        row = cells([rouge["teacher"]])
        summary["teacher"] = {"cells": dict(zip([*sets, "all", "sampled"], row, strict=True))}
        lines.append("| teacher | – | " + " | ".join(row) + " |")
    for arm in [a for a in ARMS if a in rouge]:
        seeds = sorted(rouge[arm])
        row = cells([rouge[arm][s] for s in seeds])
        summary["arms"][arm] = {"seeds": seeds, "cells": dict(zip([*sets, "all", "sampled"], row, strict=True))}
        lines.append(f"| {arm} | {','.join(map(str, seeds))} | " + " | ".join(row) + " |")
    lines += [
        "",
        f"| x - y | seeds | sets | items | Δ greedy {rouge_type} | Δ sampled {rouge_type} |",
        "|---|---|---|---|---|---|",
    ]
    for x, y, _question in COMPARISONS:
        seeds = sorted(set(rouge.get(x, {})) & set(rouge.get(y, {})))
        # pooled over the items of every set both arms were measured on, at every shared seed
        shared = [st for st in sets
                  if seeds and all(rouge_vector(rouge[a][s], [st], "greedy", rouge_type) for a in (x, y) for s in seeds)]  # fmt: skip
        row = {"x": x, "y": y, "seeds": seeds, "sets": shared}
        for decoding in ("greedy", "sampled"):
            xs = [rouge_vector(rouge[x][s], shared, decoding, rouge_type) for s in seeds]
            ys = [rouge_vector(rouge[y][s], shared, decoding, rouge_type) for s in seeds]
            if shared and all(v is not None for v in xs + ys):
                row[decoding] = paired_difference(xs, ys, [1] * len(xs[0]), n_boot=n_boot)
        if "greedy" in row:
            summary["comparisons"].append(row)
            samp = _fmt_ci(row["sampled"], 2) if "sampled" in row else "–"
            lines.append(f"| {x} - {y} | {','.join(map(str, seeds))} | {'all' if shared == list(sets) else ', '.join(shared)} | "
                         f"{row['greedy']['n_examples']} | {_fmt_ci(row['greedy'], 2)} | {samp} |")  # fmt: skip
    return lines, summary


def _load_references(out: str) -> dict:
    refs = {}
    root = os.path.join(out, "reference")
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        with open(os.path.join(root, name)) as f:
            res = json.load(f)
        refs[res["name"]] = res
    return refs


def _fmt_ci(r: dict, digits: int) -> str:
    star = " *" if r["excludes_zero"] else ""
    return f"{r['diff']:+.{digits}f} [{r['ci95'][0]:+.{digits}f}, {r['ci95'][1]:+.{digits}f}]{star}"


def _fmt_seed_ci(r: dict, digits: int) -> str:
    """The seed-level t interval of a pooled difference (`harness.seed_interval`), '–' for one seed."""
    ci = r.get("seed_ci95")
    if not ci:
        return "–"
    star = " *" if ci[0] > 0 or ci[1] < 0 else ""
    return f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]{star}"


HEADLINE = [("C", "A", "ours vs Minitron-style"), ("C", "D", "units vs projector"), ("C", "B", "feature term vs none"),
            ("B", "A", "task cut vs activation cut"), ("G", "A", "our loss on Minitron's cut"),
            ("C", "E", "task vs random units"), ("C", "F", "KD + units vs SFT only")]  # fmt: skip


def headline(summaries: list[dict]) -> str:
    """The README's headline table from the `results.json` summaries of several tasks: per comparison and task, the
    pooled dev-NLL difference (bootstrap interval over examples; seed-level t interval where several seeds) and the
    greedy ROUGE-L difference (pooled over the sets both arms were measured on)."""

    def cell(summary, x, y):
        nll = next((c for c in summary["comparisons"] if (c["x"], c["y"]) == (x, y)), None)
        rouge = next((c for c in summary.get("rouge", {}).get("comparisons", []) if (c["x"], c["y"]) == (x, y)), None)
        if nll is None:
            return "not run", "not run"
        seeds = nll["seeds"]
        text = f"{_fmt_ci(nll['nll']['pooled'], 3)} ({len(seeds)} seed{'s' * (len(seeds) > 1)})"
        if nll["nll"]["pooled"].get("seed_ci95"):
            text += f"; seeds {_fmt_seed_ci(nll['nll']['pooled'], 3)}"
        return text, (_fmt_ci(rouge["greedy"], 2) if rouge else "not run")

    head = "| x − y (negative NLL = x better) |"
    for sm in summaries:
        head += f" {sm['task']} Δ dev NLL | {sm['task']} Δ greedy ROUGE-L |"
    lines = [head, "|---" * (1 + 2 * len(summaries)) + "|"]
    for x, y, question in HEADLINE:
        cells = [c for sm in summaries for c in cell(sm, x, y)]
        if any(c != "not run" for c in cells):
            lines.append(f"| {x} − {y} ({question}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cut_report(act_sq, mlp_act, cuts: dict[str, dict], reference: str = "activation", outliers: int = 10) -> dict:
    """How the cuts differ, from the scoring pass's statistics (pure): per cut, the share of the residual stream's
    energy its K units carry (sum of h^2 at the 2L+1 norm inputs, averaged over the inputs), how many of the
    `outliers` highest-energy units it keeps, the share of MLP activation (L2 over examples) its neurons carry
    (averaged over layers), and its overlap with the `reference` cut (residual units; MLP neurons, mean over layers).

    `act_sq`: (P, d); `mlp_act`: (L, m); `cuts[name]`: {"residual": [K indices], "mlp": [[M indices] per layer]}.
    """
    import torch

    act_sq, mlp_act = torch.as_tensor(act_sq, dtype=torch.float64), torch.as_tensor(mlp_act, dtype=torch.float64)
    top = set(act_sq.sum(0).topk(outliers).indices.tolist())
    ref = cuts.get(reference)
    out = {}
    for name, cut in cuts.items():
        res, mlp = cut["residual"], cut["mlp"]
        row = {
            "residual_energy": float((act_sq[:, res].sum(1) / act_sq.sum(1)).mean()),
            "outliers_kept": len(top & set(res)),
            "mlp_energy": float(
                torch.stack([mlp_act[i, m].sum() / mlp_act[i].sum() for i, m in enumerate(mlp)]).mean()
            ),
        }
        if ref is not None:
            row["residual_overlap"] = len(set(res) & set(ref["residual"])) / len(res)
            row["mlp_overlap"] = sum(
                len(set(m) & set(r)) / len(m) for m, r in zip(mlp, ref["mlp"], strict=True)
            ) / len(mlp)
        out[name] = row
    return out


def run_cut_report(args) -> dict:
    """`--cut_report`: `cut_report` over the saved cuts of `--work_dir`, written to `<output_dir>/cuts.{json,md}`."""
    import torch

    stats = torch.load(os.path.join(args.work_dir, "scoring_stats.pt"), weights_only=False)
    cuts = {}
    for init in CUTS:
        path = os.path.join(args.work_dir, "students", init, "config.json")
        if os.path.isfile(path):
            rec = _read_json(path)["task_distill"]["init"]
            cuts[init] = {"residual": rec["residual_indices"], "mlp": rec["mlp_indices"]}
    report = cut_report(stats.act_sq, stats.mlp_act_l2, cuts)
    refs = _load_references(args.output_dir)  # the untrained dev NLL where `--references` / `--eval_inits` ran
    for name, row in report.items():
        row["untrained_dev_nll"] = refs.get(name, {}).get("dev_summary", {}).get("nll")
    head = ["cut", "residual energy kept", "top-10 energy units kept", "MLP activation kept",
            "units shared with activation cut", "MLP neurons shared", "untrained dev NLL"]  # fmt: skip
    title = (f"Cuts of {args.task}: K = {args.hidden_size} of {stats.act_sq.shape[1]} residual units, M = "
             f"{args.intermediate_size} of {stats.mlp_act_l2.shape[1]} MLP neurons; statistics of the scoring pass "
             f"({stats.num_samples} examples).")  # fmt: skip
    lines = [title, "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, r in report.items():
        nll = "–" if r["untrained_dev_nll"] is None else f"{r['untrained_dev_nll']:.4f}"
        lines.append(f"| {name} | {100 * r['residual_energy']:.1f}% | {r['outliers_kept']} | {100 * r['mlp_energy']:.1f}% | "
                     f"{100 * r.get('residual_overlap', float('nan')):.1f}% | {100 * r.get('mlp_overlap', float('nan')):.1f}% | {nll} |")  # fmt: skip
    harness.write_results(args.output_dir, "cuts", report, "\n".join(lines))
    print("\n".join(lines))
    return report


ARM_LABELS = {"A": "Minitron-style anchor", "C": "ours", "D": "paper's projector"}
REFERENCE_ROWS = {"teacher": "teacher", "activation": "activation cut, untrained", "task": "task cut, untrained",
                  "random": "random cut, untrained", "task_res": "task units + activation MLP, untrained",
                  "act_res": "activation units + task MLP, untrained", "fresh": "fresh init, untrained"}  # fmt: skip


def arm_table(summary: dict) -> str:
    """A task's README table from its `results.json` summary: references, then every arm with its seeds, dev NLL
    (mean ± sd over seeds), token accuracy, gap closed, and greedy ROUGE per measured set + sampled (ROUGE-L; on
    DialogSum ROUGE-1 / 2 / L)."""
    import statistics

    by_type = summary.get("rouge_by_type") or {}
    types = [t for t in ("rouge1", "rouge2", "rougeL") if (by_type.get(t) or {}).get("arms")]
    cells_of = {t: [by_type[t].get("teacher", {}), *by_type[t]["arms"].values()] for t in types}
    sets = {k for t in types for r in cells_of[t] for k in r.get("cells", {}) if k not in ("all", "sampled")}
    order = [*INSTRUCTION_SETS, "dialogsum"]
    sets = sorted(sets, key=lambda st: (order.index(st) if st in order else len(order), st))

    def rouge_cells(name):
        if not types:
            return []
        found = [((by_type[t].get("teacher") if name == "teacher" else by_type[t]["arms"].get(name)) or {}).get("cells", {})
                 for t in types]  # fmt: skip
        return [" / ".join(c.get(key, "–") for c in found) if any(key in c for c in found) else ""
                for key in [*sets, "sampled"]]  # fmt: skip

    rouge_head = [f"greedy {st}" for st in sets] + (["sampled"] if types else [])
    label = " / ".join({"rouge1": "R-1", "rouge2": "R-2", "rougeL": "R-L"}[t] for t in types)
    head = ["arm", "seeds", "dev NLL / token", "token acc %", "gap closed"] + [f"{h} {label}" for h in rouge_head]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, text in REFERENCE_ROWS.items():
        ref = summary.get("references", {}).get(name)
        if ref:
            cells = rouge_cells(name) if name == "teacher" else [""] * len(rouge_head)
            row = [text, "–", f"{ref['nll']:.4f}", f"{ref['accuracy']:.2f}", "–", *cells]
            lines.append("| " + " | ".join(row) + " |")
    for arm in [a for a in ARMS if a in summary["arms"]]:
        r = summary["arms"][arm]
        sd = f" ± {statistics.stdev(r['nll']):.4f}" if len(r["nll"]) > 1 else ""
        gap = "–" if r["gap_closed"] is None else f"{100 * r['gap_closed']:.1f}%"
        name = f"{arm} ({ARM_LABELS[arm] + ': ' if arm in ARM_LABELS else ''}{ARMS[arm][0]} init, {ARMS[arm][1]})"
        row = [f"**{name}**" if arm in ARM_LABELS else name, ",".join(map(str, r["seeds"])),
               f"{statistics.mean(r['nll']):.4f}{sd}", f"{statistics.mean(r['accuracy']):.2f}", gap, *rouge_cells(arm)]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def comparison_table(summary: dict) -> str:
    """A task's README table of paired differences from its `results.json` summary: per comparison, the pooled
    dev-NLL difference (interval over examples), the seed-level interval, the per-seed differences, token accuracy,
    and the greedy / sampled ROUGE-L differences (over the items of the sets both arms were measured on)."""
    rouge = {(c["x"], c["y"]): c for c in (summary.get("rouge") or {}).get("comparisons", [])}
    head = ["x − y", "question", "Δ dev NLL pooled [examples]", "seed-level", "per seed", "Δ token acc",
            "Δ greedy ROUGE-L", "Δ sampled ROUGE-L"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for c in summary["comparisons"]:
        nll, r = c["nll"]["pooled"], rouge.get((c["x"], c["y"]), {})
        per_seed = ", ".join(f"{v:+.3f}" for v in nll["per_seed"]) if len(c["seeds"]) > 1 else f"seed {c['seeds'][0]}"
        row = [f"{c['x']} − {c['y']}", c["question"], _fmt_ci(nll, 4), _fmt_seed_ci(nll, 4), per_seed,
               _fmt_ci(c["accuracy"]["pooled"], 2), *(_fmt_ci(r[d], 2) if d in r else "–" for d in ("greedy", "sampled"))]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def generated_blocks(summaries: list[dict]) -> dict[str, str]:
    """The README's generated tables, by marker name: `headline`, `<task>-arms`, `<task>-diffs` (`--headline` adds
    `<task>-cuts`, the `--cut_report` table, where it ran)."""
    blocks = {"headline": headline(summaries)}
    for sm in summaries:
        blocks[f"{sm['task']}-arms"] = arm_table(sm)
        blocks[f"{sm['task']}-diffs"] = comparison_table(sm)
    return blocks


def fill_markers(text: str, blocks: dict[str, str]) -> tuple[str, list[str]]:
    """`text` with every `<!-- quality2:NAME -->` ... `<!-- /quality2:NAME -->` span refilled from `blocks`, and the
    names filled. A start marker without its end marker is an error (nothing would be written)."""
    filled = []
    for name, body in blocks.items():
        start, end = f"<!-- quality2:{name} -->", f"<!-- /quality2:{name} -->"
        if start not in text:
            continue
        before, rest = text.split(start, 1)
        if end not in rest:
            raise ValueError(f"{start} has no {end} after it")
        text = f"{before}{start}\n{body}\n{end}{rest.split(end, 1)[1]}"
        filled.append(name)
    return text, filled


def aggregate(args) -> dict:
    """results.json / results.md from every finished run: the arm table and the paired differences."""
    import statistics

    out = args.output_dir
    runs, refs = _load_runs(out), _load_references(out)
    teacher_nll = refs.get("teacher", {}).get("dev_summary", {}).get("nll")
    lines = [f"# Quality benchmark, second design: {args.task} ({args.profile} profile)", ""]
    settings_path = os.path.join(out, "settings.json")
    if os.path.isfile(settings_path):
        with open(settings_path) as f:
            st = json.load(f)
        tr = st.get("train", {})
        lines += [
            (
                f"Student: K={st['hidden_size']}, M={st['intermediate_size'] or 'full'}, layers={st['num_layers'] or 'all'}; "
                f"{st['steps']} steps x {st['batch_size']} examples ({tr.get('tokens')} tokens, "
                f"{tr.get('completion_tokens')} completion tokens, {tr.get('epochs')} epoch(s)), lr {st['learning_rate']} "
                f"cosine; task-pruned init: {st['task_criterion']}/{st['task_aggregation']}, norm rescale "
                f"{st['norm_rescale']}; dev: {st.get('num_dev_examples')} examples; {st.get('hardware')}."
            ),
            "",
        ]
    has_rouge = any(r.get("rouge") for arm in runs.values() for r in arm.values())
    rouge_head = " greedy ROUGE-L |" if has_rouge else ""
    lines += [
        f"| arm | init | loss | seeds | dev NLL / token | token acc % |{rouge_head} gap closed | train s | eval s |",
        "|---" * (9 + has_rouge) + "|",
    ]
    table = {}

    def rouge_cell(results) -> str:
        if not has_rouge:
            return ""
        vals = [r["rouge"]["mean"]["rougeL"] for r in results if r.get("rouge")]
        return f" {statistics.mean(vals):.2f} |" if vals else " – |"

    for name, ref in refs.items():
        s = ref["dev_summary"]
        lines.append(
            f"| {'teacher' if name == 'teacher' else f'{name} init, untrained'} | – | – | – | {s['nll']:.4f} | {s['accuracy']:.2f} |{rouge_cell([ref])}"
            f" – | – | {ref['eval_seconds']:.0f} |"
        )
    for arm in [a for a in ARMS if a in runs]:
        seeds = sorted(runs[arm])
        results = [runs[arm][s] for s in seeds]
        nll = [r["dev_summary"]["nll"] for r in results]
        acc = [r["dev_summary"]["accuracy"] for r in results]
        init, loss = ARMS[arm]
        start = refs.get(init, {}).get("dev_summary", {}).get("nll")
        gap = gap_closed(start, statistics.mean(nll), teacher_nll) if start is not None and teacher_nll else None
        sd = f" ± {statistics.stdev(nll):.4f}" if len(nll) > 1 else ""
        tsec = statistics.mean(r["train_seconds"] for r in results)
        esec = statistics.mean(r["eval_seconds"] for r in results)
        gap_text = "–" if gap is None else f"{100 * gap:.1f}%"
        lines.append(
            f"| {arm} | {init} | {loss} | {','.join(map(str, seeds))} | {statistics.mean(nll):.4f}{sd} | "
            f"{statistics.mean(acc):.2f} |{rouge_cell(results)} {gap_text} | {tsec:.0f} | {esec:.0f} |"
        )
        table[arm] = {"seeds": seeds, "nll": nll, "accuracy": acc, "gap_closed": gap}
    comps = compare_runs(runs)
    lines += [
        "",
        (
            "Gap closed: (untrained init NLL - arm NLL) / (untrained init NLL - teacher NLL). Paired differences x - y "
            "over the same dev examples (bootstrap 95% interval over examples, 2000 draws; pooled = mean over the shared "
            "training seeds; * = interval excludes 0). Seed-level: the 95% t interval over the per-seed differences "
            "(counts seed-to-seed variation; wide with 3 seeds). NLL: nats per completion token, negative = x better; "
            "accuracy: points, positive = x better."
        ),
        "",
        f"| x - y | question | seeds | Δ dev NLL | seed-level | Δ token acc |{' Δ ROUGE-L |' if has_rouge else ''}",
        "|---" * (6 + has_rouge) + "|",
    ]
    for c in comps:
        rouge = (f" {_fmt_ci(c['rougeL']['pooled'], 2)} |" if "rougeL" in c else " – |") if has_rouge else ""
        lines.append(
            f"| {c['x']} - {c['y']} | {c['question']} | {','.join(map(str, c['seeds']))} | "
            f"{_fmt_ci(c['nll']['pooled'], 4)} | {_fmt_seed_ci(c['nll']['pooled'], 4)} | "
            f"{_fmt_ci(c['accuracy']['pooled'], 2)} |{rouge}"
        )
        if len(c["seeds"]) > 1:
            for seed, r in c["nll"]["per_seed"].items():
                acc = c["accuracy"]["per_seed"][seed]
                lines.append(
                    f"| ↳ seed {seed} | | | {_fmt_ci(r, 4)} | | {_fmt_ci(acc, 2)} |{' |' if has_rouge else ''}"
                )
    rouge, rouge_by_type = _load_rouge(out), {}
    for rouge_type in rouge_types(args.task):  # ROUGE-1/2/L on DialogSum, ROUGE-L on the instruction sets
        rouge_lines, rouge_by_type[rouge_type] = rouge_section(rouge, args.rouge_sets, rouge_type)
        lines += rouge_lines
    rouge_summary = rouge_by_type.get("rougeL", {})
    missing = missing_runs(runs, args.arms, args.seeds)
    if missing:
        lines += [
            "",
            (
                f"**Partial**: {len(missing)} (arm, seed) runs of the design not done: {', '.join(missing)} "
                f"(seeded arms {', '.join(SEEDED_ARMS)} at every seed of --seeds, the other arms at the first)."
            ),
        ]
    md = "\n".join(lines)
    summary = {"task": args.task, "profile": args.profile, "arms": table, "comparisons": comps,
               "references": {k: v["dev_summary"] for k, v in refs.items()}, "rouge": rouge_summary, "missing": missing,
               "rouge_by_type": rouge_by_type, "table": md}  # fmt: skip
    harness.write_results(out, "results", summary, md)
    print(md)
    return summary


if __name__ == "__main__":
    run(sys.argv[1:])
