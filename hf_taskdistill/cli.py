"""`hf-taskdistill` console script: `train`, `select`, `eval`, `push` and `demo` sub-commands.

Each sub-command lives in its own module and exposes `main(argv)`; this file only dispatches, so that
`hf-taskdistill --help` stays fast (nothing heavy is imported before a sub-command is chosen).
Under `accelerate launch`, use `accelerate launch -m hf_taskdistill.cli train --config recipe.yaml`.

User mistakes (a bad value, a missing file, a corrupt stored selection, a refused Hub push, a bad flag) print one
line, `hf-taskdistill <command>: error: ...`, and exit with status 2 (1 for a failed Hub push); `--debug`, anywhere
on the command line, shows the full traceback instead.
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


DEBUG_FLAG = "--debug"


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean a mistake in the command (not a bug): reported in one line unless `--debug`."""
    # ValueError covers SelectionFormatError; OSError covers missing files and `from_pretrained`'s "not a valid model
    # identifier". TypeError, KeyError and the rest are bugs: they keep their traceback.
    errors: list[type[BaseException]] = [ValueError, OSError]
    for module, name in (("hf_taskdistill.hub", "HubPushError"), ("huggingface_hub.errors", "HFValidationError"),
                         ("huggingface_hub.errors", "RepositoryNotFoundError")):  # fmt: skip
        loaded = sys.modules.get(module)  # only if the command imported it: no heavy import here
        if loaded is not None and hasattr(loaded, name):
            errors.append(getattr(loaded, name))
    return tuple(errors)


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines)


def end_process_group() -> None:
    """After a command that ran under `accelerate launch`/`torchrun`: wait for every rank, then destroy the process
    group. A rank that exits with live gloo threads can abort (`terminate called without an active exception`,
    SIGABRT) after its work is saved, and the launcher then reports the whole run as failed. No-op otherwise."""
    dist = sys.modules.get("torch.distributed")  # only if the command imported torch: no heavy import here
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Dispatch `hf-taskdistill <command> ...`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]  # stripped before the sub-command parses its flags
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"hf-taskdistill: error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        result = module.main(rest)
    except SystemExit as exit_:  # argparse has already printed `usage: ... error: ...`; --help exits 0
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    except KeyboardInterrupt:
        print(f"hf-taskdistill {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug or not isinstance(err, _user_errors()):
            raise
        status = 1 if type(err).__name__ == "HubPushError" else 2
        hint = f" (run with {DEBUG_FLAG} for the traceback)"
        print(f"hf-taskdistill {name}: error: {_one_line(err)}{hint}", file=sys.stderr)
        return status
    end_process_group()  # on success only: after a failure the other ranks may never reach the barrier
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
