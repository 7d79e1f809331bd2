"""hf_taskdistill: task-based flexible feature distillation (Flex-KD, arXiv 2507.10155) for TRL."""

import os as _os


# trl.experimental warns on import; the GKD host lives there (pinned trl==1.16.*).
_os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING


# Public names and the module each lives in. Imported on first use (PEP 562), so `hf-taskdistill --help` or
# `import hf_taskdistill.losses` does not pay for importing TRL.
_EXPORTS = {
    "TeacherCache": "cache",
    "build_teacher_cache": "cache_build",
    "open_teacher_cache": "cache",
    "prune_teacher": "pruning",
    "FeatureDistillSFTTrainer": "trainer",
    "FeatureDistillTrainer": "trainer",
    "LayerSelection": "selection",
    "SelectionFormatError": "selection",
    "TaskFeatureDistillConfig": "config",
    "UnitSelection": "selection",
    "feature_distillation_loss": "losses",
    "feature_loss": "losses",
    "load_unit_selection": "selection",
    "select_task_units": "scoring",
}

if _TYPE_CHECKING:  # pragma: no cover
    from .cache import TeacherCache, open_teacher_cache
    from .cache_build import build_teacher_cache
    from .config import TaskFeatureDistillConfig
    from .losses import feature_distillation_loss, feature_loss
    from .pruning import prune_teacher
    from .scoring import select_task_units
    from .selection import LayerSelection, SelectionFormatError, UnitSelection, load_unit_selection
    from .trainer import FeatureDistillSFTTrainer, FeatureDistillTrainer


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


try:
    from importlib.metadata import version as _version

    __version__ = _version("hf-taskdistill")
except Exception:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = [
    "FeatureDistillSFTTrainer",
    "FeatureDistillTrainer",
    "LayerSelection",
    "SelectionFormatError",
    "TaskFeatureDistillConfig",
    "TeacherCache",
    "UnitSelection",
    "build_teacher_cache",
    "feature_distillation_loss",
    "feature_loss",
    "load_unit_selection",
    "open_teacher_cache",
    "prune_teacher",
    "select_task_units",
]
