"""Timing, memory and paired-quality harness shared by the benchmarks (`speed_memory.py`, `cache.py`).

- `interleave(fns, rounds, reps, device)`: every configuration runs in every round, in a balanced order that changes
  each round (`round_order`), so drift of a shared machine cancels out of the ratios; `ratio_stats` turns the
  per-round times into median ratios with a bootstrap interval and the ratio of minima.
- `TensorPeak`: peak bytes of tensors allocated inside a block (a `TorchDispatchMode`, deterministic, any device);
  `reset_rss_peak` / `peak_rss_mib` / `rss_mib`: the process's peak and current resident memory on Linux
  (`VmHWM`, `VmRSS`); `tensor_bytes`: the bytes of the weights (gradients) and optimizer state alive in a process.
- `narrow_config(config, hidden, layers)`: the fresh narrow student's config (`narrow_overrides`, the recipes' rule).
- `length_batches` + `teacher_forced`: per-example completion NLL / token accuracy of a model on held-out rows;
  `per_token` (ratio of totals) and `paired_difference` (x - y per token, bootstrap 95% interval over examples) compare
  two runs on the same examples.
- `rouge_per_example(model, tokenizer, examples, rouge_types, ...)`: ROUGE x 100 per test example of a model's
  greedy (or seeded sampled) responses, so two models can be compared paired over the same items.
- `hardware_line(device, threads)`: the line every result file names its hardware with.
- `md_table(header, rows)`: a Markdown table's lines; `write_results(out_dir, name, results, markdown)`: `<name>.json`
  and `<name>.md` side by side.

Step-time / peak-memory ratios of a training configuration against a baseline (e.g. training from a teacher cache
against plain `SFTTrainer`) are `interleave({"base": step_a, "new": step_b}, ...)` + `ratio_stats(times, "new",
"base")`, and `TensorPeak` around one step of each.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import random
import re
import statistics
import time
import weakref
from collections.abc import Callable
from functools import partial


_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Print a line prefixed with the seconds since the harness was imported."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def benchmark_env(threads: int | None = 1) -> None:
    """Offline, quiet Hugging Face settings, and `threads` torch CPU threads (before heavy imports where possible)."""
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1"), ("TRL_EXPERIMENTAL_SILENCE", "1"),
                       ("TOKENIZERS_PARALLELISM", "false")):  # fmt: skip
        os.environ.setdefault(key, value)
    if threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        import torch

        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------
# time
# ----------------------------------------------------------------------------------------------------------------
def sync(device) -> None:
    """Wait for the accelerator (no-op on CPU)."""
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device="cpu") -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call, after a garbage collection."""
    gc.collect()
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - w0, time.process_time() - c0


def round_order(names: list[str], r: int) -> list[str]:
    """Balanced order of round r: rotations, then reversed rotations (A B C, B C A, C A B, C B A, A C B, B A C;
    for two configurations A B, B A, B A, A B), so every configuration takes every position equally often."""
    k = len(names)
    order = names[r % k :] + names[: r % k]
    return order[::-1] if (r // k) % 2 else order


def interleave(fns: dict[str, Callable], rounds: int, reps: int = 1, device="cpu", warmup: int = 1,
               label: str = "") -> dict[str, dict[str, list[float]]]:  # fmt: skip
    """Run each callable `reps` times per round, in the order `round_order` gives that round.

    Returns, per name, the per-round mean `wall` and `cpu` seconds."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    out = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(rounds):
        for name in round_order(names, r):
            walls, cpus = zip(*[time_call(fns[name], device) for _ in range(reps)], strict=True)
            out[name]["wall"].append(sum(walls) / reps)
            out[name]["cpu"].append(sum(cpus) / reps)
        log(f"  {label} round {r + 1}/{rounds}: " + "  ".join(f"{n} {out[n]['wall'][-1]:.3f}s" for n in names))
    return out


def ratio_stats(times: dict, a: str, b: str) -> dict:
    """Per-round ratios a/b for wall and CPU time: the median (with a bootstrap 95% interval of the median) and the
    ratio of the per-configuration minima (robust to the positive noise of a shared machine)."""
    res = {}
    rng = random.Random(0)
    for kind in ("wall", "cpu"):
        ratios = [x / y for x, y in zip(times[a][kind], times[b][kind], strict=True)]
        res[kind] = round(statistics.median(ratios), 4)
        res[f"{kind}_min"], res[f"{kind}_max"] = round(min(ratios), 4), round(max(ratios), 4)
        boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
        res[f"{kind}_ci95"] = [round(boot[50], 4), round(boot[1949], 4)]
        res[f"{kind}_ratio_of_min"] = round(min(times[a][kind]) / min(times[b][kind]), 4)
    res["rounds"] = len(times[a]["wall"])
    return res


# ----------------------------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------------------------
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"{field}:\s+(\d+)", fh.read()).group(1))


def rss_mib() -> float | None:
    """The process's current resident memory (`VmRSS`) in MiB, or None off Linux."""
    try:
        return _proc_status_kib("VmRSS") / 1024
    except (OSError, AttributeError):
        return None


def reset_rss_peak() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float | None:
    """The process's peak resident memory (`VmHWM`) in MiB, or None off Linux."""
    try:
        return _proc_status_kib("VmHWM") / 1024
    except (OSError, AttributeError):
        return None


def tensor_bytes(*objects, grads: bool = False) -> int:
    """Bytes of the distinct storages held by modules (parameters, buffers, and with `grads` their gradients) and
    optimizers (their state tensors); `None` entries are skipped."""
    import torch

    ptrs = {}
    for obj in objects:
        if obj is None:
            continue
        if isinstance(obj, torch.nn.Module):
            tensors = [*obj.parameters(), *obj.buffers(), *([p.grad for p in obj.parameters()] if grads else [])]
        else:  # optimizer
            tensors = [v for state in obj.state.values() for v in state.values()]
        for t in tensors:
            if isinstance(t, torch.Tensor):
                ptrs[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(ptrs.values())


class TensorPeak:
    """Peak of live tensor bytes *allocated inside the block* (a `TorchDispatchMode`), per process, deterministic.

    Every op output whose storage is new (not one of the op's inputs, not already counted) is counted until its
    storage is freed. Tensors alive before the block (weights, optimizer state) are not counted: the result is the
    step's transient memory, without allocator caching or fragmentation.
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                tracker._record(tree_flatten((args, kwargs))[0], tree_flatten(out)[0])
                return out

        self._mode = _Mode()
        self.live: dict[int, tuple[int, object]] = {}
        self.current = 0
        self.peak = 0

    def _record(self, inputs, outputs) -> None:
        import torch

        seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in outputs:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            ptr, size = st.data_ptr(), st.nbytes()
            if size == 0 or ptr in seen or ptr in self.live:
                continue
            self.live[ptr] = (size, weakref.ref(st, partial(self._free, ptr)))
            self.current += size
            self.peak = max(self.peak, self.current)

    def _free(self, ptr, _ref) -> None:
        size, _ = self.live.pop(ptr, (0, None))
        self.current -= size

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


# ----------------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------------
def narrow_overrides(hidden_size: int = 256, num_layers: int = 4) -> dict:
    """Config overrides of the benchmarks' fresh narrow student (the rule of
    `recipes/dolly/smollm2-135m-to-llama-256`): heads of 64 dims, half as many KV heads, an MLP 3x the width."""
    heads = max(hidden_size // 64, 1)
    return dict(hidden_size=hidden_size, intermediate_size=hidden_size * 3, num_hidden_layers=num_layers,
                num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1), head_dim=64)  # fmt: skip


def narrow_config(config, hidden_size: int = 256, num_layers: int = 4):
    """A copy of a teacher's `config` narrowed with `narrow_overrides` (same vocabulary and everything else)."""
    import copy

    config = copy.deepcopy(config)
    for key, value in narrow_overrides(hidden_size, num_layers).items():
        setattr(config, key, value)
    return config


# ----------------------------------------------------------------------------------------------------------------
# teacher-forced quality, paired over examples
# ----------------------------------------------------------------------------------------------------------------
def length_batches(dataset, collator, batch_size: int, sort: bool = True) -> list[tuple[list[int], dict]]:
    """[(row indices, batch)], rows grouped by length (little padding) when `sort`."""
    lengths = [len(collator([dataset[i]])["input_ids"][0]) for i in range(len(dataset))]
    order = sorted(range(len(dataset)), key=lambda i: lengths[i]) if sort else list(range(len(dataset)))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [(rows, collator([dataset[i] for i in rows])) for rows in chunks]


def teacher_forced(model, batches, n: int) -> dict[str, list]:
    """Per example (`batches` from `length_batches`, `n` examples): the summed NLL of its completion tokens
    (`labels != -100`), how many of them the argmax predicts, and how many there are."""
    import torch
    import torch.nn.functional as F

    nll, correct, tokens = [0.0] * n, [0] * n, [0] * n
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for rows, b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
            targets = b["labels"][:, 1:]
            mask = targets != -100
            loss = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none") * mask
            hit = (logits.argmax(-1) == targets) & mask
            for j, row in enumerate(rows):
                nll[row], correct[row], tokens[row] = float(loss[j].sum()), int(hit[j].sum()), int(mask[j].sum())
    model.train(was_training)
    return {"nll": nll, "correct": correct, "tokens": tokens}


def per_token(sums, tokens) -> float:
    """Per-token mean of per-example sums (the ratio of totals, as a dev NLL is reported)."""
    total = float(sum(tokens))
    if total <= 0:
        raise ValueError("per_token needs a positive token count.")
    return float(sum(sums)) / total


def paired_difference(x_runs, y_runs, tokens, n_boot: int = 2000, seed: int = 0) -> dict:
    """Paired difference of per-token means, x - y, with a bootstrap 95% interval over examples.

    `x_runs` / `y_runs` hold the per-example sums of one run, or one list of them per training seed (the same
    examples, in the same order, for every run; `tokens[i]` is example i's token count). With several seeds the
    statistic is the mean over seeds of the per-seed differences, and each bootstrap draw resamples the examples once
    for all seeds (the examples are the shared source of noise; the seed-to-seed spread is reported next to it).

    Returns `{"diff", "ci95": [lo, hi], "per_seed": [...], "n_examples", "n_seeds", "excludes_zero",
    "seed_ci95"}`: `seed_ci95` is the t interval over the per-seed differences (`seed_interval`; None for one seed),
    the interval that also counts seed-to-seed variation.
    """
    import numpy as np

    x, y = np.asarray(x_runs, dtype=np.float64), np.asarray(y_runs, dtype=np.float64)
    if x.ndim == 1:
        x, y = x[None], y[None]
    t = np.asarray(tokens, dtype=np.float64)
    if x.shape != y.shape or x.shape[1] != t.shape[0]:
        raise ValueError(f"paired_difference needs equal shapes: x {x.shape}, y {y.shape}, tokens {t.shape}.")
    if x.shape[1] == 0:
        raise ValueError("paired_difference needs at least one example.")
    d = x - y  # (seeds, examples)
    per_seed = d.sum(1) / t.sum()
    idx = np.random.default_rng(seed).integers(0, t.shape[0], size=(n_boot, t.shape[0]))
    boot = (d[:, idx].sum(-1) / t[idx].sum(-1)).mean(0)  # (n_boot,)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"diff": float(per_seed.mean()), "ci95": [float(lo), float(hi)], "per_seed": per_seed.tolist(),
            "n_examples": int(t.shape[0]), "n_seeds": int(d.shape[0]), "excludes_zero": bool(lo > 0 or hi < 0),
            "seed_ci95": seed_interval(per_seed.tolist())}  # fmt: skip


# two-sided 95% Student t quantiles, t_{0.975, df} for df = 1..30 (beyond: the normal 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def seed_interval(values) -> list[float] | None:
    """95% t interval of the mean of per-seed values (mean +- t_{0.975, n-1} sd / sqrt(n)); None for < 2 values.

    Training seeds are few (3 here), so this interval is wide: it answers "would another seed agree?", which the
    bootstrap over examples (the examples are shared by every seed) does not."""
    import math

    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * sd / math.sqrt(n)
    return [mean - half, mean + half]


def rouge_per_example(
    model,
    tokenizer,
    examples,
    rouge_types=("rougeL",),
    seed: int = 0,
    do_sample: bool = False,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
) -> dict[str, list[float]]:
    """ROUGE F x 100 of each example's response (max over its references), `{type: [per example]}`.

    `examples` come from `hf_taskdistill.data.load_eval_set`; responses from `hf_taskdistill.evaluation`'s
    `generate_responses` with the protocol's chat prompts: greedy, or sampled (temperature 1) seeded with `seed`.
    """
    from hf_taskdistill.evaluation import build_eval_prompts, generate_responses, rouge_scores

    prompts = build_eval_prompts(tokenizer, examples, "chat")
    outputs = generate_responses(model, tokenizer, prompts, seed=seed, batch_size=batch_size, do_sample=do_sample,
                                 progress=False, max_new_tokens=max_new_tokens)  # fmt: skip
    per: dict[str, list[float]] = {t: [] for t in rouge_types}
    for out, ex in zip(outputs, examples, strict=True):
        scores = rouge_scores([out], [ex["references"]], rouge_types, implementation="rouge_score")
        for t in rouge_types:
            per[t].append(float(scores[t]))
    return per


# ----------------------------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------------------------
def hardware_line(device: str = "cpu", threads: int | None = None) -> str:
    """`GPU <name> (<mem> GiB), torch, CUDA` or `CPU <model>, <cores> cores, <ram> GiB RAM, torch with N thread(s)`."""
    import torch

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return (f"GPU {props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
                f"CUDA {torch.version.cuda}")  # fmt: skip
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        m = re.search(r"model name\s*:\s*(.+)", fh.read())
        model = m.group(1).strip() if m else model
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = threads or torch.get_num_threads()
    return f"CPU {model}, {cores} cores, {ram:.0f} GiB RAM, torch {torch.__version__} with {threads} thread(s)"


def md_table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table as lines: `| a | b |`, `|---|---|`, then one line per row (cells as `str` gives them)."""
    return [
        "| " + " | ".join(str(h) for h in header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
    ]


def write_results(out_dir: str, name: str, results: dict, markdown: str) -> tuple[str, str]:
    """Write `<out_dir>/<name>.json` (sorted, indented) and `<name>.md`; returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.md")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(md_path, "w") as f:
        f.write(markdown.rstrip() + "\n")
    return json_path, md_path
