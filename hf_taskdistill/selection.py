"""The unit selection: which teacher units each student layer learns, and where it is stored.

A `UnitSelection` serialises to one versioned dict kept under `config.task_distill` of the student (so
`save_pretrained` / `from_pretrained` carry it) and, for adapter-only saves, in a `task_distill.json` sidecar.
The raw per-unit scores of every teacher unit go to a `task_distill_scores.safetensors` sidecar.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


logger = logging.getLogger(__name__)

CONFIG_KEY = "task_distill"
SIDECAR_NAME = "task_distill.json"
SCORES_NAME = "task_distill_scores.safetensors"
# The keep-k report of a selection (`hf-taskdistill select --report`, `hf_taskdistill.report`), kept beside it.
REPORT_NAME = "selection_report.json"
REPORT_PLOT_NAME = "selection_report.png"
FORMAT_VERSION = 1
SELECTION_METHODS = ("grad", "grad_x_act", "random", "projector")
_TOP_KEYS = {
    "format_version", "library_version", "teacher", "selection_method", "selection_order", "num_samples",
    "num_tokens", "seed", "teacher_hidden_size", "student_hidden_size", "layers", "diagnostics", "training",
    "student", "data", "init",
}  # fmt: skip
_LAYER_KEYS = {"student_layer", "teacher_layer", "indices", "scores", "teacher_mean", "teacher_std"}


class SelectionFormatError(ValueError):
    """A stored selection is corrupt or incompatible; the message names the bad field."""


def _library_version() -> str:
    try:
        from importlib.metadata import version

        return version("hf-taskdistill")
    except Exception:
        return "unknown"


@dataclass
class LayerSelection:
    """The selected teacher units for one (student layer, teacher layer) pair.

    `indices[i]` is the teacher unit that student unit i learns. `scores`, `teacher_mean` and `teacher_std` are
    aligned with `indices` (per selected unit); `indices` is `None` for the projector baseline (full teacher layer).
    """

    student_layer: int
    teacher_layer: int
    indices: list[int] | None
    scores: list[float] | None = None
    teacher_mean: list[float] | None = None
    teacher_std: list[float] | None = None

    @property
    def k(self) -> int:
        return 0 if self.indices is None else len(self.indices)


@dataclass
class UnitSelection:
    """Task-relevant teacher units per layer pair, with provenance.

    Attributes:
        layers: one `LayerSelection` per layer pair.
        selection_method: `grad` (mean |dL/dh|), `grad_x_act` (mean |h * dL/dh|), `random` (seeded) or
            `projector` (no selection: the learned-projector baseline matches the whole teacher layer).
        selection_order: `index` (ascending teacher index) or `score` (descending score).
        num_samples / num_tokens: examples and completion tokens scored (summed over processes).
        seed: the seed of the scoring subset (and of `random`).
        teacher: `{"model_id", "revision"}` when known.
        teacher_hidden_size / student_hidden_size: d_T and d_S at selection time.
        diagnostics: scoring wall time, peak memory, split-half top-k overlap, selected score-mass share.
        training: the distillation settings the trainer used (logit loss, beta, lmbda, feature loss type and
            weight, hyperparameters), recorded for the model card.
        student: `{"model_id", "revision", "local_name"}` of the student's starting checkpoint (see
            `provenance.model_reference`; never a local path).
        data: a description of the training data (`{"name", "num_examples", ...}`), recorded for the model card.
        init: for a student cut out of its teacher (`hf-taskdistill prune`): how it was cut (criterion, scored
            layers, residual and MLP indices, layers kept, teacher). Empty otherwise.
        full_scores: per layer pair, the (d_T,) score of every teacher unit (kept out of `config.json`).
    """

    layers: list[LayerSelection]
    selection_method: str
    teacher_hidden_size: int
    student_hidden_size: int
    selection_order: str = "index"
    num_samples: int = 0
    num_tokens: int = 0
    seed: int = 0
    teacher: dict[str, str | None] = field(default_factory=lambda: {"model_id": None, "revision": None})
    diagnostics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    student: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    init: dict[str, Any] = field(default_factory=dict)
    library_version: str = field(default_factory=_library_version)
    full_scores: list[torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def k(self) -> int:
        return self.layers[0].k if self.layers else 0

    # ----- serialisation -----
    def to_dict(self) -> dict[str, Any]:
        """The JSON-safe dict stored under `config.task_distill` (no tensors, string keys only)."""
        d = {k: v for k, v in asdict(self).items() if k != "full_scores"}
        d["format_version"] = FORMAT_VERSION
        return json.loads(json.dumps(d, sort_keys=True))

    @classmethod
    def from_dict(cls, data: Any) -> UnitSelection:
        """Validate a stored dict and rebuild the selection; raises `SelectionFormatError` naming the bad field."""
        return _parse(data)

    def save(self, directory: str | os.PathLike, sidecar: bool = True) -> None:
        """Write the `task_distill.json` sidecar (and the raw scores, when known) into `directory`."""
        os.makedirs(directory, exist_ok=True)
        if sidecar:
            with open(os.path.join(directory, SIDECAR_NAME), "w") as f:
                json.dump(self.to_dict(), f, indent=2, sort_keys=True)
        if self.full_scores is not None:
            from safetensors.torch import save_file

            tensors = {f"layer_{i}": s.detach().float().cpu().contiguous() for i, s in enumerate(self.full_scores)}
            save_file(tensors, os.path.join(directory, SCORES_NAME))

    def attach_to(self, model) -> None:
        """Store the selection in `model.config.task_distill` (the base model's config for PEFT models)."""
        config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
        setattr(config, CONFIG_KEY, self.to_dict())


def _fail(field_name: str, msg: str) -> SelectionFormatError:
    return SelectionFormatError(
        f"Corrupt stored unit selection: field `{field_name}` {msg}. Re-run the selection "
        "(e.g. `hf-taskdistill select`) or remove `task_distill` from the config."
    )


def _int(value: Any, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(name, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _floats(value: Any, name: str, n: int) -> list[float] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != n:
        raise _fail(name, f"must be a list of {n} numbers")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _fail(name, f"holds a non-finite or non-numeric value {v!r}")
    return [float(v) for v in value]


def _parse(data: Any) -> UnitSelection:
    if not isinstance(data, dict):
        raise _fail(CONFIG_KEY, f"must be a dict, got {type(data).__name__}")
    if "format_version" not in data:
        raise _fail("format_version", "is missing")
    version = data["format_version"]
    if not isinstance(version, int) or version < 1:
        raise _fail("format_version", f"must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise SelectionFormatError(
            f"Stored unit selection has format_version {version}, but this hf_taskdistill reads up to "
            f"{FORMAT_VERSION}. Upgrade hf_taskdistill (`pip install -U hf-taskdistill`)."
        )
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        logger.warning("Ignoring unknown keys in the stored unit selection: %s", unknown)
    method = data.get("selection_method")
    pruned = bool(data.get("init"))  # a student cut from its teacher names its pruning criterion here
    if not (method in SELECTION_METHODS or (pruned and isinstance(method, str) and method)):
        raise _fail("selection_method", f"must be one of {SELECTION_METHODS}, got {method!r}")
    order = data.get("selection_order", "index")
    if order not in ("index", "score"):
        raise _fail("selection_order", f"must be 'index' or 'score', got {order!r}")
    d_t = _int(data.get("teacher_hidden_size"), "teacher_hidden_size", 1)
    d_s = _int(data.get("student_hidden_size"), "student_hidden_size", 1)
    raw_layers = data.get("layers")
    if not isinstance(raw_layers, list) or not raw_layers:
        raise _fail("layers", "must be a non-empty list")
    layers = []
    for li, raw in enumerate(raw_layers):
        where = f"layers[{li}]"
        if not isinstance(raw, dict):
            raise _fail(where, "must be a dict")
        s_layer = _int(raw.get("student_layer"), f"{where}.student_layer")
        t_layer = _int(raw.get("teacher_layer"), f"{where}.teacher_layer")
        indices = raw.get("indices")
        if indices is None:
            if method != "projector":
                raise _fail(f"{where}.indices", "is missing")
            layers.append(LayerSelection(s_layer, t_layer, None))
            continue
        if not isinstance(indices, list) or not indices:
            raise _fail(f"{where}.indices", "must be a non-empty list of integers")
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int):
                raise _fail(f"{where}.indices", f"holds a non-integer {i!r}")
            if not 0 <= i < d_t:
                raise _fail(f"{where}.indices", f"holds {i}, outside the teacher's hidden size 0..{d_t - 1}")
        if len(set(indices)) != len(indices):
            raise _fail(f"{where}.indices", "holds duplicate unit indices")
        if len(indices) > d_s:
            raise _fail(f"{where}.indices", f"has {len(indices)} units, more than the student's hidden size {d_s}")
        n = len(indices)
        layers.append(
            LayerSelection(
                s_layer,
                t_layer,
                list(indices),
                _floats(raw.get("scores"), f"{where}.scores", n),
                _floats(raw.get("teacher_mean"), f"{where}.teacher_mean", n),
                _floats(raw.get("teacher_std"), f"{where}.teacher_std", n),
            )
        )
    teacher = data.get("teacher") or {}
    if not isinstance(teacher, dict):
        raise _fail("teacher", "must be a dict with `model_id` and `revision`")
    return UnitSelection(
        layers=layers,
        selection_method=method,
        teacher_hidden_size=d_t,
        student_hidden_size=d_s,
        selection_order=order,
        num_samples=_int(data.get("num_samples", 0), "num_samples"),
        num_tokens=_int(data.get("num_tokens", 0), "num_tokens"),
        seed=_int(data.get("seed", 0), "seed"),
        teacher={
            k: teacher.get(k) for k in ("model_id", "revision", "local_name") if k in teacher or k != "local_name"
        },
        diagnostics=dict(data.get("diagnostics") or {}),
        training=dict(data.get("training") or {}),
        student=_dict_field(data, "student"),
        data=_dict_field(data, "data"),
        init=_dict_field(data, "init"),
        library_version=str(data.get("library_version", "unknown")),
    )


def _dict_field(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise _fail(key, "must be a dict")
    return dict(value)


def _from_config_dict(cfg: dict[str, Any], source: str) -> UnitSelection:
    if CONFIG_KEY not in cfg:
        raise ValueError(f"{source} holds no `{CONFIG_KEY}` unit selection (was the student distilled?).")
    return _parse(cfg[CONFIG_KEY])


def load_unit_selection(source: Any, revision: str | None = None, token: str | bool | None = None) -> UnitSelection:
    """Return the stored unit selection from a model, a config, a dict, a local path or a Hub repo id.

    Local paths may be a model directory (`config.json`), an adapter directory (`task_distill.json`), or one of
    those files. Hub ids are read with `huggingface_hub.hf_hub_download` (config first, then the sidecar).

    Raises:
        SelectionFormatError: the stored dict is corrupt (the message names the field).
        ValueError: the source holds no selection.
    """
    if isinstance(source, UnitSelection):
        return source
    if hasattr(source, "get_base_model"):  # PEFT model
        source = source.get_base_model()
    if hasattr(source, "config") and not isinstance(source, dict):
        source = source.config
    if hasattr(source, "to_dict") and not isinstance(source, (str, os.PathLike, dict)):
        stored = getattr(source, CONFIG_KEY, None)
        if stored is None:
            raise ValueError(f"{type(source).__name__} has no `{CONFIG_KEY}` unit selection.")
        return _parse(stored)
    if isinstance(source, dict):
        return _parse(source[CONFIG_KEY] if CONFIG_KEY in source else source)
    path = os.fspath(source)
    if os.path.isdir(path):
        for name in ("config.json", SIDECAR_NAME):
            file = os.path.join(path, name)
            if os.path.isfile(file):
                with open(file) as f:
                    cfg = json.load(f)
                if name == SIDECAR_NAME:
                    return _with_scores(_parse(cfg), path)
                if CONFIG_KEY in cfg:
                    return _with_scores(_parse(cfg[CONFIG_KEY]), path)
        raise ValueError(f"{path} holds neither a `config.json` with `{CONFIG_KEY}` nor a `{SIDECAR_NAME}`.")
    if os.path.isfile(path):
        with open(path) as f:
            cfg = json.load(f)
        selection = _parse(cfg[CONFIG_KEY]) if CONFIG_KEY in cfg else _parse(cfg)
        return _with_scores(selection, os.path.dirname(path))
    from .provenance import is_hub_id

    if not is_hub_id(path):
        raise FileNotFoundError(f"Unit selection {path!r}: no such file or directory.")
    return _load_from_hub(path, revision, token)


def _with_scores(selection: UnitSelection, directory: str) -> UnitSelection:
    """Attach the raw scores of every teacher unit from the `task_distill_scores.safetensors` next to the selection,
    so that a reused selection keeps them (the model card's plot needs them)."""
    file = os.path.join(directory or ".", SCORES_NAME)
    if not os.path.isfile(file) or selection.selection_method in ("projector", "random"):
        return selection
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(file)
    except (SafetensorError, OSError) as e:
        raise SelectionFormatError(
            f"{file} is not a readable safetensors file ({e}); delete it or re-run the selection."
        ) from e
    scores = [tensors.get(f"layer_{i}") for i in range(len(selection.layers))]
    if any(t is None or t.shape != (selection.teacher_hidden_size,) for t in scores):
        raise SelectionFormatError(
            f"{file} does not match the selection: expected {len(selection.layers)} score vectors `layer_i` of "
            f"{selection.teacher_hidden_size} values, found {{{', '.join(f'{k}: {tuple(v.shape)}' for k, v in tensors.items())}}}."
        )
    selection.full_scores = scores
    return selection


def _load_from_hub(repo_id: str, revision: str | None, token: str | bool | None) -> UnitSelection:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        file = hf_hub_download(repo_id, "config.json", revision=revision, token=token)
        with open(file) as f:
            cfg = json.load(f)
        if CONFIG_KEY in cfg:
            return _parse(cfg[CONFIG_KEY])
    except EntryNotFoundError:
        pass
    file = hf_hub_download(repo_id, SIDECAR_NAME, revision=revision, token=token)
    with open(file) as f:
        return _parse(json.load(f))
