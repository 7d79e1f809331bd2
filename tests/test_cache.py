"""The offline teacher: sparse top-K + tail KD math, the cache build / resume / shards, its reader and every check.

Tiny toy Llamas and the generated toy task (`hf_taskdistill.toy`); no network, no shared data.
"""

import errno
import json
import os
import random

import pytest
import torch
from datasets import Dataset
from trl.experimental.gkd import GKDTrainer
from trl.experimental.utils import DataCollatorForChatML

from hf_taskdistill import cache_build as build_mod
from hf_taskdistill.cache import (
    TeacherCache,
    TeacherCacheError,
    TeacherCacheWriteError,
    open_teacher_cache,
)
from hf_taskdistill.cache_build import build_teacher_cache
from hf_taskdistill.hooks import LayerTap
from hf_taskdistill.losses import valid_positions
from hf_taskdistill.selection import LayerSelection, UnitSelection
from hf_taskdistill.sparse_kd import sparse_generalized_jsd_loss, topk_with_tail
from hf_taskdistill.toy import make_toy_examples, tiny_llama, to_messages


BETAS = (0.0, 0.3, 0.5, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# the loss (pure functions)
# ----------------------------------------------------------------------------------------------------------------
def _logits_and_labels(dtype, seed=0, b=3, t=7, v=11):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(b, t, v, generator=g, dtype=dtype) * 2).requires_grad_()
    teacher = torch.randn(b, t, v, generator=g, dtype=dtype) * 3
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :3] = -100  # prompt
    labels[1, :] = -100  # a row with no completion token
    labels[2, 4] = -100
    return student, teacher, labels


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta", BETAS)
def test_full_vocabulary_equals_trl_gkd_loss(beta, dtype):
    """K = V (empty tail): the cached loss and its gradient equal GKDTrainer.generalized_jsd_loss."""
    student, teacher, labels = _logits_and_labels(dtype)
    ref = GKDTrainer.generalized_jsd_loss(student[:, :-1], teacher[:, :-1], labels[:, 1:], beta=beta, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, student)
    ids, logp, tail = topk_with_tail(teacher, teacher.shape[-1])
    assert torch.isinf(tail).all()
    ours = sparse_generalized_jsd_loss(student, ids, logp, tail, valid_positions(labels), beta=beta)
    (grad,) = torch.autograd.grad(ours, student)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert ref.item() > 0
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol)


def _direct_topk_tail_jsd(student, teacher, mask, k, beta):
    """Written out from the definitions: both distributions collapsed onto (top-K of the teacher, everything else)."""
    t_logp, s_logp = teacher.log_softmax(-1), student.log_softmax(-1)
    ids = t_logp.topk(k, dim=-1).indices
    in_top = torch.zeros_like(t_logp, dtype=torch.bool).scatter(-1, ids, True)
    t = torch.cat([t_logp.gather(-1, ids).exp(), (t_logp.exp() * ~in_top).sum(-1, keepdim=True)], -1)
    s = torch.cat([s_logp.gather(-1, ids).exp(), (s_logp.exp() * ~in_top).sum(-1, keepdim=True)], -1)
    m = beta * t + (1 - beta) * s
    kl = lambda p, q: (p * (p.log() - q.log())).sum(-1)  # noqa: E731
    per = kl(t, s) if beta == 0 else kl(s, t) if beta == 1 else beta * kl(t, m) + (1 - beta) * kl(s, m)
    return (per * mask).sum()


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("k", [1, 4])
def test_top_k_with_tail_equals_direct_computation(beta, k):
    student, teacher, labels = _logits_and_labels(torch.float64, seed=1)
    mask = valid_positions(labels)
    ids, logp, tail = topk_with_tail(teacher, k)
    ours = sparse_generalized_jsd_loss(student, ids, logp, tail, mask, beta=beta)
    ref = _direct_topk_tail_jsd(student, teacher, mask, k, beta)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    (g1,) = torch.autograd.grad(ours, student)
    (g2,) = torch.autograd.grad(_direct_topk_tail_jsd(student, teacher, mask, k, beta), student)
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-9)


def test_masked_positions_carry_no_gradient_and_stay_finite():
    student, teacher, labels = _logits_and_labels(torch.float32, seed=2)
    mask = valid_positions(labels)
    ids, logp, tail = topk_with_tail(teacher, 3)
    # what the collator leaves at positions without a cached token: zeros
    ids, logp, tail = ids * mask[..., None], logp * mask[..., None], tail * mask
    for beta in BETAS:
        loss = sparse_generalized_jsd_loss(student, ids, logp, tail, mask, beta=beta)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert grad[~mask].abs().max() == 0
    empty = torch.zeros_like(mask)
    assert sparse_generalized_jsd_loss(student, ids, logp, tail, empty).item() == 0.0


# ----------------------------------------------------------------------------------------------------------------
# building and reading
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def data(tokenizer):
    return Dataset.from_list([to_messages(r) for r in make_toy_examples(20, seed=0)])


def _selection(k=5, layers=((1, 2), (0, 1)), d_t=32, seed=0):
    rng = random.Random(seed)
    return UnitSelection(
        layers=[LayerSelection(s, t, sorted(rng.sample(range(d_t), k))) for s, t in layers],
        selection_method="random", teacher_hidden_size=d_t, student_hidden_size=16,
    )  # fmt: skip


def _build(teacher, data, tokenizer, path, **kwargs):
    kwargs.setdefault("selection", _selection())
    collator = kwargs.pop("collator", None) or DataCollatorForChatML(tokenizer=tokenizer, max_length=24)
    kwargs.setdefault("top_k", 8)
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("teacher_name_or_path", "org/tiny-teacher")
    return build_teacher_cache(teacher, data, collator, path, tokenizer=tokenizer, batch_size=3, show_progress=False,
                               shard_size=kwargs.pop("shard_size", 6), template="chat", **kwargs)  # fmt: skip


def _expected(teacher, selection, batch, k):
    """What the online teacher computes on this very batch: full-logit top-K + tail and the tapped units."""
    gather = {ls.teacher_layer: torch.tensor(ls.indices) for ls in selection.layers}
    tap = LayerTap(teacher, list(gather), gather, detach=True)
    with torch.no_grad(), tap.capture() as out:
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    tap.remove()
    return topk_with_tail(logits, k), out


def test_cached_batches_match_the_online_teacher_after_shuffle_and_truncation(teacher, tokenizer, data, tmp_path):
    selection = _selection()
    cache = _build(teacher, data, tokenizer, tmp_path / "c", selection=selection, top_k=len(tokenizer))
    assert isinstance(cache, TeacherCache) and len(cache) == 20
    assert cache.header["teacher"] == {"model_id": "org/tiny-teacher", "revision": None, "local_name": None}
    # training: another collator instance with the same window; shuffled, other batches
    base = DataCollatorForChatML(tokenizer=tokenizer, max_length=24)
    open_teacher_cache(tmp_path / "c", tokenizer=tokenizer, selection=selection, max_length=24, template="chat",
                       teacher="org/tiny-teacher", dataset=data, collator=base)  # fmt: skip
    collate = cache.wrap_collator(base)
    order = list(range(20))
    random.Random(1).shuffle(order)
    truncated = 0
    for start in (0, 5, 9):  # batch sizes 5, 4, 11: different padding than the build's batches of 3
        rows = [data[i] for i in order[start : start + (5 if start == 0 else 4 if start == 5 else 11)]]
        batch = collate(rows)
        truncated += int((batch["attention_mask"].sum(1) == 24).sum())
        (ids, logp, _), units = _expected(teacher, selection, batch, len(tokenizer))
        mask = valid_positions(batch["labels"])
        got = cache.pop_batch(batch, selection)
        assert set(batch) == {"input_ids", "attention_mask", "labels", "prompts", "prompt_attention_mask",
                              "byte_offsets"}  # fmt: skip
        # ties between equal logits may order differently: compare the distributions, then the units
        torch.testing.assert_close(got.topk_logprobs[mask], logp[mask], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.topk_logprobs[mask].exp().sum(-1), torch.ones(int(mask.sum())), atol=1e-5,
                                   rtol=0)  # fmt: skip
        assert (got.topk_ids[mask][:, 0] == ids[mask][:, 0]).float().mean() > 0.95
        assert (got.topk_ids[~mask] == 0).all() and (got.units[2][~mask] == 0).all()
        for layer in (1, 2):
            torch.testing.assert_close(got.units[layer][mask], units[layer][mask], atol=1e-5, rtol=1e-5)
        # the cached loss on this batch equals TRL's GKD loss with the online teacher
        student = torch.randn(*batch["input_ids"].shape, len(tokenizer), dtype=torch.float32)
        labels = batch["labels"]
        teacher_logits = _teacher_logits(teacher, batch)
        ref = GKDTrainer.generalized_jsd_loss(student[:, :-1], teacher_logits[:, :-1], labels[:, 1:], beta=0.5,
                                              reduction="sum")  # fmt: skip
        ours = sparse_generalized_jsd_loss(student, got.topk_ids, got.topk_logprobs, got.tail_logprob, mask, 0.5)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert truncated > 0  # some rows hit max_length, i.e. the collator truncated them


def _teacher_logits(teacher, batch):
    with torch.no_grad():
        return teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_storage_dtypes_full_layer_and_bytes(teacher, tokenizer, data, tmp_path):
    selection = _selection(k=4, layers=((1, 2),))
    f32 = _build(teacher, data, tokenizer, tmp_path / "f32", selection=selection)
    bf16 = _build(teacher, data, tokenizer, tmp_path / "bf16", selection=selection, dtype="bf16")
    full = _build(teacher, data, tokenizer, tmp_path / "full", selection=selection, dtype="fp16", full_layer=True)
    units_only = _build(teacher, data, tokenizer, tmp_path / "u", selection=selection, top_k=0)
    assert bf16.bytes_per_token() < f32.bytes_per_token() and units_only.bytes_per_token() < bf16.bytes_per_token()
    batch_rows = [data[i] for i in (3, 1, 7)]
    base = DataCollatorForChatML(tokenizer=tokenizer, max_length=24)
    a = f32.pop_batch(f32.wrap_collator(base)(batch_rows))
    b = bf16.pop_batch(bf16.wrap_collator(base)(batch_rows))
    c = full.pop_batch(full.wrap_collator(base)(batch_rows), selection)  # gathered from the whole stored layer
    d = units_only.pop_batch(units_only.wrap_collator(base)(batch_rows))
    assert b.units[2].dtype == torch.bfloat16 and c.units[2].dtype == torch.float16 and d.topk_ids is None
    torch.testing.assert_close(b.units[2].float(), a.units[2], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(c.units[2].float(), a.units[2], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(b.topk_logprobs, a.topk_logprobs, rtol=1e-2, atol=5e-2)
    torch.testing.assert_close(b.tail_logprob, a.tail_logprob)  # the tail is always fp32
    assert torch.equal(d.units[2], a.units[2])
    assert full.header["layers"] == [{"teacher_layer": 2, "width": 32, "full": True}]


def test_wrapped_collator_survives_pickling_for_dataloader_workers(built, tokenizer, data):
    import pickle

    collate = TeacherCache(built).wrap_collator(DataCollatorForChatML(tokenizer=tokenizer, max_length=24))
    clone = pickle.loads(pickle.dumps(collate))  # what a worker process receives: the memory maps are reopened
    rows = [data[i] for i in (4, 2)]
    a, b = collate(rows), clone(rows)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ranks_write_their_own_shards_and_merge(teacher, tokenizer, data, tmp_path):
    one = _build(teacher, data, tokenizer, tmp_path / "one")
    assert _build(teacher, data, tokenizer, tmp_path / "two", rank=0, world_size=2) is None  # rank 1 not done yet
    with pytest.raises(TeacherCacheError, match=r"unfinished \(ranks \[1\] not done\)"):
        TeacherCache(tmp_path / "two")
    two = _build(teacher, data, tokenizer, tmp_path / "two", rank=1, world_size=2)
    names = sorted(s["name"] for s in two.header["shards"])
    assert names == ["shard-r00000-of-00002-00000.arrow", "shard-r00000-of-00002-00001.arrow",
                     "shard-r00001-of-00002-00000.arrow", "shard-r00001-of-00002-00001.arrow"]  # fmt: skip
    assert sorted(two.dataset["row"]) == list(range(20)) and len(two) == 20
    rows = [data[i] for i in range(0, 20, 3)]
    base = DataCollatorForChatML(tokenizer=tokenizer, max_length=24)
    a, b = one.wrap_collator(base)(rows), two.wrap_collator(base)(rows)
    for key in ("teacher_topk_logprobs", "teacher_tail_logprob", "teacher_units_0", "teacher_units_1"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)


def _distributed_worker(rank, world, root):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    from hf_taskdistill.toy import build_toy_tokenizer

    tokenizer = build_toy_tokenizer()
    teacher = tiny_llama(len(tokenizer), hidden_size=32, num_layers=3, seed=1)
    data = Dataset.from_list([to_messages(r) for r in make_toy_examples(20, seed=0)])
    cache = _build(teacher, data, tokenizer, os.path.join(root, "c"))  # rank and world from torch.distributed
    with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
        json.dump(None if cache is None else sorted(cache.dataset["row"]), f)
    torch.distributed.destroy_process_group()


@pytest.mark.multiprocess
def test_ranks_under_torch_distributed_write_their_shards_and_rank0_finalizes(tmp_path):
    torch.multiprocessing.spawn(_distributed_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert rows == [list(range(20)), None]  # rank 0 writes the header after the barrier, rank 1 returns None
    shards = sorted(f for f in os.listdir(tmp_path / "c") if f.endswith(".arrow"))
    assert [f[:21] for f in shards] == ["shard-r00000-of-00002"] * 2 + ["shard-r00001-of-00002"] * 2


class _Killed(Exception):
    pass


def test_killed_build_resumes_and_never_publishes_a_partial_shard(teacher, tokenizer, data, tmp_path, monkeypatch):
    calls = []
    teacher.model.register_forward_hook(lambda *a: calls.append(1))
    original = build_mod._ShardWriter.write

    def dies_in_third_shard(self, records):
        original(self, records)
        if self.name.endswith("-00002.arrow"):
            raise _Killed

    monkeypatch.setattr(build_mod._ShardWriter, "write", dies_in_third_shard)
    with pytest.raises(_Killed):
        _build(teacher, data, tokenizer, tmp_path / "c")  # 20 examples, shards of 6: 4 shards, dies in the third
    files = sorted(os.listdir(tmp_path / "c"))
    assert [f for f in files if f.endswith(".arrow")] == ["shard-r00000-of-00001-00000.arrow",
                                                          "shard-r00000-of-00001-00001.arrow"]  # fmt: skip
    assert "shard-r00000-of-00001-00002.arrow.tmp" in files and "teacher_cache.json" not in files
    with pytest.raises(TeacherCacheError, match="unfinished"):
        TeacherCache(tmp_path / "c")
    monkeypatch.setattr(build_mod._ShardWriter, "write", original)
    calls.clear()
    resumed = _build(teacher, data, tokenizer, tmp_path / "c")
    assert len(calls) == 3  # shards 2 and 3 only: 6 + 2 examples in batches of 3
    assert not [f for f in os.listdir(tmp_path / "c") if f.endswith(".tmp")]
    clean = _build(teacher, data, tokenizer, tmp_path / "clean")
    assert (
        resumed.dataset["hash"] == clean.dataset["hash"] and resumed.header["num_tokens"] == clean.header["num_tokens"]
    )
    # a finished cache rebuilt with the same settings is reused (no teacher work), with other settings refused
    calls.clear()
    assert len(_build(teacher, data, tokenizer, tmp_path / "c")) == 20 and calls == []
    with pytest.raises(TeacherCacheError, match=r"other settings: top_k: 8 there, 4 requested"):
        _build(teacher, data, tokenizer, tmp_path / "c", top_k=4)


# ----------------------------------------------------------------------------------------------------------------
# every check before the first step
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def built(teacher, tokenizer, data, tmp_path):
    _build(teacher, data, tokenizer, tmp_path / "c")
    return tmp_path / "c"


def test_mismatched_settings_are_named(built, tokenizer, teacher):
    cache = TeacherCache(built)
    changed = _copy_tokenizer(tokenizer)
    changed.chat_template = changed.chat_template + " "
    with pytest.raises(TeacherCacheError, match=r"another template \(chat template\)"):
        cache.check_compatible(tokenizer=changed)
    with pytest.raises(TeacherCacheError, match=r"max_length=24, training uses max_length=64"):
        cache.check_compatible(max_length=64)
    with pytest.raises(TeacherCacheError, match=r"template 'chat', training uses 'alpaca'"):
        cache.check_compatible(template="alpaca")
    with pytest.raises(TeacherCacheError, match=r"another unit selection .* layer pair 0"):
        cache.check_compatible(selection=_selection(seed=5))
    with pytest.raises(TeacherCacheError, match=r"teacher layers \[2, 1\], the selection uses \[2\]"):
        cache.check_compatible(selection=_selection(layers=((1, 2),)))
    with pytest.raises(
        TeacherCacheError, match=r"built for teacher org/tiny-teacher, training names teacher org/other-teacher"
    ):
        cache.check_compatible(teacher="org/other-teacher")
    with pytest.raises(TeacherCacheError, match="temperature"):
        cache.check_compatible(temperature=0.9)
    cache.check_compatible(tokenizer=tokenizer, selection=_selection(), max_length=24, template="chat",
                           temperature=1.0, need_logits=True)  # fmt: skip
    assert cache.selection.layers[0].indices == _selection().layers[0].indices


def _copy_tokenizer(tokenizer):
    import copy

    return copy.deepcopy(tokenizer)


def test_missing_extra_and_mismatched_examples_are_named(built, tokenizer, data):
    cache = TeacherCache(built)
    base = DataCollatorForChatML(tokenizer=tokenizer, max_length=24)
    cache.check_dataset(data.shuffle(seed=3), base)  # order does not matter
    new = Dataset.from_list([to_messages(r) for r in make_toy_examples(3, seed=99)])
    from datasets import concatenate_datasets

    with pytest.raises(TeacherCacheError, match=r"lacks 3 of the 23 training examples \(dataset rows \[20, 21, 22\]"):
        cache.check_dataset(concatenate_datasets([data, new]), base)
    with pytest.raises(TeacherCacheError, match=r"holds 5 example\(s\) that are not in the training set"):
        cache.check_dataset(data.select(range(15)), base)
    cache.check_dataset(data.select(range(15)), base, allow_extra=True)
    with pytest.raises(TeacherCacheError, match="max_length=24, training uses max_length=32"):
        open_teacher_cache(built, max_length=32, dataset=data, collator=base)
    collate = cache.wrap_collator(base)
    with pytest.raises(TeacherCacheError, match=r"Batch row 1 \(token hash [0-9a-f]+\) is not in the teacher cache"):
        collate([data[0], new[0]])

    def fewer_labels(examples):  # same tokens, other completion mask
        batch = base(examples)
        batch["labels"][:, -2] = -100
        return batch

    with pytest.raises(TeacherCacheError, match="completion positions, the cache"):
        cache.wrap_collator(fewer_labels)([data[0]])


def test_truncated_corrupt_and_unfinished_shards_are_named(built):
    shard = sorted(p for p in os.listdir(built) if p.endswith(".arrow"))[1]
    path = os.path.join(built, shard)
    with open(path, "rb") as f:
        blob = f.read()
    with open(path, "r+b") as f:  # same size, flipped bytes in the middle
        f.seek(len(blob) // 2)
        f.write(bytes(255 - x for x in blob[len(blob) // 2 : len(blob) // 2 + 16]))
    with pytest.raises(TeacherCacheError, match=f"{shard} .* fails its sha256 check"):
        TeacherCache(built, verify="checksum")
    with open(path, "wb") as f:
        f.write(blob[: len(blob) // 2])
    with pytest.raises(TeacherCacheError, match=f"Shard {shard} .* is truncated"):
        TeacherCache(built)
    os.remove(path)
    with pytest.raises(TeacherCacheError, match=f"Shard {shard} .* is missing"):
        TeacherCache(built)
    os.remove(os.path.join(built, "teacher_cache.json"))
    with pytest.raises(TeacherCacheError, match="no complete teacher cache"):
        TeacherCache(built)


@pytest.mark.parametrize(("code", "message"), [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only")])
def test_disk_full_and_read_only_give_clear_errors(teacher, tokenizer, data, tmp_path, monkeypatch, code, message):
    # Tests run as root, for whom chmod does not stop writes: the OS errors are injected instead.
    from datasets.arrow_writer import ArrowWriter

    original = ArrowWriter.write_batch
    seen = []

    def fails_in_second_shard(self, *args, **kwargs):
        seen.append(1)
        if len(seen) == 3:  # first batch of the second shard
            raise OSError(code, os.strerror(code))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ArrowWriter, "write_batch", fails_in_second_shard)
    with pytest.raises(TeacherCacheWriteError, match=message) as info:
        _build(teacher, data, tokenizer, tmp_path / "c")
    assert info.value.errno == code and "rerunning the same build resumes" in str(info.value)
    files = os.listdir(tmp_path / "c")
    assert not [f for f in files if f.endswith(".tmp")]
    assert [f for f in files if f.endswith(".arrow")] == ["shard-r00000-of-00001-00000.arrow"]

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    calls = []
    teacher.model.register_forward_hook(lambda *a: calls.append(1))
    monkeypatch.setattr(build_mod, "open", refuse, raising=False)  # the probe write of `check_output_dir`
    with pytest.raises(TeacherCacheWriteError, match=message):
        _build(teacher, data, tokenizer, tmp_path / "d")
    assert calls == []  # raised before any teacher work


def test_a_disk_too_small_for_the_rest_fails_after_the_first_shard(teacher, tokenizer, data, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 5000, 5000))
    with pytest.raises(TeacherCacheWriteError, match=r"needs about .* GiB more for 14 examples .* the disk is full"):
        _build(teacher, data, tokenizer, tmp_path / "c")
    assert sorted(f for f in os.listdir(tmp_path / "c") if f.endswith(".arrow")) == [
        "shard-r00000-of-00001-00000.arrow"
    ]
    monkeypatch.undo()
    assert len(_build(teacher, data, tokenizer, tmp_path / "c")) == 20  # resumes once there is room


def test_cli_builds_a_cache_the_training_run_can_open(tokenizer, tmp_path, capsys):
    import yaml

    from hf_taskdistill.cli import main

    teacher = tiny_llama(len(tokenizer), hidden_size=32, num_layers=3, seed=1)
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    tiny_llama(len(tokenizer), hidden_size=16, num_layers=2, seed=2).save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_toy_examples(12, seed=0)))
    recipe = {"task": "instruction", "prompt_template": "chat", "max_length": 64, "per_device_train_batch_size": 4,
              "use_cpu": True, "bf16": False, "report_to": "none", "disable_tqdm": True, "selection_num_samples": 8,
              "selection_num_units": 8, "activation_checkpointing": False,
              "model_name_or_path": str(tmp_path / "student"), "teacher_model_name_or_path": str(tmp_path / "teacher"),
              "train_file": str(tmp_path / "train.jsonl"), "output_dir": str(tmp_path / "unused")}  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "cache"
    assert main(["cache", "--config", str(tmp_path / "recipe.yaml"), "--cache_dir", str(out), "--top_k", "4"]) == 0
    cache = TeacherCache(out)
    assert cache.header["top_k"] == 4 and cache.header["template"] == "chat" and len(cache) == 12
    assert cache.header["teacher"] == {"model_id": None, "revision": None, "local_name": "teacher"}
    assert os.path.isfile(out / "task_distill.json") and cache.selection.k == 8  # scored first, saved with the cache
    assert str(tmp_path) not in (out / "teacher_cache.json").read_text()  # no local path in the header
    cache.check_compatible(teacher=str(tmp_path / "teacher"), max_length=64, template="chat", tokenizer=tokenizer)
    # a rerun (e.g. after a kill) reuses the saved selection instead of re-scoring, and finds the cache complete
    assert main(["cache", "--config", str(tmp_path / "recipe.yaml"), "--cache_dir", str(out), "--top_k", "4"]) == 0
    assert "Reusing the unit selection" in capsys.readouterr().out
    assert main(["cache", "--help"]) == 0 and "--cache_dir" in capsys.readouterr().out
    # train from it with the same recipe: no teacher is loaded (the recipe's teacher name is only checked)
    trained = tmp_path / "trained"
    assert main(["train", "--config", str(tmp_path / "recipe.yaml"), "--teacher_cache", str(out), "--max_steps", "2",
                 "--selection_num_units", "8", "--output_dir", str(trained)]) == 0  # fmt: skip
    saved = json.loads((trained / "config.json").read_text())["task_distill"]
    assert saved["layers"][0]["indices"] == cache.selection.layers[0].indices
    assert saved["training"]["teacher_cache"]["top_k"] == 4


def test_benchmark_script_runs_on_toy_models(tmp_path):
    """`benchmarks/cache.py --quick` (bytes and read parts): the formula matches the files, the report is written."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("cache_bench", os.path.join(root, "benchmarks", "cache.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--quick", "--parts", "bytes", "read", "--output_dir", str(tmp_path)])
    for row in results["bytes"]["rows"]:
        overhead = (row["bytes_per_token"] - row["formula"]) * row["completion_tokens"] / row["examples"]
        assert 0 < overhead < 1000, row  # per example: row, hash, Arrow offsets, file metadata
    assert 0 < results["read"]["lookup_seconds"] < results["read"]["student_step_seconds"] * 10
    assert (tmp_path / "quick.md").read_text().startswith("# Teacher cache benchmark")
    assert bench.harness.round_order(["a", "b", "c"], 3) == ["c", "b", "a"]
