"""Training from an offline teacher cache: the part of both trainers that runs without a teacher in memory.

With `args.teacher_cache` set, the teacher's top-K logits and selected units come from a cache built beforehand by
`hf-taskdistill cache` (`cache.py` reads it): no teacher is loaded, and every batch carries the cached teacher
tensors. Off-policy only: the cache holds the teacher's view of the dataset's completions, so on-policy GKD
(`lmbda>0`) is refused by the config. `trainer.py` lists these mixins as bases of its trainers.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from trl import SFTTrainer

from .config import TaskFeatureDistillConfig
from .hooks import resolve_layer_index
from .losses import valid_positions
from .selection import load_unit_selection
from .unit_resolution import projector_selection, reconcile_stored, selection_pairs, stored_selection_source


class CachedTeacherMixin:
    """Set-up and loss from a teacher cache, shared by both hosts (a base of `_FeatureDistillMixin`).

    Takes the run's units as the online set-up does (`unit_resolution.py`), and relies on the trainer's own
    `_warn_engine`, `_base_student`, `_finish_selection` and loss helpers (`_feature_term`, `_host_correction`,
    `_log_host`), called via `self`.
    """

    def _setup_from_cache(self, teacher_model: Any, unit_selection: Any, references: dict) -> None:
        """Open `args.teacher_cache`, check it against this run before any step, take its selection, and wrap the
        collator so every batch carries the cached teacher tensors. No teacher is loaded."""
        from .cache import open_teacher_cache

        args: TaskFeatureDistillConfig = self.args
        self._warn_engine()
        self._fd_teacher = self._teacher_tap = None
        self._fd_active = args.feature_loss_weight > 0
        self.unit_selection = None
        self._student_tap = None
        eval_sets = self.eval_dataset if isinstance(self.eval_dataset, dict) else {"eval": self.eval_dataset}
        eval_sets = {k: v for k, v in eval_sets.items() if v is not None}
        cache = open_teacher_cache(
            args.teacher_cache,
            tokenizer=self.processing_class,
            max_length=args.max_length,
            teacher=teacher_model if isinstance(teacher_model, str) else None,
            temperature=1.0 if self._default_logit_loss == "jsd" else None,  # GKD's divergence uses temperature 1
            need_logits=self._default_logit_loss == "jsd",
            dataset=self.train_dataset,
            collator=self.data_collator,
            allow_extra=bool(eval_sets),  # one cache may hold the train and eval examples
        )
        for dataset in eval_sets.values():
            cache.check_dataset(dataset, self.data_collator, allow_extra=True)
        self._fd_cache = cache
        self.data_collator = cache.wrap_collator(self.data_collator)
        if not self._fd_active:
            return
        student = self._base_student()
        source = stored_selection_source(unit_selection, args, student)
        selection = load_unit_selection(source) if source is not None else cache.selection
        s_cfg = student.config.get_text_config()
        if args.feature_projector and selection is not None and selection.selection_method != "projector":
            # the projector matches whole teacher layers: the cache must hold them (`--full_layer`)
            layers = cache.header.get("layers") or []
            if not all(layer.get("full") for layer in layers):
                raise ValueError(
                    f"feature_projector=True needs whole teacher layers, but the teacher cache {args.teacher_cache} "
                    "holds selected units only: rebuild it with `--full_layer` (full_layer=True)."
                )
            selection = projector_selection(
                selection_pairs(selection), selection.teacher_hidden_size, s_cfg.hidden_size, selection.teacher
            )
        if selection is None:
            raise ValueError(
                f"The teacher cache {args.teacher_cache} holds logits only (no teacher units), but "
                f"feature_loss_weight={args.feature_loss_weight}: rebuild it with a selection "
                "(`hf-taskdistill cache --selection_path ...`), or set feature_loss_weight=0."
            )
        if selection.selection_method != "projector":
            cache.check_compatible(selection=selection)
        for ls in selection.layers:
            resolve_layer_index(ls.student_layer, s_cfg.num_hidden_layers, "student")
        reconcile_stored(selection, None, s_cfg.hidden_size, args)  # the layer pairs are checked below
        if args.feature_layers is not None:
            # The cache's header records the teacher's layer count, so negative teacher indices resolve as online.
            n_t = (cache.header.get("teacher_config") or {}).get("num_hidden_layers")
            stored = selection_pairs(selection)
            if args.feature_layers == "all" or n_t is None:
                wanted = None if args.feature_layers == "all" else [tuple(p) for p in args.feature_layers]
            else:
                wanted = args.resolve_layer_pairs(s_cfg.num_hidden_layers, n_t)
            if wanted != stored:
                raise ValueError(
                    f"feature_layers={args.feature_layers} does not match the layer pairs the teacher cache holds, "
                    f"{stored} (student, teacher): drop feature_layers to use them, or rebuild the cache."
                )
        self._finish_selection(
            selection, student, s_cfg, references, teacher_hidden_size=selection.teacher_hidden_size
        )

    def _compute_loss_from_cache(self, model, inputs, return_outputs, num_items_in_batch):
        cached = self._fd_cache.pop_batch(inputs, self.unit_selection)  # the model call never sees the cached keys
        capture = self._student_tap.capture() if self._fd_active else contextlib.nullcontext({})
        with capture as student_out:
            host, outputs = self._cached_logit_loss(model, inputs, cached, return_outputs, num_items_in_batch)
        host = host * self._host_correction(num_items_in_batch)
        loss = host
        if self._fd_active:
            feature = self._feature_term(student_out, cached.units, inputs["labels"], num_items_in_batch)
            loss = host + self.args.feature_loss_weight * feature.to(host.device, host.dtype)
        self._log_host(host, inputs, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _cached_logit_loss(self, model, inputs, cached, return_outputs, num_items_in_batch):
        """The host loss from a teacher cache, `(loss, outputs or None)`: SFT's own cross-entropy, or GKD's
        generalized JSD over the cached top-K + tail (`sparse_kd`), reduced like `GKDTrainer.generalized_jsd_loss`."""
        # Only ask SFT for outputs when the caller does: with return_outputs=True it runs a second (no-grad) forward,
        # which would overwrite the student tap's capture.
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return result if return_outputs else (result, None)


class CachedGKDMixin(CachedTeacherMixin):
    """The GKD host's part of training from a teacher cache: `GKDTrainer.__init__` without its teacher, and GKD's
    generalized JSD over the cached top-K + tail. A base of `FeatureDistillTrainer`, before `_FeatureDistillMixin`,
    so its `_cached_logit_loss` overrides the generic one."""

    def _init_without_teacher(self, model, args, train_dataset, kwargs) -> None:
        # `GKDTrainer.__init__` loads and places a teacher, and a cache has none: run its set-up without that part
        # (the ChatML collator, the dataset left unprepared for it, dropout off); on-policy steps are refused by
        # the config, so GKD's generation settings are never used.
        from trl.experimental.utils import DataCollatorForChatML
        from trl.trainer.utils import disable_dropout_in_model

        args.remove_unused_columns = False
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = DataCollatorForChatML(tokenizer=kwargs.get("processing_class"),
                                                            max_length=args.max_length)  # fmt: skip
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        SFTTrainer.__init__(self, model=model, args=args, train_dataset=train_dataset, **kwargs)
        if args.disable_dropout:
            disable_dropout_in_model(self.model)
        self.teacher_model = None
        self.lmbda, self.beta, self.temperature, self.seq_kd = args.lmbda, args.beta, args.temperature, args.seq_kd

    def _cached_logit_loss(self, model, inputs, cached, return_outputs, num_items_in_batch):
        from .sparse_kd import sparse_generalized_jsd_loss

        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        mask = valid_positions(inputs["labels"]).to(outputs.logits.device)
        total = sparse_generalized_jsd_loss(outputs.logits, cached.topk_ids.to(mask.device),
                                            cached.topk_logprobs.to(mask.device), cached.tail_logprob.to(mask.device),
                                            mask, beta=self.beta)  # fmt: skip
        if num_items_in_batch is not None:
            return total / torch.as_tensor(num_items_in_batch, device=total.device), outputs
        return total / mask.sum().clamp_min(1), outputs
