"""`hf-taskdistill` console script: `train`, `select`, `eval`, `push` and `demo` sub-commands.

Each sub-command lives in its own module and exposes `main(argv)`; this file only dispatches, so that
`hf-taskdistill --help` stays fast (nothing heavy is imported before a sub-command is chosen).
Under `accelerate launch`, use `accelerate launch -m hf_taskdistill.cli train --config recipe.yaml`.
"""

from __future__ import annotations

import importlib
import sys


COMMANDS = {
    "train": ("hf_taskdistill.scripts.train", "distil a student from a teacher (TRL-style YAML recipe + flags)"),
    "select": ("hf_taskdistill.scripts.select", "score teacher units only; write a selection `train` can reuse"),
    "prune": ("hf_taskdistill.scripts.prune", "cut a narrower student out of the teacher at task-selected units"),
    "cache": ("hf_taskdistill.scripts.cache", "run the teacher once over the training set; train from the cache"),
    "eval": ("hf_taskdistill.evaluation", "ROUGE-L evaluation (MiniLLM protocol) of a saved model"),
    "push": ("hf_taskdistill.hub", "push a distilled local directory (weights, config, card, plot) to the Hub"),
    "demo": ("hf_taskdistill.demo", "offline end-to-end demo on a generated task (CPU, a few minutes)"),
}


def _usage() -> str:
    lines = ["usage: hf-taskdistill <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `hf-taskdistill <command> --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"hf-taskdistill: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
