"""One GPU per concurrent training job (or ``training.jobs_per_gpu`` jobs per GPU).

`--resources gpu=N` lets N training jobs run at once, but Snakemake does not tell a job *which* GPU is
its own. Each training job claims a slot here before CUDA is initialised: an exclusive ``flock`` on
``<lock_dir>/gpu-<id>.lock``, held for the life of the process and released by the kernel when the
process exits, crashes or is killed (no stale locks), and exports ``CUDA_VISIBLE_DEVICES=<id>``.

The candidate GPUs are those in ``CUDA_VISIBLE_DEVICES`` when it is already set (a SLURM job sees only
its own), else ``0 .. count-1`` with ``count`` from ``nvidia-smi -L``. Under SLURM the locks go in a folder
of the allocation's own (``slurm-<SLURM_JOB_ID>``): its GPU ids are not another allocation's.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]


def _cuda_devices() -> int:
    """CUDA devices torch sees (0 without CUDA); asked only where no GPU could be listed, so no slot will set
    CUDA_VISIBLE_DEVICES after it."""
    import torch

    return torch.cuda.device_count()


class GpuSlot:
    """Claim a free slot on a GPU (blocking, up to ``timeout_s`` when one is given); keep the object alive
    while training.

    Each GPU has ``jobs_per_gpu`` slots (``training.jobs_per_gpu``, default 1: one training job per GPU at a
    time). Every GPU gets one job before any GPU gets a second. ``peers()`` tells how many
    other training jobs hold a slot on the same GPU right now, so a run can record that it shared its GPU.
    """

    def __init__(self, lock_dir: str | Path, gpus: list[str] | None = None, jobs_per_gpu: int = 1,
                 timeout_s: float | None = None, poll_s: float = 0.5):
        self.lock_dir = Path(lock_dir)
        self.gpus = visible_gpus() if gpus is None else gpus
        self.unlisted = gpus is None and not self.gpus  # GPU training, but no GPU could be listed
        self.from_smi = gpus is None and os.environ.get("CUDA_VISIBLE_DEVICES") is None  # nvidia-smi's list
        self.jobs_per_gpu = max(1, int(jobs_per_gpu))
        self.timeout_s, self.poll_s = timeout_s, poll_s
        self.gpu: str | None = None
        self.slot: int | None = None
        self._fd: int | None = None

    def _path(self, gpu: str, k: int) -> Path:
        return self.lock_dir / (f"gpu-{gpu}.lock" if k == 0 else f"gpu-{gpu}.{k}.lock")

    def claim(self) -> str | None:
        if not self.gpus:  # no GPU: nothing to share out
            if self.unlisted and _cuda_devices():  # GPUs there, but unlisted (on a machine without any: NoGPUError)
                log.warning("no GPU listed (CUDA_VISIBLE_DEVICES is not set and nvidia-smi is not on the PATH): "
                            "training jobs are not shared out among GPUs, each uses CUDA's default device, and "
                            "runs do not record sharing one; set CUDA_VISIBLE_DEVICES (e.g. 0,1) to list them")
            return None
        if os.environ.get("SLURM_JOB_ID") and self.lock_dir.name != f"slurm-{os.environ['SLURM_JOB_ID']}":
            # Under SLURM the GPU ids are the allocation's own (another job's "GPU 0" is another card), while
            # the lock folder may be shared between nodes: one lock folder per allocation. Jobs of one
            # allocation (snakemake run inside `srun --gpus=1`) share its GPUs through it; jobs of different
            # allocations (the SLURM executor: one each) never wait for each other.
            self.lock_dir = self.lock_dir / f"slurm-{os.environ['SLURM_JOB_ID']}"
            if self.from_smi:
                log.warning("SLURM job %s without CUDA_VISIBLE_DEVICES: its GPUs are those nvidia-smi lists (%s), "
                            "which are this allocation's only where the site confines jobs to their devices "
                            "(cgroups); otherwise jobs of two allocations on one node may train on the same GPU. "
                            "Ask SLURM for the GPUs (--gpus, --gres=gpu:N), which sets CUDA_VISIBLE_DEVICES",
                            os.environ["SLURM_JOB_ID"], ",".join(self.gpus))
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        start, noted = time.monotonic(), None
        while True:
            for k in range(self.jobs_per_gpu):  # every GPU's first slot before any GPU's second
                for gpu in self.gpus:
                    fd = os.open(self._path(gpu, k), os.O_RDWR | os.O_CREAT, 0o644)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        os.close(fd)
                        continue
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                    self._fd, self.gpu, self.slot = fd, gpu, k
                    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
                    log.info("claimed GPU %s (GPUs: %s), slot %d of %d", gpu, ",".join(self.gpus), k + 1,
                             self.jobs_per_gpu)
                    return gpu
            now = time.monotonic()
            if self.timeout_s is not None and now - start > self.timeout_s:
                raise TimeoutError(f"no free GPU slot among {self.gpus} x {self.jobs_per_gpu} after "
                                   f"{self.timeout_s:.0f}s")
            if noted is None or now - noted > 600:
                log.info("waiting for a free GPU slot: %d GPU(s) x %d job(s) each are taken (--resources gpu=N "
                         "above that queues jobs; training.jobs_per_gpu lets jobs share a GPU)", len(self.gpus),
                         self.jobs_per_gpu)
                noted = now
            time.sleep(self.poll_s)

    def peers(self) -> int | None:
        """Other training jobs holding a slot on this job's GPU now; None when this job holds no slot."""
        if self._fd is None:
            return None
        n = 0
        for k in range(self.jobs_per_gpu):
            path = self._path(self.gpu, k)
            if k == self.slot or not path.exists():
                continue
            fd = os.open(path, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: taken and given back at once
                fcntl.flock(fd, fcntl.LOCK_UN)
            except BlockingIOError:
                n += 1  # held by a live process (the kernel drops a dead one's lock)
            finally:
                os.close(fd)
        return n

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        self.claim()
        return self

    def __exit__(self, *exc):
        self.release()
