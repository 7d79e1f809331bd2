"""hf_taskdistill: task-based flexible feature distillation (Flex-KD, arXiv 2507.10155) for TRL."""

import os as _os


# trl.experimental warns on import; the GKD host lives there (pinned trl==1.16.*).
_os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from .config import TaskFeatureDistillConfig
from .losses import feature_distillation_loss, feature_loss
from .scoring import select_task_units
from .selection import LayerSelection, SelectionFormatError, UnitSelection, load_unit_selection
from .trainer import FeatureDistillSFTTrainer, FeatureDistillTrainer


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
    "UnitSelection",
    "feature_distillation_loss",
    "feature_loss",
    "load_unit_selection",
    "select_task_units",
]
