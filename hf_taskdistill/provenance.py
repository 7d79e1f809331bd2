"""Model references that are safe to publish: a Hub id with its revision, or a local label that is never a path.

Everything this library writes into `config.json`, the selection files or a model card names models through
`model_reference`, so a user's file system never reaches the Hub (issue: "the teacher is recorded wrongly").
"""

from __future__ import annotations

import os
import re
import textwrap
from typing import Any


# `name` or `org/name`, the characters the Hub allows (huggingface_hub's repo-id rule, without the length check).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")

FLEX_KD_PAPER = {
    "title": "Task-Based Flexible Feature Distillation for LLMs",
    "id": "2507.10155",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @article{saadi2025taskbased,
            title        = {{Task-Based Flexible Feature Distillation for LLMs}},
            author       = {Khouloud Saadi and Di Wang},
            year         = 2025,
            eprint       = {arXiv:2507.10155},
        }"""),
}


def is_hub_id(name: str | None) -> bool:
    """True for an `org/name` (or `name`) string that is not an existing local path and has no path syntax."""
    if not name or not isinstance(name, str):
        return False
    if os.path.exists(name) or name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return False
    return bool(_HUB_ID.match(name))


def local_label(path: str | os.PathLike) -> str:
    """The folder (or file) name of a local model, never its path."""
    return os.path.basename(os.path.normpath(os.fspath(path))) or "local-model"


def model_reference(name_or_path: Any, revision: str | None = None) -> dict[str, str | None]:
    """`{"model_id", "revision", "local_name"}` for a model given as a Hub id, a local path or a loaded model.

    A Hub id is kept with its revision (a loaded model's `config._commit_hash` when not given); a local folder
    becomes `model_id=None, local_name=<folder name>` so that no path is ever published and no link is made to a
    Hub repo that does not exist. `None` gives all three `None`.
    """
    if name_or_path is not None and not isinstance(name_or_path, (str, os.PathLike)):
        model = name_or_path.get_base_model() if hasattr(name_or_path, "get_base_model") else name_or_path
        config = getattr(model, "config", None)
        revision = revision or getattr(config, "_commit_hash", None)
        name_or_path = getattr(config, "_name_or_path", None) or None
    if not name_or_path:
        return {"model_id": None, "revision": None, "local_name": None}
    name = os.fspath(name_or_path)
    if is_hub_id(name):
        return {"model_id": name, "revision": revision, "local_name": None}
    return {"model_id": None, "revision": None, "local_name": local_label(name)}


def cached_revision(model_id: str, revision: str | None = None) -> str | None:
    """The commit sha a Hub id (at `revision`, default `main`) resolved to when it was last downloaded, read from the
    local Hugging Face cache (`refs/<revision>`); `None` when it is not cached. No network."""
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    try:
        from huggingface_hub import constants

        folder = os.path.join(constants.HF_HUB_CACHE, "models--" + model_id.replace("/", "--"))
        with open(os.path.join(folder, "refs", revision or "main")) as f:
            sha = f.read().strip()
    except (OSError, ImportError):
        return None
    return sha if re.fullmatch(r"[0-9a-f]{40}", sha) else None


def reference_text(reference: dict[str, Any] | None) -> str | None:
    """A short human label: the Hub id (with `@revision`), or `<name> (local)`; `None` when nothing is recorded."""
    reference = reference or {}
    if reference.get("model_id"):
        rev = reference.get("revision")
        return f"{reference['model_id']}@{rev[:12]}" if rev else reference["model_id"]
    if reference.get("local_name"):
        return f"{reference['local_name']} (local)"
    return None
