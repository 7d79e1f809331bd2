"""Feature-distillation trainers: thin subclasses of TRL's GKD and SFT trainers.

The host computes its own loss (GKD's generalized JSD, or SFT's cross-entropy) with its own code; gated forward
hooks capture the student's and teacher's matched layers during that same forward, and the feature term is added
on top, normalised by the same `num_items_in_batch` as the host loss.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, PreTrainedModel
from trl import SFTTrainer
from trl.experimental.gkd import GKDTrainer
from trl.models.utils import _ForwardRedirection

from .cache_host import CachedGKDMixin, CachedTeacherMixin
from .config import TaskFeatureDistillConfig
from .hooks import LayerTap
from .input_checks import check_dataset_columns, check_models, coerce_args
from .losses import feature_loss, valid_positions
from .provenance import FLEX_KD_PAPER, cached_revision, is_hub_id, model_reference
from .scoring import model_inputs, select_task_units
from .selection import REPORT_NAME, REPORT_PLOT_NAME, UnitSelection, load_unit_selection
from .unit_resolution import (
    at_every_layer,
    check_selection,
    projector_selection,
    pruning_record,
    reconcile_stored,
    scoring_subset,
    selection_dir,
    stored_selection_source,
)


logger = logging.getLogger(__name__)

PROJECTOR_ATTR = "fd_proj"
PROJECTOR_FILE = "_feature_projector.safetensors"  # leading "_": skipped by Trainer.push_to_hub
REPORT_FILES = (REPORT_NAME, REPORT_PLOT_NAME)  # written by `hf-taskdistill select --report`


def _sanitized_reference(reference: dict | None) -> dict | None:
    """A stored teacher reference with any local path reduced to a local label (old selections stored paths)."""
    if not reference or not (reference.get("model_id") or reference.get("local_name")):
        return None
    if reference.get("model_id") and not is_hub_id(reference["model_id"]):
        return model_reference(reference["model_id"])
    return dict(reference)


class _FeatureDistillMixin(CachedTeacherMixin):
    """Selection, taps, projector and the feature term, shared by both hosts (training from a teacher cache:
    `CachedTeacherMixin`, in `cache_host.py`)."""

    _host_loss_name = "loss"
    _default_logit_loss = "jsd"

    # ----- set-up, before any training step -----
    def _base_student(self) -> nn.Module:
        """The student without its PEFT wrapper (the model whose config and layers the selection refers to)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        """Place the teacher for the engine in use, as TRL does for its own teachers: DeepSpeed (ZeRO-3 shards it),
        FSDP (`prepare_fsdp`; TRL's GKD has no such branch, so its teacher would stay unsharded on the CPU), else
        `prepare_model(evaluation_mode=True)` (moved to the device, replicated under DDP)."""
        from trl.models.utils import prepare_deepspeed, prepare_fsdp

        teacher.requires_grad_(False)
        teacher.eval()
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(teacher, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(teacher.to(self.accelerator.device), self.accelerator)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def _warn_engine(self) -> None:
        # accelerate enables FSDP only on accelerator devices: an FSDP config launched on CPU processes runs DDP.
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not self.is_fsdp_enabled:
            logger.warning(
                "Launched with an FSDP config, but accelerate runs %s: it enables FSDP only on accelerator devices "
                "(GPU, XPU, ...), not on CPU processes.",
                self.accelerator.distributed_type,
            )

    def _setup_feature_distillation(self, teacher: nn.Module, unit_selection: Any, references: dict) -> None:
        args: TaskFeatureDistillConfig = self.args
        self._warn_engine()
        self._fd_teacher = teacher
        self._fd_cache = None
        teacher.requires_grad_(False)
        teacher.eval()
        self._fd_active = args.feature_loss_weight > 0
        self.unit_selection: UnitSelection | None = None
        self._student_tap = self._teacher_tap = None
        if not self._fd_active:
            return
        student = self._base_student()
        s_cfg, t_cfg = student.config.get_text_config(), teacher.config.get_text_config()
        init = pruning_record(student)
        pairs = args.resolve_layer_pairs(
            s_cfg.num_hidden_layers, t_cfg.num_hidden_layers, init.get("layers_kept") if init else None
        )
        selection = self._resolve_selection(unit_selection, teacher, references, pairs, s_cfg, t_cfg)
        check_selection(selection, s_cfg, t_cfg)
        self._finish_selection(selection, student, s_cfg, references, teacher_hidden_size=t_cfg.hidden_size)
        device = next(teacher.parameters()).device
        gather = {}
        if selection.selection_method != "projector":
            gather = {
                ls.teacher_layer: torch.tensor(ls.indices, dtype=torch.long, device=device) for ls in selection.layers
            }
        self._teacher_tap = LayerTap(teacher, [ls.teacher_layer for ls in selection.layers], gather, detach=True)

    def _finish_selection(self, selection, student, s_cfg, references, teacher_hidden_size: int) -> None:
        """Record provenance and settings on the selection, attach it to the student, set up the student tap (and
        the projector baseline). Shared by the online and the cached teacher."""
        args: TaskFeatureDistillConfig = self.args
        # A Hub id's revision is known once the model is loaded (the parent loads models given as strings).
        for who, model in (("student", student), ("teacher", self._fd_teacher)):
            ref = references[who]
            if ref.get("model_id") and not ref.get("revision"):
                loaded = getattr(model.config, "_commit_hash", None) if model is not None else None
                ref["revision"] = loaded or cached_revision(ref["model_id"])
        selection.teacher = _sanitized_reference(selection.teacher) or references["teacher"]
        if selection.teacher.get("model_id") == references["teacher"].get("model_id") and not selection.teacher.get(
            "revision"
        ):
            selection.teacher["revision"] = references["teacher"].get("revision")
        selection.student = references["student"]
        selection.data = self._describe_data()
        selection.training = self._training_record()
        self.unit_selection = selection
        selection.attach_to(self.model)
        logger.info(
            "Unit selection (%s, k=%d, layer pairs %s): %s",
            selection.selection_method,
            selection.k,
            [(ls.student_layer, ls.teacher_layer) for ls in selection.layers],
            selection.diagnostics,
        )

        self._fd_var = [
            None if ls.teacher_std is None else torch.tensor(ls.teacher_std, dtype=torch.float32).pow(2)
            for ls in selection.layers
        ]
        if args.feature_loss_type == "nmse" and any(v is None for v in self._fd_var):
            raise ValueError("feature_loss_type='nmse' needs the teacher unit std from a scoring pass (not stored).")
        self._student_tap = LayerTap(self.model, [ls.student_layer for ls in selection.layers])
        if selection.selection_method == "projector":
            self._add_projector(student, s_cfg.hidden_size, teacher_hidden_size, len(selection.layers))

    def _resolve_selection(self, unit_selection, teacher, references, pairs, s_cfg, t_cfg) -> UnitSelection:
        """The run's selection: a stored one (argument, `selection_path`, or a pruned student's own units), the
        projector baseline's whole layers, or a scoring pass over `selection_num_samples` training examples."""
        args: TaskFeatureDistillConfig = self.args
        student = self._base_student()
        source = stored_selection_source(unit_selection, args, student)
        if source is not None:
            selection = load_unit_selection(source)
            self._fd_selection_dir = selection_dir(source)  # the report is copied into every save
            if args.feature_layers == "all":
                selection = at_every_layer(selection, pairs)
            reconcile_stored(selection, pairs, s_cfg.hidden_size, args)
            logger.info("Reusing a stored unit selection (%s); scoring skipped.", selection.selection_method)
            return selection
        if args.feature_projector:
            return projector_selection(pairs, t_cfg.hidden_size, s_cfg.hidden_size, references["teacher"])
        try:
            return select_task_units(
                teacher,
                self._scoring_batches(),
                num_units=args.selection_num_units or s_cfg.hidden_size,
                layer_pairs=pairs,
                method=args.selection_method,
                order=args.selection_order,
                seed=args.selection_seed,
                student_hidden_size=s_cfg.hidden_size,
                teacher_id=references["teacher"]["model_id"],
                teacher_revision=references["teacher"]["revision"],
                show_progress=not args.disable_tqdm,
            )
        except ValueError as e:
            if "Image features and image tokens do not match" in str(e) and args.max_length is not None:
                raise ValueError(
                    f"Unit selection: max_length={args.max_length} is too short: truncation cuts image placeholder "
                    "tokens out of input_ids while the image features remain. Raise max_length or set it to None "
                    "(TRL's SFTTrainer raises the same at its first training step)."
                ) from e
            raise

    def _describe_data(self) -> dict[str, Any]:
        """What the card says about the training data: a name when the dataset has one, the size, the columns."""
        dataset = self.train_dataset
        from .data import data_label

        info = getattr(dataset, "info", None)
        name = getattr(info, "dataset_name", None)
        if name in ("json", "csv", "parquet", "text", "generator", "arrow", "pandas", "dict"):
            name = None  # a builder's name, not the data's
        # `data_label`: a Hub id as is, a local file by a short label (`dolly/train.jsonl`), never a path
        data = {
            "name": data_label(self._dataset_name or name),
            "num_examples": None,
            "columns": None,
            "streamed": False,
        }
        try:
            data["num_examples"] = len(dataset)
        except TypeError:
            data["streamed"] = True
        columns = getattr(dataset, "column_names", None)
        data["columns"] = list(columns) if isinstance(columns, list) else None
        return data

    def _training_record(self) -> dict[str, Any]:
        args: TaskFeatureDistillConfig = self.args
        jsd = self._default_logit_loss == "jsd"
        record = {
            "host": self._host_loss_name.split("_")[0],  # "jsd" (GKD host) or "ce" (SFT host)
            "logit_loss": self._default_logit_loss,
            "beta": args.beta if jsd else None,
            "lmbda": args.lmbda if jsd else None,
            "feature_loss_type": args.feature_loss_type,
            "feature_loss_weight": args.feature_loss_weight,
            "feature_projector": args.feature_projector,
            "hyperparameters": {
                "learning_rate": args.learning_rate,
                "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
                "num_train_epochs": args.num_train_epochs if args.max_steps <= 0 else None,
                "max_steps": args.max_steps if args.max_steps > 0 else None,
                "per_device_train_batch_size": args.per_device_train_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "num_processes": self.accelerator.num_processes,
                "max_length": args.max_length,
                "temperature": args.temperature if jsd else None,
                "seed": args.seed,
                "selection_num_samples": args.selection_num_samples,
            },
        }
        if getattr(self, "_fd_cache", None) is not None:
            header = self._fd_cache.header
            record["teacher_cache"] = {"top_k": header.get("top_k"), "dtype": header.get("dtype"),
                                       "full_layer": any(x.get("full") for x in header.get("layers") or [])}  # fmt: skip
        return record

    def _scoring_batches(self) -> list[dict[str, torch.Tensor]]:
        """Collated batches of the scoring subset (`unit_resolution.scoring_subset`), through the host's collator."""
        args: TaskFeatureDistillConfig = self.args
        subset = scoring_subset(self.train_dataset, args.selection_num_samples, args.selection_seed)
        if args.remove_unused_columns and hasattr(subset, "column_names"):
            subset = self._remove_unused_columns(subset, description="scoring")
        batch_size = args.selection_batch_size or args.per_device_train_batch_size
        loader = DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=self.data_collator)
        return list(loader)

    def _add_projector(self, student: PreTrainedModel, d_s: int, d_t: int, n_pairs: int) -> None:
        # A submodule of the student, so the optimizer, DDP and DeepSpeed see it; kept out of `save_pretrained`.
        param = next(student.parameters())
        proj = nn.ModuleDict({str(i): nn.Linear(d_s, d_t, bias=False) for i in range(n_pairs)})
        student.add_module(PROJECTOR_ATTR, proj.to(device=param.device, dtype=param.dtype))
        ignore = {f"{PROJECTOR_ATTR}.{i}.weight" for i in range(n_pairs)}
        student._keys_to_ignore_on_save = set(student._keys_to_ignore_on_save or ()) | ignore

    def _projector(self) -> nn.ModuleDict | None:
        student = self._base_student()
        return getattr(student, PROJECTOR_ATTR, None)

    # ----- the loss -----
    def _teacher_forward(self, inputs: dict[str, Any]) -> None:
        """Run the teacher where the host does not (SFT host); the GKD host already runs it."""

    def _token_factor(self, num_items_in_batch) -> int:
        """`num_items_in_batch` counts the tokens of every rank while DDP averages gradients: multiply back by the
        number of processes, as `Trainer.compute_loss` and SFT do."""
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            return self.accelerator.num_processes
        return 1

    def _host_correction(self, num_items_in_batch) -> int:
        """Factor applied to the host loss so it follows the rule above (1 where the host already does)."""
        return 1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._fd_cache is not None:
            return self._compute_loss_from_cache(model, inputs, return_outputs, num_items_in_batch)
        if not self._fd_active:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            host = (result[0] if return_outputs else result) * self._host_correction(num_items_in_batch)
            self._log_host(host, inputs, num_items_in_batch)
            return (host, result[1]) if return_outputs else host
        with self._student_tap.capture() as student_out, self._teacher_tap.capture() as teacher_out:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self._teacher_forward(inputs)
        host = (result[0] if return_outputs else result) * self._host_correction(num_items_in_batch)
        feature = self._feature_term(student_out, teacher_out, inputs["labels"], num_items_in_batch)
        loss = host + self.args.feature_loss_weight * feature.to(host.device, host.dtype)
        self._log_host(host, inputs, num_items_in_batch)
        return (loss, result[1]) if return_outputs else loss

    def _feature_term(self, student_out, teacher_out, labels, num_items_in_batch) -> torch.Tensor:
        mask = valid_positions(labels)
        projector = self._projector()
        terms, means, corrs = [], [], []
        for i, ls in enumerate(self.unit_selection.layers):
            student_h = student_out[ls.student_layer]
            teacher_h = teacher_out[ls.teacher_layer]  # (B, T, k) selected units, or (B, T, d_T) for the projector
            if projector is not None:
                student_h = projector[str(i)](student_h)  # (B, T, d_T)
            else:
                student_h = student_h[..., : teacher_h.shape[-1]]  # (B, T, k) student units aligned to indices
            out = feature_loss(student_h, teacher_h.to(student_h.device), mask.to(student_h.device),
                               self.args.feature_loss_type, self._fd_var[i])  # fmt: skip
            if num_items_in_batch is None:
                terms.append(out.mean)
            else:
                denom = torch.as_tensor(num_items_in_batch, device=out.loss_sum.device).clamp(min=1)
                terms.append(out.loss_sum / denom * self._token_factor(num_items_in_batch))
            means.append(out.mean.detach())
            if out.mean_corr is not None:
                corrs.append(out.mean_corr)
        # Logged values stay tensors until `log` (one transfer per logging step, not a host sync per micro-batch).
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["feature_loss"].append(torch.stack(means).mean())
        if corrs:
            self._metrics[mode]["feature_corr"].append(torch.stack(corrs).mean())
        return torch.stack(terms).mean()

    def _log_host(self, host: torch.Tensor, inputs, num_items_in_batch) -> None:
        # Log the host term as a per-token mean of this micro-batch, comparable with `feature_loss`.
        value = host.detach().float()
        if num_items_in_batch is not None and "labels" in inputs:
            local = (inputs["labels"][:, 1:] != -100).sum().clamp(min=1)
            value = value * torch.as_tensor(num_items_in_batch).to(value.device) / local.to(value.device)
            value = value / self._token_factor(num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode][self._host_loss_name].append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Turn the tensors `_feature_term` / `_log_host` queued into floats in one transfer, then TRL averages them.
        mode = "train" if self.model.training else "eval"
        queued = [(values, i) for values in self._metrics[mode].values() for i, v in enumerate(values)
                  if torch.is_tensor(v)]  # fmt: skip
        if queued:
            device = queued[0][0][queued[0][1]].device
            stacked = torch.stack([values[i].detach().float().reshape(()).to(device) for values, i in queued])
            if self.accelerator.num_processes > 1:
                # Each rank queued its own micro-batches (in lockstep): log the mean over ranks, as TRL gathers its
                # own metrics, instead of rank 0's values alone.
                stacked = self.accelerator.reduce(stacked, reduction="mean")
            floats = stacked.tolist()
            for (values, i), value in zip(queued, floats, strict=True):
                values[i] = value
        if mode == "eval":
            # TRL prefixes its metrics with "eval_" only; with a dict of eval datasets (`eval_a_loss`, ...) every set's
            # values would land under the same key and the last set would overwrite the others. Use the set's prefix.
            prefix = next((k[: -len("loss")] for k in logs if k.startswith("eval_") and k.endswith("_loss")), "eval_")
            if prefix != "eval_":
                for key, values in self._metrics[mode].items():
                    if values:
                        logs[f"{prefix}{key}"] = sum(values) / len(values)
                self._metrics[mode].clear()
        super().log(logs, start_time)

    # ----- saving and resuming -----
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.unit_selection is not None:
            self.unit_selection.attach_to(self.model)  # config.json carries the selection
        save_here = self.args.should_save and self.unit_selection is not None
        # Before super()._save: save_pretrained drops the projector's (ignored) keys from `state_dict` in place.
        projector_state = self._projector_state(state_dict) if save_here else None
        super()._save(output_dir, state_dict)
        if not save_here:
            return
        # The adapter directory of a PEFT student has no config.json: write the sidecar there too.
        self.unit_selection.save(output_dir, sidecar=hasattr(self.model, "get_base_model"))
        source = getattr(self, "_fd_selection_dir", None)
        for name in REPORT_FILES if source and os.path.abspath(source) != os.path.abspath(output_dir) else ():
            if os.path.isfile(os.path.join(source, name)):
                shutil.copyfile(os.path.join(source, name), os.path.join(output_dir, name))
        if projector_state is not None:
            from safetensors.torch import save_file

            save_file(projector_state, os.path.join(output_dir, PROJECTOR_FILE))

    def _projector_state(self, state_dict: dict | None) -> dict | None:
        """The projector's full weights on the CPU: from the gathered `state_dict` that `Trainer.save_model` passes
        under FSDP / DeepSpeed ZeRO-3 (where the module's own parameters are shards), else from the module. Only the
        saving rank runs `_save`, so no collective may happen here."""
        projector = self._projector()
        if projector is None:
            return None
        marker = f"{PROJECTOR_ATTR}."
        state = {k.split(marker, 1)[1]: v for k, v in (state_dict or {}).items() if marker in k}
        return {k: v.detach().cpu().contiguous() for k, v in (state or projector.state_dict()).items()}

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        projector = self._projector()
        path = os.path.join(resume_from_checkpoint, PROJECTOR_FILE)
        if projector is not None and os.path.isfile(path):
            from safetensors.torch import load_file
            from torch.distributed.tensor import DTensor, distribute_tensor

            state = load_file(path)
            with torch.no_grad():
                for name, param in projector.named_parameters():
                    value = state[name].to(device=param.device, dtype=param.dtype)
                    if isinstance(param, DTensor):  # an FSDP2 shard: keep this rank's part of the full weight
                        value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
                    param.copy_(value)

    # ----- model card and Hub (implementation in model_card.py / hub.py) -----
    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **kwargs):
        """Write `README.md` (and the unit-score plot) into `output_dir` with the package's own template.

        Replaces TRL's card: names the teacher, the method, the layers and k, fixes `base_model` for local
        students and the `licence` typo, and accepts `license=` / `eval_results=` from `push_to_hub(**kwargs)`.
        """
        if not self.is_world_process_zero():
            return
        from .model_card import write_trainer_model_card

        write_trainer_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags, **kwargs)

    def push_to_hub(self, commit_message="End of training", blocking=True, token=None, revision=None, private=None,
                    **kwargs):  # fmt: skip
        """`Trainer.push_to_hub` (save, card, upload), plus: a missing `revision` branch is created first, and Hub
        errors raise `hf_taskdistill.hub.HubPushError` naming the repo and endpoint, with the token scrubbed."""
        from .hub import trainer_push_to_hub

        return trainer_push_to_hub(self, super().push_to_hub, commit_message=commit_message, blocking=blocking,
                                   token=token, revision=revision, private=private, **kwargs)  # fmt: skip


class FeatureDistillTrainer(CachedGKDMixin, _FeatureDistillMixin, GKDTrainer):
    """TRL's [`~trl.experimental.gkd.GKDTrainer`] plus task-selected feature distillation.

    The loss is GKD's generalized JSD (off-policy with `lmbda=0`, on-policy with `lmbda>0`) plus
    `feature_loss_weight` times the feature loss between the student's matched layer and the teacher's selected
    units. Before training, the teacher's units are scored on `selection_num_samples` training examples (unless a
    selection is given); the selection is stored in the student's `config.json` under `task_distill`.

    Args:
        model: the student ([`~transformers.PreTrainedModel`] or path / Hub id).
        teacher_model: the teacher (model or path / Hub id); same vocabulary as the student.
        args: a [`TaskFeatureDistillConfig`].
        train_dataset: a dataset with a `messages` column (conversational), as for GKD.
        unit_selection: optional [`UnitSelection`], model, path or Hub id whose stored selection is reused. A student
            made by `hf-taskdistill prune` reuses the units it was cut at by itself.
        dataset_name: optional name of the training data (a Hub dataset id, or a short label), recorded for the card.
        **kwargs: everything else [`~trl.experimental.gkd.GKDTrainer`] takes (`processing_class`, `peft_config`,
            `eval_dataset`, `data_collator`, `callbacks`, ...).
    """

    _tag_names = ["trl", "gkd", "hf_taskdistill", "feature-distillation", "distillation"]
    _name = "Task-based feature distillation (GKD host)"
    _paper = FLEX_KD_PAPER
    _host_loss_name = "jsd_loss"
    _default_logit_loss = "jsd"

    def _host_correction(self, num_items_in_batch) -> int:
        # TRL's GKD divides by the all-rank token count but, unlike Trainer and SFT, does not multiply by the number
        # of processes, so its gradient shrinks with the world size. Restore Trainer's rule.
        return self._token_factor(num_items_in_batch)

    def __init__(self, model=None, teacher_model=None, args: TaskFeatureDistillConfig | None = None,
                 train_dataset=None, unit_selection=None, dataset_name: str | None = None, **kwargs):  # fmt: skip
        args = coerce_args(args, model, type(self).__name__)
        self._dataset_name = dataset_name
        check_models(model, teacher_model, args, type(self).__name__, self._default_logit_loss)
        check_dataset_columns(train_dataset, "gkd")
        references = {"teacher": model_reference(teacher_model), "student": model_reference(model)}
        if args.teacher_cache:
            self._init_without_teacher(model, args, train_dataset, kwargs)
            self._setup_from_cache(teacher_model, unit_selection, references)
            return
        super().__init__(model=model, teacher_model=teacher_model, args=args, train_dataset=train_dataset, **kwargs)
        if self.is_fsdp_enabled:
            self.teacher_model = self._prepare_teacher(self.teacher_model)
        self._setup_feature_distillation(self.accelerator.unwrap_model(self.teacher_model), unit_selection, references)


class FeatureDistillSFTTrainer(_FeatureDistillMixin, SFTTrainer):
    """TRL's [`~trl.SFTTrainer`] (cross-entropy on the gold completion) plus task-selected feature distillation.

    No logit KD: the teacher runs backbone-only (no LM head, no logits) under `no_grad`, and only its tapped layers
    are kept. Takes every dataset format SFT takes (`prompt`/`completion`, `messages`, `text`). With
    `feature_loss_weight=0` this is the plain SFT baseline.

    Args:
        model: the student.
        teacher_model: the teacher (model or path / Hub id).
        args: a [`TaskFeatureDistillConfig`] (`beta`, `lmbda` and the other GKD fields are unused).
        unit_selection: optional stored selection to reuse (a pruned student reuses its own by itself).
        dataset_name: optional name of the training data, recorded for the card.
        **kwargs: everything else [`~trl.SFTTrainer`] takes.
    """

    _tag_names = ["trl", "sft", "hf_taskdistill", "feature-distillation", "distillation"]
    _name = "Task-based feature distillation (SFT host)"
    _paper = FLEX_KD_PAPER
    _host_loss_name = "ce_loss"
    _default_logit_loss = "none"

    def __init__(self, model=None, teacher_model=None, args: TaskFeatureDistillConfig | None = None,
                 train_dataset=None, unit_selection=None, dataset_name: str | None = None, **kwargs):  # fmt: skip
        args = coerce_args(args, model, type(self).__name__)
        self._dataset_name = dataset_name
        check_models(model, teacher_model, args, type(self).__name__, self._default_logit_loss)
        check_dataset_columns(train_dataset, "sft")
        references = {"teacher": model_reference(teacher_model), "student": model_reference(model)}
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        if args.teacher_cache:
            self.teacher_model = None
            self._setup_from_cache(teacher_model, unit_selection, references)
            return
        if isinstance(teacher_model, str):
            init_kwargs = dict(args.teacher_model_init_kwargs or {})
            if init_kwargs.get("dtype") not in (None, "auto"):
                init_kwargs["dtype"] = getattr(torch, init_kwargs["dtype"])
            teacher_model = AutoModelForCausalLM.from_pretrained(teacher_model, **init_kwargs)
        self.teacher_model = self._prepare_teacher(teacher_model)
        self._forward_redirection = _ForwardRedirection()
        self._setup_feature_distillation(self.accelerator.unwrap_model(self.teacher_model), unit_selection, references)

    def _teacher_forward(self, inputs: dict[str, Any]) -> None:
        # Backbone only: the taps need hidden states, not the (B, T, V) logits.
        teacher_inputs = model_inputs(inputs)  # the same keys the scoring pass feeds the teacher
        self.teacher_model.eval()
        with torch.no_grad():
            # Through the wrapper, so FSDP / DeepSpeed gather the sharded parameters first (as TRL's Distillation).
            self._forward_redirection(self.teacher_model, self._fd_teacher, self._fd_teacher.base_model.forward,
                                      **teacher_inputs, use_cache=False)  # fmt: skip
