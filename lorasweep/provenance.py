"""Provenance of a run: package versions, hardware, workflow commit."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

PACKAGES = ("torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "accelerate", "tokenizers",
            "snakemake", "lorasweep")


def package_versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state(path: str | Path | None = None) -> dict:
    """Commit and dirty flag of the checkout that holds this package (None outside a git checkout)."""
    where = Path(path) if path else Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip() != ""
        return {"git_commit": commit, "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


def hardware(device: str) -> dict:
    import torch

    out = {
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda_version": torch.version.cuda,
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        out.update(gpu_name=props.name, gpu_total_memory_bytes=props.total_memory,
                   gpu_capability=f"{props.major}.{props.minor}")
    return out


def hardware_label(hw: dict) -> str:
    """One line naming what trained: the GPU, or the CPU and its torch threads (``hw`` from :func:`hardware`)."""
    return hw.get("gpu_name") or f"CPU ({hw['cpu']}, {hw['torch_threads']} threads)"


class MachineShare:
    """How much of the machine's CPU other processes used while a run trained.

    Timings are only comparable between runs when each had the machine to itself. Between
    :meth:`start` and :meth:`stop`, the CPU time of every process on the machine (``/proc/stat`` via
    psutil) minus this process's own is divided by the capacity (wall time x cores); above
    ``BUSY_PCT`` the report flags the run's timings as taken on a busy machine.
    """

    BUSY_PCT = 10.0

    def __init__(self, prior: dict | None = None):
        """``prior``: :meth:`totals` of earlier segments of the same run (a run resumed after a crash)."""
        self.prior = prior or {}
        self._t = None

    def totals(self) -> dict:
        """Other processes' CPU seconds and the wall seconds so far, earlier segments included."""
        import time

        import psutil

        other = self.prior.get("other_cpu_s", 0.0)
        wall = self.prior.get("wall_s", 0.0)
        if self._t is not None:
            other += max(0.0, (self._busy(psutil.cpu_times()) - self._sys) - (self._own_cpu() - self._own))
            wall += time.perf_counter() - self._t
        return {"other_cpu_s": other, "wall_s": wall}

    def start(self) -> None:
        import time

        import psutil

        self._t = time.perf_counter()
        self._sys = self._busy(psutil.cpu_times())
        self._own = self._own_cpu()

    @staticmethod
    def _busy(t) -> float:
        return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))

    @staticmethod
    def _own_cpu() -> float:
        import psutil

        t = psutil.Process().cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    def stop(self) -> dict:
        import os

        t = self.totals()
        wall, other = t["wall_s"], t["other_cpu_s"]
        cores = os.cpu_count() or 1
        share = 100.0 * other / (wall * cores) if wall > 0 else 0.0
        return {"other_processes_cpu_share_pct": share, "machine_cpu_count": cores,
                "machine_busy_during_train": share > self.BUSY_PCT}
