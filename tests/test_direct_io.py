"""storage.direct_io: aligned buffers, run coalescing, parallel (direct) record reads."""
import errno
import logging
import os

import numpy as np
import pytest

from storage import direct_io
from storage.direct_io import RecordReader, aligned_empty, coalesce, measure_sequential_bandwidth
from storage.errors import BundleError

N, RB, LAYERS, HEADER = 37, 1024, 3, 4096


def record_value(layer, i):
    return (layer * N + i) % 251


@pytest.fixture
def record_file(tmp_path):
    """A fake ffn file: 4 KiB header, then per layer N records of RB bytes padded to 4 KiB.

    Returns (path, layer_offsets). Record i of layer l is RB bytes of value record_value(l, i).
    """
    path = tmp_path / "ffn.bin"
    offsets, parts = [], [np.full(HEADER, 0x20, np.uint8)]
    pos = HEADER
    for layer in range(LAYERS):
        offsets.append(pos)
        recs = np.repeat(np.array([record_value(layer, i) for i in range(N)], np.uint8)[:, None], RB, 1)
        pad = -recs.nbytes % 4096
        parts += [recs.ravel(), np.full(pad, 0xEE, np.uint8)]
        pos += recs.nbytes + pad
    np.concatenate(parts).tofile(path)
    return path, offsets


def expected(layer, ids):
    return np.repeat(np.array([record_value(layer, i) for i in ids], np.uint8)[:, None], RB, 1)


def coalesce_ref(ids, max_run):
    runs = []
    for j, x in enumerate(ids):
        if runs and x == runs[-1][0] + runs[-1][1] and runs[-1][1] < max_run:
            runs[-1][1] += 1
        else:
            runs.append([int(x), 1, j])
    return [tuple(r) for r in runs]


# ---------------------------------------------------------------- aligned_empty, coalesce

@pytest.mark.parametrize("shape,dtype,align", [((5, 1024), np.uint8, 4096), (7, np.float32, 512),
                                               ((3, 4, 5), np.float16, 4096), (0, np.uint8, 4096),
                                               ((2, 3), np.int64, 1 << 16)])
def test_aligned_empty(shape, dtype, align):
    a = aligned_empty(shape, dtype, align)
    assert a.shape == (shape if isinstance(shape, tuple) else (shape,))
    assert a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
    assert a.size == 0 or a.ctypes.data % align == 0   # numpy does not offset empty slices
    a[...] = 1   # the whole array is usable memory


def test_coalesce_cases():
    assert coalesce(np.array([], np.int64), 4) == []
    assert coalesce(np.array([7]), 4) == [(7, 1, 0)]
    assert coalesce(np.array([3, 4, 5, 9]), 2) == [(3, 2, 0), (5, 1, 2), (9, 1, 3)]
    assert coalesce(np.arange(10), 4) == [(0, 4, 0), (4, 4, 4), (8, 2, 8)]
    assert coalesce(np.arange(8), 4) == [(0, 4, 0), (4, 4, 4)]
    assert coalesce(np.array([0, 2, 4]), 100) == [(0, 1, 0), (2, 1, 1), (4, 1, 2)]
    assert coalesce(np.array([1, 2, 3, 10, 11]), 1) == [(1, 1, 0), (2, 1, 1), (3, 1, 2), (10, 1, 3),
                                                         (11, 1, 4)]
    assert all(type(v) is int for v in coalesce(np.array([5, 6], np.int32), 8)[0])
    with pytest.raises(ValueError):
        coalesce(np.arange(3), 0)


@pytest.mark.parametrize("seed", range(20))
def test_coalesce_matches_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    ids = np.flatnonzero(rng.random(n) < rng.random())
    max_run = int(rng.integers(1, 12))
    assert coalesce(ids, max_run) == coalesce_ref(ids, max_run)


# ---------------------------------------------------------------- RecordReader

def id_sets(seed):
    rng = np.random.default_rng(seed)
    yield np.array([int(rng.integers(N))])                     # one id
    yield np.array([0])                                        # first record
    yield np.array([N - 1])                                    # last record
    yield np.arange(N)                                         # full layer, runs > max_run
    yield np.arange(5, 30)                                     # one long run
    yield np.array([], np.int64)                               # nothing
    for p in (0.1, 0.5, 0.9):
        yield np.flatnonzero(rng.random(N) < p)


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_reads_land_in_right_rows(record_file, direct, seed):
    path, offsets = record_file
    with RecordReader(path, RB, offsets, threads=4, max_read_bytes=4 * RB, direct=direct) as r:
        assert r.max_run == 4
        for ids in id_sets(seed):
            for layer in range(LAYERS):
                dest = aligned_empty((len(ids), RB))
                dest[...] = 0xAB
                r.read(layer, ids, dest)
                np.testing.assert_array_equal(dest, expected(layer, ids))


def test_direct_and_buffered_agree_and_batches_overlap(record_file):
    path, offsets = record_file
    got = {}
    for direct in (True, False):
        with RecordReader(path, RB, offsets, threads=3, max_read_bytes=3 * RB, direct=direct) as r:
            rng = np.random.default_rng(0)
            sets = [np.flatnonzero(rng.random(N) < 0.4) for _ in range(LAYERS)]
            bufs = [aligned_empty((len(s), RB)) for s in sets]
            batches = [r.submit(layer, s, b) for layer, (s, b) in enumerate(zip(sets, bufs))]
            for b in batches:
                b.wait()
                assert b.done()
            got[direct] = bufs
    for a, b in zip(got[True], got[False]):
        np.testing.assert_array_equal(a, b)


def test_row_slice_of_aligned_buffer(record_file):
    path, offsets = record_file
    buf = aligned_empty((N, RB))
    with RecordReader(path, RB, offsets) as r:
        r.read(1, np.array([3, 4, 9]), buf[5:8])     # rows of an aligned buffer stay 512-aligned
    np.testing.assert_array_equal(buf[5:8], expected(1, [3, 4, 9]))


def test_bad_dest_raises_value_error(record_file):
    path, offsets = record_file
    ids = np.array([1, 2, 3])
    with RecordReader(path, RB, offsets) as r:
        raw = aligned_empty(len(ids) * RB + 512)
        with pytest.raises(ValueError, match="aligned"):
            r.submit(0, ids, raw[256:256 + len(ids) * RB].reshape(len(ids), RB))
        with pytest.raises(ValueError, match="contiguous"):
            r.submit(0, ids, aligned_empty((len(ids), 2 * RB))[:, :RB])
        with pytest.raises(ValueError):
            r.submit(0, ids, aligned_empty((len(ids) + 1, RB)))
        with pytest.raises(ValueError):
            r.submit(0, ids, aligned_empty((len(ids), RB), np.int8))
        with pytest.raises(ValueError, match="sorted"):
            r.submit(0, np.array([3, 2, 1]), aligned_empty((3, RB)))
    with pytest.raises(ValueError):
        RecordReader(path, 1000, offsets)
    with pytest.raises(ValueError):
        RecordReader(path, RB, [4096 + 100])


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("cut", [0, 512, 700])
def test_truncated_file_raises_bundle_error(record_file, direct, cut):
    path, offsets = record_file
    end = offsets[2] + 20 * RB + cut           # layer 2 ends inside record 20 (or right before it)
    os.truncate(path, end)
    with RecordReader(path, RB, offsets, threads=2, direct=direct) as r:
        r.read(2, np.arange(10), aligned_empty((10, RB)))                  # before the cut: fine
        batch = r.submit(2, np.array([3, 18, 19, 20, 21, 30]), aligned_empty((6, RB)))
        with pytest.raises(BundleError, match="short read at offset") as e:
            batch.wait()
        assert str(path) in str(e.value)
        assert batch.done()


def test_stats_count_bytes_ops_and_wait(record_file):
    path, offsets = record_file
    rng = np.random.default_rng(3)
    with RecordReader(path, RB, offsets, max_read_bytes=2 * RB + 100) as r:
        assert r.max_run == 2
        nbytes = ops = 0
        for layer in range(LAYERS):
            ids = np.flatnonzero(rng.random(N) < 0.6)
            r.read(layer, ids, aligned_empty((len(ids), RB)))
            nbytes += len(ids) * RB
            ops += len(coalesce(ids, 2))
        assert (r.bytes_read, r.read_ops) == (nbytes, ops)
        assert r.wait_s >= 0.0
    with RecordReader(path, RB, offsets, max_read_bytes=RB // 2) as r:   # smaller than a record
        assert r.max_run == 1


def test_fallback_when_o_direct_refused(record_file, monkeypatch, caplog):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    path, offsets = record_file
    real_open = os.open

    def refusing_open(p, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *a)

    monkeypatch.setattr(direct_io.os, "open", refusing_open)
    monkeypatch.setattr(direct_io, "_warned_fallback", False)
    with caplog.at_level(logging.WARNING, logger="storage.direct_io"):
        with RecordReader(path, RB, offsets) as r:
            assert r.direct is False
            ids = np.array([0, 1, 2, 17, 36])
            dest = aligned_empty((len(ids), RB))
            r.read(2, ids, dest)
            np.testing.assert_array_equal(dest, expected(2, ids))
        with RecordReader(path, RB, offsets) as r:   # second fallback: not warned again
            assert r.direct is False
    assert sum("O_DIRECT unavailable" in m for m in caplog.messages) == 1


def test_missing_file_is_bundle_error(tmp_path):
    with pytest.raises(BundleError, match="cannot open"):
        RecordReader(tmp_path / "nope.bin", RB, [0])


@pytest.mark.parametrize("direct", [True, False])
def test_measure_sequential_bandwidth(record_file, direct):
    path, _ = record_file
    bw = measure_sequential_bandwidth(path, seconds=0.05, block=64 << 10, direct=direct)
    assert bw > 0


def test_merge_gaps_groups_runs_within_the_gap_and_span():
    from storage.direct_io import merge_gaps
    runs = coalesce(np.array([1, 2, 5, 20, 21, 23]), 8)
    assert merge_gaps(runs, 2, 8) == [[(1, 2, 0), (5, 1, 2)], [(20, 2, 3), (23, 1, 5)]]
    assert merge_gaps(runs, 0, 8) == [[r] for r in runs]
    # the span limit counts the gap: 1..5 is 5 records
    assert merge_gaps(runs, 2, 4) == [[(1, 2, 0)], [(5, 1, 2)], [(20, 2, 3), (23, 1, 5)]]


@pytest.mark.parametrize("direct", [True, False])
def test_gap_reads_fill_only_the_wanted_rows(tmp_path, direct):
    rb, n = 1024, 64
    data = np.random.default_rng(3).integers(0, 256, (n, rb), dtype=np.uint8)
    path = tmp_path / "recs.bin"
    path.write_bytes(data.tobytes())
    ids = np.array([0, 2, 3, 7, 8, 30, 33, 63])
    with RecordReader(path, rb, [0], threads=3, max_gap_bytes=3 * rb, direct=direct) as r:
        dest = aligned_empty((len(ids), rb))
        r.read(0, ids, dest)
        assert np.array_equal(dest, data[ids])
        # gaps read: 1 (id 1) + 3 (4..6) + 2 (31, 32); 8..30 is too far
        assert r.gap_bytes == 6 * rb
        assert r.read_ops == 3 and r.bytes_read == (len(ids) + 6) * rb
