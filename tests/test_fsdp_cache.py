"""The teacher cache under FSDP2 on 2 CPU processes (gloo, `accelerate launch` with fsdp_cpu.yaml) against 1 process:
the build (each rank writes its own shards; the merged cache equals the 1-process build) and training from it, for
both hosts (GKD off-policy with top-K logits and units; SFT with units), with the feature loss on.

The worker (tests/fsdp_cache_worker.py) uses tests/fsdp_worker.py's data, models and optimiser. The 1-process
reference builds its own caches (for the comparison) and trains from the 2-process ones, so both training runs read
the same files. Measured: the merged 2-process caches are bit-identical to the 1-process builds, example by example;
relative difference of the parameter updates 2 processes vs 1 <= 2e-7 (bound: test_fsdp.py's 1e-4).
"""

import os
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from .test_fsdp import CONFIGS, ROOT, _check_save, _check_training, _free_port, _Run


WORKER = os.path.join(ROOT, "tests", "fsdp_cache_worker.py")
HOSTS = ("gkd", "sft")
TOP_K = {"gkd": 8, "sft": 0}
_NP = {"uint16": np.uint16, "int32": np.int32, "float32": np.float32}

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_cache")
    two, one = tmp / "fsdp", tmp / "single"
    two.mkdir()
    one.mkdir()
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
           os.path.join(CONFIGS, "fsdp_cpu.yaml"), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
           "--main_process_port", str(_free_port()), WORKER, str(two), "4"]  # fmt: skip
    launched = _Run(cmd, two, 2)
    # started at once: it builds its own caches beside the launch, then waits for the 2-process caches to train
    reference = _Run([sys.executable, WORKER, str(one), "8", str(two)], one, 1)
    try:
        r0, r1 = launched.results()
        (ref,) = reference.results()
    finally:
        for run in (launched, reference):
            if run.proc.poll() is None:  # a failed launch: do not leave the other waiting
                run.proc.kill()
                run.proc.communicate()
    return {"r0": r0, "r1": r1, "ref": ref, "dir": two, "ref_dir": one}


def _per_example(cache) -> dict[str, dict[str, torch.Tensor]]:
    """Every cached example by its token hash: its completion-token count and its tensors, decoded from the shards."""
    h = cache.header
    widths = {f"units_{i}": layer["width"] for i, layer in enumerate(h["layers"])}
    dtypes = dict.fromkeys(widths, h["dtype"])
    if h["top_k"]:
        widths.update(topk_ids=h["top_k"], topk_logprobs=h["top_k"], tail_logprob=1)
        dtypes.update(topk_ids=h["id_dtype"], topk_logprobs=h["dtype"], tail_logprob="float32")
    out = {}
    for record in cache.dataset:
        assert record["hash"] not in out, "an example is cached twice"
        out[record["hash"]] = {"num_tokens": record["num_tokens"], "row": record["row"]} | {
            c: torch.from_numpy(np.frombuffer(record[c], _NP[dtypes[c]]).astype(np.float64).reshape(-1, widths[c]))
            for c in widths
        }
    return out


def test_the_build_ran_on_two_gloo_ranks_and_training_under_fsdp2(runs):
    r0, r1, ref = runs["r0"], runs["r1"], runs["ref"]
    assert r0["world"] == r1["world"] == 2 and ref["world"] == 1
    for host in HOSTS:
        # rank 1 finishes first and returns None; rank 0 writes the header after the barrier and opens the cache
        assert r0[f"{host}_build"]["returned"] == "TeacherCache" and r1[f"{host}_build"]["returned"] is None
        assert r0[f"{host}_build"]["process_group"] == r1[f"{host}_build"]["process_group"] == ("gloo", 2)
        assert r0[f"{host}_build"]["num_examples"] == r1[f"{host}_build"]["num_examples"] == 32
        assert ref[f"{host}_build"]["process_group"] is None and ref[f"{host}_build"]["returned"] == "TeacherCache"
        for record in (r0[f"{host}_units"], r1[f"{host}_units"]):
            assert (record["distributed_type"], record["fsdp_version"], record["teacher_model"]) == ("FSDP", 2, None)
        assert ref[f"{host}_units"]["distributed_type"] == "NO"


@pytest.mark.parametrize("host", HOSTS)
def test_each_rank_wrote_its_own_shards_under_one_directory(runs, host):
    from datasets import Dataset

    from hf_taskdistill.cache import TeacherCache

    directory = runs["dir"] / f"cache_{host}"
    cache = TeacherCache(directory, verify="checksum")
    assert cache.header["world_size"] == 2 and len(cache.header["build_seconds_per_rank"]) == 2
    for rank in (0, 1):
        assert (directory / f"rank-{rank:05d}-of-00002.done.json").is_file()
        shards = [s for s in cache.header["shards"] if s["rank"] == rank]
        # 16 examples per rank in shards of 6: 6 + 6 + 4, named by the rank that wrote them
        assert [s["name"] for s in shards] == [f"shard-r{rank:05d}-of-00002-{j:05d}.arrow" for j in range(3)]
        assert [s["num_examples"] for s in shards] == [6, 6, 4]
        rows = [r for s in shards for r in Dataset.from_file(str(directory / s["name"]))["row"]]
        assert rows == list(range(rank, 32, 2))  # rank r takes the examples i with i % 2 == r
    assert not [f for f in os.listdir(directory) if f.endswith(".tmp")]


@pytest.mark.parametrize("host", HOSTS)
def test_the_merged_cache_equals_the_one_process_build(runs, host):
    from trl.experimental.utils import DataCollatorForChatML

    from hf_taskdistill.cache import TeacherCache
    from tests.fsdp_worker import build

    merged, single = TeacherCache(runs["dir"] / f"cache_{host}"), TeacherCache(runs["ref_dir"] / f"cache_{host}")
    assert single.header["world_size"] == 1 and merged.header["top_k"] == TOP_K[host]
    skip = {"world_size", "shards", "build_seconds_per_rank"}
    assert {k: v for k, v in merged.header.items() if k not in skip} == {
        k: v for k, v in single.header.items() if k not in skip
    }
    # every example exactly once: the training set's token ids, and nothing else
    tokenizer, messages, _, _, args = build("gkd", 4, str(runs["dir"] / "unused"))
    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=args.max_length)
    merged.check_dataset(messages, collator)
    keys = merged.example_keys(messages, collator)
    assert sorted(merged.dataset["row"]) == list(range(32))
    assert Counter(merged.dataset["hash"]) == Counter(h for h, _ in keys) == Counter(single.dataset["hash"])
    a, b = _per_example(merged), _per_example(single)
    assert a.keys() == b.keys() and len(a) == len({h for h, _ in keys})
    columns = {"units_0", "units_1"} | ({"topk_ids", "topk_logprobs", "tail_logprob"} if TOP_K[host] else set())
    for key, example in a.items():
        assert set(example) - {"num_tokens", "row"} == columns
        assert example["num_tokens"] == b[key]["num_tokens"] > 0 and example["row"] == b[key]["row"]
        assert torch.equal(example.get("topk_ids", torch.zeros(0)), b[key].get("topk_ids", torch.zeros(0)))
        for column in columns - {"topk_ids"}:
            assert example[column].shape == b[key][column].shape and example[column].shape[0] == example["num_tokens"]
            torch.testing.assert_close(example[column], b[key][column], rtol=1e-5, atol=1e-6, msg=column)


@pytest.mark.parametrize("host", HOSTS)
def test_training_from_the_cache_matches_one_process(runs, host):
    from hf_taskdistill.cache import TeacherCache

    selection = TeacherCache(runs["dir"] / f"cache_{host}").selection
    for who in ("r0", "r1", "ref"):  # the trainer took the cache's own selection
        assert runs[who][f"{host}_units"]["indices"] == [ls.indices for ls in selection.layers]
    _check_training(runs, host)  # 4 steps, ranks identical, the student moved, update within UPDATE_RTOL (1e-4)
    assert all(h["feature_loss"] > 0 for h in runs["ref"][f"{host}_units"]["losses"])  # the feature term is on
    # Logged terms are the mean over ranks (not rank 0's micro-batch): equal to 1 process here (equal token counts).
    host_key = "jsd_loss" if host == "gkd" else "ce_loss"
    for key in ("feature_loss", host_key):
        two = [h[key] for h in runs["r0"][f"{host}_units"]["losses"] if key in h]
        one = [h[key] for h in runs["ref"][f"{host}_units"]["losses"] if key in h]
        assert len(two) == len(one) > 0 and all(
            abs(a - b) <= 1e-5 * abs(b) + 1e-7 for a, b in zip(two, one, strict=True)
        ), key


@pytest.mark.parametrize("host", HOSTS)
def test_save_writes_a_plain_directory_with_task_distill(runs, host):
    import json

    _check_save(runs, host, "units")  # one model.safetensors, no FSDP files, reloads to the weights, num_processes 2
    stored = json.loads((runs["dir"] / f"{host}_units" / "final" / "config.json").read_text())["task_distill"]
    assert stored["training"]["teacher_cache"] == {"top_k": TOP_K[host], "dtype": "float32", "full_layer": False}
