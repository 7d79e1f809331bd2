"""Offline teacher: the cache format, its reader and every check a trainer runs (the build is `cache_build`).

Per example the cache holds a hash of its token ids, its row, and per completion position (the positions t with
`labels[t + 1] != -100`, `losses.valid_positions`) the teacher's top-K log-probabilities with the log of the mass left
outside them (`sparse_kd`), and the selected units of every matched layer, captured with the same `LayerTap` as
training (or the whole layer, for the projector baseline).

Layout of a cache directory::

    teacher_cache.json            header, written last (format version, teacher, tokenizer, selection, K, dtype, ...)
    cache_config.json             the requested configuration, written first (a resumed build must match it)
    shard-r00000-of-00001-00000.arrow  + .json   Arrow stream files (memory-mapped by `datasets`) and their metadata
    rank-00000-of-00001.done.json  one per rank once all its shards are written

A shard is written to a `.tmp` name and renamed only when complete (metadata first), so a killed build never
publishes half a shard; rerunning the build skips the complete shards. Under `torch.distributed` rank r takes the
examples i with i % world_size == r and writes its own shards; `TeacherCache` reads all of them as one view.

Training reads it through `CachedTeacherCollator`: the trainer's own collator builds the batch, then every row is
looked up by the hash of its (unpadded) token ids, so shuffling, gradient accumulation and the collator's own
truncation keep the alignment, and the cached values are scattered onto the batch's valid positions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .losses import valid_positions
from .provenance import model_reference
from .selection import UnitSelection


logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
HEADER_NAME = "teacher_cache.json"
CONFIG_NAME = "cache_config.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
# numpy carrier of each storage dtype (bf16 travels as its raw 16-bit pattern)
_NP = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32, "uint16": np.uint16, "int32": np.int32}
_VIEW = {"bfloat16": torch.bfloat16}


class TeacherCacheError(ValueError):
    """A cache that does not fit the training run, or is incomplete or corrupt; the message names the field."""


class TeacherCacheWriteError(OSError):
    """Writing the cache failed (disk full, read-only or unwritable directory); complete shards are kept."""


# ----------------------------------------------------------------------------------------------------------------
# fingerprints
# ----------------------------------------------------------------------------------------------------------------
def _sha(data: bytes | str, n: int = 16) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:n]


def token_hash(ids: Sequence[int] | torch.Tensor | np.ndarray) -> str:
    """Hash of a sequence of token ids (the key a batch row is looked up by)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    return hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=16).hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """`{"vocab_hash", "chat_template_hash", "vocab_size", "pad_token_id", "eos_token_id"}` of a tokenizer.

    The vocabulary hash covers the fast tokenizer's whole serialisation (model, merges, normaliser, added tokens)
    except its runtime truncation / padding state; the chat template is hashed separately so a mismatch can say which.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        vocab = json.dumps(state, sort_keys=True)
    else:
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return {
        "vocab_hash": _sha(vocab),
        "chat_template_hash": _sha(template or ""),
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def selection_fingerprint(selection: UnitSelection | None) -> str | None:
    """Hash of what the cache stores from a selection: the teacher layer and unit indices of every pair."""
    if selection is None:
        return None
    layers = [[ls.teacher_layer, ls.indices] for ls in selection.layers]
    return _sha(json.dumps(layers))


def _dataset_fingerprint(dataset) -> str:
    # Cheap resume guard (three rows and the length); the full check is `TeacherCache.check_dataset`.
    n = len(dataset)
    rows = [dataset[i] for i in sorted({0, n // 2, n - 1})] if n else []
    return _sha(json.dumps([n, rows], sort_keys=True, default=str))


def _normalise_dtype(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    dtype = _ALIASES.get(dtype, dtype)
    if dtype not in DTYPES:
        raise ValueError(f"cache dtype must be one of {sorted(DTYPES)} (or bf16/fp16/fp32), got {dtype!r}.")
    return dtype


def _to_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _from_bytes(buffers: list, dtype: str, width: int) -> torch.Tensor:
    """Concatenate raw buffers of one storage dtype into an (N, width) tensor (one copy)."""
    arr = np.concatenate([np.frombuffer(b, dtype=_NP[dtype]) for b in buffers]) if buffers else np.zeros(0, _NP[dtype])
    out = torch.from_numpy(arr.reshape(-1, width) if width else arr)
    return out.view(_VIEW[dtype]) if dtype in _VIEW else out


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class CachedTeacherBatch:
    """What a cached batch carries for the loss, popped from the trainer's `inputs` (`TeacherCache.pop_batch`).

    `topk_ids` (B, T, K) long, `topk_logprobs` (B, T, K) fp32 and `tail_logprob` (B, T) fp32 (`None` without logits);
    `units` maps a teacher layer to its (B, T, k) cached units in the storage dtype: a drop-in for the teacher tap's
    `outputs` dict. All are zero at positions that predict no completion token.
    """

    topk_ids: torch.Tensor | None
    topk_logprobs: torch.Tensor | None
    tail_logprob: torch.Tensor | None
    units: dict[int, torch.Tensor]


CACHE_KEYS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logprob")


class TeacherCache:
    """A complete teacher cache, memory-mapped: header, integrity checks, lookup by token hash, collator wrapper.

    Args:
        directory: the cache directory.
        verify: `"size"` (default: every shard exists with its recorded size and row count, cheap) or `"checksum"`
            (also the sha256 of every shard file: reads every byte once).

    Raises:
        TeacherCacheError: the directory holds no complete cache, a newer format, or a missing / truncated / corrupt
            shard (named).
    """

    def __init__(self, directory: str | os.PathLike, verify: str = "size"):
        if verify not in ("size", "checksum"):
            raise ValueError(f"verify must be 'size' or 'checksum', got {verify!r}.")
        self.directory = os.fspath(directory)
        self.header = self._read_header()
        self._verify = verify
        self._index: dict[str, tuple[int, int, int, int]] = {}
        self._hash_counts: Counter = Counter()
        self._open(verify)

    # ----- header and integrity -----
    def _read_header(self) -> dict:
        path = os.path.join(self.directory, HEADER_NAME)
        if not os.path.isfile(path):
            pending = ""
            config = os.path.join(self.directory, CONFIG_NAME)
            if os.path.isfile(config):
                with open(config) as f:
                    world = json.load(f)["world_size"]
                missing = [r for r in range(world) if not os.path.isfile(
                    os.path.join(self.directory, f"rank-{r:05d}-of-{world:05d}.done.json"))]  # fmt: skip
                pending = (
                    f" The build is unfinished (ranks {missing} not done): rerun the same cache command to resume."
                )
            raise TeacherCacheError(
                f"{self.directory} holds no complete teacher cache ({HEADER_NAME} missing).{pending}"
            )
        try:
            with open(path) as f:
                header = json.load(f)
        except json.JSONDecodeError as e:
            raise TeacherCacheError(f"{path} is not valid JSON ({e}): the cache header is corrupt; rebuild it.") from e
        version = header.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise TeacherCacheError(f"{path}: format_version must be a positive integer, got {version!r}.")
        if version > FORMAT_VERSION:
            raise TeacherCacheError(
                f"{path} has format_version {version}; this hf_taskdistill reads up to {FORMAT_VERSION}. Upgrade it."
            )
        if not header.get("complete"):
            raise TeacherCacheError(f"{path} describes an incomplete cache; rerun the cache command to finish it.")
        return header

    def _open(self, verify: str) -> None:
        from datasets import Dataset

        self._shards = []
        for meta in self.header["shards"]:
            path = os.path.join(self.directory, meta["name"])
            if not os.path.isfile(path):
                raise TeacherCacheError(f"Shard {meta['name']} of the cache {self.directory} is missing.")
            size = os.path.getsize(path)
            if size != meta["bytes"]:
                raise TeacherCacheError(
                    f"Shard {meta['name']} of the cache {self.directory} is truncated or altered: {size} bytes, "
                    f"{meta['bytes']} expected. Delete it and its .json and rerun the cache command to rebuild it."
                )
            if verify == "checksum" and _file_sha256(path) != meta["sha256"]:
                raise TeacherCacheError(f"Shard {meta['name']} of the cache {self.directory} fails its sha256 check.")
            try:
                shard = Dataset.from_file(path)
            except Exception as e:  # pyarrow raises ArrowInvalid & co. on a damaged stream
                raise TeacherCacheError(f"Shard {meta['name']} of the cache {self.directory} is corrupt: {e}") from e
            if len(shard) != meta["num_examples"]:
                raise TeacherCacheError(
                    f"Shard {meta['name']} holds {len(shard)} examples, its metadata says {meta['num_examples']}."
                )
            self._shards.append(shard)
        self._index, self._hash_counts = {}, Counter()
        for s, shard in enumerate(self._shards):
            table = shard.data
            columns = (table.column(c).to_pylist() for c in ("hash", "row", "num_tokens"))
            for r, (h, row, n) in enumerate(zip(*columns, strict=True)):
                self._index.setdefault(h, (s, r, row, n))  # (shard, row in shard, dataset row, completion tokens)
                self._hash_counts[h] += 1

    def __getstate__(self):  # DataLoader workers: reopen the memory maps on the other side
        return {"directory": self.directory, "verify": self._verify}

    def __setstate__(self, state):
        self.__init__(state["directory"], verify="size")

    # ----- properties -----
    def __len__(self) -> int:
        return self.header["num_examples"]

    @property
    def top_k(self) -> int:
        return self.header["top_k"]

    @property
    def selection(self) -> UnitSelection | None:
        """The unit selection the cache was built with (`None` for a logits-only cache)."""
        stored = self.header.get("selection")
        return None if stored is None else UnitSelection.from_dict(stored)

    @property
    def dataset(self):
        """All shards as one memory-mapped `datasets.Dataset` (columns: row, hash, num_tokens, raw tensor bytes)."""
        from datasets import concatenate_datasets

        return concatenate_datasets(self._shards)

    def bytes_per_token(self) -> float:
        """Shard bytes on disk per cached completion token."""
        return sum(s["bytes"] for s in self.header["shards"]) / max(1, self.header["num_tokens"])

    # ----- checks a trainer runs before the first step -----
    def check_compatible(
        self,
        *,
        tokenizer=None,
        selection: UnitSelection | None = None,
        max_length: int | None = None,
        template: str | None = None,
        teacher: str | None = None,
        teacher_revision: str | None = None,
        temperature: float | None = None,
        need_logits: bool = False,
    ) -> None:
        """Raise `TeacherCacheError` naming the first setting that differs from the cache's.

        Each argument given is compared (`None` skips it): the tokenizer (vocabulary and chat template separately),
        the selection (teacher layers and indices; a full-layer cache serves any selection of its layers), `max_length`,
        the template name, the teacher (`provenance.model_reference` of a name or path: a Hub id with its revision, a
        local folder by its name), the temperature, and, with `need_logits`, that the cache holds top-K logits.
        """
        h = self.header
        where = f"The teacher cache {self.directory}"
        if tokenizer is not None:
            fp = tokenizer_fingerprint(tokenizer)
            for key, label in (("vocab_hash", "tokenizer (vocabulary)"), ("chat_template_hash", "template (chat template)"), ("vocab_size", "tokenizer size"),
                               ("pad_token_id", "pad token"), ("eos_token_id", "eos token")):  # fmt: skip
                if fp[key] != h["tokenizer"].get(key):
                    raise TeacherCacheError(
                        f"{where} was built for another {label}: {key} {h['tokenizer'].get(key)!r} in the cache, "
                        f"{fp[key]!r} now. Rebuild the cache with this tokenizer."
                    )
        if template is not None and h.get("template") is not None and template != h["template"]:
            raise TeacherCacheError(f"{where} was built with template {h['template']!r}, training uses {template!r}.")
        if max_length is not None and max_length != h.get("max_length"):
            raise TeacherCacheError(
                f"{where} was built with max_length={h.get('max_length')}, training uses max_length={max_length}: "
                "the truncated token windows differ. Rebuild it with this max_length."
            )
        if temperature is not None and float(temperature) != h.get("temperature", 1.0):
            raise TeacherCacheError(f"{where} holds teacher log-probs at temperature {h.get('temperature')}, "
                                    f"training uses {temperature}.")  # fmt: skip
        if teacher is not None:
            ref, stored = model_reference(teacher, teacher_revision), h["teacher"]
            if not (stored.get("model_id") or stored.get("local_name")):
                logger.warning(
                    "%s records no teacher name (built from an unnamed in-memory model): not checked.", where
                )
                stored = ref
            same = ref["model_id"] == stored.get("model_id") and ref["local_name"] == stored.get("local_name")
            if same and ref["model_id"] and ref["revision"] and stored.get("revision"):
                same = ref["revision"] == stored["revision"]
            if not same:
                raise TeacherCacheError(f"{where} was built for teacher {_ref_text(stored)}, training names teacher "
                                        f"{_ref_text(ref)}. Rebuild the cache with this teacher.")  # fmt: skip
        if need_logits and not h.get("top_k"):
            raise TeacherCacheError(f"{where} stores no teacher logits (top_k=0); logit KD needs top_k > 0.")
        if selection is not None:
            self._check_selection(selection, where)

    def _check_selection(self, selection: UnitSelection, where: str) -> None:
        h = self.header
        layers = h.get("layers") or []
        wanted = [ls.teacher_layer for ls in selection.layers]
        have = [layer["teacher_layer"] for layer in layers]
        if not have:
            raise TeacherCacheError(f"{where} holds teacher logits only, no units: the feature term needs a cache "
                                    "built with a selection.")  # fmt: skip
        if wanted != have:
            raise TeacherCacheError(f"{where} holds units of teacher layers {have}, the selection uses {wanted}.")
        for ls, layer in zip(selection.layers, layers, strict=True):
            if layer["full"]:
                continue  # the whole layer is stored: any indices can be gathered from it
            if ls.indices is None:
                raise TeacherCacheError(f"{where} holds selected units only; the projector baseline needs the whole "
                                        "layer (rebuild with full_layer=True).")  # fmt: skip
        if not h.get("full_layer") and selection_fingerprint(selection) != h.get("selection_hash"):
            stored = UnitSelection.from_dict(h["selection"])
            first = next((i for i, (a, b) in enumerate(zip(stored.layers, selection.layers, strict=True))
                          if a.indices != b.indices), 0)  # fmt: skip
            raise TeacherCacheError(
                f"{where} was built for another unit selection (hash {h.get('selection_hash')}, now "
                f"{selection_fingerprint(selection)}): layer pair {first} stores other teacher units. Train with the "
                "cache's own selection (`TeacherCache.selection`) or rebuild the cache."
            )

    def example_keys(self, dataset, collator, batch_size: int = 256) -> list[tuple[str, int]]:
        """(token hash, number of completion positions) of every example of `dataset` as `collator` makes it."""
        from torch.utils.data import DataLoader

        keys = []
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
            mask = valid_positions(batch["labels"]) & batch["attention_mask"].bool()
            for b in range(batch["input_ids"].shape[0]):
                ids = batch["input_ids"][b][batch["attention_mask"][b].bool()]
                keys.append((token_hash(ids), int(mask[b].sum())))
        return keys

    def check_dataset(self, dataset, collator, allow_extra: bool = False, batch_size: int = 256) -> None:
        """Raise `TeacherCacheError` unless the cache holds exactly the examples of `dataset`.

        Every example is tokenised by `collator` (the trainer's own, before wrapping) and looked up by its token hash:
        an example missing from the cache, one whose number of completion positions differs, or (unless
        `allow_extra`, e.g. for a subset) a cached example absent from the dataset raises, naming the rows.
        """
        keys = self.example_keys(dataset, collator, batch_size)
        where = f"The teacher cache {self.directory}"
        missing = [i for i, (h, _) in enumerate(keys) if h not in self._index]
        if missing:
            raise TeacherCacheError(
                f"{where} lacks {len(missing)} of the {len(keys)} training examples (dataset rows {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}): their token ids hash to nothing in the cache. The data, its "
                "order-independent content, the template or max_length changed since the build: rebuild the cache."
            )
        for i, (h, n) in enumerate(keys):
            _, _, row, cached = self._index[h]
            if cached != n:
                raise TeacherCacheError(
                    f"{where}: dataset row {i} has {n} completion positions, the cache {cached} for the same tokens "
                    f"(cache row {row}): the labels were built differently (collator or completion mask)."
                )
        if not allow_extra:
            extra = Counter(self._hash_counts)
            extra.subtract(Counter(h for h, _ in keys))
            surplus = [self._index[h][2] for h, c in extra.items() if c > 0]
            if surplus:
                raise TeacherCacheError(
                    f"{where} holds {len(surplus)} example(s) that are not in the training set (cache rows "
                    f"{sorted(surplus)[:5]}): it was built for other data. Rebuild it, or pass allow_extra=True to "
                    "train on a subset of the cached examples."
                )

    # ----- lookup -----
    def _records(self, hashes: list[str], columns: list[str]) -> list[dict]:
        out = []
        for h in hashes:
            s, r, row, n = self._index[h]
            table = self._shards[s].data  # memory-mapped Arrow: only these cells are touched, without a copy
            out.append({"row": row, "num_tokens": n, **{c: table.column(c)[r].as_buffer() for c in columns}})
        return out

    def lookup(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """The cached tensors aligned to a collated batch (see `CachedTeacherCollator`)."""
        h = self.header
        mask = valid_positions(labels) & attention_mask.bool()  # (B, T)
        bsz, seq = mask.shape
        hashes = []
        for b in range(bsz):
            key = token_hash(input_ids[b][attention_mask[b].bool()])
            if key not in self._index:
                raise TeacherCacheError(
                    f"Batch row {b} (token hash {key}) is not in the teacher cache {self.directory}: the example "
                    "was not cached, or its tokens differ from the build (data, template, max_length or collator)."
                )
            hashes.append(key)
        columns = [f"units_{i}" for i in range(len(h.get("layers") or []))]
        if h["top_k"]:
            columns += ["topk_ids", "topk_logprobs", "tail_logprob"]
        records = self._records(hashes, columns)
        counts = mask.sum(dim=1).tolist()
        for b, (rec, n) in enumerate(zip(records, counts, strict=True)):
            if rec["num_tokens"] != n:
                raise TeacherCacheError(
                    f"Batch row {b} (cache row {rec['row']}) has {n} completion positions, the cache "
                    f"{rec['num_tokens']}: the labels differ from the build's (collator or completion mask)."
                )
        where = mask.nonzero(as_tuple=True)  # row-major: rows in order, positions ascending, as cached
        out: dict[str, Any] = {}
        if h["top_k"]:
            k = h["top_k"]
            ids = torch.zeros(bsz, seq, k, dtype=torch.long)
            ids[where] = _from_bytes([r["topk_ids"] for r in records], h["id_dtype"], k).long()
            logp = torch.zeros(bsz, seq, k, dtype=torch.float32)
            logp[where] = _from_bytes([r["topk_logprobs"] for r in records], h["dtype"], k).float()
            tail = torch.zeros(bsz, seq, dtype=torch.float32)
            tail[where] = _from_bytes([r["tail_logprob"] for r in records], "float32", 0)
            out.update(teacher_topk_ids=ids, teacher_topk_logprobs=logp, teacher_tail_logprob=tail)
        for i, layer in enumerate(h.get("layers") or []):
            units = torch.zeros(bsz, seq, layer["width"], dtype=DTYPES[h["dtype"]])
            units[where] = _from_bytes([r[f"units_{i}"] for r in records], h["dtype"], layer["width"])
            out[f"teacher_units_{i}"] = units
        return out

    def wrap_collator(self, collator: Callable) -> CachedTeacherCollator:
        """The trainer's collator, with the cached tensors added to every batch."""
        return CachedTeacherCollator(collator, self)

    def pop_batch(self, inputs: dict[str, Any], selection: UnitSelection | None = None) -> CachedTeacherBatch:
        """Remove the cached tensors from `inputs` (so the model call never sees them) and return them.

        With `selection` and a full-layer cache, the selected units of each pair are gathered from the whole layer
        (no gather for a projector selection, whose indices are `None`).
        """
        layers = self.header.get("layers") or []
        units = {}
        for i, layer in enumerate(layers):
            value = inputs.pop(f"teacher_units_{i}", None)
            if value is None:
                raise TeacherCacheError(f"The batch carries no `teacher_units_{i}`: wrap the collator with "
                                        "`TeacherCache.wrap_collator`.")  # fmt: skip
            if selection is not None and layer["full"] and selection.layers[i].indices is not None:
                index = torch.tensor(selection.layers[i].indices, device=value.device)
                value = value.index_select(-1, index)  # (B, T, k) selected units of the whole stored layer
            units[layer["teacher_layer"]] = value
        return CachedTeacherBatch(*(inputs.pop(k, None) for k in CACHE_KEYS), units=units)


def _ref_text(ref: dict) -> str:
    if ref.get("model_id"):
        return f"{ref['model_id']}" + (f"@{ref['revision']}" if ref.get("revision") else "")
    return f"{ref.get('local_name')!r} (local)"


class CachedTeacherCollator:
    """Wraps a trainer's collator: the same batch, plus the cached teacher tensors aligned to its positions.

    Added keys (all zero where a position predicts no completion token): `teacher_topk_ids` (B, T, K) long,
    `teacher_topk_logprobs` (B, T, K) fp32, `teacher_tail_logprob` (B, T) fp32 (when the cache has logits), and
    `teacher_units_{i}` (B, T, k_i) per layer pair i, in the cache's storage dtype. Rows are matched by the hash of
    their unpadded token ids (`attention_mask`), so shuffling and gradient accumulation do not matter; a row that is
    not cached, or whose completion positions differ, raises `TeacherCacheError` naming it.
    """

    def __init__(self, collator: Callable, cache: TeacherCache):
        self.collator = collator
        self.cache = cache

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        batch = self.collator(examples)
        if "attention_mask" not in batch or "labels" not in batch:
            raise TeacherCacheError("Training from a teacher cache needs batches with attention_mask and labels "
                                    "(padding-free / packed batches are not supported).")  # fmt: skip
        batch.update(self.cache.lookup(batch["input_ids"], batch["attention_mask"], batch["labels"]))
        return batch

    def __getattr__(self, name):  # e.g. `max_length`, `tokenizer` of the wrapped collator
        if name in ("collator", "cache"):
            raise AttributeError(name)
        return getattr(self.collator, name)


def open_teacher_cache(
    directory: str | os.PathLike,
    *,
    tokenizer=None,
    selection: UnitSelection | None = None,
    max_length: int | None = None,
    template: str | None = None,
    teacher: str | None = None,
    temperature: float | None = None,
    need_logits: bool = False,
    dataset=None,
    collator: Callable | None = None,
    allow_extra: bool = False,
    verify: str = "size",
) -> TeacherCache:
    """Open a cache and run every check a trainer needs before its first step (one call for `__init__`).

    Integrity (header, shards), then `TeacherCache.check_compatible` with the given settings, then, with `dataset`
    and `collator` (the trainer's own, unwrapped), `TeacherCache.check_dataset`. Raises `TeacherCacheError` naming
    the mismatch.
    """
    cache = TeacherCache(directory, verify=verify)
    cache.check_compatible(tokenizer=tokenizer, selection=selection, max_length=max_length, template=template,
                           teacher=teacher, temperature=temperature, need_logits=need_logits)  # fmt: skip
    if dataset is not None:
        if collator is None:
            raise ValueError("check_dataset needs the trainer's collator next to the dataset.")
        cache.check_dataset(dataset, collator, allow_extra=allow_extra)
    return cache
