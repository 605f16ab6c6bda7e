"""The memory condition peers without a budget get: their model file's pages pushed out of memory.

llama.cpp memory-maps its GGUF and has no budget; when the model does not fit, the kernel's reclaim
pages weights out, and a cyclic scan larger than memory re-reads nearly all of them every token.
``page_out`` models that after each token: ``madvise(MADV_PAGEOUT)`` on every mapping of the file in
this process (the pages leave the process) and ``posix_fadvise(DONTNEED)`` on the file (they leave
the page cache). ``drop_cache`` is the second half alone, for files read with plain I/O (AirLLM's
shards, accelerate's offload folder). ``resident`` counts a mapping's resident pages (``mincore``),
so the helpers can be checked. Linux only.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

MADV_PAGEOUT = 21
PAGE = os.sysconf("SC_PAGE_SIZE")
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]


def mappings(path: str | Path, pid: str = "self") -> list[tuple[int, int]]:
    """(start, end) of every mapping of ``path`` in a process (from /proc/PID/maps)."""
    real = os.path.realpath(path)
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].strip() == real:
                a, b = parts[0].split("-")
                out.append((int(a, 16), int(b, 16)))
    return out


def drop_cache(path: str | Path) -> None:
    """Evict ``path``'s pages from the page cache (those no process maps)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def page_out(path: str | Path) -> int:
    """Push this process's mapped pages of ``path`` out, then drop the file's page cache;
    returns the bytes of mappings advised."""
    total = 0
    for a, b in mappings(path):
        if _libc.madvise(a, b - a, MADV_PAGEOUT) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"madvise(MADV_PAGEOUT) failed: {os.strerror(err)} (Linux 5.4 or later needed)")
        total += b - a
    drop_cache(path)
    return total


def resident(addr: int, length: int) -> int:
    """Resident pages of the mapping [addr, addr + length) (``addr`` page-aligned)."""
    n = (length + PAGE - 1) // PAGE
    vec = (ctypes.c_ubyte * n)()
    if _libc.mincore(addr, length, vec) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mincore failed: {os.strerror(err)}")
    return sum(v & 1 for v in vec)


def resident_of(path: str | Path) -> int:
    """Resident pages of every mapping of ``path`` in this process."""
    return sum(resident(a, b - a) for a, b in mappings(path))
