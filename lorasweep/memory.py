"""Peak-memory measurement with an explicit baseline.

CUDA: ``torch.cuda`` peak allocated / reserved bytes, counters reset after the model is loaded.
CPU: peak resident set size (``VmHWM``) of the training process, reset through
``/proc/self/clear_refs`` after the model is loaded; where that file cannot be written, a sampling
thread polls RSS instead (and says so in ``memory_method``).
"""

from __future__ import annotations

import threading
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


class PeakMemory:
    """Measures peaks from :meth:`reset` on; :meth:`read` returns fields named by what they are."""

    def __init__(self, device: str, sample_interval_s: float = 0.05):
        self.device = device
        self.sample_interval_s = sample_interval_s
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled_peak = 0
        self.method = None
        self.baseline: dict = {}

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
            torch.cuda.reset_peak_memory_stats()
        self.baseline["rss_at_load_bytes"] = rss_bytes()
        try:
            _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.method = "VmHWM after /proc/self/clear_refs reset"
        except OSError:
            self.method = f"RSS sampled every {self.sample_interval_s}s"
            self._sampled_peak = rss_bytes() or 0
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return dict(self.baseline)

    def _sample(self) -> None:
        while not self._stop.wait(self.sample_interval_s):
            self._sampled_peak = max(self._sampled_peak, rss_bytes() or 0)

    def current(self) -> dict:
        """Instantaneous figures, for per-step averages."""
        import torch

        out = {"rss_bytes": rss_bytes()}
        if self.device == "cuda":
            out["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
            out["cuda_reserved_bytes"] = torch.cuda.memory_reserved()
        return out

    def read(self, keep_running: bool = False) -> dict:
        """Peaks since :meth:`reset`. CUDA fields exist only on CUDA: absent is absent, never 0."""
        import torch

        out = dict(self.baseline)
        if self._thread is not None:
            if not keep_running:
                self._stop.set()
                self._thread.join()
                self._thread = None
            out["peak_rss_bytes"] = max(self._sampled_peak, rss_bytes() or 0)
        else:
            out["peak_rss_bytes"] = _status_bytes("VmHWM")
        out["peak_rss_method"] = self.method
        if self.device == "cuda":
            torch.cuda.synchronize()
            out["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated()
            out["peak_cuda_reserved_bytes"] = torch.cuda.max_memory_reserved()
        return out
