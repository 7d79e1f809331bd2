"""Building a teacher cache: one teacher pass over a training set, written shard by shard (see `cache` for the
format, the reader and the checks a trainer runs).

A shard is written to a `.tmp` name and renamed only when complete (metadata first), so a killed build never
publishes half a shard; rerunning the build skips the complete shards. Under `torch.distributed` rank r takes the
examples i with i % world_size == r and writes its own shards.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .cache import (
    _NP,
    CONFIG_NAME,
    DTYPES,
    FORMAT_VERSION,
    HEADER_NAME,
    TeacherCache,
    TeacherCacheError,
    TeacherCacheWriteError,
    _dataset_fingerprint,
    _file_sha256,
    _normalise_dtype,
    _to_bytes,
    selection_fingerprint,
    token_hash,
    tokenizer_fingerprint,
)
from .losses import valid_positions
from .provenance import model_reference
from .selection import UnitSelection, load_unit_selection


logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# writing, atomically
# ----------------------------------------------------------------------------------------------------------------
def _write_error(exc: OSError, what: str, directory: str) -> TeacherCacheWriteError:
    if exc.errno == errno.ENOSPC:
        hint = "the disk is full. Free space or choose another cache directory"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "the directory is read-only or not writable. Choose a writable cache directory"
    else:
        hint = f"{exc.strerror or exc}. Check the directory"
    return TeacherCacheWriteError(
        exc.errno, f"Cannot write {what} in {directory}: {hint}; complete shards are kept and rerunning the same "
        "build resumes from them."
    )  # fmt: skip


def _atomic_write_json(path: str, data: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise _write_error(e, os.path.basename(path), os.path.dirname(path)) from e


def check_output_dir(directory: str | os.PathLike) -> str:
    """Create `directory` and prove it is writable (a probe file), raising `TeacherCacheWriteError` otherwise.

    Called before any expensive work (the teacher load in the CLI, the teacher pass in `build_teacher_cache`).
    """
    directory = os.fspath(directory)
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write-probe-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        raise _write_error(e, "the cache", directory) from e
    return directory


def _shard_name(rank: int, world: int, index: int) -> str:
    return f"shard-r{rank:05d}-of-{world:05d}-{index:05d}.arrow"


class _ShardWriter:
    """Streams record batches into `<name>.tmp`; `publish()` writes the metadata, then renames the shard."""

    def __init__(self, directory: str, name: str, features):
        from datasets.arrow_writer import ArrowWriter

        self.directory, self.name = directory, name
        self.path = os.path.join(directory, name)
        self.tmp = self.path + ".tmp"
        self.num_examples = self.num_tokens = 0
        try:
            self._writer = ArrowWriter(features=features, path=self.tmp)
        except OSError as e:
            raise _write_error(e, f"shard {name}", directory) from e

    def write(self, records: dict[str, list]) -> None:
        try:
            self._writer.write_batch(records)
        except OSError as e:
            self.abort()
            raise _write_error(e, f"shard {self.name}", self.directory) from e
        self.num_examples += len(records["row"])
        self.num_tokens += sum(records["num_tokens"])

    def publish(self, extra: dict) -> dict:
        try:
            self._writer.finalize()
            self._writer.close()
            with open(self.tmp, "rb+") as f:
                os.fsync(f.fileno())
            meta = {"name": self.name, "num_examples": self.num_examples, "num_tokens": self.num_tokens,
                    "bytes": os.path.getsize(self.tmp), "sha256": _file_sha256(self.tmp), **extra}  # fmt: skip
        except OSError as e:
            self.abort()
            raise _write_error(e, f"shard {self.name}", self.directory) from e
        try:
            _atomic_write_json(self.path[: -len(".arrow")] + ".json", meta)
        except TeacherCacheWriteError:
            self.abort()
            raise
        os.replace(self.tmp, self.path)  # the shard exists under its final name only now
        return meta

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        with contextlib.suppress(OSError):
            os.remove(self.tmp)


# ----------------------------------------------------------------------------------------------------------------
# the teacher pass
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """What one build stores: K, dtypes, per-pair teacher layer, indices and width."""

    top_k: int
    dtype: str
    id_dtype: str
    full_layer: bool
    layers: list[int] = field(default_factory=list)
    indices: list[list[int] | None] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)

    def features(self):
        from datasets import Features, Value

        cols = {"row": Value("int64"), "hash": Value("string"), "num_tokens": Value("int32")}
        if self.top_k:
            cols.update(topk_ids=Value("binary"), topk_logprobs=Value("binary"), tail_logprob=Value("binary"))
        cols.update({f"units_{i}": Value("binary") for i in range(len(self.layers))})
        return Features(cols)


def _dist_info(rank: int | None, world_size: int | None) -> tuple[int, int, bool]:
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}.")
    return rank, world_size, initialised


def _teacher_head(teacher):
    """(backbone, lm_head) when logits are a plain linear map of the backbone output, else None (full forward)."""
    cfg = teacher.config.get_text_config()
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None
    head = teacher.get_output_embeddings()
    backbone = getattr(teacher, "base_model", None)
    if head is None or backbone is None or backbone is teacher:
        return None
    return backbone, head


def _examples_of(dataset, indices: list[int]):
    return dataset.select(indices) if hasattr(dataset, "select") else [dataset[i] for i in indices]


def build_teacher_cache(
    teacher,
    dataset,
    collator: Callable[[list[dict]], dict[str, torch.Tensor]],
    output_dir: str | os.PathLike,
    *,
    tokenizer,
    selection: UnitSelection | str | None = None,
    top_k: int = 64,
    dtype: str | torch.dtype = "bfloat16",
    full_layer: bool = False,
    max_length: int | None = None,
    template: str | None = None,
    temperature: float = 1.0,
    batch_size: int = 8,
    shard_size: int = 1024,
    teacher_name_or_path: str | None = None,
    teacher_revision: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    show_progress: bool = True,
    logits_chunk: int = 2048,
) -> TeacherCache | None:
    """Run `teacher` once over `dataset` (no gradient) and write the cache into `output_dir`.

    Args:
        teacher: the frozen teacher (`eval()` is set; its device is used).
        dataset: the training examples, in the form `collator` takes (GKD host: a `messages` dataset; SFT host: the
            SFT-prepared dataset). The token ids the collator makes are the lookup keys at training time, so build with
            the collator and `max_length` training uses; a cache built with TRL's `DataCollatorForChatML` also serves
            the SFT host when both tokenise alike (they do for chat-template prompt/completion data).
        collator: returns `input_ids`, `attention_mask` and `labels` (-100 = not supervised).
        output_dir: the cache directory (created; a partial build there is resumed if its configuration matches).
        tokenizer: the tokenizer (fingerprinted into the header).
        selection: a `UnitSelection` (or anything `load_unit_selection` reads) whose teacher units are stored;
            `None` stores logits only.
        top_k: K, the teacher tokens kept per position (0: units only, e.g. for the SFT host).
        dtype: storage dtype of the units and top-K log-probs: `bfloat16`, `float16` or `float32` (ids are uint16
            when the vocabulary fits, else int32; the tail is always fp32).
        full_layer: store the whole teacher layer of every pair (projector baseline, or any later selection of it).
        max_length: the collator's window (read from `collator.max_length` when it has one).
        template: the prompt template name (`chat` / `alpaca`), recorded and checked at training time.
        temperature: divides the teacher logits before the softmax; training must use the same value.
        batch_size / shard_size: examples per teacher forward / per shard file.
        teacher_name_or_path / teacher_revision: the teacher's reference for the header (default: from the model;
            a local path is recorded by its folder name only, `provenance.model_reference`).
        rank / world_size: this process's share (default: from `torch.distributed`, else 0 / 1).
        logits_chunk: completion positions projected through the LM head at a time.

    Returns:
        The opened `TeacherCache` once every rank has finished (this one last), else `None`.

    Raises:
        TeacherCacheWriteError: the directory is not writable or the disk fills up (before any teacher work for the
            former; complete shards are kept for the latter).
        TeacherCacheError: `output_dir` holds a partial cache for another configuration.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from .hooks import LayerTap

    rank, world_size, distributed = _dist_info(rank, world_size)
    output_dir = check_output_dir(output_dir)
    dtype = _normalise_dtype(dtype)
    if selection is not None and not isinstance(selection, UnitSelection):
        selection = load_unit_selection(selection)
    collator_max = getattr(collator, "max_length", None)
    if max_length is None:
        max_length = collator_max
    elif collator_max is not None and collator_max != max_length:
        raise ValueError(f"max_length={max_length} differs from the collator's max_length={collator_max}.")
    t_cfg = teacher.config.get_text_config()
    vocab = t_cfg.vocab_size
    if top_k < 0 or top_k > vocab:
        raise ValueError(f"top_k must be in 0..{vocab} (the teacher's vocabulary), got {top_k}.")
    if top_k == 0 and selection is None:
        raise ValueError("Nothing to cache: top_k=0 and no unit selection. Give a selection or top_k > 0.")
    if len(tokenizer) > vocab:
        raise ValueError(f"The tokenizer has {len(tokenizer)} tokens, more than the teacher's vocab_size {vocab}.")
    plan = _Plan(top_k, dtype, "uint16" if vocab <= 65536 else "int32", full_layer)
    if selection is not None:
        if selection.teacher_hidden_size != t_cfg.hidden_size:
            raise TeacherCacheError(
                f"The selection was made for a teacher of hidden size {selection.teacher_hidden_size}, this teacher "
                f"has {t_cfg.hidden_size}."
            )
        for ls in selection.layers:
            full = full_layer or ls.indices is None
            plan.layers.append(ls.teacher_layer)
            plan.indices.append(None if full else list(ls.indices))
            plan.widths.append(t_cfg.hidden_size if full else len(ls.indices))
        plan.full_layer = full_layer or any(i is None for i in plan.indices)

    reference = model_reference(teacher_name_or_path or teacher, teacher_revision)
    config = {
        "format_version": FORMAT_VERSION,
        "teacher": reference,
        "teacher_config": {
            "model_type": t_cfg.model_type,
            "hidden_size": t_cfg.hidden_size,
            "num_hidden_layers": t_cfg.num_hidden_layers,
            "vocab_size": vocab,
        },
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": template,
        "max_length": max_length,
        "top_k": top_k,
        "dtype": dtype,
        "id_dtype": plan.id_dtype,
        "temperature": float(temperature),
        "full_layer": plan.full_layer,
        "layers": [
            {"teacher_layer": layer, "width": w, "full": idx is None}
            for layer, w, idx in zip(plan.layers, plan.widths, plan.indices, strict=True)
        ],
        "selection": None if selection is None else selection.to_dict(),
        "selection_hash": selection_fingerprint(selection),
        "num_examples": len(dataset),
        "dataset_fingerprint": _dataset_fingerprint(dataset),
        "world_size": world_size,
        "shard_size": shard_size,
        "collator": type(collator).__name__,
    }
    _claim_directory(output_dir, config)
    if os.path.isfile(os.path.join(output_dir, HEADER_NAME)):
        logger.info("%s already holds this teacher cache, complete: nothing to do.", output_dir)
        return TeacherCache(output_dir)

    # this rank's examples, cut into shards; complete shards (final name + metadata) are skipped
    mine = list(range(rank, len(dataset), world_size))
    shards = [mine[i : i + shard_size] for i in range(0, len(mine), shard_size)]
    for name in os.listdir(output_dir):
        if name.startswith(f"shard-r{rank:05d}-") and name.endswith(".tmp"):
            os.remove(os.path.join(output_dir, name))  # left by a killed build: never published
    done = [j for j in range(len(shards)) if _complete_shard(output_dir, _shard_name(rank, world_size, j))]
    todo = [j for j in range(len(shards)) if j not in done]
    if done:
        logger.info("Resuming the cache build of rank %d: %d of %d shards already complete.", rank, len(done),
                    len(shards))  # fmt: skip

    teacher.eval()
    device = next(teacher.parameters()).device
    head = _teacher_head(teacher)
    gather = {}
    for layer, idx in zip(plan.layers, plan.indices, strict=True):
        if idx is not None and plan.layers.count(layer) == 1:
            gather[layer] = torch.tensor(idx, dtype=torch.long, device=device)
    tap = LayerTap(teacher, plan.layers, gather, detach=True) if plan.layers else None
    features = plan.features()
    progress = tqdm(total=len(mine), initial=sum(len(shards[j]) for j in done), desc=f"teacher cache (rank {rank})",
                    unit="ex", disable=not show_progress)  # fmt: skip
    start = time.perf_counter()
    try:
        for j in todo:
            writer = _ShardWriter(output_dir, _shard_name(rank, world_size, j), features)
            loader = DataLoader(_examples_of(dataset, shards[j]), batch_size=batch_size, collate_fn=collator)
            offset = 0
            for batch in loader:
                rows = shards[j][offset : offset + batch["input_ids"].shape[0]]
                offset += len(rows)
                records = _cache_batch(teacher, head, tap, plan, batch, rows, device, temperature, logits_chunk)
                writer.write(records)
                progress.update(len(rows))
            meta = writer.publish({"rank": rank, "world_size": world_size, "index": j,
                                   "first_row": shards[j][0], "last_row": shards[j][-1]})  # fmt: skip
            _check_free_space(output_dir, meta, sum(len(shards[i]) for i in todo if i > j))
    finally:
        progress.close()
        if tap is not None:
            tap.remove()
    seconds = time.perf_counter() - start
    names = [_shard_name(rank, world_size, j) for j in range(len(shards))]
    _atomic_write_json(os.path.join(output_dir, f"rank-{rank:05d}-of-{world_size:05d}.done.json"),
                       {"rank": rank, "shards": names, "seconds": seconds, "num_examples": len(mine)})  # fmt: skip
    if distributed:
        torch.distributed.barrier()
        if rank != 0:
            return None
    return _finalize(output_dir, config)


def _check_free_space(directory: str, meta: dict, remaining_examples: int) -> None:
    """Fail fast when the shards still to write will not fit: estimated from the shard just written."""
    if not remaining_examples:
        return
    need = meta["bytes"] / max(1, meta["num_examples"]) * remaining_examples
    free = shutil.disk_usage(directory).free
    if need > free:
        raise TeacherCacheWriteError(
            errno.ENOSPC, f"The teacher cache in {directory} needs about {need / 2**30:.2f} GiB more for "
            f"{remaining_examples} examples (estimated from shard {meta['name']}), but only {free / 2**30:.2f} GiB "
            "are free: the disk is full before the end. Free space or choose another cache directory; complete "
            "shards are kept and rerunning the same build resumes from them.",
        )  # fmt: skip


def _cache_batch(teacher, head, tap, plan: _Plan, batch, rows, device, temperature, chunk) -> dict:
    """One collated batch through the teacher: the Arrow records of its examples (completion positions only)."""
    from .sparse_kd import topk_with_tail

    for key in ("input_ids", "attention_mask", "labels"):
        if key not in batch:
            raise ValueError(
                f"The collator's batch has no `{key}`; the cache needs input_ids, attention_mask, labels."
            )
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    mask = valid_positions(batch["labels"]).to(device) & attention_mask.bool()
    counts = mask.sum(dim=1).tolist()
    capture = tap.capture() if tap is not None else contextlib.nullcontext({})
    with torch.no_grad(), capture as captured:
        if plan.top_k and head is not None:
            backbone, lm_head = head
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            hidden = hidden[mask]  # (N, H): only completion positions go through the LM head
            parts = [topk_with_tail(lm_head(hidden[i : i + chunk]), plan.top_k, temperature)
                     for i in range(0, max(1, hidden.shape[0]), chunk)]  # fmt: skip
        elif plan.top_k:
            logits = teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[mask]
            parts = [topk_with_tail(logits[i : i + chunk], plan.top_k, temperature)
                     for i in range(0, max(1, logits.shape[0]), chunk)]  # fmt: skip
        else:  # units only: the backbone is enough
            teacher.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            parts = []
    records: dict[str, list] = {"row": list(rows), "num_tokens": counts, "hash": []}
    for b in range(input_ids.shape[0]):
        records["hash"].append(token_hash(input_ids[b][attention_mask[b].bool()]))
    store = DTYPES[plan.dtype]
    if plan.top_k:
        ids, logp, tail = (torch.cat(x) for x in zip(*parts, strict=True))
        ids = ids.cpu().numpy().astype(_NP[plan.id_dtype])
        logp, tail = logp.to(store).cpu(), tail.float().cpu()
        splits = np.cumsum([0] + counts)
        records["topk_ids"] = [ids[s:e].tobytes() for s, e in itertools.pairwise(splits)]
        records["topk_logprobs"] = [_to_bytes(logp[s:e]) for s, e in itertools.pairwise(splits)]
        records["tail_logprob"] = [_to_bytes(tail[s:e]) for s, e in itertools.pairwise(splits)]
    for i, (layer, idx) in enumerate(zip(plan.layers, plan.indices, strict=True)):
        hidden = captured[layer]  # (B, T, k) selected units (gathered in the tap), or the whole layer
        if idx is not None and layer not in tap.gather:
            hidden = hidden.index_select(-1, torch.tensor(idx, device=hidden.device))
        units = hidden[mask].to(store).cpu()  # (N, k)
        splits = np.cumsum([0] + counts)
        records[f"units_{i}"] = [_to_bytes(units[s:e]) for s, e in itertools.pairwise(splits)]
    return records


def _claim_directory(output_dir: str, config: dict) -> None:
    path = os.path.join(output_dir, CONFIG_NAME)
    if os.path.isfile(path):
        with open(path) as f:
            existing = json.load(f)
        # the selection is compared by its hash (indices): re-scoring on a resume changes only its diagnostics
        diff = _diff({k: v for k, v in existing.items() if k != "selection"},
                     {k: v for k, v in config.items() if k != "selection"})  # fmt: skip
        if diff:
            raise TeacherCacheError(
                f"{output_dir} already holds a (partial) teacher cache built with other settings: {diff}. Use "
                "another cache directory, or delete this one to rebuild."
            )
        return
    _atomic_write_json(path, config)


def _diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "; ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} requested" for k in keys)


def _complete_shard(directory: str, name: str) -> bool:
    path = os.path.join(directory, name)
    meta = path[: -len(".arrow")] + ".json"
    if not (os.path.isfile(path) and os.path.isfile(meta)):
        return False
    with open(meta) as f:
        return json.load(f).get("bytes") == os.path.getsize(path)


def _finalize(output_dir: str, config: dict) -> TeacherCache | None:
    """Write the header once every rank is done (whichever rank finishes last); returns the opened cache."""
    world = config["world_size"]
    markers = [os.path.join(output_dir, f"rank-{r:05d}-of-{world:05d}.done.json") for r in range(world)]
    if not all(os.path.isfile(m) for m in markers):
        return None
    shards, seconds = [], []
    for marker in markers:
        with open(marker) as f:
            done = json.load(f)
        seconds.append(done["seconds"])
        for name in done["shards"]:
            with open(os.path.join(output_dir, name[: -len(".arrow")] + ".json")) as f:
                shards.append(json.load(f))
    num_examples = sum(s["num_examples"] for s in shards)
    if num_examples != config["num_examples"]:
        raise TeacherCacheError(f"The shards hold {num_examples} examples, the dataset {config['num_examples']}.")
    header = {**config, "complete": True, "library_version": _library_version(),
              "num_tokens": sum(s["num_tokens"] for s in shards), "shards": shards,
              "build_seconds_per_rank": seconds}  # fmt: skip
    _atomic_write_json(os.path.join(output_dir, HEADER_NAME), header)
    return TeacherCache(output_dir)


def _library_version() -> str:
    from .selection import _library_version as version

    return version()
