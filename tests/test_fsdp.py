"""Sharded engines on 2 CPU processes (gloo) against 1 process with the same global batch, for both hosts (GKD
off-policy and SFT): FSDP2 launched by `accelerate launch` with recipes/accelerate_configs/fsdp_cpu.yaml, and
(marked slow, when deepspeed is installed) DeepSpeed ZeRO-3 with a CPU copy of zero3.yaml.

The worker (tests/fsdp_worker.py) trains a tiny Llama student from a tiny Llama teacher with SGD (momentum 0.9, no
weight decay, no clipping) and the mse feature loss: each rank's gradient is an exact share of the global one, so
2 processes follow 1 process up to float32 summation order. Measured (FSDP2 and ZeRO-3 alike): selection scores
bit-identical; relative difference of the parameter updates <= 4e-7 (student) and <= 1.7e-6 (projector), max abs
<= 3e-7; resumed runs bit-identical to uninterrupted ones. The bounds below leave >= 50x room.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "fsdp_worker.py")
CONFIGS = os.path.join(ROOT, "recipes", "accelerate_configs")
HOSTS = ("gkd", "sft")
UPDATE_RTOL = 1e-4  # relative difference of the parameter updates, 2 processes vs 1
RESUME_RTOL = 1e-6  # resumed vs uninterrupted, both on 2 processes (measured: 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Run:
    """A worker started in the background; `results()` waits for it and loads what each rank wrote."""

    def __init__(self, cmd, out_dir, ranks, **env):
        self.out_dir, self.ranks, self._results = out_dir, ranks, None
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false", **env}
        self.proc = subprocess.Popen(cmd, env=env, cwd=out_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)  # fmt: skip

    def results(self):
        if self._results is None:
            out, _ = self.proc.communicate(timeout=600)
            assert self.proc.returncode == 0, out[-6000:]
            self._results = [torch.load(self.out_dir / f"rank{r}.pt", weights_only=False) for r in range(self.ranks)]
        return self._results


def _launch(config, out_dir, **env):
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", str(config),
           "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
           WORKER, str(out_dir), "4"]  # fmt: skip
    return _Run(cmd, out_dir, 2, **env)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("sharded")


@pytest.fixture(scope="module")
def reference(tmp):
    """The 1-process run (batch 8), started at once so that it runs beside the first 2-process launch."""
    out = tmp / "single"
    out.mkdir()
    run = _Run([sys.executable, WORKER, str(out), "8", ",".join(HOSTS), "units,projector"], out, 1)
    yield run
    if run.proc.poll() is None:  # a test failed before waiting for it
        run.proc.kill()
        run.proc.communicate()


@pytest.fixture(scope="module")
def fsdp(tmp, reference):
    out = tmp / "fsdp"
    out.mkdir()
    run = _launch(os.path.join(CONFIGS, "fsdp_cpu.yaml"), out)
    r0, r1 = run.results()
    return {"r0": r0, "r1": r1, "ref": reference.results()[0], "dir": out}


# ----- the checks, shared by both engines -----
def _rel(a: dict, b: dict) -> float:
    num = sum((a[n] - b[n]).norm() ** 2 for n in b) ** 0.5
    return float(num / sum(b[n].norm() ** 2 for n in b) ** 0.5)


def _update(record: dict) -> dict:
    return {n: record["weights"][n] - record["before"][n] for n in record["weights"]}


def _check_sharded(placement: dict, kind: str) -> None:
    """Rank 0 holds its half (rounded up) of the parameter: FSDP2 as a Shard(0) DTensor, ZeRO-3 as a flat partition."""
    assert placement["type"] == kind, placement
    local, full = placement["local_shape"], placement["global_shape"]
    if kind == "DTensor":
        assert placement["placements"] == ["S(0)"] and local[0] == -(-full[0] // 2) and local[1:] == full[1:]
    else:
        assert local[0] == -(-full[0] * full[1] // 2)


def _check_engine(runs, engine: str, kind: str) -> None:
    r0, r1, ref = runs["r0"], runs["r1"], runs["ref"]
    assert r0["world"] == r1["world"] == 2 and ref["world"] == 1
    for host in HOSTS:
        assert r0[f"{host}_units"]["distributed_type"] == engine
        assert ref[f"{host}_units"]["distributed_type"] == "NO"
        # the teacher is sharded too (`_prepare_teacher`: TRL's prepare_fsdp / prepare_deepspeed), not left whole
        _check_sharded(r0[f"{host}_units"]["teacher_placement"], kind)


def _check_selection(runs, host: str) -> None:
    a, b, ref = (runs[k][f"{host}_units"] for k in ("r0", "r1", "ref"))
    assert a["indices"] == b["indices"] == ref["indices"]
    for sa, sb, sr in zip(a["scores"], b["scores"], ref["scores"], strict=True):
        assert torch.equal(sa, sb)
        torch.testing.assert_close(sa, sr, rtol=1e-5, atol=1e-7)


def _check_training(runs, host: str) -> None:
    a, b, ref = (runs[k][f"{host}_units"] for k in ("r0", "r1", "ref"))
    assert a["global_step"] == ref["global_step"] == 4
    assert _rel(a["weights"], b["weights"]) == 0.0  # every rank gathers the same weights
    assert sum(float(v.norm()) for v in _update(ref).values()) > 0  # the student moved
    assert _rel(_update(a), _update(ref)) < UPDATE_RTOL


def _check_projector(runs, host: str, kind: str) -> None:
    a, b, ref = (runs[k][f"{host}_projector"] for k in ("r0", "r1", "ref"))
    for name, placement in a["projector_placement"].items():
        _check_sharded(placement, kind)
        assert not torch.equal(a["projector_after"][name], a["projector_before"][name])  # trained
    assert ref["projector_placement"]["0.weight"]["placements"] is None  # whole on 1 process
    assert _rel(a["projector_after"], b["projector_after"]) == 0.0
    update = {n: a["projector_after"][n] - ref["projector_before"][n] for n in a["projector_after"]}
    ref_update = {n: ref["projector_after"][n] - ref["projector_before"][n] for n in ref["projector_after"]}
    assert _rel(update, ref_update) < UPDATE_RTOL
    assert _rel(_update(a), _update(ref)) < UPDATE_RTOL


def _check_save(runs, host: str, variant: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hf_taskdistill.trainer import PROJECTOR_FILE

    record = runs["r0"][f"{host}_{variant}"]
    final = runs["dir"] / f"{host}_{variant}" / "final"
    files = sorted(os.listdir(final))
    assert "model.safetensors" in files, files
    assert not any(f.startswith(("pytorch_model_fsdp", "global_step", "zero_to", "model-0")) for f in files), files
    with safe_open(final / "model.safetensors", "pt") as f:
        assert not any("fd_proj" in k for k in f.keys())
    model = AutoModelForCausalLM.from_pretrained(final)
    for name, param in model.named_parameters():
        assert torch.equal(param, record["weights"][name]), name
    stored = json.loads((final / "config.json").read_text())["task_distill"]
    assert stored["training"]["hyperparameters"]["num_processes"] == 2
    if variant == "units":
        assert [layer["indices"] for layer in stored["layers"]] == record["indices"]
        assert PROJECTOR_FILE not in files
    else:
        assert stored["selection_method"] == "projector"
        projector = load_file(final / PROJECTOR_FILE)
        assert set(projector) == set(record["projector_after"])
        for name, value in projector.items():
            assert torch.equal(value, record["projector_after"][name])


def _check_resume(runs, host: str) -> None:
    for done, resumed in (("units", "resume"), ("projector", "projector_resume")):
        a, b = runs["r0"][f"{host}_{done}"], runs["r0"][f"{host}_{resumed}"]
        assert b["global_step"] == a["global_step"]
        assert _rel(_update(b), _update(a)) < RESUME_RTOL
        if "projector_after" in a:
            assert _rel(b["projector_after"], a["projector_after"]) < RESUME_RTOL


# ----- FSDP2 (default suite) -----
@pytest.mark.multiprocess
def test_fsdp_is_what_ran(fsdp):
    _check_engine(fsdp, "FSDP", "DTensor")


@pytest.mark.multiprocess
@pytest.mark.parametrize("host", HOSTS)
def test_fsdp_selection_identical_on_ranks_and_equal_to_one_process(fsdp, host):
    _check_selection(fsdp, host)


@pytest.mark.multiprocess
@pytest.mark.parametrize("host", HOSTS)
def test_fsdp_training_matches_one_process(fsdp, host):
    _check_training(fsdp, host)


@pytest.mark.multiprocess
@pytest.mark.parametrize("host", HOSTS)
def test_fsdp_projector_sharded_and_trained(fsdp, host):
    _check_projector(fsdp, host, "DTensor")


@pytest.mark.multiprocess
@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("variant", ["units", "projector"])
def test_fsdp_save_is_a_plain_reloadable_model(fsdp, host, variant):
    _check_save(fsdp, host, variant)


@pytest.mark.multiprocess
@pytest.mark.parametrize("host", HOSTS)
def test_fsdp_resume_ends_where_the_uninterrupted_run_ends(fsdp, host):
    _check_resume(fsdp, host)


# ----- DeepSpeed ZeRO-3 (slow: DeepSpeed builds its CPU communication op on first use, ~2 min) -----
@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_zero3_on_cpu(tmp, reference):
    with open(os.path.join(CONFIGS, "zero3.yaml")) as f:
        config = yaml.safe_load(f)
    config.update(mixed_precision="no", num_processes=2)  # the only CPU changes (use_cpu stays false: see worker)
    path = tmp / "zero3_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp / "zero3"
    out.mkdir()
    r0, r1 = _launch(path, out, DS_ACCELERATOR="cpu").results()
    runs = {"r0": r0, "r1": r1, "ref": reference.results()[0], "dir": out}
    _check_engine(runs, "DEEPSPEED", "zero3")
    for host in HOSTS:
        _check_selection(runs, host)
        _check_training(runs, host)
        _check_projector(runs, host, "zero3")
        _check_save(runs, host, "units")
        _check_save(runs, host, "projector")
        _check_resume(runs, host)
