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
