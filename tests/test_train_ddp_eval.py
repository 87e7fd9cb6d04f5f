"""The held-out loss under several gloo processes equals one process's with the same global batch, for
held-out splits smaller than one batch, of one batch, and larger (1, 2 and 9 sequences), with 2 and 3
processes (a process left without rows of its own runs the first rows again and counts nothing)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from fusedlora.train.config import TrainConfig
from fusedlora.train.data import build_sequences, builtin_records
from fusedlora.train.loop import evaluate
from fusedlora.train.model import tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = (1, 2, 9)
BATCH = 2  # per process

WORKER = """
import contextlib, json, sys
import torch
from fusedlora.train.config import TrainConfig
from fusedlora.train.data import build_sequences, builtin_records
from fusedlora.train.loop import _distributed, evaluate
from fusedlora.train.model import tiny_llama
from worker_exit import leave_group

rank, world, _ = _distributed()
model, tok = tiny_llama()
out = {}
for n in json.loads(sys.argv[2]):
    seqs = build_sequences(builtin_records(n), tok, 32, pack=False)
    config = TrainConfig(batch_size=int(sys.argv[3]), eval_batches=8)
    out[n] = evaluate(model, seqs, config, torch.device("cpu"), contextlib.nullcontext, rank, world)
if rank == 0:
    json.dump(out, open(sys.argv[1], "w"))
leave_group()
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_process(world):
    import contextlib

    model, tok = tiny_llama()
    out = {}
    for n in SPLITS:
        seqs = build_sequences(builtin_records(n), tok, 32, pack=False)
        assert len(seqs) == n
        config = TrainConfig(batch_size=BATCH * world, eval_batches=8)
        out[str(n)] = evaluate(model, seqs, config, torch.device("cpu"), contextlib.nullcontext, 0, 1)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_eval_under_gloo_equals_one_process(tmp_path, world):
    result = tmp_path / "eval.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((ROOT, os.path.join(ROOT, "tests"),
                                                         os.environ.get("PYTHONPATH", ""))),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(result), json.dumps(SPLITS), str(BATCH)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    got = json.loads(result.read_text())
    want = _one_process(world)
    # The same token losses summed in another order (per process, then across): fp64 sums of fp32 terms.
    assert got.keys() == want.keys()
    for n in want:
        assert got[n] == pytest.approx(want[n], rel=1e-6), n
