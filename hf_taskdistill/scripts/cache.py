"""`hf-taskdistill cache --config recipe.yaml --cache_dir DIR [--top_k 64] [--cache_dtype bfloat16] [...]`.

Runs the recipe's teacher once over its training set (the same data, template, `max_length` and collator as
`train`) and writes a teacher cache into `--cache_dir` (see `hf_taskdistill.cache`). The units stored are those of
`--selection_path` (or the recipe's `selection_path`); with neither and `feature_loss_weight > 0`, the units are
scored first exactly as `hf-taskdistill select` does and the selection is saved into the cache directory. A killed
run resumes when rerun with the same arguments. Under `accelerate launch -m hf_taskdistill.cli cache ...` every rank
caches its share of the examples.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

from .common import load_datasets, load_tokenizer, make_parser


def _cache_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-taskdistill cache", add_help=False)
    p.add_argument("--cache_dir", required=True, help="directory of the cache (created; a partial one is resumed)")
    p.add_argument("--top_k", type=int, default=64, help="teacher tokens kept per position (0: units only)")
    p.add_argument("--cache_dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="storage dtype of the units and top-K log-probs")  # fmt: skip
    p.add_argument("--full_layer", action="store_true", help="store the whole teacher layer (projector baseline)")
    p.add_argument("--cache_batch_size", type=int, default=None, help="default: per_device_train_batch_size")
    p.add_argument("--shard_size", type=int, default=1024, help="examples per shard file")
    return p


def parse(argv: list[str]):
    """(cache args, script args, training args, model args) from the command line and the recipe."""
    parser = make_parser(prog="hf-taskdistill cache")
    if any(a in ("-h", "--help") for a in argv):
        _cache_parser().print_help()
        print("\nAll `hf-taskdistill train` options (and --config) are accepted as well:\n")
        parser.parse_args_and_config(args=["--help"])  # prints them and exits
    cache_args, rest = _cache_parser().parse_known_args(argv)
    script_args, training_args, model_args = parser.parse_args_and_config(args=rest)
    return cache_args, script_args, training_args, model_args


def run(cache_args, script_args, training_args, model_args):
    """Build the cache; returns the opened `TeacherCache` (on the rank that finalises it), else `None`."""
    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM
    from trl.experimental.utils import DataCollatorForChatML

    from ..cache_build import build_teacher_cache, check_output_dir
    from ..selection import SIDECAR_NAME, load_unit_selection

    teacher_id = training_args.teacher_model_name_or_path
    if teacher_id is None:
        raise ValueError("Set the teacher with --teacher_model_name_or_path (a path or Hub id).")
    check_output_dir(cache_args.cache_dir)  # before any model is loaded: a read-only or full disk fails now
    state = PartialState()
    selection = None
    saved = os.path.join(cache_args.cache_dir, SIDECAR_NAME)
    if training_args.selection_path:
        selection = load_unit_selection(training_args.selection_path)
    elif training_args.feature_loss_weight > 0 and os.path.isfile(saved):
        selection = load_unit_selection(saved)  # scored by an earlier (killed) run of this command: resume with it
        state.print(f"Reusing the unit selection {saved} (scored by an earlier run); delete it to re-score.")
    elif training_args.feature_loss_weight > 0:
        from .select import run as select

        scoring_args = copy.deepcopy(training_args)
        scoring_args.output_dir = cache_args.cache_dir  # the selection is saved next to the cache
        selection = select(script_args, scoring_args, model_args)
        state.wait_for_everyone()
    tokenizer = load_tokenizer(script_args, model_args, training_args)
    # One cache serves both hosts: TRL's GKD collator and SFT tokenise chat prompt/completion data identically, and
    # training looks every example up by its token ids (a mismatch raises there, naming the example).
    train, _ = load_datasets(script_args, training_args, "messages", tokenizer=tokenizer)
    init_kwargs = dict(training_args.teacher_model_init_kwargs or {})
    if init_kwargs.get("dtype") not in (None, "auto"):
        init_kwargs["dtype"] = getattr(torch, init_kwargs["dtype"])
    teacher = AutoModelForCausalLM.from_pretrained(teacher_id, **init_kwargs).to(state.device)
    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=training_args.max_length)
    cache = build_teacher_cache(
        teacher, train, collator, cache_args.cache_dir, tokenizer=tokenizer, selection=selection,
        top_k=cache_args.top_k, dtype=cache_args.cache_dtype, full_layer=cache_args.full_layer,
        max_length=training_args.max_length, template=script_args.prompt_template,
        batch_size=cache_args.cache_batch_size or training_args.per_device_train_batch_size,
        shard_size=cache_args.shard_size, teacher_name_or_path=teacher_id,
        teacher_revision=init_kwargs.get("revision"), show_progress=not training_args.disable_tqdm,
    )  # fmt: skip
    if cache is not None:
        h = cache.header
        print(f"Teacher cache written to {os.path.abspath(cache_args.cache_dir)}: {h['num_examples']} examples, "
              f"{h['num_tokens']} completion tokens, K={h['top_k']}, {h['dtype']}, "
              f"{cache.bytes_per_token():.0f} bytes per completion token.")  # fmt: skip
    return cache


def main(argv: list[str] | None = None) -> int:
    run(*parse(list(sys.argv[1:] if argv is None else argv)))
    return 0
