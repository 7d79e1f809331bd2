"""Speed and memory benchmark: the cost of task-based feature distillation against plain TRL.

Measures, in one run and with the configurations interleaved (A B C, B C A, C A B, C B A, ...) so that machine
drift cancels, and prints ratios:

1. Step time and peak memory of the feature-distillation trainers against the same TRL trainer with no feature
   loss (plain `GKDTrainer` / `SFTTrainer`), for GKD off-policy, GKD on-policy and the SFT host; and against a
   reference implementation of the common hidden-state KD approach (both models called with
   `output_hidden_states=True`, a learned `Linear(d_S, d_T)` projector, MSE on the last layer, on the same GKD
   loss; DistillKit-style, written here, not a peer's code).
2. The one-off unit-scoring pass (`select_task_units`) against one teacher forward+backward over the same tokens,
   and its share of some realistic training runs.
3. How the overhead grows with sequence length, batch size, k and the number of layer pairs (GKD off-policy).

    python benchmarks/speed_memory.py --quick                 # toy models, about a minute: checks the script runs
    nice -n 10 python benchmarks/speed_memory.py              # SmolLM2-135M teacher on CPU (default profile)
    python benchmarks/speed_memory.py --device cuda           # GPU profile (bf16, batch 8, seq 512)
    python benchmarks/speed_memory.py --from_json benchmarks/results/speed_memory/cpu.json   # rewrite the .md

Step time = `trainer.training_step` (the host's forward, loss and backward, with generation for on-policy GKD)
plus the optimizer step, on a fixed list of batches, after warm-up. The learning rate is 0 so every configuration
sees identical weights and, for on-policy GKD, identical sampled completions (same RNG seed per step); the
optimizer still does all its arithmetic. Memory is measured per configuration in a fresh subprocess:
CPU peak RSS (Linux `VmHWM`, reset after model load and one warm-up step) and, deterministically, the peak of
live tensor bytes allocated during one step (a `TorchDispatchMode` counter); on CUDA `max_memory_allocated`.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
sys.path.insert(0, HERE)

import harness  # noqa: E402  (benchmarks/harness.py: timing, memory probes, hardware line)
from harness import TensorPeak, interleave, log, ratio_stats, round_order  # noqa: E402
from speed_memory_report import summary_rows, write_report  # noqa: E402  (the report: targets, tables)


MODES = ("gkd_off", "gkd_on", "sft")
# Per mode: the baseline first, then the feature-distillation trainer, then the reference.
CONFIGS = {
    "gkd_off": ("trl", "fd", "allhs"),
    "gkd_on": ("trl", "fd", "allhs"),
    "sft": ("trl", "fd", "sft_teacher"),
}

PROFILES = {
    # tiny toy models: a functional check of the whole script (memory subprocesses for GKD off-policy only)
    "quick": dict(batch_size=4, max_length=48, rounds=2, steps=1, n_batches=1, max_new_tokens=6, score_batches=2,
                  score_rounds=2, scaling_rounds=1, mem_rounds=1, mem_steps=1, mem_modes=["gkd_off"],
                  scoring_memory=False),
    # SmolLM2-135M teacher, narrow 4-layer student, 2 shared CPU cores: about 15 minutes
    "cpu": dict(batch_size=2, max_length=128, rounds=16, steps=1, n_batches=1, max_new_tokens=32, score_batches=4,
                score_rounds=3, scaling_rounds=2, mem_rounds=1, mem_steps=1, mem_modes=list(MODES),
                scoring_memory=True),
    # one GPU, bf16
    "gpu": dict(batch_size=8, max_length=512, rounds=8, steps=1, n_batches=2, max_new_tokens=128, score_batches=16,
                score_rounds=5, scaling_rounds=5, mem_rounds=2, mem_steps=2, mem_modes=list(MODES),
                scoring_memory=True),
}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny toy models and short runs (checks the script works)")
    p.add_argument("--profile", choices=sorted(PROFILES), default=None, help="default: gpu on CUDA, else cpu")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--teacher", default=os.path.join(ROOT, "local", "bench", "dolly-cpu", "teacher-base"),
                   help="dense SmolLM2-135M-Instruct directory (read only)")  # fmt: skip
    p.add_argument("--tokenizer", default=os.path.join(SHARED, "tokenizers", "smollm2"))
    p.add_argument("--data", default=os.path.join(SHARED, "dolly", "train.jsonl"))
    p.add_argument("--output_dir", default=None, help="default: benchmarks/results/speed_memory (quick: a temp dir)")
    p.add_argument("--student_hidden", type=int, default=256)
    p.add_argument("--student_layers", type=int, default=4)
    p.add_argument("--beta", type=float, default=0.0, help="GKD beta (0: forward KL, as benchmarks/quality.py)")
    for name in ("batch_size", "max_length", "rounds", "steps", "n_batches", "max_new_tokens", "score_batches",
                 "score_rounds", "scaling_rounds", "mem_rounds", "mem_steps"):  # fmt: skip
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--parts", nargs="+", default=["step", "scoring", "scaling"],
                   choices=["step", "scoring", "scaling"])  # fmt: skip
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU: less noise)")
    p.add_argument("--no_memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--from_json", default=None, help="only rewrite the Markdown report from a results JSON")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one memory measurement
    return p


def _settings(argv=None) -> argparse.Namespace:
    args = _parser().parse_args(argv)
    if args.worker or args.from_json:
        return args
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        args.profile = "quick"
    if args.profile is None:
        args.profile = "gpu" if args.device == "cuda" else "cpu"
    for key, value in PROFILES[args.profile].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.output_dir is None:
        args.output_dir = (
            os.path.join(tempfile.gettempdir(), "hf_taskdistill_speed_memory_quick")
            if args.profile == "quick"
            else os.path.join(HERE, "results", "speed_memory")
        )
    return args


def _env() -> None:
    harness.benchmark_env(threads=None)  # offline, quiet; the thread count is set where the device is known
    sys.path.insert(0, ROOT)


# --------------------------------------------------------------------------------------------------------------
# models and data
# --------------------------------------------------------------------------------------------------------------
class Bench:
    """Models, tokenizer, datasets and batches shared by every configuration of one run (or one worker)."""

    def __init__(self, args):
        import torch

        self.args = args
        self.device = torch.device(args.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        self.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        self.tmp = tempfile.mkdtemp(prefix="hf_td_bench_")
        self._load_models()
        self._examples: dict[int, list[dict]] = {}

    # ---- models ----
    def _load_models(self) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        a = self.args
        if a.profile == "quick":
            from hf_taskdistill.toy import build_toy_tokenizer, tiny_llama

            self.tokenizer = build_toy_tokenizer()
            self.teacher = tiny_llama(len(self.tokenizer), hidden_size=64, num_layers=4, seed=1,
                                      max_position_embeddings=256)  # fmt: skip
            self.student_config = tiny_llama(len(self.tokenizer), hidden_size=32, num_layers=2,
                                             max_position_embeddings=256).config  # fmt: skip
            self.teacher_name = "toy Llama (hidden 64, 4 layers)"
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self.teacher = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=self.dtype)
            self.student_config = harness.narrow_config(AutoConfig.from_pretrained(a.teacher), a.student_hidden,
                                                        a.student_layers)  # fmt: skip
            self.teacher_name = f"SmolLM2-135M-Instruct ({a.teacher})"
        self.teacher.requires_grad_(False).eval()
        self.teacher.to(self.device)
        self.t_cfg = self.teacher.config.get_text_config()
        self.s_cfg = self.student_config
        torch.manual_seed(0)
        from transformers import AutoModelForCausalLM as _Auto

        self.student_init = _Auto.from_config(self.student_config).float()

    single_use = False  # memory workers build one trainer: hand over the models themselves, no copies in RSS

    def student(self):
        return self.student_init if self.single_use else copy.deepcopy(self.student_init)

    def teacher_copy(self):
        return self.teacher if self.single_use else copy.deepcopy(self.teacher)

    def model_line(self) -> str:
        t, s = self.t_cfg, self.s_cfg
        n_t = sum(p.numel() for p in self.teacher.parameters()) / 1e6
        n_s = sum(p.numel() for p in self.student_init.parameters()) / 1e6
        return (
            f"teacher {self.teacher_name}: {n_t:.1f}M params, d_T={t.hidden_size}, L_T={t.num_hidden_layers}, "
            f"V={t.vocab_size}; student fresh Llama: {n_s:.1f}M params, d_S={s.hidden_size}, "
            f"L_S={s.num_hidden_layers}, heads {s.num_attention_heads}/{s.num_key_value_heads} KV, "
            f"intermediate {s.intermediate_size}; dtype {str(self.dtype).replace('torch.', '')}"
        )

    # ---- data ----
    def examples(self, length: int, n: int) -> list[dict]:
        """`n` examples (user + assistant messages) that fill about `length` tokens each (cached per length)."""
        cached = self._examples.get(length, [])
        if len(cached) >= n:
            return cached[:n]
        if self.args.profile == "quick":
            from hf_taskdistill.toy import make_toy_examples, to_messages

            rows = [to_messages(r) for r in make_toy_examples(max(n, 32), seed=0, min_len=4, max_len=8)]
            self._examples[length] = rows
            return rows[:n]
        from hf_taskdistill.data import load_task_dataset

        if not hasattr(self, "_rows"):
            self._rows = list(load_task_dataset(self.args.data, format="messages", template="chat", max_samples=2000,
                                                seed=0))  # fmt: skip
            self._answers: dict[int, list[int]] = {}
        tok, out = self.tokenizer, []
        sep = tok("\n\n", add_special_tokens=False)["input_ids"]

        def answer(i: int) -> list[int]:
            i %= len(self._rows)
            if i not in self._answers:
                self._answers[i] = tok(self._rows[i]["messages"][1]["content"], add_special_tokens=False)["input_ids"]
            return self._answers[i]

        for i, ex in enumerate(self._rows):
            user = ex["messages"][0]
            prompt = tok.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
            budget = length - len(tok(prompt, add_special_tokens=False)["input_ids"]) - 4  # room for end-of-turn
            if budget < max(8, length // 4):
                continue  # the prompt would take most of the window
            ids, j = list(answer(i)), i + 1
            while len(ids) < budget:  # long windows: go on with the next responses (real text, joined)
                ids += sep + answer(j)
                j += 1
            out.append({"messages": [user, {"role": "assistant", "content": tok.decode(ids[:budget])}]})
            if len(out) == max(n, 32):
                break
        if len(out) < n:
            raise ValueError(f"only {len(out)} Dolly prompts leave room for a completion in {length} tokens")
        self._examples[length] = out
        return out[:n]

    def datasets(self, length: int, n: int):
        from datasets import Dataset

        rows = self.examples(length, n)
        messages = Dataset.from_list(rows)
        pc = Dataset.from_list([{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in rows])
        return messages, pc

    def batches(self, trainer, batch_size: int, n_batches: int, length: int | None = None) -> list[dict]:
        """Collated batches: GKD hosts collate raw messages (any length); the SFT host uses its tokenized dataset."""
        from torch.utils.data import DataLoader

        if "messages" in (trainer.train_dataset.column_names or []):
            rows = self.examples(length or self.args.max_length, batch_size * n_batches)
            raw = [trainer.data_collator(rows[i * batch_size : (i + 1) * batch_size]) for i in range(n_batches)]
        else:
            ds = trainer.train_dataset
            if trainer.args.remove_unused_columns:
                ds = trainer._remove_unused_columns(ds, description="benchmark")
            loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=trainer.data_collator)
            raw = [b for _, b in zip(range(n_batches), loader, strict=False)]
        return [{k: v.to(self.device) if hasattr(v, "to") else v for k, v in b.items()} for b in raw]

    # ---- selection ----
    def selection(self, pairs: list[tuple[int, int]], k: int):
        from hf_taskdistill.scoring import select_task_units

        # Random units (seeded): the cost does not depend on which units are kept, and scoring is timed apart.
        return select_task_units(self.teacher, None, num_units=k, layer_pairs=pairs, method="random", seed=0,
                                 student_hidden_size=self.s_cfg.hidden_size, show_progress=False)  # fmt: skip

    def layer_pairs(self, n_pairs: int) -> list[tuple[int, int]]:
        """The last `n_pairs` student layers with the proportional teacher mapping (method.md §3.3)."""
        ls, lt = self.s_cfg.num_hidden_layers, self.t_cfg.num_hidden_layers
        pairs = [(i, round((i + 1) * lt / ls) - 1) for i in range(ls)]
        return pairs[-n_pairs:]


# --------------------------------------------------------------------------------------------------------------
# trainers
# --------------------------------------------------------------------------------------------------------------
def _trainer_classes():
    import torch
    from trl import SFTTrainer
    from trl.experimental.gkd import GKDTrainer

    from hf_taskdistill.losses import valid_positions

    class AllHiddenStatesKDTrainer(GKDTrainer):
        """Reference implementation of the common hidden-state KD approach (DistillKit-style), written for this
        benchmark: both models are called with `output_hidden_states=True`, a learned `Linear(d_S, d_T)` projector
        maps the student's last hidden state onto the teacher's, and an MSE over the valid positions is added to the
        same GKD generalized-JSD loss. Not a peer library's code."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            d_s = self.model.config.get_text_config().hidden_size
            d_t = self.teacher_model.config.get_text_config().hidden_size
            param = next(self.model.parameters())
            self.model.add_module("hs_proj", torch.nn.Linear(d_s, d_t, bias=False).to(param.device, param.dtype))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            student = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            output_hidden_states=True)  # fmt: skip
            self.teacher_model.eval()
            with torch.no_grad():
                teacher = self.teacher_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                             output_hidden_states=True)  # fmt: skip
            loss = self.generalized_jsd_loss(
                student.logits[:, :-1], teacher.logits[:, :-1], labels=inputs["labels"][:, 1:], beta=self.beta,
                num_items_in_batch=num_items_in_batch,
            )  # fmt: skip
            mask = valid_positions(inputs["labels"])
            projected = self.accelerator.unwrap_model(model).hs_proj(student.hidden_states[-1])  # (B, T, d_T)
            diff = (projected - teacher.hidden_states[-1].to(projected.dtype))[mask].float()
            denom = num_items_in_batch if num_items_in_batch is not None else max(int(mask.sum()), 1)
            loss = loss + diff.pow(2).sum() / diff.shape[-1] / denom
            return (loss, student) if return_outputs else loss

    class SFTTeacherFloorTrainer(SFTTrainer):
        """Plain SFT plus one teacher backbone forward under `no_grad`: what any hidden-state KD on the SFT host has
        to pay at least (no hooks, no feature loss)."""

        def __init__(self, *a, teacher_model=None, **kw):
            super().__init__(*a, **kw)
            self.floor_teacher = teacher_model.to(self.args.device)
            self.floor_teacher.requires_grad_(False).eval()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            with torch.no_grad():
                self.floor_teacher.base_model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                                              use_cache=False)  # fmt: skip
            return result

    return GKDTrainer, SFTTrainer, AllHiddenStatesKDTrainer, SFTTeacherFloorTrainer


def make_trainer(bench: Bench, mode: str, config: str, length: int, batch_size: int, k: int | None = None,
                 n_pairs: int = 1, n_examples: int = 16):  # fmt: skip
    from hf_taskdistill import FeatureDistillSFTTrainer, FeatureDistillTrainer, TaskFeatureDistillConfig

    GKDTrainer, SFTTrainer, AllHiddenStatesKDTrainer, SFTTeacherFloorTrainer = _trainer_classes()
    a = bench.args
    pairs = bench.layer_pairs(n_pairs)
    k = k or bench.s_cfg.hidden_size
    cuda = bench.device.type == "cuda"
    cfg = TaskFeatureDistillConfig(
        output_dir=os.path.join(bench.tmp, f"{mode}-{config}"), per_device_train_batch_size=batch_size,
        learning_rate=0.0, max_length=length, lmbda=1.0 if mode == "gkd_on" else 0.0, beta=a.beta,
        max_new_tokens=a.max_new_tokens, report_to="none", save_strategy="no", disable_tqdm=True,
        use_cpu=not cuda, bf16=cuda, activation_checkpointing=False, seed=0, logging_steps=1,
        feature_loss_weight=1.0 if config == "fd" else 0.0, feature_layers=[list(p) for p in pairs],
        selection_num_units=k, logit_loss="none" if mode == "sft" else None,
    )  # fmt: skip
    messages, pc = bench.datasets(length, n_examples)
    common = dict(model=bench.student(), args=cfg, processing_class=bench.tokenizer)
    if mode == "sft":
        if config == "trl":
            return SFTTrainer(train_dataset=pc, **common)
        if config == "sft_teacher":
            return SFTTeacherFloorTrainer(train_dataset=pc, teacher_model=bench.teacher_copy(), **common)
        return FeatureDistillSFTTrainer(train_dataset=pc, teacher_model=bench.teacher_copy(),
                                        unit_selection=bench.selection(pairs, k), **common)  # fmt: skip
    common.update(train_dataset=messages, teacher_model=bench.teacher_copy())
    if config == "trl":
        return GKDTrainer(**common)
    if config == "allhs":
        return AllHiddenStatesKDTrainer(**common)
    return FeatureDistillTrainer(unit_selection=bench.selection(pairs, k), **common)


def train_step(trainer, batch: dict, seed: int = 0) -> None:
    """One optimizer step: the host's `training_step` (generation, forward, loss, backward) + optimizer step."""
    import torch

    if trainer.optimizer is None:
        trainer.create_optimizer()
    inputs = dict(batch)  # on-policy GKD rewrites input_ids / labels in place
    num_items = (inputs["labels"][:, 1:] != -100).sum()
    random.seed(seed)
    torch.manual_seed(seed)
    trainer.model.train()
    trainer.training_step(trainer.model, inputs, num_items)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def train_steps(trainer, batches: list[dict]) -> None:
    for i, batch in enumerate(batches):
        train_step(trainer, batch, seed=i)


# --------------------------------------------------------------------------------------------------------------
# scoring vs teacher forward+backward
# --------------------------------------------------------------------------------------------------------------
def scoring_fns(bench: Bench, batches: list[dict], teacher=None) -> dict:
    import torch

    from hf_taskdistill.scoring import select_task_units

    teacher = teacher if teacher is not None else bench.teacher
    pairs = bench.layer_pairs(1)
    k = bench.s_cfg.hidden_size

    def score():
        select_task_units(teacher, batches, num_units=k, layer_pairs=pairs, show_progress=False)

    def fwd_bwd_embeds():
        # One teacher forward+backward, gradients w.r.t. the input embeddings only (frozen parameters).
        for b in batches:
            emb = teacher.get_input_embeddings()(b["input_ids"]).detach().requires_grad_(True)
            out = teacher(inputs_embeds=emb, attention_mask=b["attention_mask"], labels=b["labels"])
            torch.autograd.grad(out.loss, emb)

    def fwd_bwd_params():
        # One teacher forward+backward as in training: gradients for every parameter.
        teacher.requires_grad_(True)
        try:
            for b in batches:
                out = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
                out.loss.backward()
                teacher.zero_grad(set_to_none=True)
        finally:
            teacher.requires_grad_(False)

    return {"scoring": score, "fwd_bwd_embeds": fwd_bwd_embeds, "fwd_bwd_params": fwd_bwd_params}


# --------------------------------------------------------------------------------------------------------------
# memory worker (a fresh process per configuration)
# --------------------------------------------------------------------------------------------------------------
def _run_worker(spec: dict) -> dict:
    import torch

    args = argparse.Namespace(**spec["args"])
    bench = Bench(args)
    bench.single_use = True
    cuda = bench.device.type == "cuda"
    job = spec["job"]
    if job["kind"] == "train":
        trainer = make_trainer(bench, job["mode"], job["config"], args.max_length, args.batch_size)
        batches = bench.batches(trainer, args.batch_size, args.n_batches)
        steps = [partial(train_step, trainer, b) for b in batches]
        holders = [trainer.model, getattr(trainer, "teacher_model", None), getattr(trainer, "floor_teacher", None)]
    else:
        mode_trainer = make_trainer(bench, "gkd_off", "trl", args.max_length, args.batch_size)
        batches = bench.batches(mode_trainer, args.batch_size, args.score_batches)
        fn = scoring_fns(bench, batches)[job["kind"]]
        steps, trainer, holders = [fn], None, [bench.teacher]
        del mode_trainer
    bench.student_init = bench.teacher = None  # only the trainer's (or the scoring pass's) references remain
    # warm-up: allocates the optimizer state, runs lazy initialisation
    for fn in steps:
        fn()
    gc.collect()
    result = {}
    if cuda:
        harness.sync(bench.device)
        torch.cuda.reset_peak_memory_stats(bench.device)
        base = torch.cuda.memory_allocated(bench.device)
        for _ in range(args.mem_steps):
            for fn in steps:
                fn()
        harness.sync(bench.device)
        peak = torch.cuda.max_memory_allocated(bench.device)
        result.update(peak_mb=peak / 2**20, transient_mb=(peak - base) / 2**20, base_mb=base / 2**20,
                      probe="torch.cuda.max_memory_allocated")  # fmt: skip
    else:
        base = harness.rss_mib()
        ok = harness.reset_rss_peak()
        for _ in range(args.mem_steps):
            for fn in steps:
                fn()
                gc.collect()
        peak = harness.peak_rss_mib()
        result.update(peak_mb=peak, transient_mb=peak - base, base_mb=base,
                      probe="VmHWM (peak RSS) after clear_refs" if ok else "VmHWM (not reset)")  # fmt: skip
        # deterministic: the peak of live tensor bytes allocated during one call, over the tensors alive before
        static = harness.tensor_bytes(*holders, trainer.optimizer if trainer is not None else None)
        tracked = []
        for fn in steps:
            gc.collect()
            with TensorPeak() as tp:
                fn()
            tracked.append(tp.peak)
        result.update(tensor_transient_mb=max(tracked) / 2**20, tensor_static_mb=static / 2**20,
                      tensor_peak_mb=(static + max(tracked)) / 2**20)  # fmt: skip
    return result


def measure_memory(args, job: dict) -> dict:
    spec = {"args": {k: v for k, v in vars(args).items() if k != "worker"}, "job": job}
    env = dict(os.environ)
    # Return freed memory to the OS at once, so that RSS follows the live tensors (no malloc arena caching).
    env.pop("MALLOC_MMAP_MAX_", None)
    env.pop("MALLOC_TOP_PAD_", None)
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS=str(args.threads or 1))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("WORKER_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory worker {job} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("WORKER_RESULT ") :])


def memory_interleaved(args, jobs: dict, rounds: int) -> dict:
    """Each job in its own fresh process, in a balanced order; per job the median of each field."""
    runs = {name: [] for name in jobs}
    names = list(jobs)
    for r in range(rounds):
        for name in round_order(names, r):
            runs[name].append(measure_memory(args, jobs[name]))
            log(f"  memory {name}: peak {runs[name][-1]['peak_mb']:.0f} MB, step transient "
                f"{runs[name][-1]['transient_mb']:.0f} MB")  # fmt: skip
    out = {}
    for name, rs in runs.items():
        out[name] = {k: round(statistics.median(r[k] for r in rs), 1) for k in rs[0] if k != "probe"}
        out[name]["probe"] = rs[0]["probe"]
        out[name]["runs"] = len(rs)
    return out


# --------------------------------------------------------------------------------------------------------------
# parts
# --------------------------------------------------------------------------------------------------------------
def added_work(trainer, batch: dict, reps: int) -> dict:
    """The feature path alone, on tensors shaped like this batch: the teacher hooks' unit gather, the student hooks,
    the feature loss forward and backward (down to the student layer output) with its logging, and the gradient add
    where the feature gradient meets the host's. Median wall and CPU seconds per step over `reps` calls."""
    import torch

    labels = batch["labels"]
    n_items = (labels[:, 1:] != -100).sum()
    bsz, length = labels.shape
    s_tap, t_tap = trainer._student_tap, trainer._teacher_tap
    d_s = trainer.unit_selection.student_hidden_size
    d_t = trainer.unit_selection.teacher_hidden_size
    dtype = next(trainer._fd_teacher.parameters()).dtype
    dev = labels.device
    gen = torch.Generator().manual_seed(0)
    t_full = {layer: torch.randn(bsz, length, d_t, generator=gen).to(dev, dtype) for layer in t_tap.layers}
    s_full = {layer: torch.randn(bsz, length, d_s, generator=gen).to(dev, dtype) for layer in s_tap.layers}
    host_grad = {layer: torch.randn(bsz, length, d_s, generator=gen).to(dev, dtype) for layer in s_tap.layers}
    t_hooks = {layer: t_tap._make_hook(layer) for layer in t_tap.layers}
    s_hooks = {layer: s_tap._make_hook(layer) for layer in s_tap.layers}

    def run():
        leaves = {layer: h.detach().requires_grad_(True) for layer, h in s_full.items()}
        with s_tap.capture() as s_out, t_tap.capture() as t_out:
            for layer, h in t_full.items():
                t_hooks[layer](None, None, (h,))
            for layer, h in leaves.items():
                s_hooks[layer](None, None, (h,))
        trainer._feature_term(s_out, t_out, labels, n_items).backward()
        for layer, h in leaves.items():
            h.grad.add_(host_grad[layer])

    run()
    walls, cpus = zip(*[harness.time_call(run, dev) for _ in range(reps)], strict=True)
    return {"wall": statistics.median(walls), "cpu": statistics.median(cpus)}


def _remove_taps(*trainers) -> None:
    for t in trainers:
        for tap in (getattr(t, "_student_tap", None), getattr(t, "_teacher_tap", None)):
            if tap is not None:
                tap.remove()


def _memory_ratios(mem: dict, pairs: list[tuple[str, str]]) -> dict:
    keys = ("peak_mb", "transient_mb", "tensor_peak_mb", "tensor_transient_mb")
    return {
        f"{a}/{b}": {k: round(mem[a][k] / mem[b][k], 4) if mem[b].get(k) else None for k in keys if k in mem[a]}
        for a, b in pairs
    }


def part_step(args, bench: Bench) -> dict:
    results = {}
    for mode in args.modes:
        log(f"[step] {mode}")
        configs = CONFIGS[mode]
        ref = configs[2]
        trainers = {c: make_trainer(bench, mode, c, args.max_length, args.batch_size) for c in configs}
        batches = bench.batches(trainers["trl"], args.batch_size, args.n_batches)
        tokens = int(sum(int(b["attention_mask"].sum()) for b in batches) / len(batches))
        fns = {c: partial(train_steps, t, batches) for c, t in trainers.items()}
        times = interleave(fns, args.rounds, args.steps, bench.device, label=mode)
        n = len(batches)
        entry = {
            "batch_shape": list(batches[0]["input_ids"].shape),
            "tokens_per_batch": tokens,
            "step_seconds": {c: round(statistics.median(times[c]["wall"]) / n, 4) for c in trainers},
            "step_cpu_seconds": {c: round(statistics.median(times[c]["cpu"]) / n, 4) for c in trainers},
            "time_ratio": {f"{c}/trl": ratio_stats(times, c, "trl") for c in configs[1:]},
            "raw_round_seconds": {c: [round(x / n, 4) for x in times[c]["wall"]] for c in trainers},
        }
        entry["time_ratio"][f"fd/{ref}"] = ratio_stats(times, "fd", ref)
        shape_batch = batches[0]
        if mode == "gkd_on":  # the step trains on prompt + generated tokens: time the path on that shape
            import torch

            width = batches[0]["prompts"].shape[1]
            labels = torch.full((args.batch_size, width + args.max_new_tokens), -100, device=bench.device)
            labels[:, width:] = 1
            shape_batch = {"labels": labels}
        extra = added_work(trainers["fd"], shape_batch, reps=20)
        entry["fd_path_seconds"] = {k: round(v, 5) for k, v in extra.items()}
        entry["fd_path_share"] = round(extra["cpu"] / (statistics.median(times["trl"]["cpu"]) / n), 5)
        _remove_taps(*trainers.values())
        del trainers, fns
        gc.collect()
        if not args.no_memory and mode in args.mem_modes:
            jobs = {c: {"kind": "train", "mode": mode, "config": c} for c in configs}
            mem = memory_interleaved(args, jobs, rounds=args.mem_rounds)
            entry["memory_mb"] = mem
            entry["memory_ratio"] = _memory_ratios(mem, [("fd", "trl"), (ref, "trl"), ("fd", ref)])
        results[mode] = entry
        log(
            f"  {mode}: step s {entry['step_seconds']}, time ratios "
            f"{ {k: v['wall'] for k, v in entry['time_ratio'].items()} }"
        )
    return results


def part_scoring(args, bench: Bench, step_results: dict) -> dict:
    log("[scoring]")
    probe = make_trainer(bench, "gkd_off", "trl", args.max_length, args.batch_size)
    batches = bench.batches(probe, args.batch_size, args.score_batches)
    del probe
    n_examples = sum(b["input_ids"].shape[0] for b in batches)
    n_completion = int(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))
    fns = scoring_fns(bench, batches)
    times = interleave(fns, args.score_rounds, 1, bench.device, label="scoring")
    res = {
        "batches": len(batches),
        "examples": n_examples,
        "completion_tokens": n_completion,
        "batch_shape": list(batches[0]["input_ids"].shape),
        "layer_pair": list(bench.layer_pairs(1)[0]),
        "seconds": {n: round(statistics.median(times[n]["wall"]), 3) for n in fns},
        "time_ratio": {
            "scoring/fwd_bwd_embeds": ratio_stats(times, "scoring", "fwd_bwd_embeds"),
            "scoring/fwd_bwd_params": ratio_stats(times, "scoring", "fwd_bwd_params"),
        },
    }
    if not args.no_memory and args.scoring_memory:
        jobs = {n: {"kind": n} for n in fns}
        mem = memory_interleaved(args, jobs, rounds=args.mem_rounds)
        res["memory_mb"] = mem
        res["memory_ratio"] = _memory_ratios(mem, [("scoring", "fwd_bwd_embeds"), ("scoring", "fwd_bwd_params")])
    # Share of realistic runs, with the per-example costs measured here (off-policy GKD step with feature loss: the
    # cheapest step, so the largest share).
    if "gkd_off" in step_results:
        per_ex_score = res["seconds"]["scoring"] / n_examples
        per_ex_step = step_results["gkd_off"]["step_seconds"]["fd"] / args.batch_size
        runs = {
            "benchmarks/quality.py cpu profile (128 scored, 150 steps x 8)": (128, 150 * 8),
            "benchmarks/quality.py gpu profile (1024 scored, 3000 steps x 32)": (1024, 3000 * 32),
            "method default: 1000 scored, 3 epochs of Dolly train (11,435 x 3)": (1000, 11435 * 3),
        }
        res["share_of_run"] = {}
        for name, (n_score, n_train) in runs.items():
            s, t = n_score * per_ex_score, n_train * per_ex_step
            res["share_of_run"][name] = {"scoring_s": round(s, 1), "training_s": round(t, 1),
                                         "share": round(s / (s + t), 4)}  # fmt: skip
        res["share_basis"] = (
            f"per-example costs measured here at seq {args.max_length}, batch {args.batch_size}: scoring "
            f"{per_ex_score:.4f} s/example, GKD off-policy feature-distillation step {per_ex_step:.4f} s/example"
        )
    log(f"  scoring: seconds {res['seconds']}, ratios { {k: v['wall'] for k, v in res['time_ratio'].items()} }")
    return res


def part_scaling(args, bench: Bench) -> dict:
    """GKD off-policy, fd vs plain TRL, one of T, B, k, layer pairs varied around the base point: interleaved step
    times, the isolated feature path, and the extra step memory."""
    log("[scaling]")
    d_s, l_s = bench.s_cfg.hidden_size, bench.s_cfg.num_hidden_layers
    base = dict(length=args.max_length, batch=args.batch_size, k=d_s, pairs=1)
    points = [dict(base)]
    points += [dict(base, length=t) for t in (args.max_length // 2, args.max_length * 2)]
    points += [
        dict(base, batch=b) for b in sorted({max(args.batch_size // 2, 1), args.batch_size * 2} - {args.batch_size})
    ]
    points += [dict(base, k=k) for k in (d_s // 4, d_s // 2)]
    points += [dict(base, pairs=p) for p in sorted({min(2, l_s), l_s} - {1})]
    max_len = max(p["length"] for p in points)
    trl = make_trainer(bench, "gkd_off", "trl", max_len, args.batch_size)
    fd_cache: dict[tuple[int, int], object] = {}
    rows = []
    for p in points:
        key = (p["k"], p["pairs"])
        if key not in fd_cache:
            fd_cache[key] = make_trainer(
                bench, "gkd_off", "fd", max_len, args.batch_size, k=p["k"], n_pairs=p["pairs"]
            )
        fd = fd_cache[key]
        batch = bench.batches(trl, p["batch"], 1, length=p["length"])[0]
        fns = {"trl": partial(train_step, trl, batch), "fd": partial(train_step, fd, batch)}
        label = f"T={p['length']} B={p['batch']} k={p['k']} pairs={p['pairs']}"
        times = interleave(fns, args.scaling_rounds, 1, bench.device, label=label)
        ratio = ratio_stats(times, "fd", "trl")
        extra = added_work(fd, batch, reps=10)
        trl_cpu = statistics.median(times["trl"]["cpu"])
        row = dict(p, shape=list(batch["input_ids"].shape), trl_s=round(statistics.median(times["trl"]["wall"]), 4),
                   fd_s=round(statistics.median(times["fd"]["wall"]), 4), time_ratio=ratio["wall"],
                   cpu_time_ratio=ratio["cpu"], fd_path_ms=round(1000 * extra["cpu"], 2),
                   fd_path_share=round(extra["cpu"] / trl_cpu, 5))  # fmt: skip
        peaks = {}
        for name, fn in fns.items():
            gc.collect()
            if bench.device.type == "cuda":
                import torch

                harness.sync(bench.device)
                torch.cuda.reset_peak_memory_stats(bench.device)
                fn()
                harness.sync(bench.device)
                peaks[name] = torch.cuda.max_memory_allocated(bench.device)
            else:
                with TensorPeak() as tp:
                    fn()
                peaks[name] = tp.peak
        row.update(trl_mem_mb=round(peaks["trl"] / 2**20, 1), fd_mem_mb=round(peaks["fd"] / 2**20, 1),
                   fd_extra_mem_mb=round((peaks["fd"] - peaks["trl"]) / 2**20, 2),
                   mem_ratio=round(peaks["fd"] / peaks["trl"], 4))  # fmt: skip
        rows.append(row)
        log("  " + json.dumps(row))
    _remove_taps(*fd_cache.values())
    memory = (
        "torch.cuda.max_memory_allocated (absolute)"
        if bench.device.type == "cuda"
        else ("peak live tensor bytes allocated during the step (TensorPeak; excludes weights and optimizer state)")
    )
    return {"base": base, "memory_measure": memory, "rows": rows}


def main(argv=None) -> dict:
    args = _settings(argv)
    _env()
    if args.worker:
        spec = json.loads(args.worker)
        if spec["args"].get("threads"):
            import torch

            torch.set_num_threads(spec["args"]["threads"])
        print("WORKER_RESULT " + json.dumps(_run_worker(spec)), flush=True)
        return {}
    if args.from_json:
        with open(args.from_json) as fh:
            results = json.load(fh)
        saved = argparse.Namespace(**results["settings"])
        saved.output_dir = args.output_dir or os.path.dirname(os.path.abspath(args.from_json))
        results["summary"] = summary_rows(results)
        write_report(saved, results, __doc__)
        return results
    if args.device == "cpu" and "MALLOC_MMAP_MAX_" not in os.environ:
        # Timing process: keep freed memory in the heap for reuse (no mmap/munmap and page faults per (B, T, V)
        # tensor), as a GPU caching allocator would; this removes the kernel time that made CPU steps noisy.
        # The memory subprocesses set the opposite, so that RSS follows the live tensors.
        env = dict(os.environ, MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(2**40), MALLOC_TOP_PAD_=str(2**29))
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])], env)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    start = time.perf_counter()
    hardware = harness.hardware_line(args.device, args.threads) + (", fp32" if args.device == "cpu" else "")
    results = {"hardware": hardware, "loadavg_start": os.getloadavg()[0], "command": "python " + " ".join(sys.argv),
               "settings": {k: v for k, v in vars(args).items() if k != "worker"}}  # fmt: skip
    log(results["hardware"])
    bench = Bench(args)
    results["models"] = bench.model_line()
    results["settings_line"] = (
        f"batch {args.batch_size}, seq {args.max_length} (examples filled to the window), GKD beta {args.beta}, "
        f"on-policy max_new_tokens {args.max_new_tokens}, {args.rounds} interleaved rounds x {args.steps} steps, "
        f"learning rate 0 (identical weights and samples in every config), feature loss correlation on the last "
        f"layer pair, k = d_S"
    )
    log(results["models"])
    results["part_seconds"] = {}
    for part, fn in (("step", lambda: part_step(args, bench)),
                     ("scoring", lambda: part_scoring(args, bench, results.get("step", {}))),
                     ("scaling", lambda: part_scaling(args, bench))):  # fmt: skip
        if part in args.parts:
            t0 = time.perf_counter()
            results[part] = fn()
            results["part_seconds"][part] = round(time.perf_counter() - t0, 1)
    results["loadavg_end"] = os.getloadavg()[0]
    results["run_seconds"] = time.perf_counter() - start
    results["summary"] = summary_rows(results)
    write_report(args, results, __doc__)
    for r in results["summary"]:
        print(f"{r['what']:<56} {r['value']!s:>14}  {r['target']:<20} {r['verdict']}")
    return results


if __name__ == "__main__":
    main()
