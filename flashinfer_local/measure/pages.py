"""Which pages of a span of this process's memory, or of a file in the page cache, are resident
(Linux: /proc/self/pagemap and mincore). The RSS sampler itself is ``runtime.rss``."""
from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import numpy as np



# ---- which pages are in memory (Linux): owners' resident bytes, and the page cache of a file

PAGE = mmap.PAGESIZE
_libc = None


def _c():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                               ctypes.c_int, ctypes.c_long]
        _libc.mmap.restype = ctypes.c_void_p
        _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return _libc


def _overlap(addr: int, nbytes: int, present: np.ndarray) -> int:
    """Bytes of [addr, addr + nbytes) on the pages flagged in ``present`` (one flag per page from
    the page holding ``addr``): the first and last page count only their share of the range."""
    first = addr // PAGE * PAGE
    lo = np.maximum(first + np.arange(len(present), dtype=np.int64) * PAGE, addr)
    hi = np.minimum(lo // PAGE * PAGE + PAGE, addr + nbytes)
    return int((hi - lo)[present].sum())


class PageMap:
    """Which pages of this process are resident (counted in RSS), from /proc/self/pagemap.

    Bit 63 of a page's entry: present in RAM. Not mincore: for a file mapping mincore reports the
    page cache (pages this process never touched count when another process or an earlier run
    loaded them), which is not RSS. Open once for several queries (``with PageMap() as pm``).
    """

    def __enter__(self):
        self._f = open("/proc/self/pagemap", "rb", buffering=0)
        return self

    def __exit__(self, *exc):
        self._f.close()

    def resident(self, addr: int, nbytes: int) -> int:
        """Resident bytes of [addr, addr + nbytes)."""
        if nbytes <= 0:
            return 0
        first, last = addr // PAGE, (addr + nbytes - 1) // PAGE
        self._f.seek(first * 8)
        entries = np.frombuffer(self._f.read((last - first + 1) * 8), np.uint64)    # [pages]
        return _overlap(addr, nbytes, (entries >> np.uint64(63)).astype(bool))

    def array(self, a) -> int:
        """Resident bytes of a numpy array's or torch tensor's data span."""
        if hasattr(a, "data_ptr"):                       # torch.Tensor
            return self.resident(a.data_ptr(), a.numel() * a.element_size())
        return self.resident(a.__array_interface__["data"][0], a.nbytes)


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc ``malloc_trim``), so that
    memory earlier work freed is not still counted in a baseline RSS and returned mid-measurement."""
    import gc
    gc.collect()
    try:
        _c().malloc_trim(0)
    except AttributeError:           # not glibc
        pass


def resident_bytes(addr: int, nbytes: int) -> int:
    """Bytes of this process's memory [addr, addr + nbytes) that are resident (see PageMap)."""
    with PageMap() as pm:
        return pm.resident(addr, nbytes)


def page_cache_bytes(path: str | Path) -> int:
    """Bytes of the file at ``path`` held in the kernel's page cache (not part of any RSS).

    mincore over a fresh read-only shared mapping: this process has touched none of its pages,
    so what mincore reports is the page cache alone.
    """
    size = os.path.getsize(path)
    if size == 0:
        return 0
    libc = _c()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            n = -(-size // PAGE)
            vec = (ctypes.c_ubyte * n)()
            if libc.mincore(addr, n * PAGE, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            present = (np.frombuffer(vec, np.uint8) & 1).astype(bool)
            return _overlap(addr, size, present)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
