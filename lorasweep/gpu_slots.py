"""One GPU per concurrent training job on a multi-GPU machine.

`--resources gpu=N` lets N training jobs run at once, but Snakemake does not tell a job *which* GPU is
its own. Each training job claims a slot here before CUDA is initialised: an exclusive ``flock`` on
``<lock_dir>/gpu-<id>.lock``, held for the life of the process and released by the kernel when the
process exits, crashes or is killed (no stale locks), and exports ``CUDA_VISIBLE_DEVICES=<id>``.

The candidate GPUs are those in ``CUDA_VISIBLE_DEVICES`` when it is already set (a SLURM job sees only
its own), else ``0 .. count-1`` with ``count`` from ``nvidia-smi -L``.
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


class GpuSlot:
    """Claim a free GPU (blocking up to ``timeout_s``); keep the object alive while training."""

    def __init__(self, lock_dir: str | Path, gpus: list[str] | None = None, timeout_s: float = 3600,
                 poll_s: float = 0.5):
        self.lock_dir = Path(lock_dir)
        self.gpus = visible_gpus() if gpus is None else gpus
        self.timeout_s, self.poll_s = timeout_s, poll_s
        self.gpu: str | None = None
        self._fd: int | None = None

    def claim(self) -> str | None:
        if len(self.gpus) <= 1:  # nothing to share out
            self.gpu = self.gpus[0] if self.gpus else None
            return self.gpu
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.timeout_s
        while True:
            for gpu in self.gpus:
                fd = os.open(self.lock_dir / f"gpu-{gpu}.lock", os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._fd, self.gpu = fd, gpu
                os.environ["CUDA_VISIBLE_DEVICES"] = gpu
                log.info("claimed GPU %s (of %s)", gpu, ",".join(self.gpus))
                return gpu
            if time.monotonic() > deadline:
                raise TimeoutError(f"no free GPU among {self.gpus} after {self.timeout_s:.0f}s: is "
                                   "--resources gpu=N larger than the number of GPUs?")
            time.sleep(self.poll_s)

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
