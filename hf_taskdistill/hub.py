"""Push a distilled student directory to the Hub: weights, tokenizer, `config.json` with the selection, card, plot.

`hf-taskdistill push --model_dir DIR --repo_id ns/name` (or `push_distilled(...)`) uploads what the trainer saved.
A LoRA adapter directory is merged into its base first (its `task_distill.json` is re-attached to the merged
config), unless `adapter=True`. The local directory is never modified: generated files (a missing card, the plot,
merged weights) are written to a temporary folder and committed from there.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .card_eval import eval_results_metadata, eval_table_markdown, normalize_eval_results, rows_from_model_index
from .model_card import PLOT_NAME, REPORT_PLOT_NAME, build_model_card, missing_card_fields, plot_into
from .report import load_selection_report
from .selection import SIDECAR_NAME, SelectionFormatError, UnitSelection, load_unit_selection


logger = logging.getLogger(__name__)

_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
# PEFT's `save_pretrained` writes an unfilled card template; it is replaced, never kept.
_PEFT_PLACEHOLDER = "<!-- Provide a quick summary of what the model is/does. -->"
_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{20,}")  # the shape of Hub user access tokens
# Written by every `Trainer.save_model`: the pickled TrainingArguments, which hold `output_dir` (a local path).
TRAINING_ARGS_NAME = "training_args.bin"


class HubPushError(RuntimeError):
    """A Hub request failed during a push; the message names the repo, the endpoint and what to check.

    Attributes: `repo_id`, `endpoint`, `stage` (what was being done) and `status_code` (None when the endpoint could
    not be reached). The local directory is left as it was.
    """

    def __init__(self, message: str, *, repo_id: str, endpoint: str, stage: str, status_code: int | None = None):
        super().__init__(message)
        self.repo_id, self.endpoint, self.stage, self.status_code = repo_id, endpoint, stage, status_code


def _scrub(text: str, token: str | None) -> str:
    if isinstance(token, str) and len(token) >= 4:
        text = text.replace(token, "***")
    return _TOKEN_PATTERN.sub("hf_***", text)


def _is_hub_error(err: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, (HfHubHTTPError, ConnectionError, TimeoutError)):
        return True
    if isinstance(err, ValueError) and str(err).startswith("Invalid metadata in README.md"):
        return True
    # Transport errors of the HTTP client huggingface_hub uses (httpx, or its `httpx2` fork).
    return type(err).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3")


def _hub_error(
    err: BaseException, repo_id: str, endpoint: str, stage: str, token: str | None, after: str
) -> HubPushError:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    detail = _scrub(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__, token)
    namespace = repo_id.split("/")[0] if "/" in repo_id else "your user namespace"
    if isinstance(err, ConnectionError) and "offline mode" in str(err):
        advice = "Offline mode is on (HF_HUB_OFFLINE=1): unset it to push."
    elif status is None:
        advice = (
            f"The endpoint could not be reached ({type(err).__name__}: {detail}). Check the network connection, "
            "proxy settings and HF_ENDPOINT."
        )
    elif status in (401, 403):
        advice = (
            f"The Hub refused the credentials (HTTP {status}). Check that the token is valid and has write access to "
            f"`{namespace}` (`hf auth login`, the HF_TOKEN variable, or `--token`)."
        )
    elif status == 404:
        advice = f"Not found (HTTP 404): check the repo id, the revision and that the token can see the repo. {detail}"
    elif status >= 500:
        advice = (
            f"The Hub had a server error (HTTP {status}). Retry later; files already on the Hub are skipped on "
            "the next push."
        )
    else:
        advice = f"HTTP {status}: {detail}"
    message = f"Pushing to `{repo_id}` on {endpoint} failed while {stage}. {advice} {after}"
    return HubPushError(_scrub(message, token), repo_id=repo_id, endpoint=endpoint, stage=stage, status_code=status)


def _collect(local: Path, include_training_args: bool = False) -> dict[str, Path]:
    """Files to upload, by repo path; skips what `Trainer.push_to_hub` skips (`_*`, `checkpoint-*`), dotfiles and,
    unless asked for, `training_args.bin` (it holds the local `output_dir`)."""
    files = {}
    for path in sorted(local.rglob("*")):
        rel = path.relative_to(local)
        if not path.is_file() or any(p.startswith(("_", ".", "checkpoint-")) for p in rel.parts):
            continue
        if rel.as_posix() == TRAINING_ARGS_NAME and not include_training_args:
            logger.info("Leaving out %s (it records the local output_dir); include_training_args=True sends it.",
                        TRAINING_ARGS_NAME)  # fmt: skip
            continue
        files[rel.as_posix()] = path
    return files


def _generated_note(selection: UnitSelection | None) -> str:
    """The line under the title of a card `push` generates: where it came from, and only what is really missing."""
    if selection is None:
        return (
            "This card was generated by `hf-taskdistill push` from a directory without a `task_distill` record (a run "
            "without the feature term stores none), so the teacher, the training data, the logit loss and the "
            "training hyperparameters are not known here."
        )
    note = "This card was generated by `hf-taskdistill push` from the stored `task_distill` record"
    missing = missing_card_fields(selection)
    if not missing:
        return note + "."
    listed = ", ".join(missing[:-1]) + (" and " if len(missing) > 1 else "") + missing[-1]
    return f"{note}; that record does not hold {listed}."


def _public_references(record: dict[str, Any]) -> bool:
    """Turn model references that are local paths (written by older versions) into local labels, in place; True
    when something changed. Covers `teacher`, `student` and `init.teacher` of a `task_distill` record."""
    from .model_card import as_reference

    changed = False
    for holder in (record, record.get("init") if isinstance(record.get("init"), dict) else {}):
        for key in ("teacher", "student"):
            ref = holder.get(key)
            if isinstance(ref, dict) and ref.get("model_id"):
                public = as_reference(ref)
                if public["model_id"] != ref["model_id"]:
                    holder[key] = {**ref, **public}
                    changed = True
    return changed


def _stage_public_configs(staging: Path, files: dict[str, Path]) -> None:
    """Rewrite `config.json` / `task_distill.json` into `staging` when they name a model by a local path."""
    from .selection import CONFIG_KEY

    for name in ("config.json", SIDECAR_NAME):
        if name not in files:
            continue
        data = _read_json(files[name])
        record = data.get(CONFIG_KEY) if name == "config.json" else data
        if isinstance(record, dict) and _public_references(record):
            logger.warning("%s names a model by a local path; the pushed copy names it by its folder only.", name)
            target = staging / "public" / name
            target.parent.mkdir(exist_ok=True)
            target.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            files[name] = target


def _read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _selection_or_none(source) -> UnitSelection | None:
    """The stored selection, or None for a run without one; a corrupt selection still raises."""
    try:
        return load_unit_selection(source)
    except SelectionFormatError:
        raise
    except ValueError:
        return None


def _merge_adapter(local: Path, staging: Path, files: dict[str, Path], token: str | None) -> UnitSelection | None:
    """Merge the LoRA adapter into its base, re-attach the selection, save into `staging`; update `files`."""
    from peft import AutoPeftModelForCausalLM

    selection = _selection_or_none(local / SIDECAR_NAME) if (local / SIDECAR_NAME).is_file() else None
    model = AutoPeftModelForCausalLM.from_pretrained(str(local), token=token)
    merged = model.merge_and_unload()
    if selection is not None:
        selection.attach_to(merged)
    else:
        logger.warning("%s has no %s: the merged model carries no unit selection.", local, SIDECAR_NAME)
    out = staging / "merged"
    merged.save_pretrained(out)
    for name in (*_ADAPTER_FILES, SIDECAR_NAME):
        files.pop(name, None)
    files.update({p.name: p for p in out.iterdir() if p.is_file()})
    return selection


def _update_card(card, license: str | None, rows: list[dict[str, Any]]):
    """Set the license and the evaluation results (metadata and section) of an existing card of ours."""
    from huggingface_hub import ModelCard

    if license:
        card.data.license = license
        card.data.pop("licence", None)
    if rows:
        card.data.model_name = card.data.model_name or "distilled-student"
        card.data.eval_results = eval_results_metadata(rows)
        section = f"## Evaluation\n\n{eval_table_markdown(rows)}\n"
        text = card.text
        if "## Evaluation\n" in text:
            text = re.sub(r"## Evaluation\n.*?(?=\n## |\Z)", lambda _: section, text, count=1, flags=re.DOTALL)
        elif "## Framework versions" in text:
            text = text.replace("## Framework versions", f"{section}\n## Framework versions", 1)
        else:
            text = f"{text.rstrip()}\n\n{section}"
        card = ModelCard(f"---\n{card.data.to_yaml()}\n---\n{text}")
    return card


def _prepare_card(local: Path, staging: Path, files: dict[str, Path], repo_id: str, *, merged: bool,
                  adapter: bool, selection: UnitSelection | None, license: str | None, eval_results: Any) -> None:  # fmt: skip
    """Keep, update or generate `README.md` (and the plot) so the upload carries a card; writes into `staging`."""
    from huggingface_hub import ModelCard

    rows = normalize_eval_results(eval_results)
    existing = ModelCard.load(files["README.md"]) if "README.md" in files else None
    placeholder = existing is not None and _PEFT_PLACEHOLDER in existing.text
    ours = existing is not None and not placeholder and "hf_taskdistill" in (existing.data.tags or [])
    # A card is kept (the trainer's, or one written by hand), except PEFT's placeholder and, for a merged adapter,
    # our adapter card (its library and loading snippet describe the adapter): those are regenerated.
    if existing is not None and not placeholder and not (merged and ours):
        if not license and not rows:
            return
        card = _update_card(existing, license, rows)
    else:
        previous = existing.data.to_dict() if ours else {}
        dist = previous.get("distillation") or {}
        adapter_cfg = local / "adapter_config.json"
        base = _read_json(adapter_cfg).get("base_model_name_or_path") if adapter_cfg.is_file() else None
        plot_file, reason = (None, None)
        if selection is not None:
            if PLOT_NAME in files:
                plot_file = PLOT_NAME
            else:  # from the raw scores sidecar (task_distill_scores.safetensors), which is uploaded too
                plot_file, reason = plot_into(selection, local, staging)
                if plot_file:
                    files[PLOT_NAME] = staging / PLOT_NAME
        report = load_selection_report(local)
        logit = {"generalized_jsd": "jsd", "none": "none"}.get(dist.get("logit_loss"))
        # Everything else comes from config.json's `task_distill` (teacher, student, data, `training` with the
        # hyperparameters); a previous card of ours fills the gaps of an older record.
        trained = (selection.training if selection is not None else None) or {}
        student = selection.student if selection is not None and selection.student else None
        card = build_model_card(
            selection,
            repo_id=repo_id,
            base_model=base or student or previous.get("base_model"),
            dataset_name=None
            if selection is not None and (selection.data or {}).get("name")
            else previous.get("datasets"),
            logit_loss=trained.get("logit_loss") or logit,
            beta=trained.get("beta", dist.get("beta")),
            lmbda=trained.get("lmbda", dist.get("lmbda")),
            feature_loss_type=trained.get("feature_loss_type") or dist.get("feature_loss"),
            feature_loss_weight=trained.get("feature_loss_weight", dist.get("feature_loss_weight")),
            hyperparameters=trained.get("hyperparameters") or None,
            license=license or previous.get("license"),
            tags=[t for t in previous.get("tags") or [] if t != "generated_from_trainer"],
            eval_results=eval_results if rows else rows_from_model_index(existing if ours else None),
            plot_file=plot_file,
            no_plot_reason=reason,
            selection_report=report,
            report_plot_file=REPORT_PLOT_NAME if report and REPORT_PLOT_NAME in files else None,
            library_name="peft" if adapter else "transformers",
            note=None if ours else _generated_note(selection),
        )
    card.save(staging / "README.md")
    files["README.md"] = staging / "README.md"


def push_distilled(
    local_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    adapter: bool = False,
    commit_message: str | None = None,
    eval_results: Any = None,
    license: str | None = None,
    include_training_args: bool = False,
    dry_run_dir: str | os.PathLike | None = None,
):
    """Push an already-distilled local directory to the Hub and return the `huggingface_hub.CommitInfo` (with
    `dry_run_dir`: the list of repo paths written there instead).

    Args:
        local_dir: a directory written by the trainer's `save_model` (or `hf-taskdistill train`).
        repo_id: `namespace/name`; created when missing (`private` applies only then).
        revision: a branch to commit to; created from `main` when it does not exist.
        token: a write token; defaults to `HF_TOKEN` or the stored login. Never written anywhere.
        adapter: push a LoRA adapter directory as an adapter (with `task_distill.json`) instead of merging it.
        eval_results: the evaluation module's results (dict or JSON file), added to the card and `model-index`.
        license: a Hub license id (e.g. `apache-2.0`), set in the card.
        include_training_args: also upload `training_args.bin` (the pickled `TrainingArguments`, which hold the
            local `output_dir`). Left out by default, so that no local path leaves the machine.
        dry_run_dir: write exactly the files that would be uploaded (card and plot included) into this folder and
            return their repo paths, without any network call; the local directory is still left unchanged.

    Raises:
        HubPushError: a Hub request failed (unreachable endpoint, refused token, server error).
        FileNotFoundError / ValueError: the directory is missing or is not a model or adapter directory.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    from . import __version__

    local = Path(local_dir)
    if not local.is_dir():
        raise FileNotFoundError(f"{local} is not a directory.")
    is_adapter = (local / "adapter_config.json").is_file()
    if not is_adapter and not (local / "config.json").is_file():
        raise ValueError(f"{local} holds neither config.json (a model) nor adapter_config.json (a LoRA adapter).")
    if adapter and not is_adapter:
        raise ValueError(f"adapter=True, but {local} has no adapter_config.json.")
    if adapter and not (local / SIDECAR_NAME).is_file():
        logger.warning("%s has no %s: the pushed adapter carries no unit selection.", local, SIDECAR_NAME)
    normalize_eval_results(eval_results)  # fail on a bad results file before any network call

    with tempfile.TemporaryDirectory(prefix="hf_taskdistill_push_") as tmp:
        staging = Path(tmp)
        files = _collect(local, include_training_args)
        merge = is_adapter and not adapter
        selection = _merge_adapter(local, staging, files, token) if merge else _selection_or_none(local)
        _stage_public_configs(staging, files)
        _prepare_card(local, staging, files, repo_id, merged=merge, adapter=is_adapter and adapter,
                      selection=selection, license=license, eval_results=eval_results)  # fmt: skip
        if dry_run_dir is not None:
            target = Path(dry_run_dir)
            for path_in_repo, file in sorted(files.items()):
                (target / path_in_repo).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, target / path_in_repo)
            logger.info("Dry run: %d files that a push to %s would upload written to %s.", len(files), repo_id, target)
            return sorted(files)

        # `constants.ENDPOINT` at call time (not huggingface_hub's import-time default `api`), so HF_ENDPOINT holds.
        api = HfApi(endpoint=constants.ENDPOINT, token=token, library_name="hf_taskdistill", library_version=__version__)  # fmt: skip
        logger.info("Pushing %d files from %s to %s on %s.", len(files), local, repo_id, api.endpoint)
        with _HubErrors(repo_id, api.endpoint, token) as errors:
            api.create_repo(repo_id, private=private, exist_ok=True)
            _ensure_branch(api, repo_id, revision, errors)
            errors.stage = "uploading the files (commit)"
            operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f)) for p, f in sorted(files.items())]
            message = commit_message or ("Upload merged distilled student" if merge else "Upload distilled student")
            return api.create_commit(repo_id, operations=operations, commit_message=message, revision=revision)


def trainer_push_to_hub(trainer, parent_push, *, token=None, revision=None, private=None, **kwargs):
    """The body of the trainers' `push_to_hub`: `parent_push` (transformers' `Trainer.push_to_hub`) with a missing
    `revision` branch created first and Hub errors raised as `HubPushError` (token scrubbed)."""
    from huggingface_hub import constants
    from transformers.utils.hub import hf_api

    token = token if token is not None else trainer.args.hub_token
    revision = revision if revision is not None else trainer.args.hub_revision
    repo_id = trainer.hub_model_id or trainer.args.hub_model_id or Path(trainer.args.output_dir).absolute().name
    output_dir = trainer.args.output_dir
    after = f"The model and card are saved in {output_dir}: retry, or `hf-taskdistill push --model_dir {output_dir}`."
    with _HubErrors(repo_id, constants.ENDPOINT, token, after) as errors:
        if revision and trainer.is_world_process_zero():
            if trainer.hub_model_id is None:
                trainer.init_hf_repo(token=token, private=private)
            _ensure_branch(hf_api(), trainer.hub_model_id, revision, errors, token=token)
        errors.stage = "pushing the output directory (create repo, upload)"
        return parent_push(token=token, revision=revision, private=private, **kwargs)


def _ensure_branch(api, repo_id: str, revision: str | None, errors: _HubErrors, token: str | None = None) -> None:
    """Create `revision` as a branch from `main` when it does not exist yet (commits to a missing branch fail)."""
    from huggingface_hub.errors import RevisionNotFoundError

    if not revision or revision == "main" or revision.startswith("refs/"):
        return
    errors.stage = f"checking the revision `{revision}`"
    try:
        api.repo_info(repo_id, revision=revision, token=token)
    except RevisionNotFoundError:
        errors.stage = f"creating the branch `{revision}`"
        api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)


class _HubErrors:
    """Re-raise Hub errors from the `with` body as `HubPushError`; `stage` says what was being done."""

    def __init__(
        self, repo_id: str, endpoint: str, token: str | None, after: str = "The local directory is unchanged."
    ):
        self.repo_id, self.endpoint, self.token, self.after = repo_id, endpoint, token, after
        self.stage = "creating the repository"

    def __enter__(self):
        return self

    def __exit__(self, exc_type, err, tb) -> bool:
        if isinstance(err, Exception) and _is_hub_error(err):
            # `from None`: the original chain may carry request details; the message keeps what matters.
            raise _hub_error(err, self.repo_id, self.endpoint, self.stage, self.token, self.after) from None
        return False


def _scrubbed_call(secret: str | None, fn, /, *args, **kwargs):
    """`fn(*args, **kwargs)`, with the token scrubbed from the message of an `OSError` / `ValueError` it raises (the
    traceback is kept; `hf_taskdistill.cli` prints the one-line message, or the traceback with `--debug`).
    `HubPushError` messages are scrubbed already."""
    try:
        return fn(*args, **kwargs)
    except HubPushError:
        raise
    except (OSError, ValueError) as err:
        scrubbed = _scrub(str(err), secret)
        if scrubbed == str(err):
            raise
        raise ValueError(scrubbed).with_traceback(err.__traceback__) from None


def main(argv: list[str] | None = None) -> int:
    """`hf-taskdistill push`: push a distilled local directory; returns 0 (errors are raised: `hf_taskdistill.cli`
    turns `HubPushError` into exit status 1 and other user mistakes into 2, each with a one-line message)."""
    parser = argparse.ArgumentParser(
        prog="hf-taskdistill push",
        description="Push a distilled local directory (weights, tokenizer, config with the unit selection, model "
        "card, unit-score plot) to the Hugging Face Hub. A LoRA adapter directory is merged into its base first.",
    )
    parser.add_argument("--model_dir", required=True, help="Directory written by the trainer (save_model).")
    parser.add_argument("--repo_id", required=True, help="Target repo, namespace/name.")
    parser.add_argument("--private", action="store_true", help="Create the repo as private (when it is created).")
    parser.add_argument("--revision", default=None, help="Branch to commit to; created when missing.")
    parser.add_argument("--adapter", action="store_true", help="Push a LoRA adapter as is instead of merging it.")
    parser.add_argument("--eval_results", default=None, help="JSON file written by `hf-taskdistill eval`.")
    parser.add_argument("--license", default=None, help="Hub license id for the card, e.g. apache-2.0.")
    parser.add_argument(
        "--include_training_args", action="store_true",
        help="Also upload training_args.bin (left out by default: it records the local output_dir path).",
    )  # fmt: skip
    parser.add_argument(
        "--dry_run", default=None, metavar="DIR",
        help="Write the files a push would upload (card, plot, config, weights) into DIR; no network call.",
    )  # fmt: skip
    parser.add_argument("--commit_message", default=None)
    parser.add_argument("--token", default=None, help="Write token; default: HF_TOKEN or the stored login.")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    info = _scrubbed_call(
        args.token,
        push_distilled,
        args.model_dir,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        token=args.token,
        adapter=args.adapter,
        commit_message=args.commit_message,
        eval_results=args.eval_results,
        license=args.license,
        include_training_args=args.include_training_args,
        dry_run_dir=args.dry_run,
    )
    if args.dry_run is not None:
        print(f"Dry run: {len(info)} files written to {args.dry_run} (nothing was uploaded): {', '.join(info)}")
        return 0
    print(info.commit_url)
    return 0
