"""Peak memory of a region of code, above what was allocated when it started.

CPU: the process's resident-set high-water mark (Linux: /proc/self/status VmHWM, reset through
/proc/self/clear_refs), so every allocator counts, torch's and others'. CUDA: torch's caching
allocator peak (torch.cuda.max_memory_allocated).
"""
from __future__ import annotations

import torch


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not found in /proc/self/status (peak CPU memory needs Linux)")


class PeakMemory:
    """with PeakMemory(device) as peak: ...;  peak.extra_bytes = peak - usage at entry."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.extra_bytes = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS to the current RSS
            self._start = _proc_status_bytes("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _proc_status_bytes("VmHWM")
        self.extra_bytes = max(0, peak - self._start)
