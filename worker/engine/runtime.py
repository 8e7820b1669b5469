"""Where and how a run computes: device, autocast precision, and the run's peak memory."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from worker.engine.errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: full fp32

    @property
    def precision(self) -> str:
        return "bf16" if self.autocast_dtype is torch.bfloat16 else "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def pick_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for, but no CUDA device is available")
    chosen = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    if precision == "auto":
        # bf16 autocast on a CPU without native bf16 is emulated: measured 16x slower than fp32 (AVX2).
        native = torch.cuda.is_bf16_supported() if chosen.type == "cuda" else cpu_has_native_bf16()
        precision = "bf16" if native else "fp32"
    return Runtime(device=chosen, autocast_dtype=torch.bfloat16 if precision == "bf16" else None)


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


class PeakMemory:
    """Peak memory of one run, not of the process's lifetime.

    CUDA: the allocator's peak, reset at the start. CPU: the peak resident set (VmHWM), reset at the
    start through /proc/self/clear_refs, minus the resident set at the start; Python's tracemalloc
    would miss torch's native allocations.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start_rss = 0
        self.peak_bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_rss = torch.cuda.memory_allocated(self.device)
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.start_rss = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.start_rss
        else:
            self.peak_bytes = max(0, _status_bytes("VmHWM") - self.start_rss)


def _status_bytes(field: str) -> int:
    try:
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
