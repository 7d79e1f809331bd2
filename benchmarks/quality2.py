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
rebuilds `results.json` / `results.md` from them (the tables: `benchmarks/quality2_tables.py`). Heavy artefacts
(scoring statistics, pruned students, the cache) live under `local/bench/quality2/` and are reused.

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
from quality2_tables import (  # (benchmarks/quality2_tables.py: the design's arms and every table)
    ARMS,
    DEFAULT_ORDER,
    INSTRUCTION_SETS,
    aggregate,
    budget_comparison,
    budget_table,
    cut_report,
    fill_markers,
    generated_blocks,
    load_references,
    load_runs,
    per_token,
    read_json,
    rouge_types,
    training_plan,
)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = {"dolly": "instruction", "dialogsum": "summarization"}
# init -> how it is cut: (residual criterion, aggregation, MLP criterion; None = the residual's), from the settings
CUTS = {
    "activation": lambda a: ("activation", "sum", None),
    "random": lambda a: ("random", "sum", None),
    "task": lambda a: (a.task_criterion, a.task_aggregation, None),
    # the two halves of the cut swapped (untrained references, `--references`): which half costs the task cut its start?
    "task_res": lambda a: (a.task_criterion, a.task_aggregation, "activation"),  # task units, Minitron's MLP
    "act_res": lambda a: ("activation", "sum", a.task_criterion),  # Minitron's units, task MLP
}
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


def dev_summary(dev: dict) -> dict:
    return {"nll": per_token(dev["nll"], dev["tokens"]), "accuracy": 100 * per_token(dev["correct"], dev["tokens"]),
            "n_examples": len(dev["tokens"]), "n_tokens": int(sum(dev["tokens"]))}  # fmt: skip


def seconds_until(deadline: str, now: time.struct_time) -> int:
    """Seconds from `now` to the UTC clock time `deadline` ("HH:MM"), which may be after midnight: a deadline up to
    12 h behind the clock counts as passed (negative), one further behind as tomorrow's."""
    hh, mm = map(int, deadline.split(":"))
    left = (hh * 60 + mm) * 60 - (now.tm_hour * 3600 + now.tm_min * 60 + now.tm_sec)
    return left + 86400 if left < -12 * 3600 else left


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
        left = seconds_until(self.args.deadline, time.gmtime())
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
            record = read_json(out) if os.path.isfile(out) else {"model": name, "n_per_set": a.rouge_eval,
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
        evals = [r["eval_seconds"] for arm in load_runs(self.args.output_dir).values() for r in arm.values()]
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
        return run_headline(args)
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
# reports from finished parts (the tables themselves: quality2_tables.py)
# ----------------------------------------------------------------------------------------------------------------
def run_headline(args) -> dict[str, str]:
    """`--headline DIR...`: the README's generated tables from each task's `results.json` (and `cuts.md`, where
    `--cut_report` ran); printed, or with `--write_readme PATH` refilled into PATH's marked spans. A second directory
    of the same task (the same design at another `--steps`) adds that task's budget check, `<task>-budget`."""
    # per task: the first directory is the design, a later one its budget check
    main_dirs, budget_dirs, summaries = {}, {}, []
    for d in args.headline:
        summary = read_json(os.path.join(d, "results.json"))
        if summary["task"] in main_dirs:
            budget_dirs.setdefault(summary["task"], d)
        else:
            main_dirs[summary["task"]] = d
            summaries.append(summary)
    blocks = generated_blocks(summaries)
    for task, d in budget_dirs.items():
        short, long = main_dirs[task], d
        steps = [read_json(os.path.join(x, "settings.json"))["steps"] for x in (short, long)]
        blocks[f"{task}-budget"] = budget_table(budget_comparison(load_runs(short), load_runs(long)), *steps)
    for d, sm in zip(main_dirs.values(), summaries, strict=True):
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


def run_cut_report(args) -> dict:
    """`--cut_report`: `cut_report` over the saved cuts of `--work_dir`, written to `<output_dir>/cuts.{json,md}`."""
    import torch

    stats = torch.load(os.path.join(args.work_dir, "scoring_stats.pt"), weights_only=False)
    cuts = {}
    for init in CUTS:
        path = os.path.join(args.work_dir, "students", init, "config.json")
        if os.path.isfile(path):
            rec = read_json(path)["task_distill"]["init"]
            cuts[init] = {"residual": rec["residual_indices"], "mlp": rec["mlp_indices"]}
    report = cut_report(stats.act_sq, stats.mlp_act_l2, cuts)
    refs = load_references(args.output_dir)  # the untrained dev NLL where `--references` / `--eval_inits` ran
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


if __name__ == "__main__":
    run(sys.argv[1:])
