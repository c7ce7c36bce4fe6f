"""Logging for workflow scripts: progress to the console and the rule's log, library noise to the log only."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path

# Library messages every job prints on a healthy run, left out of its log (a warning there should mean something):
# (logger, start of the message) for logging records, (category, module that raises it, start of the message) for
# warnings.
EXPECTED_LOGS = [
    # bitsandbytes on a CPU with AVX512-BF16, on import: its optional CPU kernel for 4-bit matmuls is not installed, so
    # QLoRA on the CPU takes its PyTorch path (what lorasweep's CPU tests and the tiny preset measure); not used on a GPU
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    # transformers, once per process on model.dequantize() (the merge of a QLoRA adapter): "The modules are
    # dequantized in torch.float32 and casted to torch.float32.", the fp32 base the merge means to make
    ("transformers.integrations.bitsandbytes", "The modules are dequantized in "),
]
EXPECTED_WARNINGS = [
    # PEFT's PeftModel asks transformers 5 for the renamed is_activation_checkpointing under its old name
    (FutureWarning, "transformers.modeling_utils", "`is_gradient_checkpointing` is deprecated"),
]


class _Expected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(record.name == name and str(record.msg).startswith(start) for name, start in EXPECTED_LOGS)


@contextlib.contextmanager
def script_logging(log_path: str | os.PathLike, level: int = logging.INFO):
    """Route a script's output to ``log_path``; echo lorasweep's progress lines to the console.

    On an exception: the traceback goes to the log, a one-paragraph message to the console, exit 1. The
    failed attempt's log is also kept as ``<log>.<time>-failed``: Snakemake deletes a job's log before it
    retries or reruns the job. While the script runs, ``<log>.<time>-unfinished`` is a second name (a hard link)
    of the log, removed when it ends: a process killed outright (the kernel's out-of-memory killer, ``kill -9``,
    a cluster's hard limit), which has no chance to keep anything, leaves its log under that name. A script whose
    log was deleted or replaced while it ran (Snakemake's rerun of a job it had left running deletes the log first)
    keeps what it wrote as ``<log>.<time>-detached``.
    """
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    if os.path.isfile(log_path) and os.stat(log_path).st_nlink > 1:
        # a log run outside Snakemake left (appended to below): another name's file, not to grow with this run's
        shutil.copyfile(log_path, f"{log_path}.tmp")
        os.replace(f"{log_path}.tmp", log_path)
    log_file = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives for the process
    stamp = time.strftime("%Y%m%dT%H%M%S")
    running = _free_name(log_path, stamp, "unfinished")
    try:
        os.link(log_path, running)
    except OSError:  # a file system without hard links: the failed attempt's log is copied instead
        running = None
    # the console is file descriptor 2 as the script found it; from here on, descriptor 2 is the log: what writes to
    # it directly (a subprocess such as papermill's kernel, C++ warnings of torch or bitsandbytes) goes to the log
    console, saved_fd2 = sys.__stderr__, None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sys.__stderr__.flush()
        saved_fd2 = os.dup(2)
        console = open(os.dup(saved_fd2), "w", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed on the way out
        os.dup2(log_file.fileno(), 2)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    file_handler = logging.StreamHandler(log_file)
    file_handler.setFormatter(fmt)
    console_handler = logging.StreamHandler(console)
    # the console names the job (several run at once: training runs with gpu=N, the adapter stages)
    console_handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s [{job_label(log_path)}] %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    ours = logging.getLogger("lorasweep")
    # what the process had before, put back on the way out: a caller that goes on (a test, a notebook) must not
    # keep handlers that write to the closed log file
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in (root, ours)]
    # the expected records dropped on the loggers that make them, before any handler: transformers' own handler
    # writes its records, which never reach the root's
    expected_logs = _Expected()
    sources = [logging.getLogger(name) for name in dict.fromkeys(name for name, _ in EXPECTED_LOGS)]
    for lg in sources:
        lg.addFilter(expected_logs)
    root.handlers[:] = [file_handler]
    root.setLevel(logging.WARNING)
    ours.handlers[:] = [console_handler]
    ours.setLevel(level)
    ours.propagate = True  # and to the log file through the root handler
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # nor progress bars (loading and writing weights, a hub download): in a log, a line of carriage returns
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported
    for module, off in (("huggingface_hub.utils", "disable_progress_bars"),  # transformers reads it on import
                        ("transformers.utils.logging", "disable_progress_bar")):
        if module in sys.modules:
            getattr(sys.modules[module], off)()
    expected = warnings.catch_warnings()  # the filters as they were, put back on the way out
    expected.__enter__()
    for category, module, start in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(start), category=category, module=re.escape(module) + r"\Z")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    old_out, old_err = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = log_file
    try:
        yield ours
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - reported, then the job fails
        try:
            log_file.write(traceback.format_exc())
            log_file.flush()
        except OSError as log_error:  # a full disk takes no log either: the traceback goes to the console
            console.write(traceback.format_exc() + f"\n(not in {log_path}: {log_error})\n")
        kept = _free_name(log_path, time.strftime("%Y%m%dT%H%M%S"), "failed")
        try:
            if running is not None:
                os.replace(running, kept)
                running = None
            else:
                shutil.copyfile(log_path, kept)
        except OSError:
            kept = None
        name = type(e).__name__
        console.write(f"\nlorasweep: {name}: {e}{write_failure_hint(e)}\n  (full traceback in {log_path}"
                      + (f", kept in {kept} for when Snakemake retries or reruns the job" if kept else "") + ")\n\n")
        console.flush()
        raise SystemExit(1) from None
    finally:
        sys.stdout, sys.stderr = old_out, old_err
        expected.__exit__(None, None, None)
        for lg in sources:
            lg.removeFilter(expected_logs)
        for lg, handlers, lvl, propagate in saved:
            lg.handlers[:] = handlers
            lg.setLevel(lvl)
            lg.propagate = propagate
        if saved_fd2 is not None:
            with contextlib.suppress(OSError):
                os.dup2(saved_fd2, 2)
                os.close(saved_fd2)
        try:
            log_file.close()
        except OSError as e:  # its last lines could not be written: the job's own outputs are whole, and stay
            console.write(f"lorasweep: the log {log_path} is missing its last lines ({e}; "
                          f"{write_room(os.path.dirname(os.path.abspath(log_path)))})\n")
        if saved_fd2 is not None and console is not sys.__stderr__:
            console.close()
        if running is not None:  # ended: the log has its own name
            with contextlib.suppress(OSError):
                if _same_file(running, log_path):
                    os.unlink(running)
                else:  # the log was deleted or replaced while this ran (a rerun of a job left running): its only name
                    os.replace(running, _free_name(log_path, stamp, "detached"))


# a write stopped by the file system or a limit, not by the data: what to tell the user (the errno's of a full disk, a
# quota, a file size limit; Rust's writers such as safetensors' say "(os error N)")
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def write_room(path: str | os.PathLike = ".") -> str:
    """How much a process may still write at ``path``: the free space of its file system, and the file size limit
    (``ulimit -f``) when one is set."""
    import resource

    try:
        free = f"{shutil.disk_usage(path).free / 2**20:,.1f} MiB free on the file system of {os.path.abspath(path)}"
    except OSError:
        free = f"the file system of {os.path.abspath(path)} cannot be asked for its free space"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return free + ("" if limit == resource.RLIM_INFINITY else
                   f"; this process may write no file larger than {limit:,} bytes (`ulimit -f` in the shell that "
                   "started it: `ulimit -f unlimited` lifts it)")


def write_failure_hint(error: BaseException) -> str:
    """For an error that is (or was caused by) a write a full disk, a quota or a file size limit stopped, what this
    process may still write and what to do, as a sentence to append to its message; "" otherwise, and for an error
    that already says so (``room_told``)."""
    seen, e = set(), error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "room_told", False):
            return ""
        code = e.errno if isinstance(e, OSError) else None
        if code is None and (m := _OS_ERROR.search(str(e))):
            code = int(m.group(1))
        if code in WRITE_ERRNOS:
            where = os.path.dirname(os.path.abspath(e.filename)) if getattr(e, "filename", None) else "."
            return (f" -- a write failed ({os.strerror(code)}): {write_room(where)}. Make room, then run snakemake "
                    "again: the job starts over (a training job from its last complete checkpoint)")
        e = e.__cause__ or e.__context__
    return ""


def job_label(log_path: str | os.PathLike) -> str:
    """The job a log belongs to, from its path under ``logs/``: ``logs/train/lora-r8/seed42.log`` ->
    ``train/lora-r8/seed42``, ``logs/prepare_data.log`` -> ``prepare_data``."""
    parts = Path(log_path).with_suffix("").parts
    return "/".join(parts[len(parts) - parts[::-1].index("logs"):] if "logs" in parts[:-1] else parts[-1:])


def _home_folder(xdg_variable: str | None, relative: str, name: str) -> Path | None:
    """``$xdg_variable/name``, else ``~/relative/name``; None without a home."""
    if xdg_variable and os.environ.get(xdg_variable):
        return Path(os.environ[xdg_variable], name)
    try:
        return Path.home() / relative / name
    except RuntimeError:  # no HOME and no user entry
        return None


def _can_write(folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        folder.mkdir(parents=True, exist_ok=True)  # as the library would
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def library_folders_in_workdir(*variables: str) -> None:
    """Where the home folder cannot be written (read-only or missing, as on some cluster nodes and containers),
    matplotlib and IPython (papermill's kernel) each warned in the job's log ("mkdir -p failed ... it is highly
    recommended to set the MPLCONFIGDIR environment variable", "IPython parent ... is not a writable location") and
    worked from a fresh temporary folder, matplotlib rebuilding its font cache every time. Then, and only when the
    user set none, ``MPLCONFIGDIR`` / ``IPYTHONDIR`` name a folder under the working directory's ``.snakemake/``.
    ``variables``: those of the libraries the caller imports: the check makes the library's folder in the home
    folder, as the library would, and leaves another's alone."""
    defaults = {"MPLCONFIGDIR": [_home_folder("XDG_CONFIG_HOME", ".config", "matplotlib"),
                                 _home_folder("XDG_CACHE_HOME", ".cache", "matplotlib")],
                "IPYTHONDIR": [_home_folder(None, "", ".ipython")]}
    for variable in variables:
        if os.environ.get(variable) or all(_can_write(f) for f in defaults[variable]):
            continue
        fallback = Path(".snakemake", "lorasweep-home", variable.lower()).resolve()
        try:
            fallback.mkdir(parents=True, exist_ok=True)
        except OSError:  # nor the working directory (a script run elsewhere): the library's temporary folder
            continue
        os.environ[variable] = str(fallback)


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _free_name(log_path, stamp: str, what: str) -> str:
    """``<log>.<stamp>-<what>``, or ``<stamp>-2-<what>``, ... when taken (attempts failing within a second, as
    Snakemake's retries of a quick error do)."""
    name, n = f"{log_path}.{stamp}-{what}", 1
    while os.path.lexists(name):
        n += 1
        name = f"{log_path}.{stamp}-{n}-{what}"
    return name


class _CurrentStderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when it emits, not the stream it was made with: a
    caller that swaps stderr (pytest's capture, a notebook) and closes the old one gets no logging errors."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):  # StreamHandler.__init__ assigns one; stderr is looked up at each emit instead
        pass


def console_progress(level: int = logging.INFO) -> logging.Logger:
    """lorasweep's progress lines (steps, losses, evaluations) on stderr, for scripts run by hand such as
    the benchmarks: a long run shows where it is."""
    ours = logging.getLogger("lorasweep")
    if not any(getattr(h, "_lorasweep_console", False) for h in ours.handlers):
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._lorasweep_console = True
        ours.addHandler(handler)
    ours.setLevel(level)
    return ours
