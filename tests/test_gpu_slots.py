"""Concurrent training jobs each get their own GPU: the claiming logic, with real processes on the CPU."""

import json
import multiprocessing as mp
import os
import signal
import time

from lorasweep.gpu_slots import GpuSlot


def _hold(lock_dir, gpus, log_path, hold_s):
    slot = GpuSlot(lock_dir, gpus=gpus, poll_s=0.02)
    gpu = slot.claim()
    start = time.monotonic()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == gpu
    time.sleep(hold_s)
    with open(log_path, "a") as f:
        f.write(json.dumps({"gpu": gpu, "start": start, "end": time.monotonic()}) + "\n")
    slot.release()


def test_concurrent_jobs_never_share_a_gpu(tmp_path):
    ctx = mp.get_context("spawn")
    log = tmp_path / "claims.jsonl"
    procs = [ctx.Process(target=_hold, args=(tmp_path / "locks", ["0", "1"], log, 0.4)) for _ in range(5)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    claims = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(claims) == 5 and {c["gpu"] for c in claims} == {"0", "1"}
    for i, a in enumerate(claims):
        for b in claims[i + 1:]:
            if a["gpu"] == b["gpu"]:  # same GPU: never at the same time
                assert a["end"] <= b["start"] or b["end"] <= a["start"]


def test_a_killed_job_releases_its_gpu(tmp_path):
    ctx = mp.get_context("spawn")
    holder = ctx.Process(target=_hold, args=(tmp_path / "locks", ["0", "1"], tmp_path / "a.jsonl", 60))
    holder.start()
    deadline = time.time() + 30
    while not any((tmp_path / "locks").glob("gpu-*.lock")):
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(0.2)
    other = GpuSlot(tmp_path / "locks", gpus=["0", "1"], poll_s=0.02)
    second = other.claim()  # the other GPU
    os.kill(holder.pid, signal.SIGKILL)  # crash: no cleanup code runs
    holder.join(10)
    third = GpuSlot(tmp_path / "locks", gpus=["0", "1"], poll_s=0.02, timeout_s=10).claim()
    assert {second, third} == {"0", "1"}
    other.release()


def test_one_or_no_gpu_needs_no_claim(tmp_path):
    assert GpuSlot(tmp_path, gpus=[]).claim() is None
    assert GpuSlot(tmp_path, gpus=["3"]).claim() == "3"
    assert not any(tmp_path.iterdir())
