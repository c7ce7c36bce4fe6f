"""Concurrent training jobs each get their own GPU: the claiming logic, with real processes on the CPU."""

import json
import multiprocessing as mp
import os
import signal
import time

import pytest

from lorasweep.gpu_slots import GpuSlot


@pytest.fixture(autouse=True)
def _cuda_visible_devices_restored():
    """GpuSlot.claim sets CUDA_VISIBLE_DEVICES in the process that claims, here pytest's own: without this, every test
    after this file ran with CUDA_VISIBLE_DEVICES=1 (the last claim's GPU), and so did the snakemake and training
    processes they start (on a machine with one GPU: none visible). Torn down after the tests' own monkeypatch."""
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    yield
    if before is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = before


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


def test_no_gpu_needs_no_claim_and_one_gpu_is_claimed_like_several(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert GpuSlot(tmp_path / "none", gpus=[]).claim() is None
    assert not (tmp_path / "none").exists()
    # one GPU, one job per GPU: a second job (--resources gpu=2 on this machine) waits instead of sharing it
    one = GpuSlot(tmp_path, gpus=["3"])
    assert one.claim() == "3" and one.peers() == 0
    with pytest.raises(TimeoutError):
        GpuSlot(tmp_path, gpus=["3"], timeout_s=0.2, poll_s=0.02).claim()
    one.release()
    assert GpuSlot(tmp_path, gpus=["3"], timeout_s=1).claim() == "3"


def test_gpu_training_on_a_machine_whose_gpus_cannot_be_listed_says_so(tmp_path, monkeypatch, caplog):
    """Without CUDA_VISIBLE_DEVICES and nvidia-smi no GPU can be listed: jobs are then not shared out among the
    GPUs (all use CUDA's default device), which the job's log says; CPU training (gpus=[]) has nothing to say."""
    import logging

    import lorasweep.gpu_slots as gs

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(gs.shutil, "which", lambda name: None)
    monkeypatch.setattr(gs, "_cuda_devices", lambda: 2)  # two GPUs that nothing listed
    with caplog.at_level(logging.WARNING, logger="lorasweep.gpu_slots"):
        assert GpuSlot(tmp_path, gpus=[]).claim() is None
        assert not caplog.records
        assert GpuSlot(tmp_path).claim() is None
    assert "no GPU listed" in caplog.text and "set CUDA_VISIBLE_DEVICES" in caplog.text
    caplog.clear()
    monkeypatch.setattr(gs, "_cuda_devices", lambda: 0)  # no GPU at all: training stops with NoGPUError instead
    with caplog.at_level(logging.WARNING, logger="lorasweep.gpu_slots"):
        assert GpuSlot(tmp_path).claim() is None
    assert not caplog.records


def _hold_slot(lock_dir, gpus, jobs_per_gpu, ready, stop):
    slot = GpuSlot(lock_dir, gpus=gpus, jobs_per_gpu=jobs_per_gpu, poll_s=0.02)
    slot.claim()
    ready.set()
    stop.wait(60)
    slot.release()


def test_jobs_per_gpu_fills_every_gpu_once_before_sharing_and_counts_the_peers(tmp_path, monkeypatch):
    """training.jobs_per_gpu: 2 on two GPUs: four jobs at once, two per GPU, spread before doubled up; each
    job sees the other job on its GPU as its peer, and a fifth job waits."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    first = GpuSlot(tmp_path, gpus=["0", "1"], jobs_per_gpu=2, poll_s=0.02)
    second = GpuSlot(tmp_path, gpus=["0", "1"], jobs_per_gpu=2, poll_s=0.02)
    assert (first.claim(), second.claim()) == ("0", "1")  # a GPU each before any GPU takes a second job
    assert first.peers() == 0 and second.peers() == 0
    holders = []
    for _ in range(2):  # other processes, as Snakemake's jobs are
        ready = ctx.Event()
        holders.append(ctx.Process(target=_hold_slot, args=(tmp_path, ["0", "1"], 2, ready, stop)))
        holders[-1].start()
        assert ready.wait(30)
    assert first.peers() == 1 and second.peers() == 1
    fifth = GpuSlot(tmp_path, gpus=["0", "1"], jobs_per_gpu=2, poll_s=0.02, timeout_s=0.3)
    with pytest.raises(TimeoutError, match="no free GPU slot"):
        fifth.claim()
    stop.set()
    for h in holders:
        h.join(30)
        assert h.exitcode == 0
    assert first.peers() == 0  # the peers' locks went with them
    second.release()
    assert first.peers() == 0 and fifth.claim() in ("0", "1")


def test_one_gpu_shared_by_jobs_per_gpu(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    slots = [GpuSlot(tmp_path, gpus=["0"], jobs_per_gpu=3, poll_s=0.02) for _ in range(3)]
    assert [s.claim() for s in slots] == ["0", "0", "0"]
    assert [s.peers() for s in slots] == [2, 2, 2]
    slots[1].release()
    assert slots[0].peers() == 1


def test_under_slurm_jobs_of_one_allocation_share_its_gpu_and_other_allocations_do_not_wait(tmp_path, monkeypatch):
    """snakemake inside one `srun --gpus=1` runs its jobs under one SLURM_JOB_ID: they queue for the GPU like
    anywhere else; another allocation's "GPU 0" is another card, so it never waits for this one's."""
    monkeypatch.setenv("SLURM_JOB_ID", "1001")
    one = GpuSlot(tmp_path, gpus=["0"])
    assert one.claim() == "0" and one.peers() == 0
    with pytest.raises(TimeoutError):
        GpuSlot(tmp_path, gpus=["0"], timeout_s=0.2, poll_s=0.02).claim()
    monkeypatch.setenv("SLURM_JOB_ID", "1002")
    assert GpuSlot(tmp_path, gpus=["0"], timeout_s=0.2, poll_s=0.02).claim() == "0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slurm-1001", "slurm-1002"]
    # an allocation with several GPUs, Snakemake running jobs locally inside it: a GPU each
    monkeypatch.setenv("SLURM_JOB_ID", "1003")
    a, b = (GpuSlot(tmp_path, gpus=["0", "1"], poll_s=0.02) for _ in range(2))
    assert {a.claim(), b.claim()} == {"0", "1"}


def test_under_slurm_gpus_listed_by_nvidia_smi_are_warned_about(tmp_path, monkeypatch, caplog):
    """A SLURM job without CUDA_VISIBLE_DEVICES lists its GPUs with nvidia-smi, which shows only the allocation's
    where the site confines jobs to their devices: elsewhere two allocations' jobs could pick the same GPU (each
    allocation locks in a folder of its own), so the job's log says so; with the variable set, nothing to say."""
    import logging

    import lorasweep.gpu_slots as gs

    monkeypatch.setenv("SLURM_JOB_ID", "2001")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(gs, "visible_gpus", lambda: ["0", "1"])  # nvidia-smi -L on a node of two GPUs
    with caplog.at_level(logging.WARNING, logger="lorasweep.gpu_slots"):
        slot = GpuSlot(tmp_path)
        assert slot.claim() == "0"
        slot.release()
    assert "SLURM job 2001 without CUDA_VISIBLE_DEVICES" in caplog.text and "nvidia-smi lists (0,1)" in caplog.text
    caplog.clear()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setattr(gs, "visible_gpus", lambda: ["1"])
    with caplog.at_level(logging.WARNING, logger="lorasweep.gpu_slots"):
        assert GpuSlot(tmp_path).claim() == "1"
    assert not caplog.records
