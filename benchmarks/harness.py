"""Timing and memory harness shared by the benchmarks (`cache.py`; `speed_memory.py` holds the same helpers).

- `interleave(fns, rounds, reps, device)`: every configuration runs in every round, in a balanced order that changes
  each round (`round_order`), so drift of a shared machine cancels out of the ratios; `ratio_stats` turns the
  per-round times into median ratios with a bootstrap interval and the ratio of minima.
- `TensorPeak`: peak bytes of tensors allocated inside a block (a `TorchDispatchMode`, deterministic, any device);
  `reset_rss_peak` / `peak_rss_mib`: the process's peak resident memory on Linux (`VmHWM`).
- `hardware_line(device, threads)`: the line every result file names its hardware with.
- `write_results(out_dir, name, results, markdown)`: `<name>.json` and `<name>.md` side by side.

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
