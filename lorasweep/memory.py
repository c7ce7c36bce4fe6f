"""Peak-memory measurement with an explicit baseline.

CUDA: ``torch.cuda`` peak allocated / reserved bytes, counters reset after the model is loaded.
CPU: peak resident set size (``VmHWM``) of the training process, reset through
``/proc/self/clear_refs`` after the model is loaded; where that file cannot be written, a sampling
thread polls RSS instead (and says so in ``memory_method``).

Evaluation is not training: work inside :meth:`PeakMemory.excluded` (the evaluations during training)
has its own peaks (``eval_peak_*``) and does not count towards the training peaks; the counters are
reset after it, the CUDA cache emptied first, so what the evaluation allocated leaves no trace.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Current resident set size of this process, or None where /proc is absent."""
    rss = _status_bytes("VmRSS")
    if rss is None:
        try:
            import psutil

            rss = psutil.Process().memory_info().rss
        except Exception:  # noqa: BLE001
            return None
    return rss


def _return_freed_heap() -> None:
    """Hand memory freed on the heap back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    glibc keeps freed blocks below its mmap threshold (up to 32 MiB each) resident for reuse, so without
    this the RSS after an evaluation would still hold the evaluation's tensors."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Measures peaks from :meth:`reset` on; :meth:`read` returns fields named by what they are."""

    def __init__(self, device: str, sample_interval_s: float = 0.05):
        self.device = device
        self.sample_interval_s = sample_interval_s
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled_peak = 0
        self._lock = threading.Lock()  # the sampler's running maximum vs a reset of it
        self.method = None
        self.baseline: dict = {}
        self.active = False  # between reset() and the final read()
        self._held: dict = {}  # training peaks of the stretches before an excluded block
        self.excluded_peaks: dict = {}  # highest peaks inside excluded blocks, as eval_peak_* fields

    def reset(self) -> dict:
        """Record the footprint now (model loaded) and start measuring peaks from here."""
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # blocks cached by the baseline evaluation must not count as training's
            self.baseline = {
                "cuda_allocated_at_load_bytes": torch.cuda.memory_allocated(),
                "cuda_reserved_at_load_bytes": torch.cuda.memory_reserved(),
            }
        _return_freed_heap()  # the untrained model's evaluation freed its tensors: not part of the footprint
        self.baseline["rss_at_load_bytes"] = rss_bytes()
        self._held, self.excluded_peaks = {}, {}
        self._reset_counters()
        self.active = True
        return dict(self.baseline)

    def _reset_counters(self) -> None:
        """Peaks from now on: CUDA peak counters, VmHWM (or the sampler's running maximum)."""
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if self.method is None:
            try:
                _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
                self.method = "VmHWM after /proc/self/clear_refs reset"
            except OSError:
                self.method = f"RSS sampled every {self.sample_interval_s}s"
        elif self._thread is None:
            _CLEAR_REFS.write_text("5")
        if self.method.startswith("RSS sampled"):
            with self._lock:
                self._sampled_peak = rss_bytes() or 0
            if self._thread is None:
                self._stop.clear()
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()

    def _peaks(self) -> dict:
        """Peaks since the counters were last reset."""
        import torch

        if self._thread is not None:
            out = {"peak_rss_bytes": max(self._sampled_peak, rss_bytes() or 0)}
        else:
            out = {"peak_rss_bytes": _status_bytes("VmHWM")}
        if self.device == "cuda":
            torch.cuda.synchronize()
            out["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated()
            out["peak_cuda_reserved_bytes"] = torch.cuda.max_memory_reserved()
        return out

    @staticmethod
    def _max(a: dict, b: dict) -> dict:
        return {k: max(v for v in (a.get(k), b.get(k)) if v is not None) for k in {**a, **b}
                if a.get(k) is not None or b.get(k) is not None}

    @contextmanager
    def excluded(self):
        """A stretch (an evaluation) whose memory is not training's: its peaks go to :attr:`excluded_peaks`.

        Outside a measurement (before :meth:`reset`) it does nothing."""
        if not self.active:
            yield
            return
        import torch

        self._held = self._max(self._held, self._peaks())
        self._reset_counters()
        try:
            yield
        finally:
            inner = {"eval_" + k: v for k, v in self._peaks().items()}
            self.excluded_peaks = self._max(self.excluded_peaks, inner)
            if self.device == "cuda":
                torch.cuda.empty_cache()  # the evaluation's cached blocks must not count as training's reserve
            _return_freed_heap()  # what the evaluation freed must not stay resident and count as training's
            self._reset_counters()

    def _sample(self) -> None:
        while not self._stop.wait(self.sample_interval_s):
            rss = rss_bytes() or 0
            with self._lock:
                self._sampled_peak = max(self._sampled_peak, rss)

    def current(self) -> dict:
        """Instantaneous figures, for per-step averages."""
        import torch

        out = {"rss_bytes": rss_bytes()}
        if self.device == "cuda":
            out["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
            out["cuda_reserved_bytes"] = torch.cuda.memory_reserved()
        return out

    def read(self, keep_running: bool = False) -> dict:
        """Training peaks since :meth:`reset`, excluded stretches left out; their own peaks as ``eval_peak_*``.
        CUDA fields exist only on CUDA: absent is absent, never 0."""
        out = {**self.baseline, **self._max(self._held, self._peaks()), "peak_rss_method": self.method,
               **self.excluded_peaks}
        if not keep_running:
            self.stop()
        return out

    def stop(self) -> None:
        """End the measurement without reading it (training failed): the RSS sampler thread, where one runs, ends."""
        self.active = False
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
