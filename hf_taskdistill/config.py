"""`TaskFeatureDistillConfig`: TRL's `GKDConfig` plus unit selection and feature-loss fields."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from trl.experimental.gkd import GKDConfig

from .losses import FEATURE_LOSS_TYPES
from .scoring import SCORE_METHODS


@dataclass
class TaskFeatureDistillConfig(GKDConfig):
    r"""
    Configuration for [`FeatureDistillTrainer`] (GKD host) and [`FeatureDistillSFTTrainer`] (SFT host).

    Everything of [`~trl.experimental.gkd.GKDConfig`] (and so of [`~trl.SFTConfig`]) applies; the fields below are
    added. Method: https://huggingface.co/papers/2507.10155 (Flex-KD).

    > Parameters that control the teacher

    Inherited: `teacher_model_name_or_path`, `teacher_model_init_kwargs` (a missing `"dtype"` key defaults to
    `"auto"`, which avoids a `KeyError` in TRL's GKD), `disable_dropout`.

    teacher_cache (`str` or `None`, *optional*, defaults to `None`):
        A teacher cache directory written by `hf-taskdistill cache` (`hf_taskdistill.cache_build.build_teacher_cache`): the
        teacher's top-K log-probs (+ tail bucket) and selected units per completion token. No teacher is loaded; the
        logit term is GKD's generalized JSD over the top-K support plus the tail, the feature term reads the cached
        units. Off-policy only (`lmbda=0`, `seq_kd=False`): the teacher must see the student's own samples otherwise.

    > Parameters that control the unit selection

    selection_method (`str`, *optional*, defaults to `"grad"`):
        How teacher units are scored: `"grad"` (mean |dL/dh| over completion tokens), `"grad_x_act"` (mean
        |h * dL/dh|), or `"random"` (a seeded draw, the ablation baseline).
    selection_num_units (`int` or `None`, *optional*, defaults to `None`):
        k, the number of teacher units kept per layer pair. `None` means the student's hidden size d_S. Must be
        <= the teacher's hidden size; with k < d_S only student units 0..k-1 are matched.
    selection_num_samples (`int`, *optional*, defaults to `1000`):
        Number of training examples (a seeded subset) scored before training.
    selection_batch_size (`int` or `None`, *optional*, defaults to `None`):
        Batch size of the scoring pass; `None` uses `per_device_train_batch_size`.
    selection_seed (`int` or `None`, *optional*, defaults to `None`):
        Seed of the scoring subset and of the `"random"` draw; `None` uses `seed`.
    selection_order (`str`, *optional*, defaults to `"index"`):
        `"index"` stores units in ascending teacher index, `"score"` in descending score. Student unit i learns
        the i-th stored unit.
    selection_path (`str` or `None`, *optional*, defaults to `None`):
        Reuse a stored selection instead of scoring: a distilled model directory or Hub id, a `config.json`, or a
        `task_distill.json` written by `hf-taskdistill select`.
    feature_layers (`list[int]`, `list[list[int]]` or `None`, *optional*, defaults to `None`):
        Layer pairs `[student_layer, teacher_layer, ...]`, flat or as a list of pairs, in Python, YAML and on the
        command line (`--feature_layers 1 15 3 29`, `1,15 3,29` or `[[1,15],[3,29]]`). `"all"` matches every
        student layer: to the teacher layer it was cut from for a student made by `hf-taskdistill prune` (same
        residual units at every layer), else by the proportional rule round((i+1) L_T / L_S) - 1. Negative indices
        count from the end. `None` means the last decoder layer of each model. Each pair has its own selection and
        loss term; the terms are averaged.

    > Parameters that control the feature loss

    feature_loss_type (`str`, *optional*, defaults to `"correlation"`):
        `"correlation"` (1 - per-unit Pearson correlation over valid tokens), `"mse"`, `"nmse"` (MSE over the
        teacher unit variance measured while scoring) or `"cosine"`.
    feature_loss_weight (`float`, *optional*, defaults to `1.0`):
        Weight of the feature term: loss = host loss + weight * feature loss. `0` disables it (logit-KD or SFT
        baseline).
    feature_projector (`bool`, *optional*, defaults to `False`):
        Baseline: match the whole teacher layer through a learned `Linear(d_S, d_T)` of the student state instead
        of selected units. The projector trains with the student, is saved in checkpoints (for resume) but not
        with the student weights.
    logit_loss (`str` or `None`, *optional*, defaults to `None`):
        `"jsd"` (GKD's generalized JSD with `beta` and `lmbda`) or `"none"` (cross-entropy on the gold
        completion, SFT host). `None` lets the trainer class decide: `jsd` for [`FeatureDistillTrainer`], `none`
        for [`FeatureDistillSFTTrainer`].

    > [!NOTE]
    > Defaults that differ from [`~trl.experimental.gkd.GKDConfig`]: `lmbda=0.0` (off-policy; the paper's setting,
    > set `lmbda>0` for on-policy GKD); `bf16` defaults to `True` only when a bf16-capable CUDA device is present
    > (TRL's unconditional `True` fails on CPU-only machines).
    """

    _VALID_DICT_FIELDS = GKDConfig._VALID_DICT_FIELDS

    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "Probability of training a step on student-generated completions (on-policy GKD). 0 keeps the "
            "paper's off-policy setting."
        },
    )

    # Parameters that control the unit selection
    selection_method: str = field(
        default="grad",
        metadata={
            "help": "Unit scoring: grad (mean |dL/dh|), grad_x_act (mean |h*dL/dh|) or random (seeded baseline).",
            "choices": list(SCORE_METHODS),
        },
    )
    selection_num_units: int | None = field(
        default=None,
        metadata={"help": "k, teacher units kept per layer pair. None: the student's hidden size."},
    )
    selection_num_samples: int = field(
        default=1000,
        metadata={"help": "Number of training examples (seeded subset) scored before training."},
    )
    selection_batch_size: int | None = field(
        default=None,
        metadata={"help": "Batch size of the scoring pass. None: per_device_train_batch_size."},
    )
    selection_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the scoring subset and of the random draw. None: `seed`."},
    )
    selection_order: str = field(
        default="index",
        metadata={
            "help": "index: stored in ascending teacher index; score: in descending score.",
            "choices": ["index", "score"],
        },
    )
    selection_path: str | None = field(
        default=None,
        metadata={
            "help": "Reuse a stored selection (model dir or Hub id, config.json, or task_distill.json) instead "
            "of scoring."
        },
    )
    # `list[str]` for the command line, which then takes `1 15 3 29`, `1,15 3,29` or `[[1,15],[3,29]]` alike;
    # __post_init__ turns every form into pairs of ints.
    feature_layers: list[str] | None = field(
        default=None,
        metadata={
            "help": "Layer pairs student_layer teacher_layer ...: `1 15 3 29`, `1,15 3,29` or `[[1,15],[3,29]]` "
            "(negative counts from the end), or `all`. None: last layer of each model.",
            "nargs": "+",
        },
    )

    teacher_cache: str | None = field(
        default=None,
        metadata={
            "help": "Train from a teacher cache written by `hf-taskdistill cache` instead of running the teacher "
            "(off-policy only: lmbda=0, seq_kd=False)."
        },
    )

    # Parameters that control the feature loss
    feature_loss_type: str = field(
        default="correlation",
        metadata={"help": "Feature loss between matched units.", "choices": list(FEATURE_LOSS_TYPES)},
    )
    feature_loss_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the feature term (0 disables it: the logit-KD / SFT baseline)."},
    )
    feature_projector: bool = field(
        default=False,
        metadata={"help": "Baseline: learned Linear(d_S, d_T) projector onto the full teacher layer."},
    )
    logit_loss: str | None = field(
        default=None,
        metadata={
            "help": "jsd (GKD generalized JSD) or none (cross-entropy, SFT host). None: decided by the trainer.",
            "choices": ["jsd", "none", None],
        },
    )

    def __post_init__(self):
        if isinstance(self.teacher_model_init_kwargs, dict):
            # TRL's GKD indexes ["dtype"] unconditionally (KeyError otherwise).
            self.teacher_model_init_kwargs.setdefault("dtype", "auto")
        if self.bf16 is None and not self.fp16:
            # TRL defaults to bf16=True, which fails on machines without a bf16 GPU: use it only where it exists.
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported() and not self.use_cpu)
        super().__post_init__()
        if self.selection_method not in SCORE_METHODS:
            raise ValueError(f"selection_method must be one of {SCORE_METHODS}, got {self.selection_method!r}.")
        if self.selection_order not in ("index", "score"):
            raise ValueError(f"selection_order must be 'index' or 'score', got {self.selection_order!r}.")
        if self.feature_loss_type not in FEATURE_LOSS_TYPES:
            raise ValueError(f"feature_loss_type must be one of {FEATURE_LOSS_TYPES}, got {self.feature_loss_type!r}.")
        if self.feature_loss_weight < 0:
            raise ValueError(f"feature_loss_weight must be >= 0, got {self.feature_loss_weight}.")
        if self.selection_num_units is not None and self.selection_num_units < 1:
            raise ValueError(
                f"selection_num_units must be >= 1 (or None for the student width), got {self.selection_num_units}."
            )
        if self.selection_num_samples < 1:
            raise ValueError(f"selection_num_samples must be >= 1, got {self.selection_num_samples}.")
        if self.selection_batch_size is not None and self.selection_batch_size < 1:
            raise ValueError(f"selection_batch_size must be >= 1, got {self.selection_batch_size}.")
        if self.logit_loss not in (None, "jsd", "none"):
            raise ValueError(f"logit_loss must be 'jsd', 'none' or None, got {self.logit_loss!r}.")
        self.feature_layers = parse_layer_pairs(self.feature_layers)
        if self.feature_projector:
            # The projector runs in compute_loss, outside the student's forward: DDP's unused-parameter search would
            # mark it ready after the forward and again when its gradient arrives. Every student parameter gets a
            # gradient from either host's loss, so the search is not needed.
            if self.ddp_find_unused_parameters:
                raise ValueError(
                    "feature_projector=True needs ddp_find_unused_parameters=False: the projector runs outside the "
                    "student's forward, so DDP's unused-parameter search would mark it ready twice."
                )
            self.ddp_find_unused_parameters = False
        if self.teacher_cache and (self.lmbda > 0 or self.seq_kd):
            raise ValueError(
                f"teacher_cache is off-policy only, but lmbda={self.lmbda} and seq_kd={self.seq_kd}: on-policy steps "
                "need the teacher to score the student's own samples. Set lmbda=0 and seq_kd=False, or drop "
                "teacher_cache and load the teacher."
            )
        if self.selection_seed is None:
            self.selection_seed = self.seed

    @classmethod
    def from_training_args(cls, args: Any, **overrides: Any) -> TaskFeatureDistillConfig:
        """Convert a `transformers.TrainingArguments`, `trl.SFTConfig` or `GKDConfig` into this config.

        Every field of `args` is kept (as TRL's `SFTTrainer` does when it converts a plain `TrainingArguments`); the
        fields this config adds take their defaults unless given in `overrides`. An object that already is a
        `TaskFeatureDistillConfig` is returned unchanged.
        """
        from transformers import TrainingArguments

        if isinstance(args, cls) and not overrides:
            return args
        if not isinstance(args, TrainingArguments):
            raise TypeError(
                f"args must be a TaskFeatureDistillConfig (or a TrainingArguments / SFTConfig / GKDConfig to convert), "
                f"got {type(args).__name__}."
            )
        names = {f.name for f in fields(cls) if f.init}
        values = {k: v for k, v in args.to_dict().items() if k in names}
        for key in values:
            if key.endswith("_token"):  # to_dict masks these as "<KEY>" (hub_token, SFT's eos_token / pad_token)
                values[key] = getattr(args, key)
        values.update(overrides)
        return cls(**values)

    @property
    def layer_pairs(self) -> list[tuple[int, int]]:
        """The `(student_layer, teacher_layer)` pairs, possibly negative; `[(-1, -1)]` by default; `[]` for
        `feature_layers="all"`, which only `resolve_layer_pairs` can expand (it needs the layer counts)."""
        if self.feature_layers == ALL_LAYERS:
            return []
        return [tuple(p) for p in self.feature_layers] if self.feature_layers else [(-1, -1)]

    def resolve_layer_pairs(
        self, num_student_layers: int, num_teacher_layers: int, layers_kept: list[int] | None = None
    ) -> list[tuple[int, int]]:
        """Non-negative `(student_layer, teacher_layer)` pairs for these models.

        `feature_layers="all"` matches every student layer: to the teacher layer it was cut from for a student made
        by `hf-taskdistill prune` (`layers_kept`), else by the proportional rule round((i+1) L_T / L_S) - 1.
        """
        from .hooks import resolve_layer_index

        if self.feature_layers == ALL_LAYERS:
            if layers_kept is not None:
                if len(layers_kept) != num_student_layers:
                    raise ValueError(
                        f"The student has {num_student_layers} layers but its pruning record keeps {len(layers_kept)}."
                    )
                return [(i, int(t)) for i, t in enumerate(layers_kept)]
            return [
                (i, round((i + 1) * num_teacher_layers / num_student_layers) - 1) for i in range(num_student_layers)
            ]
        return [
            (
                resolve_layer_index(s, num_student_layers, "student"),
                resolve_layer_index(t, num_teacher_layers, "teacher"),
            )
            for s, t in self.layer_pairs
        ]


ALL_LAYERS = "all"


def parse_layer_pairs(value) -> list[list[int]] | str | None:
    """Accept `None`, `"all"`, a flat list `[s, t, s, t]`, a list of pairs `[[s, t], ...]`, or the command-line
    strings `"1 15"`, `"1,15"`, `"[[1,15],[3,29]]"`."""
    if value is None or value == []:
        return None
    if isinstance(value, str):
        value = [value]
    if list(value) == [ALL_LAYERS] or value == ALL_LAYERS:
        return ALL_LAYERS
    if all(isinstance(v, str) for v in value):  # command-line forms: "1 15", "1,15", "[[1,15],[3,29]]"
        text = " ".join(value)
        for ch in "[](),":
            text = text.replace(ch, " ")
        try:
            value = [int(v) for v in text.split()]
        except ValueError as e:
            raise ValueError(
                f"feature_layers must hold integer layer indices, got {' '.join(map(str, value))!r}. "
                "Example: --feature_layers -1 -1 or --feature_layers [[3,29],[1,15]]."
            ) from e
    if all(isinstance(v, (list, tuple)) for v in value):
        pairs = [list(v) for v in value]
    else:
        flat = list(value)
        if len(flat) % 2:
            raise ValueError(
                f"feature_layers must hold (student_layer, teacher_layer) pairs, got an odd-length list {flat}. "
                "Example: --feature_layers -1 -1 or, in YAML, [[-1, -1], [3, 11]]."
            )
        pairs = [flat[i : i + 2] for i in range(0, len(flat), 2)]
    for p in pairs:
        if len(p) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            raise ValueError(f"feature_layers entries must be pairs of integers, got {p!r}.")
    return pairs
