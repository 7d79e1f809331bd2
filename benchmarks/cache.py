"""Teacher-cache benchmark: what building and reading a cache costs, how big it is, and how close its logit term is.

Measured with the real SmolLM2-135M-Instruct teacher on Dolly rows (CPU, one thread), in one run:

1. `build`: `build_teacher_cache` (K = 64, k = 256 selected units of the last layer, bf16) against one plain teacher
   forward over the same batches (the same DataLoader and collator, full logits, `no_grad`), interleaved; target
   <= 1.15x.
2. `bytes`: bytes per completion token of the shard files for K in {16, 64, 256} (and 0: units only), k in {256,
   576} and each dtype, next to the formula K * (id + dtype bytes) + 4 + k * dtype bytes.
3. `read`: `TeacherCache.lookup` of a batch (and the wrapped minus the plain collate) against one student step
   trained from that batch (forward, sparse KD + feature loss, backward, AdamW), interleaved.
4. `logit_gap`: per completion token, |sparse top-K + tail generalized JSD (from the bf16 cache) - full-vocabulary
   generalized JSD (online teacher logits)|, for K = 16 and 64, beta in {0, 0.5, 1}, for a freshly initialised
   narrow student and for one near the teacher (its weights plus Gaussian noise of 10% of each matrix's std); and
   the cosine between the two gradients with respect to the student logits.

5. `train`: step time and memory of training from the cache (SFT host with the feature term; GKD host, beta = 0,
   lmbda = 0) against plain `SFTTrainer` with no teacher (targets <= 1.10x time, <= 1.05x memory) and against the
   online GKD host, interleaved (`harness.py`).

6. `--train_nll` (its own mode, `train_nll.{json,md}`): dev NLL after a short training run from each logit term. A
   fresh narrow student (seeded, the same initial weights every run) is trained `--nll_steps` steps with the GKD host
   (`FeatureDistillTrainer`, beta = 0, lmbda = 0, feature_loss_weight = 0, so only the logit term differs) from the
   online teacher (full vocabulary), from a K = 64 cache and from a K = 16 cache (each built on its own: the top 16
   of a top-64 cache are the top 16, but its tail bucket holds ranks 17-64 too, so truncating it is not the K = 16
   term); same seed, same examples in the same (checked) order. Then teacher-forced NLL per completion token on
   `--nll_dev` Dolly dev rows, paired differences with a bootstrap interval over the dev examples.

    python benchmarks/cache.py --quick         # toy models, a few seconds: checks the script runs
    nice -n 10 python benchmarks/cache.py      # SmolLM2-135M on CPU, one thread (~20 min on 2 shared cores)
    python benchmarks/cache.py --parts build --rounds 5   # rerun some parts; the others are kept in cpu.json
    python benchmarks/cache.py --from_json benchmarks/results/cache/cpu.json   # rewrite the .md only
    nice -n 10 python benchmarks/cache.py --train_nll     # part 6 (~15 min on one shared core)
    python benchmarks/cache.py --train_nll --quick        # toy models: checks part 6 runs

On a shared machine compare the CPU-time ratios (process time): wall time includes the waits for the other jobs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import harness  # noqa: E402


STUDENT = harness.narrow_overrides(256, 4)  # recipes/dolly/smollm2-135m-to-llama-256: hidden 256, 4 layers, MLP 768
BYTES_GRID = {"top_k": (16, 64, 256, 0), "k": (256, 576), "dtype": ("bfloat16", "float16", "float32")}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--quick", action="store_true", help="toy models and data (checks the script works)")
    p.add_argument("--teacher", default=os.path.join(ROOT, "local", "smollm2-135m-instruct"))
    p.add_argument("--data", default=os.path.join(SHARED, "dolly", "train.jsonl"))
    p.add_argument("--num_examples", type=int, default=32, help="examples of the build / read / gap parts")
    p.add_argument("--bytes_examples", type=int, default=8, help="examples of each build of the bytes grid")
    p.add_argument("--gap_examples", type=int, default=16, help="examples of the logit-gap part")
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of build vs forward")
    p.add_argument("--read_rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train_rounds", type=int, default=5)
    p.add_argument("--parts", nargs="+", default=["build", "bytes", "read", "gap", "train"],
                   choices=["build", "bytes", "read", "gap", "train"])  # fmt: skip
    g = p.add_argument_group("--train_nll: dev NLL after a short training run from each logit term")
    g.add_argument("--train_nll", action="store_true", help="run this part alone (writes train_nll.json / .md)")
    g.add_argument("--nll_steps", type=int, default=40)
    g.add_argument("--nll_batch_size", type=int, default=4)
    g.add_argument("--nll_max_length", type=int, default=128)
    g.add_argument("--nll_lr", type=float, default=5e-4, help="the Dolly recipes' learning rate (linear decay)")
    g.add_argument("--nll_dev", type=int, default=100, help="Dolly dev rows of the teacher-forced NLL")
    g.add_argument("--nll_top_k", type=int, nargs="+", default=None, help="default: 64 16 (--quick: 16 4)")
    g.add_argument("--nll_dtype", default="float32", choices=list(DTYPE_BYTES),
                   help="storage of the top-K log-probs (fp32: only the top-K truncation differs from online)")  # fmt: skip
    g.add_argument("--nll_no_teacher_ref", action="store_true", help="skip the teacher's own dev NLL (a reference)")
    p.add_argument("--output_dir", default=None, help="default: benchmarks/results/cache (quick: a temp dir)")
    p.add_argument("--from_json", default=None, help="only rewrite the Markdown report from a results JSON")
    return p


class Bench:
    """Teacher, tokenizer, data, collator and a selection, shared by every part."""

    def __init__(self, args):
        import random

        import torch
        from trl.experimental.utils import DataCollatorForChatML

        from hf_taskdistill.data import fit_to_max_length, load_task_dataset
        from hf_taskdistill.selection import LayerSelection, UnitSelection

        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="hf_td_cache_bench_")
        if args.quick:
            from datasets import Dataset

            from hf_taskdistill.toy import build_toy_tokenizer, make_toy_examples, tiny_llama, to_messages

            self.tokenizer = build_toy_tokenizer()
            self.teacher = tiny_llama(len(self.tokenizer), hidden_size=64, num_layers=3, seed=1)
            rows = [to_messages(r) for r in make_toy_examples(max(args.num_examples, args.bytes_examples), seed=0)]
            self.data = Dataset.from_list(rows)
            self.teacher_name = "toy-teacher"
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(args.teacher)
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self.teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
            n = max(args.num_examples, args.bytes_examples)
            raw = load_task_dataset(args.data, format="messages", max_samples=n + 8, seed=0)
            self.data = fit_to_max_length(raw, self.tokenizer, args.max_length).select(range(n))
            self.teacher_name = args.teacher
        self.teacher.eval().requires_grad_(False)
        self.collator = DataCollatorForChatML(tokenizer=self.tokenizer, max_length=args.max_length)
        cfg = self.teacher.config
        self.d_t, self.n_layers = cfg.hidden_size, cfg.num_hidden_layers
        rng = random.Random(0)
        self.selection = {
            k: UnitSelection(layers=[LayerSelection(3, self.n_layers - 1, sorted(rng.sample(range(self.d_t), k)))],
                             selection_method="random", teacher_hidden_size=self.d_t, student_hidden_size=k)
            for k in self.unit_counts()
        }  # fmt: skip
        self.main = self.data.select(range(args.num_examples))
        batches = [self.collator([self.main[i] for i in range(s, min(s + args.batch_size, len(self.main)))])
                   for s in range(0, len(self.main), args.batch_size)]  # fmt: skip
        self.tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        self.completion_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)

    def unit_counts(self) -> tuple[int, ...]:
        return (16, 64) if self.args.quick else BYTES_GRID["k"]

    def build(self, data, top_k=None, k=None, dtype="bfloat16", path=None, units=True):
        """A cache of `data`: top-K log-probs + tail and (`units`) k selected units of the last layer."""
        from hf_taskdistill.cache_build import build_teacher_cache

        top_k = (8 if self.args.quick else 64) if top_k is None else top_k
        k = k or self.unit_counts()[0]
        path = path or tempfile.mkdtemp(dir=self.tmp)
        return build_teacher_cache(self.teacher, data, self.collator, path, tokenizer=self.tokenizer,
                                   selection=self.selection[k] if units else None, top_k=top_k, dtype=dtype,
                                   batch_size=self.args.batch_size, teacher_name_or_path=self.teacher_name,
                                   template="chat", show_progress=False)  # fmt: skip

    def forward_pass(self, data) -> None:
        import torch
        from torch.utils.data import DataLoader

        with torch.no_grad():
            for batch in DataLoader(data, batch_size=self.args.batch_size, collate_fn=self.collator):
                self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def student(self, closer: bool = False):
        import copy

        import torch
        from transformers import AutoModelForCausalLM

        if closer:  # a student near the teacher (late in training): its weights plus 10%-of-std Gaussian noise
            model = copy.deepcopy(self.teacher)
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() > 1:
                        p.add_(torch.randn(p.shape, generator=gen) * 0.1 * p.std())
            return model
        cfg = copy.deepcopy(self.teacher.config)
        overrides = dict(STUDENT) if not self.args.quick else {"hidden_size": 32, "intermediate_size": 64,
                                                               "num_hidden_layers": 4, "head_dim": 16}  # fmt: skip
        for key, value in overrides.items():
            setattr(cfg, key, value)
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg)


# ----------------------------------------------------------------------------------------------------------------
# parts
# ----------------------------------------------------------------------------------------------------------------
def part_build(bench: Bench) -> dict:
    args = bench.args
    harness.log(f"build vs forward: {len(bench.main)} examples, {bench.tokens} tokens "
                f"({bench.completion_tokens} completion), batch {args.batch_size}")  # fmt: skip
    warm = bench.main.select(range(min(2, len(bench.main))))
    bench.build(warm)
    bench.forward_pass(warm)
    dirs = []

    def build():
        cache = bench.build(bench.main)
        dirs.append(cache.directory)

    times = harness.interleave({"build": build, "forward": lambda: bench.forward_pass(bench.main)},
                               rounds=args.rounds, warmup=0, label="build")  # fmt: skip
    bench.main_cache_dir = dirs[-1]
    for d in dirs[:-1]:
        shutil.rmtree(d, ignore_errors=True)
    from hf_taskdistill.cache import TeacherCache

    t0 = time.perf_counter()
    cache = TeacherCache(bench.main_cache_dir)
    open_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    keys = cache.example_keys(bench.main, bench.collator)
    keys_s = time.perf_counter() - t0
    return {
        "examples": len(bench.main), "tokens": bench.tokens, "completion_tokens": bench.completion_tokens,
        "config": {"top_k": 8 if args.quick else 64, "k": bench.unit_counts()[0], "dtype": "bfloat16", "batch_size": args.batch_size},
        "times": times, "ratio": harness.ratio_stats(times, "build", "forward"), "target": 1.15,
        "open_seconds": round(open_s, 4), "validate_seconds_per_example": round(keys_s / len(keys), 6),
        "forward_tokens_per_second": round(bench.tokens / min(times["forward"]["wall"]), 1),
    }  # fmt: skip


def part_bytes(bench: Bench) -> dict:
    data = bench.data.select(range(bench.args.bytes_examples))
    rows = []
    vocab = bench.teacher.config.vocab_size
    id_bytes = 2 if vocab <= 65536 else 4
    for top_k in BYTES_GRID["top_k"] if not bench.args.quick else (4, 16, 0):
        for k in bench.unit_counts():
            for dtype in BYTES_GRID["dtype"]:
                if top_k == 0 and dtype != "bfloat16":
                    continue
                cache = bench.build(data, top_k=top_k, k=k, dtype=dtype)
                measured = cache.bytes_per_token()
                size = DTYPE_BYTES[dtype]
                formula = top_k * (id_bytes + size) + (4 if top_k else 0) + k * size
                rows.append({"top_k": top_k, "k": k, "dtype": dtype, "bytes_per_token": round(measured, 1),
                             "formula": formula, "completion_tokens": cache.header["num_tokens"],
                             "examples": len(data)})  # fmt: skip
                harness.log(f"  bytes K={top_k} k={k} {dtype}: {measured:.1f} B/token (formula {formula})")
                shutil.rmtree(cache.directory, ignore_errors=True)
    return {"rows": rows, "id_bytes": id_bytes}


def part_read(bench: Bench) -> dict:
    import torch

    from hf_taskdistill.cache import TeacherCache
    from hf_taskdistill.hooks import LayerTap
    from hf_taskdistill.losses import feature_loss, valid_positions
    from hf_taskdistill.sparse_kd import sparse_generalized_jsd_loss

    args = bench.args
    cache = TeacherCache(getattr(bench, "main_cache_dir", None) or bench.build(bench.main).directory)
    rows = [bench.main[i] for i in range(args.batch_size)]
    wrapped = cache.wrap_collator(bench.collator)
    student = bench.student()
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.0)
    tap = LayerTap(student, [student.config.num_hidden_layers - 1])
    selection = cache.selection
    batch = wrapped(rows)

    def step():
        inputs = dict(batch)
        cached = cache.pop_batch(inputs, selection)
        mask = valid_positions(inputs["labels"])
        n = mask.sum()
        with tap.capture() as out:
            logits = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        kd = sparse_generalized_jsd_loss(logits, cached.topk_ids, cached.topk_logprobs, cached.tail_logprob, mask, 0.0)
        teacher_units = cached.units[selection.layers[0].teacher_layer]
        hidden = out[student.config.num_hidden_layers - 1][..., : teacher_units.shape[-1]]
        feat = feature_loss(hidden, teacher_units, mask).loss_sum
        ((kd + feat) / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    plain = bench.collator(rows)
    keys = (plain["input_ids"], plain["attention_mask"], plain["labels"])
    times = harness.interleave({"collate": lambda: bench.collator(rows), "collate_cached": lambda: wrapped(rows),
                                "lookup": lambda: cache.lookup(*keys), "student_step": step},
                               rounds=args.read_rounds, reps=3, label="read")  # fmt: skip
    read = [a - b for a, b in zip(times["collate_cached"]["wall"], times["collate"]["wall"], strict=True)]
    step_s = statistics.median(times["student_step"]["wall"])
    return {"batch_size": args.batch_size, "tokens": int(batch["attention_mask"].sum()),
            "completion_tokens": int(valid_positions(batch["labels"]).sum()), "times": times,
            "lookup_seconds": round(statistics.median(times["lookup"]["wall"]), 5),
            "wrapped_minus_plain_seconds": round(statistics.median(read), 5),
            "collate_seconds": round(statistics.median(times["collate"]["wall"]), 5),
            "student_step_seconds": round(step_s, 4),
            "lookup_over_step": round(statistics.median(times["lookup"]["wall"]) / step_s, 5),
            "page_cache": "warm (the shards were just written)"}  # fmt: skip


def part_gap(bench: Bench) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from trl.experimental.gkd import GKDTrainer

    from hf_taskdistill.losses import valid_positions
    from hf_taskdistill.sparse_kd import sparse_generalized_jsd

    args = bench.args
    ks = (16, 64) if not args.quick else (4, 16)
    data = bench.main.select(range(min(args.gap_examples, len(bench.main))))
    caches = {k: bench.build(data, top_k=k) for k in ks}
    students = {"fresh narrow student": bench.student(), "near student (teacher + 10% weight noise)":
                bench.student(closer=True)}  # fmt: skip
    betas = (0.0, 0.5, 1.0)
    acc = {(s, k, b): {"abs": [], "full": [], "cos": []} for s in students for k in ks for b in betas}
    for batch in DataLoader(data, batch_size=args.batch_size, collate_fn=bench.collator):
        mask = valid_positions(batch["labels"])
        with torch.no_grad():
            t_logits = bench.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        keys = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        cached = {k: c.pop_batch(c.lookup(*keys)) for k, c in caches.items()}
        for s_name, model in students.items():
            with torch.no_grad():
                s_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            for beta in betas:
                leaf = s_logits.clone().requires_grad_()
                full = GKDTrainer.generalized_jsd_loss(leaf, t_logits, beta=beta, reduction="none").sum(-1)  # (B, T)
                (g_full,) = torch.autograd.grad(full[mask].sum(), leaf)
                for k in ks:
                    c = cached[k]
                    leaf_k = s_logits.clone().requires_grad_()
                    sparse = sparse_generalized_jsd(leaf_k, c.topk_ids, c.topk_logprobs, c.tail_logprob, beta)
                    (g_k,) = torch.autograd.grad(sparse[mask].sum(), leaf_k)
                    a = acc[(s_name, k, beta)]
                    a["abs"] += (sparse - full).abs()[mask].tolist()
                    a["full"] += full[mask].tolist()
                    a["cos"] += torch.nn.functional.cosine_similarity(g_k[mask], g_full[mask], dim=-1).tolist()
    rows = []
    for (s_name, k, beta), a in acc.items():
        mean_full = statistics.fmean(a["full"])
        mad = statistics.fmean(a["abs"])
        rows.append({"student": s_name, "top_k": k, "beta": beta, "mean_abs_diff": round(mad, 5),
                     "mean_full": round(mean_full, 4), "relative": round(mad / mean_full, 5),
                     "grad_cosine": round(statistics.fmean(a["cos"]), 5), "tokens": len(a["abs"])})  # fmt: skip
    for c in caches.values():
        shutil.rmtree(c.directory, ignore_errors=True)
    return {"rows": rows, "storage": "bfloat16 top-K log-probs, fp32 tail"}


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------
def _base_kwargs(bench: Bench, name: str) -> dict:
    return dict(output_dir=os.path.join(bench.tmp, name), per_device_train_batch_size=bench.args.batch_size,
                max_length=bench.args.max_length, learning_rate=0.0, report_to="none", use_cpu=True, bf16=False,
                activation_checkpointing=False, save_strategy="no", disable_tqdm=True, logging_steps=10**6, seed=0)  # fmt: skip


def _training_args(bench: Bench, name: str, **overrides):
    from hf_taskdistill import TaskFeatureDistillConfig

    return TaskFeatureDistillConfig(**{**_base_kwargs(bench, name), "beta": 0.0, "lmbda": 0.0,
                                       "feature_loss_weight": 1.0, "selection_num_units": bench.unit_counts()[0],
                                       **overrides})  # fmt: skip


def part_train(bench: Bench) -> dict:
    """Step time and memory of training from the cache against plain SFT (no teacher) and the online GKD host."""
    import copy
    import random

    from trl import SFTConfig, SFTTrainer

    from hf_taskdistill import FeatureDistillSFTTrainer, FeatureDistillTrainer
    from hf_taskdistill.cache import TeacherCache
    from hf_taskdistill.data import load_task_dataset

    args = bench.args
    cache_dir = getattr(bench, "main_cache_dir", None) or bench.build(bench.main).directory
    cache = TeacherCache(cache_dir)
    messages = bench.main
    if args.quick:
        from datasets import Dataset

        from hf_taskdistill.toy import make_toy_examples, to_prompt_completion

        pc = Dataset.from_list([to_prompt_completion(r) for r in make_toy_examples(args.num_examples, seed=0)])
    else:
        raw = load_task_dataset(args.data, format="prompt_completion", max_samples=args.num_examples + 8, seed=0)
        from hf_taskdistill.data import fit_to_max_length

        pc = fit_to_max_length(raw, bench.tokenizer, args.max_length).select(range(args.num_examples))
    student = bench.student()
    common = dict(processing_class=bench.tokenizer)
    trainers = {
        "sft": SFTTrainer(model=copy.deepcopy(student), train_dataset=pc, **common, args=SFTConfig(**_base_kwargs(bench, "sft"))),
        "sft_cache": FeatureDistillSFTTrainer(model=copy.deepcopy(student), teacher_model=None, train_dataset=pc,
                                              args=_training_args(bench, "sft_cache", logit_loss="none",
                                                                  teacher_cache=cache_dir), **common),
        "gkd_cache": FeatureDistillTrainer(model=copy.deepcopy(student), teacher_model=None, train_dataset=messages,
                                           args=_training_args(bench, "gkd_cache", teacher_cache=cache_dir), **common),
        "gkd_online": FeatureDistillTrainer(model=copy.deepcopy(student), teacher_model=bench.teacher,
                                            unit_selection=cache.selection, train_dataset=messages,
                                            args=_training_args(bench, "gkd_online"), **common),
    }  # fmt: skip
    order = list(range(len(messages)))
    random.Random(0).shuffle(order)
    idx = order[: args.batch_size]
    batches = {n: t.data_collator([t.train_dataset[i] for i in idx]) for n, t in trainers.items()}

    def step(name):
        trainer = trainers[name]
        if trainer.optimizer is None:
            trainer.create_optimizer()
        inputs = dict(batches[name])
        trainer.model.train()
        trainer.training_step(trainer.model, inputs, (inputs["labels"][:, 1:] != -100).sum())
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=False)

    times = harness.interleave({n: (lambda n=n: step(n)) for n in trainers}, rounds=args.train_rounds, label="train")
    memory = {}
    for name, trainer in trainers.items():
        with harness.TensorPeak() as peak:
            step(name)
        teacher = getattr(trainer, "teacher_model", None)
        persistent = harness.tensor_bytes(trainer.model, trainer.optimizer, teacher, grads=True)
        memory[name] = {"transient_peak_mib": round(peak.peak / 2**20, 1),
                        "persistent_mib": round(persistent / 2**20, 1),
                        "total_mib": round((peak.peak + persistent) / 2**20, 1)}  # fmt: skip
        harness.log(f"  memory {name}: {memory[name]}")
    ratios = {f"{a}/{b}": {"time": harness.ratio_stats(times, a, b),
                           "memory": round(memory[a]["total_mib"] / memory[b]["total_mib"], 4)}
              for a, b in (("sft_cache", "sft"), ("gkd_cache", "sft"), ("gkd_cache", "gkd_online"))}  # fmt: skip
    return {"times": times, "memory": memory, "ratios": ratios, "batch_size": args.batch_size,
            "targets": {"time": 1.10, "memory": 1.05},
            "memory_note": "student (+ teacher) parameters, gradients and AdamW state, plus the peak of tensors "
                           "allocated during one step (TensorPeak)"}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# --train_nll: dev NLL after a short training run from each logit term
# ----------------------------------------------------------------------------------------------------------------
class _OrderRecorder:
    """Wraps a trainer's collator and records the token hash of every example of every batch it makes (the check
    that each run sees the same examples in the same order)."""

    def __init__(self, collator):
        self.collator, self.hashes = collator, []

    def __call__(self, examples):
        from hf_taskdistill.cache import token_hash

        batch = self.collator(examples)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        self.hashes.append([token_hash(ids[i][mask[i].bool()]) for i in range(ids.shape[0])])
        return batch

    def __getattr__(self, name):
        return getattr(self.collator, name)


def _nll_data(bench: Bench):
    """(train rows, dev rows) for --train_nll: seeded Dolly subsets fitted to the window (toy rows with --quick)."""
    from datasets import Dataset

    from hf_taskdistill.data import fit_to_max_length, load_task_dataset

    args = bench.args
    n_train = args.nll_steps * args.nll_batch_size
    if args.quick:
        from hf_taskdistill.toy import make_toy_examples, to_messages

        rows = [to_messages(r) for r in make_toy_examples(n_train + args.nll_dev, seed=3)]
        return Dataset.from_list(rows[:n_train]), Dataset.from_list(rows[n_train:])
    train = load_task_dataset(args.data, format="messages", max_samples=n_train + 64, seed=1)
    train = fit_to_max_length(train, bench.tokenizer, args.max_length)
    dev_path = os.path.join(os.path.dirname(args.data), "dev.jsonl")
    dev = load_task_dataset(dev_path, format="messages", max_samples=args.nll_dev + 32, seed=0)
    dev = fit_to_max_length(dev, bench.tokenizer, args.max_length, name="dev")
    if len(train) < n_train or len(dev) < args.nll_dev:
        raise SystemExit(f"only {len(train)} train / {len(dev)} dev rows fit max_length={args.max_length}")
    return train.select(range(n_train)), dev.select(range(args.nll_dev))


def part_train_nll(bench: Bench) -> dict:
    """Train the same fresh student from the online teacher and from each top-K cache; dev NLL of each."""
    import torch

    from hf_taskdistill import FeatureDistillTrainer, TaskFeatureDistillConfig

    args = bench.args
    train, dev = _nll_data(bench)
    ks = sorted(args.nll_top_k or ([16, 4] if args.quick else [64, 16]), reverse=True)
    dev_batches = harness.length_batches(dev, bench.collator, args.nll_batch_size)
    results = {"train_examples": len(train), "dev_examples": len(dev), "runs": {}, "builds": {}}
    caches = {}
    for k in ks:
        t0 = time.perf_counter()
        path = os.path.join(bench.tmp, f"nll_k{k}")
        cache = bench.build(train, top_k=k, dtype=args.nll_dtype, path=path, units=False)
        caches[k] = path
        results["builds"][f"K={k}"] = {"seconds": round(time.perf_counter() - t0, 1),
                                       "bytes_per_token": round(cache.bytes_per_token(), 1),
                                       "completion_tokens": cache.header["num_tokens"]}  # fmt: skip
        harness.log(f"  cache K={k} ({args.nll_dtype}): {results['builds'][f'K={k}']}")
    results["train_completion_tokens"] = results["builds"][f"K={ks[0]}"]["completion_tokens"]

    def evaluate(name, model, **extra):
        t0 = time.perf_counter()
        dev_out = harness.teacher_forced(model, dev_batches, len(dev))
        entry = {"dev": dev_out, "dev_nll": round(harness.per_token(dev_out["nll"], dev_out["tokens"]), 5),
                 "dev_accuracy": round(100 * harness.per_token(dev_out["correct"], dev_out["tokens"]), 3),
                 "eval_seconds": round(time.perf_counter() - t0, 1), **extra}  # fmt: skip
        results["runs"][name] = entry
        harness.log(f"  {name}: dev NLL {entry['dev_nll']:.4f}, token accuracy {entry['dev_accuracy']:.2f}%")

    def checksum(model) -> float:
        return float(sum(p.detach().double().sum() for p in model.parameters()))

    init = bench.student()
    init_sum = checksum(init)
    c = init.config
    n_params = sum(p.numel() for p in init.parameters()) / 1e6
    results["student"] = (
        f"fresh narrow Llama from the teacher's config (hidden {c.hidden_size}, {c.num_hidden_layers} layers, "
        f"intermediate {c.intermediate_size}, {n_params:.1f}M parameters, seeded: the same initial weights in "
        "every run)"
    )
    results["top_k"] = ks
    evaluate("untrained student", init)
    arms = {"online teacher (full vocabulary)": None, **{f"cache K={k}": caches[k] for k in ks}}
    orders = {}
    for name, cache_dir in arms.items():
        student = bench.student()
        if checksum(student) != init_sum:
            raise RuntimeError("the student's initial weights differ between runs")
        cfg = TaskFeatureDistillConfig(
            output_dir=os.path.join(bench.tmp, "nll_" + name.split()[0]),
            per_device_train_batch_size=args.nll_batch_size,
            max_length=args.max_length, learning_rate=args.nll_lr, max_steps=args.nll_steps, beta=0.0, lmbda=0.0,
            feature_loss_weight=0.0, teacher_cache=cache_dir, report_to="none", use_cpu=True, bf16=False,
            activation_checkpointing=False, save_strategy="no", disable_tqdm=True, logging_steps=10, seed=0,
            dataloader_num_workers=0,
        )  # fmt: skip
        trainer = FeatureDistillTrainer(model=student, teacher_model=bench.teacher if cache_dir is None else None,
                                        args=cfg, train_dataset=train, processing_class=bench.tokenizer)  # fmt: skip
        recorder = _OrderRecorder(trainer.data_collator)
        trainer.data_collator = recorder
        torch.manual_seed(0)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        orders[name] = recorder.hashes
        losses = [(h["step"], round(h["loss"], 4)) for h in trainer.state.log_history if "loss" in h]
        harness.log(f"  {name}: {args.nll_steps} steps in {seconds:.0f} s, logged train loss {losses}")
        evaluate(name, trainer.model, train_seconds=round(seconds, 1), train_loss=losses)
        del trainer, student
    first = next(iter(orders.values()))
    results["same_order"] = all(o == first for o in orders.values())
    if not results["same_order"]:
        raise RuntimeError("the runs saw different batches: the comparison is not paired")
    results["steps_seen"] = len(first)
    if not args.nll_no_teacher_ref:
        evaluate("teacher (reference)", bench.teacher)
    runs, tokens = results["runs"], results["runs"]["untrained student"]["dev"]["tokens"]
    online = "online teacher (full vocabulary)"
    pairs = [(f"cache K={k}", online) for k in ks] + [(f"cache K={ks[-1]}", f"cache K={ks[0]}")]
    results["paired"] = [{"x": x, "y": y, **harness.paired_difference(runs[x]["dev"]["nll"], runs[y]["dev"]["nll"],
                                                                       tokens)} for x, y in pairs]  # fmt: skip
    start, end = runs["untrained student"]["dev_nll"], runs[online]["dev_nll"]
    for row in results["paired"]:
        row["share_of_online_gain"] = round(row["diff"] / (start - end), 5) if start != end else None
        harness.log(f"  {row['x']} - {row['y']}: {row['diff']:+.4f} nats/token (95% CI {row['ci95'][0]:+.4f} to "
                    f"{row['ci95'][1]:+.4f})")  # fmt: skip
    results["dev_tokens"] = int(sum(tokens))
    return results


def _run_order(name: str) -> tuple:  # (a sort key: untrained, online, caches by K descending, teacher)
    if name.startswith("cache K="):
        return (2, -int(name.split("=")[1]))
    return ({"untrained student": 0, "online teacher (full vocabulary)": 1}.get(name, 3), 0)


def markdown_train_nll(results: dict) -> str:
    """The Markdown report of --train_nll."""
    r, a = results["train_nll"], results["args"]
    head = (
        f"Hardware: {results['hardware']}. Teacher: {results['teacher']}; data: {results['data']}. "
        f"Wall {results['seconds']:.0f} s."
    )
    ks = ", ".join(str(k) for k in r["top_k"])
    setup = (
        f"Student: {r['student']}, GKD host (`FeatureDistillTrainer`), beta = 0 (forward KL), lmbda = 0, "
        f"feature_loss_weight = 0: only the logit term differs. {a['nll_steps']} steps x batch "
        f"{a['nll_batch_size']} ({r['train_examples']} train rows, {r['train_completion_tokens']} completion "
        f"tokens, one epoch, the same order in every run: checked), max_length {a['max_length']}, lr {a['nll_lr']} "
        f"(linear decay), seed 0. Caches: K = {ks}, each built on its own, top-K log-probs in {a['nll_dtype']}, fp32 "
        f"tail. Dev: teacher-forced NLL per completion token on {r['dev_examples']} dev rows "
        f"({r['dev_tokens']} tokens)."
    )
    ordered = sorted(r["runs"].items(), key=lambda item: _run_order(item[0]))
    runs = [[name, f"{e['dev_nll']:.4f}", f"{e['dev_accuracy']:.2f}", e.get("train_seconds", "-"),
             ", ".join(f"{s}: {v}" for s, v in e.get("train_loss", [])) or "-"] for name, e in ordered]  # fmt: skip
    paired = [[f"{p['x']} - {p['y']}", f"{p['diff']:+.4f}", f"{p['ci95'][0]:+.4f} to {p['ci95'][1]:+.4f}",
               "-" if p["share_of_online_gain"] is None else f"{100 * p['share_of_online_gain']:.2f}%"]
              for p in r["paired"]]  # fmt: skip
    builds = "; ".join(f"{k}: {v['seconds']} s, {v['bytes_per_token']} B/token" for k, v in r["builds"].items())
    note = (
        "Paired over the dev examples (x - y, nats per token; bootstrap 95% interval over examples; share = the "
        "difference over the online run's gain on the untrained student):"
    )
    lines = [
        "# Teacher cache: dev NLL after a short training run from each logit term",
        "",
        head,
        "",
        setup,
        "",
        *harness.md_table(["run", "dev NLL / token", "token accuracy %", "train s", "logged train loss"], runs),
        "",
        note,
        "",
        *harness.md_table(["x - y", "difference", "95% CI", "share of the online gain"], paired),
        "",
        (
            f"Cache builds (logits only): {builds}. Train loss values (step: loss) are each run's own logit term "
            "(the top-K + tail term is smaller than the full one), not comparable across runs."
        ),
        "",
    ]
    return "\n".join(lines)


def _section(title: str, note: str, *tables: tuple[list[str], list[list]]) -> list[str]:
    """`## title`, a note, then each (header, rows) table, each block followed by a blank line."""
    lines = [f"## {title}", "", note, ""]
    for header, rows in tables:
        lines += [*harness.md_table(header, rows), ""]
    return lines


def markdown(results: dict) -> str:
    head = (f"Hardware: {results['hardware']}. Teacher: {results['teacher']}; data: {results['data']}. "
            f"Wall {results['seconds']:.0f} s.")  # fmt: skip
    lines = ["# Teacher cache benchmark", "", head, ""]
    b = results.get("build")
    if b:
        r, c = b["ratio"], b["config"]
        verdict = "pass" if r["cpu"] <= b["target"] else "MISS"  # CPU time: a shared machine's wall time is noise
        setup = (
            f"{b['examples']} examples, {b['tokens']} tokens ({b['completion_tokens']} completion), K = "
            f"{c['top_k']}, k = {c['k']}, {c['dtype']}, batch {c['batch_size']}, {r['rounds']} interleaved rounds."
        )
        row = [f"{r['wall']:.3f} ({r['wall_ci95'][0]:.3f}-{r['wall_ci95'][1]:.3f})", f"{r['wall_ratio_of_min']:.3f}",
               f"{r['cpu']:.3f}", f"<= {b['target']} {verdict}"]  # fmt: skip
        extra = (
            f"Teacher forward: {b['forward_tokens_per_second']:.0f} tokens/s. Opening the cache: "
            f"{b['open_seconds']:.3f} s; validating a dataset against it: "
            f"{1000 * b['validate_seconds_per_example']:.2f} ms per example (collate + hash)."
        )
        header = ["build / forward, median wall (95% CI)", "ratio of minima", "median CPU", "target (CPU time)"]
        lines += [*_section("Build vs one teacher forward", setup, (header, [row])), extra, ""]
    by = results.get("bytes")
    if by:
        note = f"ids: {by['id_bytes']} bytes (uint16 when the vocabulary fits); tail: fp32; K = 0: units only."
        header = ["K", "k", "dtype", "measured B/token", "formula K(id+dtype)+4+k*dtype"]
        rows = [[r["top_k"], r["k"], r["dtype"], f"{r['bytes_per_token']:.1f}", r["formula"]] for r in by["rows"]]
        lines += _section("Bytes per completion token (shard files)", note, (header, rows))
    rd = results.get("read")
    if rd:
        text = (
            f"Batch of {rd['batch_size']} ({rd['tokens']} tokens, {rd['completion_tokens']} completion), page "
            f"cache {rd['page_cache']}: `TeacherCache.lookup` {1000 * rd['lookup_seconds']:.2f} ms (wrapped minus plain "
            f"collate {1000 * rd['wrapped_minus_plain_seconds']:.2f} ms) on top of the collator's "
            f"{1000 * rd['collate_seconds']:.2f} ms; student step {rd['student_step_seconds']:.3f} s; "
            f"lookup / step = {100 * rd['lookup_over_step']:.3f}%."
        )
        lines += _section("Reading a batch vs a student step", text)
    gp = results.get("gap")
    if gp:
        note = f"Per completion token, from the cache ({gp['storage']}) against the online teacher's full logits."
        header = ["student", "K", "beta", "mean abs diff", "mean full JSD", "relative", "grad cosine"]
        rows = [[r["student"], r["top_k"], r["beta"], f"{r['mean_abs_diff']:.4f}", f"{r['mean_full']:.3f}",
                 f"{100 * r['relative']:.2f}%", f"{r['grad_cosine']:.4f}"] for r in gp["rows"]]  # fmt: skip
        lines += _section("Logit term: top-K + tail vs full vocabulary", note, (header, rows))
    tr = results.get("train")
    if tr:
        note = (
            f"Batch of {tr['batch_size']}, lr 0, one step = `training_step` + AdamW step; memory = "
            f"{tr['memory_note']}."
        )
        header = ["ratio", "step time, median wall (95% CI)", "median CPU", "memory", "targets vs plain SFT"]
        targets = f"<= {tr['targets']['time']} time, <= {tr['targets']['memory']} memory"
        rows = []
        for key, r in tr["ratios"].items():
            t = r["time"]
            wall = f"{t['wall']:.3f} ({t['wall_ci95'][0]:.3f}-{t['wall_ci95'][1]:.3f})"
            rows.append([key, wall, f"{t['cpu']:.3f}", f"{r['memory']:.3f}", targets])
        memory = [[n, m["transient_peak_mib"], m["persistent_mib"], m["total_mib"]] for n, m in tr["memory"].items()]
        memory_header = ["configuration", "transient peak MiB", "persistent MiB", "total MiB"]
        lines += _section("Training from the cache", note, (header, rows), (memory_header, memory))
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    if args.from_json:
        import json

        with open(args.from_json) as f:
            results = json.load(f)
        with open(os.path.splitext(args.from_json)[0] + ".md", "w") as f:
            f.write((markdown_train_nll if "train_nll" in results else markdown)(results).rstrip() + "\n")
        return results
    if args.quick:
        args.num_examples, args.bytes_examples, args.rounds, args.read_rounds = 12, 4, 2, 2
        args.max_length, args.batch_size = 32, 4
        if args.train_nll:
            args.nll_steps, args.nll_batch_size, args.nll_dev, args.nll_max_length = 4, 2, 8, 32
    if args.train_nll:
        return main_train_nll(args)
    harness.benchmark_env(args.threads)
    t0 = time.perf_counter()
    bench = Bench(args)
    results = {"hardware": harness.hardware_line("cpu", args.threads), "args": vars(args),
               "teacher": "toy" if args.quick else "SmolLM2-135M-Instruct (fp32)",
               "data": "toy task" if args.quick else f"Dolly train, seeded subset, max_length {args.max_length}"}  # fmt: skip
    try:
        parts = (
            ("build", part_build),
            ("bytes", part_bytes),
            ("read", part_read),
            ("gap", part_gap),
            ("train", part_train),
        )
        for part, fn in parts:
            if part in args.parts:
                harness.log(f"part {part}")
                results[part] = {**fn(bench), "args": dict(vars(args))}
    finally:
        shutil.rmtree(bench.tmp, ignore_errors=True)
    results["seconds"] = time.perf_counter() - t0
    out = args.output_dir or (os.path.join(tempfile.gettempdir(), "hf_td_cache_quick") if args.quick
                              else os.path.join(HERE, "results", "cache"))  # fmt: skip
    name = "quick" if args.quick else "cpu"
    previous = os.path.join(out, f"{name}.json")
    if set(args.parts) != {"build", "bytes", "read", "gap", "train"} and os.path.isfile(previous):
        import json

        with open(previous) as f:  # a partial rerun updates its parts and keeps the others
            merged = json.load(f)
        merged.setdefault("seconds_per_run", [merged.get("seconds", 0.0)]).append(results["seconds"])
        merged.update({k: v for k, v in results.items() if k != "seconds"})
        merged["seconds"] = sum(merged["seconds_per_run"])
        results = merged
    paths = harness.write_results(out, name, results, markdown(results))
    harness.log(f"results: {paths[0]}, {paths[1]}")
    print(markdown(results))
    return results


def main_train_nll(args) -> dict:
    """--train_nll: one run of `part_train_nll`, written to `train_nll.json` / `train_nll.md`."""
    args.max_length, args.batch_size = args.nll_max_length, args.nll_batch_size
    args.num_examples = args.bytes_examples = min(args.num_examples, 8)
    harness.benchmark_env(args.threads)
    t0 = time.perf_counter()
    results = {"args": vars(args), "loadavg_start": os.getloadavg()[0]}
    bench = Bench(args)
    results.update(
        hardware=harness.hardware_line("cpu", args.threads),
        teacher="toy" if args.quick else "SmolLM2-135M-Instruct (fp32)",
        data="toy task" if args.quick else "Dolly train / dev, seeded subsets, fitted to max_length",
    )
    try:
        results["train_nll"] = part_train_nll(bench)
    finally:
        shutil.rmtree(bench.tmp, ignore_errors=True)
    results["seconds"] = time.perf_counter() - t0
    results["loadavg_end"] = os.getloadavg()[0]
    out = args.output_dir or (os.path.join(tempfile.gettempdir(), "hf_td_cache_quick") if args.quick
                              else os.path.join(HERE, "results", "cache"))  # fmt: skip
    paths = harness.write_results(out, "train_nll_quick" if args.quick else "train_nll", results,
                                  markdown_train_nll(results))  # fmt: skip
    harness.log(f"results: {paths[0]}, {paths[1]}")
    print(markdown_train_nll(results))
    return results


if __name__ == "__main__":
    main()
