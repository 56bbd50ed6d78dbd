"""Peak memory of a block of work: CUDA max allocated, or on CPU glibc's heap in use (sampled).

Used by the main job to report each run's training memory next to its metrics.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Optional

import torch


class PeakMemory:
    """Peak memory of a block above its start: CUDA max allocated, or on CPU the C heap in use.

    On CPU it samples glibc's ``mallinfo2`` (bytes in use, freed memory excluded, so earlier
    runs in the process do not hide this one's peak) every 5 ms, falling back to the process
    RSS from ``/proc/self/statm``. Sampling can miss a peak shorter than 5 ms: an estimate.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb: Optional[float] = None
        if device.type == "cuda":
            self.kind = "cuda max allocated"
        else:
            self.kind = "heap in use (sampled)" if _heap_bytes() is not None else "RSS growth (sampled)"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._start = self._peak = _cpu_bytes()
        self._stop = threading.Event()
        if self._start is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            rss = _cpu_bytes()
            if rss is not None and rss > self._peak:
                self._peak = rss

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
            return
        self._stop.set()
        if self._start is None:
            return
        self._thread.join()
        rss = _cpu_bytes() or 0
        self.peak_mb = max(self._peak, rss) - self._start
        self.peak_mb = max(self.peak_mb, 0) / 2**20


def _load_mallinfo2():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None

    class _MallInfo2(ctypes.Structure):
        _fields_ = [
            (n, ctypes.c_size_t)
            for n in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _load_mallinfo2()


def _heap_bytes() -> Optional[int]:
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)  # in use: small blocks + mmapped large blocks


def _cpu_bytes() -> Optional[int]:
    heap = _heap_bytes()
    return heap if heap is not None else _rss_bytes()


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
