"""Provenance of a run: package versions, hardware, workflow commit, the model files it loaded."""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import socket
import stat
import subprocess
from pathlib import Path

PACKAGES = ("torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "accelerate", "tokenizers",
            "snakemake", "lorasweep")


def package_versions() -> dict:
    """The installed distributions' versions; lorasweep's is the imported package's own (``PYTHONPATH`` at a
    checkout imports another lorasweep than the one installed)."""
    import sys

    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    if "lorasweep" in sys.modules:
        out["lorasweep"] = getattr(sys.modules["lorasweep"], "__version__", None)
    return out


def git_state(path: str | Path | None = None) -> dict:
    """Commit and dirty flag of the checkout that holds this package (None outside a git checkout, and where
    ``path`` is a copy inside another repository's folder that the repository does not track: not its commit)."""
    where = Path(path) if path else Path(__file__).resolve().parent.parent
    try:
        subprocess.run(["git", "-C", str(where), "ls-files", "--error-unmatch", "--", "."], capture_output=True,
                       check=True, timeout=10)
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip() != ""
        return {"git_commit": commit, "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


FINGERPRINTS = Path(".snakemake") / "lorasweep-fingerprints.json"  # the workflow's cache of file hashes


def _file_sha256(path: Path, cache: dict) -> str:
    """A file's sha256, from ``cache`` when the file's size, modification time and inode are those it was hashed
    at (a copy or a checkout changes the time: it is hashed again, to the same value)."""
    st = path.stat()
    key = str(path.resolve())
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    hit = cache.get(key)
    if hit and hit.get("stamp") == stamp:
        return hit["sha256"]
    with open(path, "rb") as f:  # in pieces: a model's weights are gigabytes
        cache[key] = {"stamp": stamp, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
    return cache[key]["sha256"]


def file_mode_from_umask() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the process's umask (read from /proc where Linux shows it;
    elsewhere set and put back at once)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return 0o666 & ~mask


def honour_umask(folder: str | os.PathLike) -> None:
    """Give a saved model's ``*.safetensors`` the mode every other file beside them got from the umask. safetensors
    0.8 writes them through a temporary file, created 0600 whatever the umask, and renames it into place
    (safetensors/safetensors#782): in a project folder shared with a group, the config and tokenizer were readable by
    it and the weights by their owner alone, so nobody else could load the model, adapter or merged model."""
    mode = file_mode_from_umask()
    for path in Path(folder).glob("*.safetensors"):
        if stat.S_IMODE(path.stat().st_mode) == 0o600 != mode:
            os.chmod(path, mode)


# the files of a model folder that make the model lorasweep loads: its config, safetensors weights (lorasweep reads
# no other format) and their index, the tokenizer's files, and code a trust_remote_code model runs. Not a README, nor
# weights in formats never read (pytorch_model.bin, flax, onnx), which `hf download` may also fetch.
MODEL_FILE_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                       "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                       "*.model", "*.tiktoken", "chat_template.*", "*.py")


# a trained run's saved model folder: the base's kinds of files, and a PEFT adapter's configuration
SAVED_MODEL_PATTERNS = (*MODEL_FILE_PATTERNS, "adapter_config.json")


def files_fingerprint(folder: str | Path, cache_path: str | Path | None = FINGERPRINTS,
                      patterns: tuple[str, ...] = MODEL_FILE_PATTERNS) -> str:
    """sha256 over the files of a model folder that make the model (``patterns``, :data:`MODEL_FILE_PATTERNS` by
    default: names, sizes and contents; not its subfolders, such as a training run's checkpoints): the same
    fingerprint, the same model.
    Each file's hash is kept in ``cache_path`` (the workflow's ``.snakemake`` folder, when it exists), so that a
    model of gigabytes is read once, not at every workflow start and in every job."""
    folder = Path(folder)
    cache_file = Path(cache_path) if cache_path is not None and Path(cache_path).parent.is_dir() else None
    cache = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
    before = dict(cache)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                       and any(fnmatch.fnmatch(p.name, pattern) for pattern in patterns)):
        h.update(f"{path.name}\0{path.stat().st_size}\0{_file_sha256(path, cache)}\n".encode())
    if cache_file is not None and cache != before:
        from .resume import atomic_write_json

        try:
            mine = cache_file.with_name(f"{cache_file.name}.{socket.gethostname()}.{os.getpid()}")  # nodes share it
            atomic_write_json(mine, cache)
            os.replace(mine, cache_file)
        except OSError:  # a read-only workflow folder: no cache, the same fingerprint
            pass
    return h.hexdigest()


_COMMIT = re.compile(r"[0-9a-f]{40}")  # a full git commit hash, as the hub names a snapshot


def hub_commit(repo_id: str, revision: str | None = None, repo_type: str = "model") -> str | None:
    """The commit a hub repository's ``revision`` (None: main) names in the local Hugging Face cache, as the last
    download through ``huggingface_hub`` resolved it (``refs/<revision>``; ``datasets.load_dataset`` fetches a
    dataset's card that way, and so leaves it); a revision that is a full commit is its own. None when not cached."""
    if revision and _COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type) / "refs" / (
        revision or "main")
    try:
        commit = ref.read_text().strip()
    except (OSError, ValueError):
        return None
    return commit if _COMMIT.fullmatch(commit) else None


def model_files(name_or_path: str, revision: str | None = None) -> dict:
    """Where the model ``name_or_path`` loads from and what it is: a local folder, or the hub's cached snapshot
    (its commit: the one ``revision``, or the hub's main, named when it was downloaded), with the fingerprint of
    its files (:func:`files_fingerprint`). Call it after loading the model: a hub model is then cached."""
    folder, commit = Path(name_or_path), None
    if not folder.is_dir():
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
        if not isinstance(hit, str):
            return {"model_commit": None, "model_files_sha256": None}
        folder = Path(hit).parent  # .../models--org--name/snapshots/<commit>
        commit = folder.name
    return {"model_commit": commit, "model_files_sha256": files_fingerprint(folder)}


def hardware(device: str) -> dict:
    import torch

    out = {
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
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


# environment variables that change what a benchmark measures (glibc's allocator, thread counts, the GPU used)
BENCHMARK_ENV_PREFIXES = ("MALLOC_", "OMP_", "MKL_", "PYTORCH_", "TORCHINDUCTOR_", "CUDA_VISIBLE_DEVICES")


def benchmark_provenance(script: str | Path, argv: list[str] | None = None, device: str | None = "cpu") -> dict:
    """How a result of ``benchmarks/<script>`` was made, to make it again: its command line (``argv``: the
    script's arguments, None: this process's; the script's path from the working folder, or absolute where the
    script is outside it), the working folder its relative paths start from, the time, the
    git commit and dirty flag of the script's checkout (and of the lorasweep package it imported, where that is
    another checkout: ``PYTHONPATH`` at an older one), package versions, the environment variables that change
    the measurement, and the machine (:func:`hardware` on ``device``; None leaves it out)."""
    import shlex
    import sys
    from datetime import datetime, timezone

    script, cwd = Path(script).resolve(), Path.cwd().resolve()
    args = [str(x) for x in (sys.argv[1:] if argv is None else argv)]
    shown = script.relative_to(cwd) if script.is_relative_to(cwd) else script  # reruns from cwd
    out = {"command": shlex.join(["python", str(shown), *args]), "argv": args,
           "cwd": os.getcwd(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           **git_state(script.parent), "packages": package_versions(),
           "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(BENCHMARK_ENV_PREFIXES)}}
    imported = sys.modules.get("lorasweep")  # the package the benchmark ran, wherever it was imported from
    package = Path(imported.__file__).resolve().parent if getattr(imported, "__file__", None) else None
    if package is not None and package.parent != script.parent.parent:
        out.update(lorasweep_path=str(package), **{f"lorasweep_{k}": v for k, v in git_state(package).items()})
    if device is not None:
        out["hardware"] = hardware(device)
    return out


def write_benchmark_json(path: str | os.PathLike, result: dict, script: str | Path, argv: list[str] | None = None,
                         device: str | None = "cpu", indent: int = 2) -> None:
    """A benchmark's ``--json`` file: its ``result`` with the :func:`benchmark_provenance` of ``script``."""
    record = {**result, "provenance": benchmark_provenance(script, argv, device)}
    Path(path).write_text(json.dumps(record, indent=indent, default=str) + "\n")


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
        t = self.totals()
        wall, other = t["wall_s"], t["other_cpu_s"]
        cores = os.cpu_count() or 1
        share = 100.0 * other / (wall * cores) if wall > 0 else 0.0
        return {"other_processes_cpu_share_pct": share, "machine_cpu_count": cores,
                "machine_busy_during_train": share > self.BUSY_PCT}
