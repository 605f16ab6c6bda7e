"""Parallel direct-I/O reads of FFN neuron records from ``ffn.safetensors``.

A layer's records are one aligned span of the file (see ``storage.format``): record ``i`` of layer
``l`` starts at ``layer_offsets[l] + i * record_bytes``, a multiple of 512. ``RecordReader`` turns a
sorted set of neuron ids into runs of consecutive ids (``coalesce``), merges runs separated by small
gaps (``merge_gaps``), and issues one ``os.preadv`` per merged run on a thread pool. ``preadv``
releases the GIL, so reads overlap each other and compute.

The file is opened with ``O_DIRECT`` where the file system allows it, so what this reader measures
is the SSD, not the page cache. O_DIRECT needs the buffer address, file offset and length to be
multiples of the logical block (512 here; ``aligned_empty`` makes such buffers). Where O_DIRECT is
refused the reader reads buffered and drops what it read from the page cache after every read.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait as _wait_all
from pathlib import Path

import numpy as np

from .errors import BundleError
from .format import RECORD_ALIGN

log = logging.getLogger(__name__)

BLOCK = RECORD_ALIGN                       # 512: offsets and lengths must be multiples of this
_REFUSED = {errno.EINVAL, errno.EOPNOTSUPP}
_warned_fallback = False                   # log the buffered fallback once per process


def aligned_empty(shape, dtype=np.uint8, align: int = 4096) -> np.ndarray:
    """An uninitialised C-contiguous array whose data pointer is a multiple of ``align``.

    Over-allocates ``align`` extra bytes and slices at the first aligned address; the returned view
    keeps the larger buffer alive through ``.base``. (An empty array's pointer is whatever numpy
    chooses: numpy does not offset the pointer of zero-size slices.)
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def coalesce(ids: np.ndarray, max_run: int) -> list[tuple[int, int, int]]:
    """Runs ``(first_id, count, index_in_ids)`` of consecutive ids, each at most ``max_run`` long.

    ``ids`` must be sorted and unique. Example: ids [3, 4, 5, 9], max_run 2 ->
    [(3, 2, 0), (5, 1, 2), (9, 1, 3)].
    """
    ids = np.asarray(ids, dtype=np.int64).ravel()
    if max_run < 1:
        raise ValueError(f"max_run must be >= 1, got {max_run}")
    if ids.size == 0:
        return []
    # maximal runs of consecutive ids: a run starts where the step from the previous id is not 1
    starts = np.concatenate(([0], np.flatnonzero(np.diff(ids) != 1) + 1))  # [R] index in ids
    lens = np.diff(np.concatenate((starts, [ids.size])))                  # [R]
    # split every run into ceil(len / max_run) chunks
    chunks = -(-lens // max_run)                                          # [R]
    first_chunk = np.cumsum(chunks) - chunks                              # [R] its 1st chunk's number
    run_of = np.repeat(np.arange(starts.size), chunks)                    # [C] run of each chunk
    k = np.arange(run_of.size) - first_chunk[run_of]                      # [C] chunk number in its run
    idx = starts[run_of] + k * max_run                                    # [C] index in ids
    count = np.minimum(max_run, starts[run_of] + lens[run_of] - idx)      # [C]
    return list(zip(ids[idx].tolist(), count.tolist(), idx.tolist()))


Run = tuple[int, int, int]         # (first_id, count, index_in_ids), as coalesce returns them


def merge_gaps(runs: list[Run], max_gap: int, max_span: int) -> list[list[Run]]:
    """Group runs (from ``coalesce``) whose gaps are at most ``max_gap`` records into spans of at
    most ``max_span`` records (gaps included): each group is read with one request.

    A request costs about as much as tens of KiB of transfer on an SSD, so reading a few unwanted
    records between two wanted runs (into a junk buffer) is cheaper than a second request.
    Example: runs of ids [1, 2, 5, 20], max_gap 2 -> [[(1, 2, 0), (5, 1, 2)], [(20, 1, 3)]].
    """
    groups: list[list[Run]] = []
    for run in runs:
        if groups:
            g = groups[-1]
            first, n, _ = g[-1]
            gap = run[0] - (first + n)
            if gap <= max_gap and run[0] + run[1] - g[0][0] <= max_span:
                g.append(run)
                continue
        groups.append([run])
    return groups


def _open(path: Path, direct: bool) -> tuple[int, bool]:
    """Open ``path`` read-only; returns (fd, is_direct). O_DIRECT only if the open and a probe work."""
    global _warned_fallback
    reason = "O_DIRECT not available on this platform"
    if direct and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError as e:
            if e.errno not in _REFUSED:
                raise BundleError(f"{path}: cannot open ({e.strerror})") from None
            reason = f"open: {e.strerror}"
        else:
            # probe: one 4 KiB read at offset 0, then one 512-byte read at offset 512 (records are
            # 512-byte multiples; a device with 4 KiB logical blocks would refuse them)
            probe = aligned_empty(4096)
            try:
                os.preadv(fd, [probe], 0)
                os.preadv(fd, [memoryview(probe)[:BLOCK]], BLOCK)
                return fd, True
            except OSError as e:
                os.close(fd)
                if e.errno not in _REFUSED:
                    raise BundleError(f"{path}: cannot read ({e.strerror})") from None
                reason = f"probe read: {e.strerror}"
    if direct:
        level = logging.DEBUG if _warned_fallback else logging.WARNING
        _warned_fallback = True
        log.log(level, "%s: O_DIRECT unavailable (%s); using buffered reads with "
                "POSIX_FADV_DONTNEED", path, reason)
    try:
        return os.open(path, os.O_RDONLY), False
    except OSError as e:
        raise BundleError(f"{path}: cannot open ({e.strerror})") from None


def _skip(bufs: list[memoryview], n: int) -> list[memoryview]:
    """``bufs`` without their first ``n`` bytes (to resume a short read)."""
    out = []
    for b in bufs:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(b[n:])
        n = 0
    return out


class ReadBatch:
    """The reads of one ``RecordReader.submit`` call (futures of pool tasks, each a few runs)."""

    def __init__(self, reader: "RecordReader", futures: list[Future]):
        self._reader = reader
        self._futures = futures

    def done(self) -> bool:
        return all(f.done() for f in self._futures)

    def wait(self) -> None:
        """Block until every read is done; re-raise the first failure (BundleError on short reads)."""
        t0 = time.perf_counter()
        _wait_all(self._futures)
        self._reader._count(wait_s=time.perf_counter() - t0)
        for f in self._futures:
            f.result()    # re-raises the task's exception, first task first


class RecordReader:
    """Reads sets of records of one layer into caller buffers with parallel (direct) preadv.

    ``layer_offsets[l]``: file offset of layer ``l``'s record 0 (a multiple of 512; 4096 in bundles).
    Reads of runs less than ``max_gap_bytes`` apart are merged: the records between them are read
    into a junk buffer (see ``merge_gaps``). Stats (plain ints/floats, updated under a lock):
    ``bytes_read`` (all bytes transferred), ``gap_bytes`` (the part of it read through gaps and
    dropped), ``read_ops`` (one per request), ``wait_s`` (seconds callers spent blocked in
    ``ReadBatch.wait``).
    """

    def __init__(self, path, record_bytes: int, layer_offsets: list[int], threads: int = 8,
                 max_read_bytes: int = 256 * 1024, max_gap_bytes: int = 0, direct: bool = True):
        if record_bytes <= 0 or record_bytes % BLOCK:
            raise ValueError(f"record_bytes must be a positive multiple of {BLOCK}, got {record_bytes}")
        if any(o % BLOCK for o in layer_offsets):
            raise ValueError(f"layer offsets must be multiples of {BLOCK}: {layer_offsets}")
        self.path = Path(path)
        self.record_bytes = record_bytes
        self.layer_offsets = [int(o) for o in layer_offsets]
        self.max_run = max(1, max_read_bytes // record_bytes)
        self.max_gap = max_gap_bytes // record_bytes       # unwanted records read through, at most
        # gap bytes land here and are dropped; every reader thread shares it (contents never used)
        self._junk = aligned_empty(max(self.max_gap, 1) * record_bytes)
        self.fd, self.direct = _open(self.path, direct)
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="record-read")
        self._lock = threading.Lock()
        self.bytes_read, self.read_ops, self.wait_s, self.gap_bytes = 0, 0, 0.0, 0

    def _count(self, nbytes: int = 0, ops: int = 0, wait_s: float = 0.0,
               gap_bytes: int = 0) -> None:
        with self._lock:
            self.gap_bytes += gap_bytes
            self.bytes_read += nbytes
            self.read_ops += ops
            self.wait_s += wait_s

    def _read_runs(self, reads: list[tuple[list[memoryview], int]]) -> None:
        """On a pool thread: one ``preadv`` per ``(buffers, offset)``; buffers are 512-aligned rows
        of dest, and junk rows for the gaps between runs.

        Several reads share one task: a pool task costs tens of microseconds of Python, about as
        much as a small SSD read (measured: ~15k tasks/s vs ~140k runs/s on a 2-core VM)."""
        nbytes = ops = 0
        try:
            for bufs, offset in reads:
                n = sum(len(b) for b in bufs)
                done = 0
                while done < n:   # regular files return short only at EOF; loop anyway
                    got = os.preadv(self.fd, _skip(bufs, done), offset + done)
                    # direct: a remainder off a 512 boundary can only be the file's end
                    if got <= 0 or (self.direct and got % BLOCK and done + got < n):
                        raise BundleError(
                            f"{self.path}: short read at offset {offset + done} ({done + got} of "
                            f"{n} bytes; the file is truncated, re-run convert)")
                    done += got
                if not self.direct:   # keep the page cache from serving later reads
                    os.posix_fadvise(self.fd, offset, n, os.POSIX_FADV_DONTNEED)
                nbytes, ops = nbytes + n, ops + 1
        finally:
            self._count(nbytes=nbytes, ops=ops)

    def submit(self, layer: int, ids: np.ndarray, dest: np.ndarray) -> ReadBatch:
        """Start reading records ``ids`` (sorted, unique) of ``layer`` into ``dest``.

        ``dest``: uint8 [len(ids), record_bytes], C-contiguous, 512-byte aligned (``aligned_empty``
        or a row slice of one); row j receives record ids[j]. Returns at once: leave ``dest`` alone
        until ``wait()`` returns.
        """
        ids = np.asarray(ids)
        if (not isinstance(dest, np.ndarray) or dest.dtype != np.uint8
                or dest.shape != (ids.size, self.record_bytes)):
            raise ValueError(f"dest must be uint8 [{ids.size}, {self.record_bytes}], got "
                             f"{getattr(dest, 'dtype', type(dest))} {getattr(dest, 'shape', '')}")
        if not dest.flags.c_contiguous or not dest.flags.writeable:
            raise ValueError("dest must be C-contiguous and writeable")
        if dest.size and dest.ctypes.data % BLOCK:   # (numpy gives empty arrays arbitrary pointers)
            raise ValueError(f"dest must be {BLOCK}-byte aligned (use aligned_empty); "
                             f"address % {BLOCK} = {dest.ctypes.data % BLOCK}")
        if ids.size and (ids[0] < 0 or np.any(np.diff(ids) <= 0)):
            raise ValueError("ids must be sorted, unique and non-negative")
        if not ids.size:
            return ReadBatch(self, [])
        base, rb = self.layer_offsets[layer], self.record_bytes
        mv = memoryview(dest).cast("B")      # flat bytes view: row i is mv[i*rb:(i+1)*rb]
        junk = memoryview(self._junk)
        runs = []                            # (buffers, file offset): one request each
        gap = 0
        for group in merge_gaps(coalesce(ids, self.max_run), self.max_gap, self.max_run):
            bufs, end = [], group[0][0]
            for first, n, i in group:
                if first > end:              # the unwanted records between two runs
                    bufs.append(junk[:(first - end) * rb])
                    gap += (first - end) * rb
                bufs.append(mv[i * rb:(i + n) * rb])
                end = first + n
            runs.append((bufs, base + group[0][0] * rb))
        self._count(gap_bytes=gap)
        # ~4 tasks per worker: enough to keep every worker busy (queue depth = threads) and balance
        # uneven latencies, few enough that the per-task Python cost stays small
        per_task = -(-len(runs) // (4 * self.threads))
        futures = [self._pool.submit(self._read_runs, runs[k:k + per_task])
                   for k in range(0, len(runs), per_task)]
        return ReadBatch(self, futures)

    def read(self, layer: int, ids: np.ndarray, dest: np.ndarray) -> None:
        self.submit(layer, ids, dest).wait()

    def close(self) -> None:
        if self.fd >= 0:
            self._pool.shutdown(wait=True)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "RecordReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def measure_sequential_bandwidth(path, seconds: float = 2.0, block: int = 8 << 20,
                                 direct: bool = True) -> float:
    """Bytes/s of single-threaded sequential reads of ``path`` from offset 0, wrapping at EOF.

    Uses O_DIRECT when ``direct`` and allowed (else buffered + POSIX_FADV_DONTNEED, as RecordReader).
    ``block`` is rounded up to a multiple of 4096. For benchmarks to report beside their figures.
    """
    block = -(-block // 4096) * 4096
    fd, is_direct = _open(Path(path), direct)
    try:
        mv = memoryview(aligned_empty(block))
        total, off = 0, 0
        t0 = time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            got = os.preadv(fd, [mv], off)
            if not is_direct and got:
                os.posix_fadvise(fd, off, got, os.POSIX_FADV_DONTNEED)
            if got <= 0 and off == 0:
                raise ValueError(f"{path}: empty file")
            total += got
            off = off + got if got == block else 0    # short read: end of file, wrap
        return total / elapsed
    finally:
        os.close(fd)
