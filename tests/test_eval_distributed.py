"""Sharding the evaluation over processes: 2 gloo processes on CPU give what one process gives."""

from __future__ import annotations

import json
import os
import socket

import torch
import torch.multiprocessing as mp

from scalekv.cache import POLICIES
from scalekv.evaluation import run_eval

from .helpers import tiny_pipeline
from .test_eval import KeepFirst, small_config, unmeasured


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    POLICIES[KeepFirst.name] = KeepFirst  # this process's registry; it ends with the process
    rows = run_eval(small_config(out, fid=True, n=3, batch_size=1, budgets=[0.3]), pipeline=tiny_pipeline())
    assert (rows is not None) == (rank == 0)


def test_two_gloo_processes_match_one_process(tmp_path, monkeypatch):
    monkeypatch.setitem(POLICIES, KeepFirst.name, KeepFirst)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    single = run_eval(
        small_config(tmp_path / "one", fid=True, n=3, batch_size=1, budgets=[0.3]), pipeline=tiny_pipeline()
    )

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    gathered = json.loads((tmp_path / "two" / "metrics.json").read_text())
    # Inception runs with a different thread count in the workers, so FID agrees to float tolerance, not bit for bit
    fids = [(g.pop("fid"), s.pop("fid")) for g, s in zip(gathered, single, strict=True)]
    assert unmeasured(gathered) == unmeasured(single)
    assert fids[1][0] is not None and abs(fids[1][0] - fids[1][1]) <= 1e-4 * abs(fids[1][1])

    # batches (= images) 0 and 2 were made by rank 0, batch 1 by rank 1; the images are identical to one process's
    for setup in ("full", f"{KeepFirst.name}_b0.3"):
        ranks = [
            json.loads((tmp_path / "two" / "records" / setup / f"batch_{j:06d}.json").read_text())["rank"]
            for j in range(3)
        ]
        assert ranks == [0, 1, 0]
        for i in range(3):
            one = (tmp_path / "one" / "images" / setup / f"{i:06d}.png").read_bytes()
            assert (tmp_path / "two" / "images" / setup / f"{i:06d}.png").read_bytes() == one
