"""Host memory: how much there is and how much is free now (psutil)."""

from __future__ import annotations

from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class MemoryInfo:
    """Host RAM and swap: whether a model and its working set fit. Recorded but left out of the fingerprint, since
    available memory changes between runs and capacity does not change speed."""

    total_bytes: int
    available_bytes: int
    swap_total_bytes: int
    swap_free_bytes: int


def probe_memory() -> MemoryInfo:
    """This machine's MemoryInfo now, through psutil so the same code works on Linux, macOS and Windows."""
    virtual = psutil.virtual_memory()
    swap = psutil.swap_memory()
    return MemoryInfo(
        total_bytes=int(virtual.total),
        available_bytes=int(virtual.available),
        swap_total_bytes=int(swap.total),
        swap_free_bytes=int(swap.free),
    )
