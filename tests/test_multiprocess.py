"""Selection and distillation on 2 CPU processes (gloo DDP) against 1 process, via torch's launcher."""

import os
import socket
import subprocess
import sys

import pytest
import torch


WORKER = os.path.join(os.path.dirname(__file__), "mp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, tmp):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    multi.mkdir(), single.mkdir()
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
          "--master_port", str(_free_port()), WORKER, str(multi), "4"], tmp_path)  # fmt: skip
    _run([sys.executable, WORKER, str(single), "8"], tmp_path)
    r0, r1 = (torch.load(multi / f"rank{r}.pt") for r in (0, 1))
    ref = torch.load(single / "rank0.pt")
    assert r0["world"] == r1["world"] == 2 and ref["world"] == 1

    # every rank ends with identical indices, equal to the 1-process selection on the same data
    assert r0["direct_indices"] == r1["direct_indices"] == ref["direct_indices"]
    assert r0["trainer_indices"] == r1["trainer_indices"] == ref["trainer_indices"]
    assert torch.allclose(r0["direct_scores"], ref["direct_scores"], rtol=1e-5, atol=1e-7)
    assert torch.allclose(r0["trainer_scores"], ref["trainer_scores"], rtol=1e-5, atol=1e-7)

    # 2 ranks x batch 4 train exactly like 1 rank x batch 8 (SGD, mse feature loss + GKD JSD)
    def rel(a, b):
        num = sum((a[n] - b[n]).norm() ** 2 for n in b) ** 0.5
        return float(num / sum(b[n].norm() ** 2 for n in b) ** 0.5)

    assert rel(r0["delta"], r1["delta"]) == 0.0  # DDP keeps replicas identical
    assert rel(r0["delta"], ref["delta"]) < 1e-4
