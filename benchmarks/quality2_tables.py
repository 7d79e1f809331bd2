"""Quality benchmark, second design: the design's arms and comparisons, and every table built from finished runs.

Pure functions over what `benchmarks/quality2.py` writes — the per-run JSON (`runs/seed<s>/<arm>.json`), the ROUGE
records (`rouge/`) and the untrained references (`reference/`): the paired differences (`compare_runs`), the
aggregate `results.json` / `results.md` (`aggregate`), the README's generated tables (`headline`, `arm_table`,
`comparison_table`, `fill_markers`) and the cut report (`cut_report`). No model is loaded here; tested in
tests/test_benchmarks.py.
"""

from __future__ import annotations

import json
import os

import harness  # (benchmarks/harness.py: paired statistics, write_results)


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
    return [f"{arm}/seed{s}" for arm, s in training_plan(arms, seeds, arms_given=False) if s not in runs.get(arm, {})]


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


def rouge_types(task: str) -> tuple[str, ...]:
    from hf_taskdistill.evaluation import SUMMARIZATION_ROUGE_TYPES

    return tuple(SUMMARIZATION_ROUGE_TYPES) if task == "dialogsum" else ("rougeL",)


# ----------------------------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------------------------
def load_runs(out: str) -> dict:
    runs: dict = {}
    root = os.path.join(out, "runs")
    for seed_dir in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        for name in sorted(os.listdir(os.path.join(root, seed_dir))):
            if name.endswith(".json"):
                with open(os.path.join(root, seed_dir, name)) as f:
                    res = json.load(f)
                runs.setdefault(res["arm"], {})[res["seed"]] = res
    return runs


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def load_rouge(out: str) -> dict:
    """{"teacher": record, "A": {seed: record}, ...} from `<out>/rouge/` (the `--rouge_eval` pass)."""
    root, found = os.path.join(out, "rouge"), {}
    if os.path.isfile(os.path.join(root, "teacher.json")):
        found["teacher"] = read_json(os.path.join(root, "teacher.json"))
    for seed_dir in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if seed_dir.startswith("seed") and os.path.isdir(os.path.join(root, seed_dir)):
            for name in sorted(os.listdir(os.path.join(root, seed_dir))):
                found.setdefault(name[: -len(".json")], {})[int(seed_dir[4:])] = read_json(
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


def load_references(out: str) -> dict:
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


def _summed_nll(a: dict, b: dict, seeds) -> list[list[float]]:
    """Per seed, the per-example sum of two runs' dev NLL (runs keyed by seed)."""
    return [[u + v for u, v in zip(a[s]["dev"]["nll"], b[s]["dev"]["nll"], strict=True)] for s in seeds]


def budget_comparison(short: dict, long: dict, n_boot: int = 2000) -> dict:
    """The same design at two budgets (pure): `short` and `long` are `load_runs` of two output directories that
    differ only in `--steps` (same cuts, data order and dev). Paired over the dev examples, on the seeds both ran:
    per arm, its NLL at each budget and the change `long - short` (negative: the longer run is better); per
    headline comparison x - y, its difference at each budget and the change of the difference,
    (x_long - y_long) - (x_short - y_short) (negative: the longer budget moves it towards x)."""
    arms = []
    for arm in [a for a in ARMS if a in short and a in long]:
        seeds = sorted(set(short[arm]) & set(long[arm]))
        if not seeds:
            continue
        (row,) = compare_runs({"long": {s: long[arm][s] for s in seeds}, "short": {s: short[arm][s] for s in seeds}},
                              [("long", "short", arm)], n_boot=n_boot)  # fmt: skip
        arms.append({"arm": arm, "seeds": seeds, "short": [short[arm][s]["dev_summary"]["nll"] for s in seeds],
                     "long": [long[arm][s]["dev_summary"]["nll"] for s in seeds], "change": row["nll"]["pooled"]})  # fmt: skip
    comparisons = []
    for x, y, question in HEADLINE:
        seeds = sorted(set.intersection(*(set(r.get(a, {})) for r in (short, long) for a in (x, y))))
        if not seeds:
            continue
        pick = {f"{a}@{b}": {s: runs[a][s] for s in seeds} for a in (x, y) for b, runs in (("s", short), ("l", long))}
        at = {b: compare_runs(pick, [(f"{x}@{b}", f"{y}@{b}", question)], n_boot=n_boot)[0]["nll"]["pooled"]
              for b in ("s", "l")}  # fmt: skip
        tokens = pick[f"{x}@s"][seeds[0]]["dev"]["tokens"]
        # (x_l - y_l) - (x_s - y_s) = (x_l + y_s) - (y_l + x_s), per example: one paired bootstrap over examples
        plus = _summed_nll(pick[f"{x}@l"], pick[f"{y}@s"], seeds)
        minus = _summed_nll(pick[f"{y}@l"], pick[f"{x}@s"], seeds)
        change = paired_difference(plus, minus, tokens, n_boot=n_boot)
        comparisons.append({"x": x, "y": y, "question": question, "seeds": seeds, "short": at["s"], "long": at["l"],
                            "change": change})  # fmt: skip
    return {"arms": arms, "comparisons": comparisons}


def _with_seeds(r: dict, digits: int = 4) -> str:
    """A pooled difference with its interval over examples and, over several seeds, its seed-level interval."""
    return _fmt_ci(r, digits) + (f"; seeds {_fmt_seed_ci(r, digits)}" if r.get("seed_ci95") else "")


def budget_table(budget: dict, short_steps: int, long_steps: int) -> str:
    """The README's budget check from `budget_comparison`: the arms' dev NLL at both budgets with the paired change,
    then each headline comparison at both budgets with the change of the difference (intervals over examples; over
    seeds too where several seeds ran at both budgets)."""
    import statistics

    lo, hi = f"{short_steps} steps", f"{long_steps} steps"
    lines = [f"| arm | seeds | dev NLL, {lo} | dev NLL, {hi} | {hi} − {lo} |", "|---" * 5 + "|"]
    for r in budget["arms"]:
        lines.append(f"| {r['arm']} | {','.join(map(str, r['seeds']))} | {statistics.mean(r['short']):.4f} | "
                     f"{statistics.mean(r['long']):.4f} | {_with_seeds(r['change'])} |")  # fmt: skip
    lines += [
        "",
        f"| x − y | seeds | Δ dev NLL, {lo} | Δ dev NLL, {hi} | change of the difference |",
        "|---" * 5 + "|",
    ]
    for c in budget["comparisons"]:
        lines.append(f"| {c['x']} − {c['y']} ({c['question']}) | {','.join(map(str, c['seeds']))} | "
                     f"{_with_seeds(c['short'])} | {_with_seeds(c['long'])} | {_with_seeds(c['change'])} |")  # fmt: skip
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
    runs, refs = load_runs(out), load_references(out)
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
    rouge, rouge_by_type = load_rouge(out), {}
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
