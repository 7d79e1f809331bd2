"""Speed and memory benchmark, the report: the targets, their pass/MISS verdicts and the Markdown tables, from the
results `benchmarks/speed_memory.py` measured (pure: no model; tested on the committed CPU results in
tests/test_benchmarks.py).

    python benchmarks/speed_memory.py --from_json benchmarks/results/speed_memory/cpu.json   # rewrite the .md only
"""

from __future__ import annotations

import json
import os


CONFIG_NAMES = {
    "trl": "plain TRL trainer, no feature loss",
    "fd": "hf_taskdistill feature distillation (hooks, selected units, correlation loss)",
    "allhs": "reference: output_hidden_states=True on both models + Linear(d_S,d_T) projector + MSE (DistillKit-style)",
    "sft_teacher": "floor: plain SFT + one teacher backbone forward under no_grad (no hooks, no loss)",
}
TARGETS = {"time": 1.03, "memory": 1.02, "scoring": 1.3}


def _verdict(value, target) -> str:
    return "n/a" if value is None else ("pass" if value <= target else "MISS")


def _time_verdict(ratio: dict, target: float) -> str:
    """pass/MISS on the median; a MISS whose 95% interval reaches 1.0 is flagged as inside the machine's noise."""
    verdict = _verdict(ratio["wall"], target)
    if verdict == "MISS" and ratio["wall_ci95"][0] <= 1.0:
        verdict += " (inside noise: interval spans 1.0)"
    return verdict


def _extra(mem: dict, a: str, b: str, key: str) -> float | None:
    return round(mem[a][key] - mem[b][key], 1) if key in mem[a] and key in mem[b] else None


def summary_rows(results: dict) -> list[dict]:
    """One row per target: the measured value, the target and pass/MISS (peak memory = absolute process/device
    peak; the step-transient ratios are given in the note)."""
    rows = []
    for mode, e in results.get("step", {}).items():
        tr = e["time_ratio"]["fd/trl"]
        note = f"CPU-time ratio {tr['cpu']}; rounds {tr['wall_min']}-{tr['wall_max']}"
        if "fd_path_share" in e:
            note += f"; isolated feature path = {100 * e['fd_path_share']:.2f}% of the TRL step"
        note += f"; 95% bootstrap interval of the median {tr['wall_ci95']} over {tr['rounds']} rounds"
        ref = next(k for k in e["time_ratio"] if not k.endswith("/trl"))
        floor = mode == "sft"
        if floor:
            note += (f"; plain SFT runs no teacher: SFT + teacher forward alone is "
                     f"{e['time_ratio']['sft_teacher/trl']['wall']}x plain SFT (see the fd/sft_teacher row)")  # fmt: skip
        rows.append(dict(what=f"{mode}: step time fd / plain TRL", value=tr["wall"], target=f"<= {TARGETS['time']}",
                         verdict=_verdict(tr["wall"], TARGETS["time"]) + " (teacher forward)" if floor and
                                 tr["wall"] > TARGETS["time"] else _time_verdict(tr, TARGETS["time"]),
                         note=note))  # fmt: skip
        rr = e["time_ratio"][ref]
        rows.append(dict(what=f"{mode}: step time {ref}", value=rr["wall"], target=f"<= {TARGETS['time']}" if floor
                         else "", verdict=_time_verdict(rr, TARGETS["time"]) if floor else "",
                         note=f"CPU-time ratio {rr['cpu']}; 95% interval {rr['wall_ci95']}; {ref.split('/')[1]} = "
                              f"{CONFIG_NAMES[ref.split('/')[1]]}"))  # fmt: skip
        if "memory_ratio" not in e:
            continue
        mem, mr = e["memory_mb"], e["memory_ratio"]["fd/trl"]
        note = (
            f"step-transient ratio {mr.get('transient_mb')} (RSS), {mr.get('tensor_transient_mb')} (tensors); fd "
            f"extra {_extra(mem, 'fd', 'trl', 'tensor_transient_mb')} MB of step tensors"
        )
        if floor and "tensor_static_mb" in mem["fd"]:
            note += (
                f"; resident weights+optimizer {mem['trl']['tensor_static_mb']} -> "
                f"{mem['fd']['tensor_static_mb']} MB: the teacher's weights, which plain SFT does not load"
            )
        verdict = _verdict(mr["peak_mb"], TARGETS["memory"])
        rows.append(dict(what=f"{mode}: peak memory fd / plain TRL", value=mr["peak_mb"],
                         target=f"<= {TARGETS['memory']}", note=note,
                         verdict=verdict + (" (teacher weights)" if floor and verdict == "MISS" else "")))  # fmt: skip
        ref_name = ref.split("/")[1]
        rr = e["memory_ratio"][ref]
        if ref_name == "allhs":
            key = "tensor_transient_mb" if "tensor_transient_mb" in mem["fd"] else "transient_mb"
            fd_extra, ref_extra = _extra(mem, "fd", "trl", key), _extra(mem, "allhs", "trl", key)
            ok = fd_extra is not None and ref_extra is not None and fd_extra <= 0.5 * ref_extra
            rows.append(dict(what=f"{mode}: extra step memory over TRL, fd vs allhs (MB)",
                             value=f"{fd_extra} vs {ref_extra}", target="fd <= half of allhs",
                             verdict="pass" if ok else "MISS",
                             note=f"{key}; absolute peak ratio fd/allhs {rr['peak_mb']}"))  # fmt: skip
        else:
            rows.append(dict(what=f"{mode}: peak memory {ref}", value=rr["peak_mb"], target=f"<= {TARGETS['memory']}",
                             verdict=_verdict(rr["peak_mb"], TARGETS["memory"]),
                             note=f"step-transient ratio {rr.get('transient_mb')} (RSS), "
                                  f"{rr.get('tensor_transient_mb')} (tensors)"))  # fmt: skip
    sc = results.get("scoring")
    if sc:
        tr = sc["time_ratio"]["scoring/fwd_bwd_embeds"]
        rows.append(dict(what="scoring time / teacher fwd+bwd (input grads)", value=tr["wall"],
                         target=f"<= {TARGETS['scoring']}", verdict=_verdict(tr["wall"], TARGETS["scoring"]),
                         note=f"CPU-time ratio {tr['cpu']}; vs fwd+bwd with parameter grads "
                              f"{sc['time_ratio']['scoring/fwd_bwd_params']['wall']}"))  # fmt: skip
        if "memory_ratio" in sc:
            mr = sc["memory_ratio"]["scoring/fwd_bwd_embeds"]
            rows.append(dict(what="scoring peak memory / teacher fwd+bwd (input grads)", value=mr["peak_mb"],
                             target=f"<= {TARGETS['scoring']}", verdict=_verdict(mr["peak_mb"], TARGETS["scoring"]),
                             note=f"step-transient ratio {mr.get('transient_mb')} (RSS), "
                                  f"{mr.get('tensor_transient_mb')} (tensors)"))  # fmt: skip
    return rows


def write_report(args, results: dict, doc: str) -> None:
    """`<output_dir>/<device>.json` and `.md` (`quick.*` for the quick profile): the targets with their verdicts,
    the per-configuration tables, and "How it was measured" from `doc` (speed_memory's docstring: its command block
    and the paragraph after it)."""
    os.makedirs(args.output_dir, exist_ok=True)
    stem = os.path.join(args.output_dir, "quick" if args.profile == "quick" else args.device)
    with open(stem + ".json", "w") as fh:
        json.dump(results, fh, indent=1)
    md = [f"# Speed and memory ({args.profile} profile)", "", f"- Hardware: {results['hardware']}",
          f"- Models: {results['models']}", f"- Settings: {results['settings_line']}",
          f"- Load average at start / end: {results['loadavg_start']} / {results['loadavg_end']}",
          f"- Wall time of this run: {results['run_seconds']:.0f} s (parts: {results.get('part_seconds')})", "",
          *([("> Quick profile: toy models whose steps take milliseconds, so Python overhead dominates; it checks "
              "that the script runs, its ratios are not measurements."), ""] if args.profile == "quick" else []),
          "## Targets", "", "| measurement | value | target | verdict | note |", "|---|---|---|---|---|"]  # fmt: skip
    for r in summary_rows(results):
        md.append(f"| {r['what']} | {r['value']} | {r['target']} | {r['verdict']} | {r['note']} |")
    step = results.get("step", {})
    if step:
        md += ["", "## Step time and memory per configuration", "",
               "| mode | config | step s (wall, median) | step s (CPU) | peak MB | step transient MB | tensor transient MB |",
               "|---|---|---|---|---|---|---|"]  # fmt: skip
        for mode, e in step.items():
            for c in e["step_seconds"]:
                m = e.get("memory_mb", {}).get(c, {})
                md.append(f"| {mode} | {c} | {e['step_seconds'][c]} | {e['step_cpu_seconds'][c]} | "
                          f"{m.get('peak_mb', '')} | {m.get('transient_mb', '')} | {m.get('tensor_transient_mb', '')} |")  # fmt: skip
        md += ["", "Configurations: " + "; ".join(f"`{k}` = {v}" for k, v in CONFIG_NAMES.items()) + "."]
        for mode, e in step.items():
            if "fd_path_seconds" in e:
                md.append(f"- {mode}: the isolated feature path (hooks, loss forward+backward, gradient add) takes "
                          f"{1000 * e['fd_path_seconds']['cpu']:.2f} ms CPU per step, "
                          f"{100 * e['fd_path_share']:.2f}% of the plain TRL step.")  # fmt: skip
    sc = results.get("scoring")
    if sc:
        md += ["", "## Scoring pass", "",
               (f"{sc['batches']} batches of shape {sc['batch_shape']} ({sc['examples']} examples, "
                f"{sc['completion_tokens']} completion tokens), layer pair {sc['layer_pair']}."), "",
               "| pass | seconds (median) | peak MB | transient MB | tensor transient MB |", "|---|---|---|---|---|"]  # fmt: skip
        for n, s in sc["seconds"].items():
            m = sc.get("memory_mb", {}).get(n, {})
            md.append(f"| {n} | {s} | {m.get('peak_mb', '')} | {m.get('transient_mb', '')} | "
                      f"{m.get('tensor_transient_mb', '')} |")  # fmt: skip
        if "share_of_run" in sc:
            md += ["", f"Share of a training run ({sc['share_basis']}):", "",
                   "| run | scoring s | training s | share |", "|---|---|---|---|"]  # fmt: skip
            for name, v in sc["share_of_run"].items():
                md.append(f"| {name} | {v['scoring_s']} | {v['training_s']} | {100 * v['share']:.2f}% |")
    sl = results.get("scaling")
    if sl:
        md += ["", "## Scaling (GKD off-policy, fd vs plain TRL, one factor varied at a time)", "",
               (f"Memory columns: {sl['memory_measure']}. `fd path` = the isolated feature path (hooks, loss "
                "forward and backward, gradient add), CPU ms per step and as a share of the plain TRL step. The "
                "direct time ratios come from few rounds on a shared machine (noise about +-10%); the fd path "
                "column is the precise measure of the added work."), "",
               ("| T | B | k | pairs | trl s | fd s | time ratio (wall) | time ratio (CPU) | fd path ms | fd path share "
                "| trl MB | fd MB | fd extra MB | memory ratio |"), "|" + "---|" * 14]  # fmt: skip
        for r in sl["rows"]:
            md.append(f"| {r['length']} | {r['batch']} | {r['k']} | {r['pairs']} | {r['trl_s']} | {r['fd_s']} | "
                      f"{r['time_ratio']} | {r['cpu_time_ratio']} | {r['fd_path_ms']} | "
                      f"{100 * r['fd_path_share']:.2f}% | {r['trl_mem_mb']} | {r['fd_mem_mb']} | "
                      f"{r['fd_extra_mem_mb']} | {r['mem_ratio']} |")  # fmt: skip
    doc = doc.split("\n\n")
    md += ["", "## How it was measured", "", f"Command: `{results.get('command', '')}`", "", "```",
           *[line.strip() for line in doc[3].splitlines()], "```", "", doc[4].strip(), ""]  # fmt: skip
    with open(stem + ".md", "w") as fh:
        fh.write("\n".join(md))
    print(f"wrote {stem}.json and {stem}.md")
