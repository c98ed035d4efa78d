"""Keep freed host memory in the process, so that a repeated step does not page-fault.

PyTorch's CPU tensors come from the C library's malloc. glibc serves large blocks
(above a threshold that adapts up to 32 MiB) with fresh mappings and hands them
back when they are freed, and trims the top of its heap when enough of it is free.
A training step frees and re-allocates its activations every time, so each step
touches new pages again: on a 2-core AMD EPYC (Zen 4) tiny p8 b8's step took
5k-28k minor page faults and 0.04-0.11 s of system time, varying with the process's
history. With both thresholds raised, the blocks stay in the heap and the faults
stop after the first step. The price is a resident set that stays at the step's
peak between steps, as with any caching allocator.

Training (`xcit train`) and the timing runs of `xcit bench` call `keep_freed_memory()`;
peak-memory measurements run in fresh processes with the opposite setting.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
_KEEP_BYTES = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds to 1 GiB for this process; False where the C library
    is not glibc (macOS, Windows, musl), which is left as it is."""
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        # setting either threshold by hand turns off glibc's adaptation of both, so set the two
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
    except (OSError, AttributeError):
        return False


def freed_memory_kept() -> bool:
    """Whether `keep_freed_memory()` has run in this process and took effect (asks, changes nothing)."""
    return keep_freed_memory.cache_info().currsize > 0 and keep_freed_memory()
