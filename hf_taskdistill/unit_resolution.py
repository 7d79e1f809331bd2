"""Which teacher units a run distils, and the checks a stored selection must pass before any training step.

A run's units come from, in order of precedence: the trainer's `unit_selection` argument, `selection_path`, the
units a pruned student was cut at (`hf-taskdistill prune` stores them in its `config.json`), or a scoring pass over
training examples (`scoring.select_task_units`). The projector baseline matches whole teacher layers instead.

Plain functions of the selection, the model configs and the run's settings: both set-ups call them, the online one
(`trainer.py`) and the one from a teacher cache (`cache_host.py`).
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import Any

import torch

from .hooks import resolve_layer_index
from .selection import LayerSelection, UnitSelection


logger = logging.getLogger(__name__)


def selection_pairs(selection: UnitSelection) -> list[tuple[int, int]]:
    """The (student layer, teacher layer) pairs of a selection, in its order."""
    return [(ls.student_layer, ls.teacher_layer) for ls in selection.layers]


def pruning_record(student) -> dict | None:
    """The `init` block of a student made by `hf-taskdistill prune` (how it was cut), else None."""
    stored = getattr(student.config, "task_distill", None)
    init = stored.get("init") if isinstance(stored, dict) else None
    return init if isinstance(init, dict) and init.get("residual_indices") else None


def stored_selection_source(unit_selection: Any, args, student) -> Any | None:
    """What to load the run's stored selection from (a `UnitSelection`, dict, model, path or Hub id), or None when
    the run scores the teacher itself (or, for the projector baseline, needs no units).

    A student cut out of this teacher carries the units it was cut at: student unit i is teacher unit S_i, so
    those are the units to distil, in that order, without re-scoring (not for the projector, which matches whole
    teacher layers).
    """
    if unit_selection is None and args.selection_path:
        unit_selection = args.selection_path
    if unit_selection is None and not args.feature_projector and pruning_record(student):
        logger.info("The student was pruned from the teacher: reusing its residual units (no scoring).")
        unit_selection = student.config.task_distill
    return unit_selection


def selection_dir(source: Any) -> str | None:
    """The directory a selection was loaded from (where `select --report` left its report), else None."""
    if isinstance(source, (str, os.PathLike)) and os.path.exists(source):
        path = os.fspath(source)
        return path if os.path.isdir(path) else os.path.dirname(path)
    return None


def at_every_layer(selection: UnitSelection, pairs: list[tuple[int, int]]) -> UnitSelection:
    """A pruned student's selection repeated at every layer pair (`feature_layers: all`): the residual stream is
    shared by every layer, so the same units match at every kept layer. Unchanged for any other selection."""
    if selection.init:
        selection.layers = [LayerSelection(s, t, list(selection.init["residual_indices"])) for s, t in pairs]
    return selection


def projector_selection(pairs, teacher_hidden_size: int, student_hidden_size: int, teacher: dict | None):
    """The projector baseline's selection: whole teacher layers (no indices) at the given layer pairs."""
    return UnitSelection(
        layers=[LayerSelection(s, t, None) for s, t in pairs],
        selection_method="projector",
        teacher_hidden_size=teacher_hidden_size,
        student_hidden_size=student_hidden_size,
        teacher=teacher,
    )


def reconcile_stored(selection: UnitSelection, pairs, student_hidden_size: int, args) -> None:
    """A stored selection must agree with the run's explicit settings (`feature_layers`, `selection_num_units`)
    and, when k is not set, with the student's width: an error names both values. `pairs`: the run's resolved layer
    pairs, or None where the run cannot resolve them (from a cache, which checks them itself). Records the width."""
    if selection.selection_method != "projector":  # whole teacher layers: no k to agree on
        stored_pairs = selection_pairs(selection)
        if args.feature_layers is not None and pairs is not None and stored_pairs != pairs:
            raise ValueError(
                f"feature_layers asks for layer pairs {pairs} (student, teacher), but the stored selection was made "
                f"for {stored_pairs}. Drop feature_layers to train on the stored pairs, or re-score without "
                "selection_path for the new pairs."
            )
        if args.selection_num_units is not None and args.selection_num_units != selection.k:
            raise ValueError(
                f"selection_num_units={args.selection_num_units}, but the stored selection holds k={selection.k} "
                "units. Drop selection_num_units to use the stored k, or re-score without selection_path."
            )
        if args.selection_num_units is None and selection.k != student_hidden_size:
            raise ValueError(
                f"The stored selection holds k={selection.k} units, but the student's hidden size is "
                f"{student_hidden_size} (k defaults to the student width). Set selection_num_units={selection.k} "
                "to match only the first k student units, or re-score without selection_path."
            )
    selection.student_hidden_size = student_hidden_size  # the student this run trains


def check_selection(selection: UnitSelection, s_cfg, t_cfg) -> None:
    """A selection fits this teacher and student: the teacher's width, k <= the student's width, layer indices in
    range (an error names the index and the model)."""
    d_s, d_t = s_cfg.hidden_size, t_cfg.hidden_size
    if selection.teacher_hidden_size != d_t:
        raise ValueError(
            f"The stored selection was made for a teacher of hidden size {selection.teacher_hidden_size}, but "
            f"this teacher has {d_t}. Re-run the selection for this teacher."
        )
    for ls in selection.layers:
        if ls.k > d_s:
            raise ValueError(f"The stored selection has {ls.k} units, more than the student's hidden size {d_s}.")
        resolve_layer_index(ls.student_layer, s_cfg.num_hidden_layers, "student")
        resolve_layer_index(ls.teacher_layer, t_cfg.num_hidden_layers, "teacher")


def scoring_subset(dataset, num_samples: int, seed: int):
    """The examples to score, as the host prepared them (tokenised, packed, ...): a seeded subset of a map-style
    dataset, or the first `num_samples` examples a stream (`datasets.IterableDataset`) yields."""
    from datasets import Dataset, IterableDataset

    if dataset is None:
        raise ValueError("Unit selection needs a train_dataset to score on (or pass `selection_path`).")
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        # A stream has no random access: score its head. Shuffle the stream yourself
        # (`dataset.shuffle(seed=..., buffer_size=...)`) when its first examples are not representative.
        rows = list(itertools.islice(iter(dataset), num_samples))
        if not rows:
            raise ValueError("Unit selection: the streamed train_dataset yielded no example.")
        if len(rows) < num_samples:
            logger.warning(
                "Unit selection: the stream ended after %d examples (asked for %d).", len(rows), num_samples
            )
        return Dataset.from_list(rows)
    n = min(num_samples, len(dataset))
    if not hasattr(dataset, "select"):  # a torch Dataset
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
        return [dataset[int(i)] for i in order[:n]]
    return dataset.shuffle(seed=seed).select(range(n))
