"""What a run leaves behind to survive a crash or an out-of-memory kill, and how the next attempt reads it.

Checkpoints carry lorasweep's state beside the Trainer's files (``STATE_FILE``: token counts, time spent,
memory peaks, the log history) so that a resumed run's metrics cover every segment; ``OOM_FILE`` records
out-of-memory attempts so that Snakemake's retry trains with half the per-device batch (effective batch kept).
Both are keyed by the run's settings and data: nothing carries over into a run that computes something else.
``LOCK_FILE`` is held by the process training a run: a second one (a job whose snakemake was killed trains on, and
the rerun starts another) stops at once instead of training beside it into the same files.
``StopOnSignal`` turns SIGTERM and SIGINT during training (a cluster's preemption or time limit, Ctrl-C) into a
checkpoint at the next logging step and a :class:`Stopped` error, so that the next attempt resumes from there.
``FAILED_FILE`` records why an attempt failed, so that Snakemake's retry of an error that no retry changes (the
configuration, the data, the model's files) stops at once instead of loading and training up to it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import threading
from pathlib import Path

log = logging.getLogger("lorasweep.train")


STATE_FILE = "lorasweep_state.json"
LOCK_FILE = ".train.lock"
OOM_FILE = "oom.json"
EVAL_OOM_FILE = "eval_oom.json"
FAILED_FILE = "failed.json"


class TrainingOOM(RuntimeError):
    """Out of memory; the next attempt (Snakemake `retries`) halves the per-device batch. ``retryable`` False:
    there is no smaller batch to retry with."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


def resume_key(spec: dict, training: dict) -> str:
    """Checkpoints are resumed only by the same run with the same settings (batch included)."""
    import hashlib

    return hashlib.sha256(json.dumps({"spec": spec, "training": training}, sort_keys=True, default=str)
                          .encode()).hexdigest()[:16]


# each memory figure's footprint at load (PeakMemory's baseline), by kind: what a segment's figures sit on
AT_LOAD = {"rss": "rss_at_load_bytes", "cuda_allocated": "cuda_allocated_at_load_bytes",
           "cuda_reserved": "cuda_reserved_at_load_bytes"}


def rebase_peaks(peaks: dict, then: dict | None, now: dict) -> dict:
    """An earlier segment's peaks moved onto this segment's footprint at load: each is what that segment added
    over its own footprint (``then``, its ``*_at_load_bytes``) plus this one's (``now``). A resumed process
    starts afresh, with its own runtime baseline; the raw peak of another process would mix the two and the
    run's ``peak - at_load`` figures would count the difference. Without a recorded baseline, unchanged."""
    if not then:
        return dict(peaks)
    out = {}
    for k, v in peaks.items():
        b = AT_LOAD.get(k.removeprefix("eval_").removeprefix("peak_").removesuffix("_bytes"))
        known = b is not None and None not in (v, then.get(b), now.get(b))
        out[k] = v - then[b] + now[b] if known else v
    return out


def rebase_sums(sums: dict, then: dict | None, now: dict) -> dict:
    """Earlier segments' per-step memory sums (``{figure: [sum, steps]}``) moved onto this segment's footprint at
    load, as :func:`rebase_peaks` moves their peaks: each step counts what it held above its own process's
    footprint plus this one's, so that the run's means do not mix two processes' runtimes."""
    if not then:
        return {k: list(v) for k, v in sums.items()}
    out = {}
    for k, (total, n) in sums.items():
        b = AT_LOAD.get(k.removesuffix("_bytes"))
        if b is not None and None not in (then.get(b), now.get(b)):
            total += n * (now[b] - then[b])
        out[k] = [total, n]
    return out


class RunBusy(RuntimeError):
    """Another process is training this run (its folder's ``LOCK_FILE`` is held)."""


class RunLock:
    """An exclusive ``flock`` on ``<out_dir>/.train.lock`` for the life of a training job, released by the kernel
    when the process ends however it ends. Snakemake keeps two of its own jobs off one output, but not a job it
    lost: killed, snakemake leaves its training job running, and the rerun README describes would start a second
    one, both writing the run's checkpoints and log history (a review saw them interleaved, and accepted)."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = os.read(fd, 200).decode(errors="replace").split()
            os.close(fd)
            pid, host = (held + ["?", "?"])[:2]
            raise RunBusy(f"another process (pid {pid} on {host}) is training this run ({self.path.parent}): a "
                          "training job left running when snakemake was killed? Stop it (`kill " + pid + "` on " +
                          host + "; on a cluster, `scancel` its job) and run snakemake again: the run resumes from "
                          "its last checkpoint. Do not wait for it to finish: the new snakemake has already "
                          "deleted the outputs it writes, and retrains the run anyway") from None
        except OSError as e:  # a file system without locks (some NFS and Lustre mounts): train without one
            os.close(fd)
            log.warning("no lock on %s (%s): nothing keeps a second process from training this run at once", self.path, e)
            return self
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Stopped(RuntimeError):
    """Training stopped by a signal after saving a checkpoint: the next attempt (Snakemake's retry, a rerun)
    resumes from it."""


class StopOnSignal:
    """While training: the first SIGTERM or SIGINT asks the run to train on to its next logging step, save a
    checkpoint there and stop (``requested`` names the signal; the Trainer's callback acts on it); a second one
    stops at once, as it would without this. A cluster's preemption or time limit sends SIGTERM some time before SIGKILL
    (SLURM: KillWait, 30 s by default; ``--signal=TERM@120`` sends it sooner), Ctrl-C sends SIGINT: without this
    both lose the steps since the last periodic checkpoint. Only the main thread can take signals: elsewhere
    (and when ``enabled`` is false: no checkpoints) the signals keep their handlers, as an ignored one does."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.requested: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:  # ignored (a job started with &): stays ignored
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = name
            log.warning("%s: training stops at its next logging step (training.logging_steps), after saving a "
                        "checkpoint to resume from (%s again stops at once, losing the steps since the last "
                        "checkpoint)", name, name)
            return
        previous = self._previous.get(signum)
        self._restore()
        if callable(previous):  # Python's own SIGINT handler: KeyboardInterrupt
            previous(signum, frame)
        else:
            os.kill(os.getpid(), signum)  # the default action: the process ends by the signal

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()


def _changed_files(ckpt: Path, files: dict | None) -> str | None:
    """What differs between a checkpoint's files and their sizes when it was written (``files``), or None."""
    for name, size in (files or {}).items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} holds {path.stat().st_size:,} bytes, {size:,} when it was written"
    return None


def find_resumable(ckpt_root: Path, key: str) -> tuple[Path | None, dict | None]:
    """The newest complete checkpoint (lorasweep's state beside the Trainer's files) and that state, when it
    was written with the same settings. A newer checkpoint a crash left half-written is deleted and the
    complete one before it used; checkpoints of other settings are all deleted."""
    if not ckpt_root.is_dir():
        return None, None
    found = sorted((int(p.name.split("-")[1]), p) for p in ckpt_root.glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[1].isdigit())
    for _, ckpt in reversed(found):
        state = read_json(ckpt / STATE_FILE)
        if state is None:  # the Trainer's files without lorasweep's state: a crash while it was written
            log.info("discarding %s: written only in part (a crash while it was saved)", ckpt)
            shutil.rmtree(ckpt)
            continue
        if state.get("key") != key:
            log.info("discarding checkpoints in %s: written with other settings or data", ckpt_root)
            shutil.rmtree(ckpt_root)
            return None, None
        changed = _changed_files(ckpt, state.get("files"))
        if changed:
            log.warning("discarding %s: %s", ckpt, changed)
            shutil.rmtree(ckpt)
            continue
        return ckpt, state
    return None, None


def halve_batch(training: dict, halvings: int) -> dict | None:
    """``training`` with its per-device batch cut ``halvings`` times by about half and gradient accumulation
    raised to keep the effective batch exactly: each halving takes the largest divisor of ``batch_size`` at most
    half the batch before (8 -> 4 -> 2 -> 1; 6 -> 3 -> 1; 9 -> 3 -> 1; 5 -> 1). None when a halving finds none:
    a batch is never "halved" to itself."""
    b = cur = training["batch_size"]
    for _ in range(halvings):
        smaller = [d for d in range(1, cur // 2 + 1) if b % d == 0]
        if not smaller:
            return None
        cur = max(smaller)
    return {**training, "batch_size": cur, "grad_accum": training["grad_accum"] * (b // cur)}


def _keyed_record(path: Path, key: str | None) -> dict | None:
    """The out-of-memory record at ``path`` when it was made with the settings ``key`` (None: any); a record of
    other settings or data is stale: deleted."""
    record = read_json(path) if path.exists() else None
    if record is not None and key is not None and record.get("key") != key:
        log.info("an earlier out-of-memory record (%s) is for other settings or data: ignored", path)
        path.unlink(missing_ok=True)
        return None
    return record


def batch_after_oom(out_dir: Path, training: dict, key: str | None = None) -> tuple[dict, int]:
    """The settings for this attempt after the out-of-memory attempts recorded in ``oom.json`` (each halves
    the per-device batch, effective batch kept), and their number. A record made with other settings or
    data (``key``, the un-halved settings') is stale: deleted, and the configured batch used."""
    path = out_dir / OOM_FILE
    record = _keyed_record(path, key)
    halvings = int((record or {}).get("halvings") or 0)
    if not halvings:
        return training, 0
    halved = halve_batch(training, halvings)
    if halved is None:
        raise TrainingOOM(f"out of memory even at per-device batch 1 (after {halvings} halvings of "
                          f"training.batch_size = {training['batch_size']}): reduce training.max_length, enable "
                          "training.gradient_checkpointing, or use a GPU with more memory (delete "
                          f"{path} to try the configured batch again)", retryable=False)
    return halved, halvings


def record_oom(out_dir: Path, training: dict, halvings: int, error: Exception, key: str | None = None) -> TrainingOOM:
    """Record an out-of-memory attempt; ``training``: the configured (un-halved) settings, ``halvings``:
    this attempt's. The error says what the next attempt (Snakemake's retry) trains with."""
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    now = halve_batch(training, halvings) or training
    nxt = halve_batch(training, halvings + 1)
    atomic_write_json(out_dir / OOM_FILE, {"halvings": halvings + 1, "last_error": first, "key": key,
                                           "failed_batch_size": now["batch_size"]})
    return TrainingOOM(f"out of memory at per-device batch {now['batch_size']} x accumulation {now['grad_accum']}. "
                       + (f"The next attempt (Snakemake retries the job) trains with batch {nxt['batch_size']} x "
                          f"accumulation {nxt['grad_accum']}, the same effective batch" if nxt
                          else f"Batch {now['batch_size']} cannot be halved") + f". ({first})",
                       retryable=nxt is not None)


class EvalOOM(RuntimeError):
    """Out of memory in an evaluation: its batch (``training.eval_batch_size``), not the training batch."""


def record_eval_oom(out_dir: Path, key: str, error: Exception) -> None:
    """Record an evaluation's out-of-memory error for the settings ``key`` (:func:`refuse_after_eval_oom`)."""
    atomic_write_json(Path(out_dir) / EVAL_OOM_FILE, {"key": key, "error": str(error)})


def refuse_after_eval_oom(out_dir: Path, key: str) -> None:
    """Stop at once when an earlier attempt with the same settings ran out of memory evaluating: Snakemake retries
    a failed training job (for the training batch's out-of-memory errors, which a retry halves), and this one
    would train up to the same evaluation and fail there again. A record of other settings is deleted."""
    path = Path(out_dir) / EVAL_OOM_FILE
    record = _keyed_record(path, key)
    if record is None:
        return
    raise EvalOOM(f"{record.get('error')} [an earlier attempt with these settings; this one stops before training "
                  f"up to it again: delete {path} to try the same eval batch again]")


class RepeatedFailure(RuntimeError):
    """A retry of an attempt that failed with an error no retry changes: stopped before it starts."""


# libraries whose errors are a network's: a hub download may succeed a moment later
_NETWORK_MODULES = {"requests", "httpx", "httpcore", "urllib3", "socket", "ssl", "aiohttp"}
# a GPU's own faults (an Xid, a busy device, a driver hiccup) may clear; the same code on the same data fails alike
_CUDA_FAULT = re.compile(r"CUDA error|CUDA driver|CUDA-capable device|NCCL|CUBLAS_STATUS|cuDNN error")
# ... except the ones the code or data cause, which fail alike every time (an index out of range in a kernel)
_CUDA_BUG = re.compile(r"device-side assert|illegal memory access")


def retry_may_help(error: BaseException) -> bool:
    """Whether Snakemake's retry of a failed training job can end otherwise: out of memory while training (the
    retry halves the per-device batch), a network error (a hub download), a CUDA fault. The exception's causes
    count too (a model that could not be loaded because the hub was unreachable). Errors in the configuration,
    the data, the model's files or the code, and an evaluation's out-of-memory error (its batch is not halved),
    fail the same way every time."""
    seen = set()
    e = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (EvalOOM, RepeatedFailure)):
            return False
        if isinstance(e, Stopped):  # by a signal, with a checkpoint: the retry resumes from it
            return True
        if type(e).__name__ == "CacheDamaged":  # lorasweep.data's: deleted, so the retry tokenizes afresh
            return True
        if isinstance(e, TrainingOOM):
            return e.retryable
        if type(e).__name__ == "OfflineModeIsEnabled":  # HF_HUB_OFFLINE=1 (a ConnectionError): no retry goes online
            return False
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ == "OutOfMemoryError":
            return True
        if type(e).__module__.split(".")[0] in _NETWORK_MODULES:
            return True
        if isinstance(e, RuntimeError) and _CUDA_FAULT.search(str(e)):
            return not _CUDA_BUG.search(str(e))
        e = e.__cause__ or e.__context__
    return False


def record_failure(out_dir: Path, attempt: int | None, error: BaseException) -> None:
    """Record why attempt ``attempt`` of a training job failed (:func:`refuse_repeated_failure`). A retry that
    was itself refused passes its first attempt's error on."""
    if attempt is None:
        return
    if isinstance(error, RepeatedFailure) and getattr(error, "record", None):
        record = {**error.record, "attempt": attempt}
    else:
        text = str(error).strip()
        record = {"attempt": attempt, "error": type(error).__name__, "message": text.splitlines()[0] if text else "",
                  "retry_may_help": retry_may_help(error), "first_attempt": attempt}
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(out_dir) / FAILED_FILE, record)
    except OSError as e:  # a full disk: the job's own error is what to report, not this record's
        log.warning("could not record the failure in %s (%s): a retry trains again", Path(out_dir) / FAILED_FILE, e)


def failures_since(runs_root: str | Path, since: float, logs_root: str | Path = "logs/train") -> str:
    """The training jobs whose last attempt failed since ``since`` (a time stamp; the workflow's start), one line
    each with the error and the log: printed when the workflow ends in failure, where Snakemake's own account of
    each failed job scrolled by long before (``--keep-going`` over a sweep). A job killed outright, with no error of
    its own, is named by the log it left (``<log>.<time>-unfinished``) unless a retry trained the run (a kill after an
    attempt's error: the kill, then that error). Empty when none."""
    lines, listed = {}, {}  # per run: its line; the runs with a failed.json: when it was written, and its record
    for path in sorted(Path(runs_root).glob(f"*/seed*/{FAILED_FILE}")):
        try:
            if (written := path.stat().st_mtime) < since:
                continue  # an older run's, not tried again this time
            record = read_json(path)
        except (OSError, ValueError):
            continue
        run, seed = path.parent.parent.name, path.parent.name
        listed[f"{run}/{seed}"] = written, record
        lines[f"{run}/{seed}"] = (f"  {run}/{seed}: {record.get('error')}: {record.get('message')} "
                                  f"(attempt {record.get('attempt')}; log {Path(logs_root) / run / seed}.log and its "
                                  "*-failed copies)")
    # an attempt killed outright (the out-of-memory killer, kill -9) writes no failed.json: its log's second name
    # (lorasweep.logs.script_logging) is what is left of it, one per attempt; a run trained since by a retry has its
    # metrics.json; a kill before the failed.json was written is not the last attempt (a kill after it is: the retry
    # of an error that a retry may help, a network error, killed before it could write one)
    killed: dict[str, list[tuple[float, Path]]] = {}
    for path in Path(logs_root).glob("*/seed*.log.*-unfinished"):
        run, seed = path.parent.name, path.name.split(".log.", 1)[0]
        try:
            if (path.stat().st_mtime < (listed[f"{run}/{seed}"][0] if f"{run}/{seed}" in listed else since)
                    or (Path(runs_root) / run / seed / "metrics.json").exists()):
                continue
            killed.setdefault(f"{run}/{seed}", []).append((path.stat().st_mtime, path))
        except OSError:
            continue
    for name, attempts in sorted(killed.items()):
        path = max(attempts)[1]  # the last attempt's
        said = _last_said(path)
        lines[name] = (f"  {name}: killed without an error of its own (the kernel's out-of-memory killer, kill -9, "
                       "a cluster's hard limit?)"
                       + (f", in each of {len(attempts)} attempts (Snakemake's retries resume from the last "
                          "checkpoint, if any): a kill that comes back is most likely memory (on the CPU the "
                          "out-of-memory killer; on a cluster the job's mem_mb)" if len(attempts) > 1 else "")
                       + ("; the last attempt's log " if len(attempts) > 1 else "; its log ") + str(path)
                       + (f", which last said: {said}" if said else ""))
        if name in listed:  # an attempt before the kills failed with an error
            record = listed[name][1]
            lines[name] += (f" (attempt {record.get('attempt')} before it: {record.get('error')}: "
                            f"{record.get('message')})")
    if not lines:
        return ""
    # a run stopped by a signal (Ctrl-C, a cluster's SIGTERM) saved a checkpoint and has nothing to fix; after Ctrl-C
    # Snakemake marks the job incomplete, and a plain rerun stops with its IncompleteFilesException
    stopped = {name for name, (_, record) in listed.items() if record.get("error") == Stopped.__name__
               and name not in killed}
    fix = ("Fix the cause and run snakemake again: it trains only what is missing."
           + (" A run stopped by a signal resumes from its checkpoint (after Ctrl-C, run again with "
              "--rerun-incomplete)." if stopped else ""))
    if stopped and stopped == set(lines):
        fix = ("Run the same command again, with --rerun-incomplete after Ctrl-C (Snakemake marks the jobs it "
               "stopped incomplete): a run stopped by a signal resumes from its checkpoint.")
    return (f"lorasweep: these training runs failed (each error in its failed.json under {runs_root}):\n"
            + "\n".join(lines.values()) + "\nThe others' results are kept"
            + ("; with --keep-going the others train on. " if set(lines) - stopped else ". ") + fix)


def _last_said(log_path: Path) -> str:
    """The last message lorasweep logged in ``log_path`` (where a killed job had got to: "step 40/150 ..."), or ""."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return ""
    for line in reversed(text.splitlines()):
        m = re.match(r"\S+ \S+ [A-Z]+ lorasweep[\w.]*: (.*)", line)
        if m:
            return " ".join(m.group(1).split())
    return ""


def refuse_repeated_failure(out_dir: Path, attempt: int | None) -> None:
    """Stop Snakemake's retry (``attempt`` > 1) of a training job whose previous attempt failed with an error no
    retry changes (:func:`retry_may_help`). A first attempt (a new Snakemake run, after a fix) clears an old
    record; a retry after an attempt that left none (a crash, a kill) trains, resuming from its checkpoint."""
    path = Path(out_dir) / FAILED_FILE
    if attempt is None:
        return
    if attempt <= 1:
        path.unlink(missing_ok=True)
        return
    record = read_json(path) if path.exists() else None
    if not record or record.get("attempt") != attempt - 1 or record.get("retry_may_help", True):
        return
    err = RepeatedFailure(
        f"attempt {record.get('first_attempt', 1)} of this job failed with {record.get('error')}: "
        f"{record.get('message')} -- a retry fails the same way, so attempt {attempt} stops here (Snakemake "
        "retries training jobs for out-of-memory errors, which halve the batch, and for network and CUDA errors). "
        "Fix the cause and run snakemake again.")
    err.record = record
    raise err


def logged_loss_sum(history: list[dict], step: int) -> float | None:
    """The training loss summed over steps 1..``step`` from the logged records (each the mean over the steps
    since the one before); None when the last one logged is not at ``step``."""
    total, prev = 0.0, 0
    for h in history:
        if "loss" in h and h["step"] <= step:
            total += h["loss"] * (h["step"] - prev)
            prev = h["step"]
    return total if prev == step else None


@contextlib.contextmanager
def written_whole(path: Path, durable: bool = False):
    """A text file to write ``path`` with, whole or not at all: written beside it (``<path>.tmp``), it replaces
    ``path`` when the block ends, and is removed when the block fails. ``durable``: also across a power loss, the
    bytes reach the disk before the rename, and the rename before this returns."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:  # a full disk: no part-written file left beside it
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    if durable:
        _fsync_folder(path.parent)


def atomic_write_json(path: Path, obj: dict) -> None:
    """Write ``path`` whole or not at all, also across a power loss (:func:`written_whole`)."""
    with written_whole(path, durable=True) as f:
        f.write(json.dumps(obj, indent=2, default=str) + "\n")


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a folder that cannot be opened (some platforms): the rename stands as it is
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: Path) -> dict | None:
    """A JSON file's object; None when it is missing, empty or cut short (a crash while it was written)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None
