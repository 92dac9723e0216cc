"""One way to measure peak memory, reset per phase.

:class:`PeakMemory` wraps a phase (a calibration pass, the mask step, a validation). On CUDA it reports
the device's peak allocated bytes, reset when the phase starts. On CPU (Linux) it reports the process's
peak resident set (``VmHWM``), reset when the phase starts through ``/proc/self/clear_refs``; where
that reset is not allowed the only number left is the process-wide ``ru_maxrss``, which never
decreases, so a phase inherits the peaks of earlier ones. ``kind`` says which of the three a number
is. RSS includes the Python runtime, the libraries, the tokenised data and memory the allocator keeps
after earlier phases: compare phases and runs with each other, not with a model size.
"""

from __future__ import annotations

import ctypes
import gc
import re
import resource
from pathlib import Path
from typing import Any, Optional

import torch


def _vm_kib(field: str) -> Optional[int]:
    try:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


#: What each ``PeakMemory.kind`` measures, for reports.
KIND_DESCRIPTIONS = {
    "cuda_max_allocated": "CUDA max_memory_allocated over the phase",
    "cpu_peak_rss": "CPU peak resident set (VmHWM, reset per phase)",
    "cpu_process_max_rss_monotone": "CPU lifetime peak RSS (ru_maxrss, not resettable: earlier peaks count)",
}


class PeakMemory:
    """The peak memory of one phase (see the module docstring): ``with PeakMemory() as m: ...`` or
    ``m.start()`` / ``m.stop()`` across hooks; then ``peak_bytes`` (absolute), ``delta_bytes`` (over
    what was in use when it started) and ``kind``. ``device``: the CUDA device whose allocator is
    measured; default: CUDA when available, else the process's resident set."""

    def __init__(self, device: Optional[torch.device] = None) -> None:
        self.cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        self.kind = "unknown"
        self.start_bytes = 0
        self.peak_bytes = 0

    @property
    def delta_bytes(self) -> int:
        return max(0, self.peak_bytes - self.start_bytes)

    def start(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.kind, self.start_bytes = "cuda_max_allocated", int(torch.cuda.memory_allocated())
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS to the current RSS
            self.kind = "cpu_peak_rss"
        except OSError:
            self.kind = "cpu_process_max_rss_monotone"
        self.start_bytes = (_vm_kib("VmRSS") or 0) * 1024
        return self

    def stop(self) -> "PeakMemory":
        if self.kind == "cuda_max_allocated":
            self.peak_bytes = int(torch.cuda.max_memory_allocated())
        elif self.kind == "cpu_peak_rss" and _vm_kib("VmHWM") is not None:
            self.peak_bytes = _vm_kib("VmHWM") * 1024
        else:
            self.peak_bytes = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
        return self

    def __enter__(self) -> "PeakMemory":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise), so the
    next measurement's peak RSS starts from what is really alive."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
