"""The eviction helpers the peer benchmark uses (tools/peers/evict.py): a file this process has
mapped, touched page by page, drops to about zero resident pages."""
import mmap
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
evict = pytest.importorskip("peers.evict")


def test_page_out_empties_a_mapped_file(tmp_path):
    f = tmp_path / "weights.bin"
    with open(f, "wb") as fh:
        fh.write(os.urandom(8 << 20))
        fh.flush()
        os.fsync(fh.fileno())                  # dirty pages cannot be dropped: write them out first
    with open(f, "rb") as fh:
        m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        a = np.frombuffer(m, np.uint8)
        assert int(a[::evict.PAGE].astype(np.int64).sum()) >= 0          # touch every page
        pages = len(m) // evict.PAGE
        assert evict.mappings(f) and evict.resident_of(f) >= 0.9 * pages
        advised = evict.page_out(f)
        assert advised >= len(m)
        assert evict.resident_of(f) <= 0.05 * pages
        assert int(a[:evict.PAGE * 4].sum()) >= 0                          # still readable: paged back in
        del a
        m.close()


def test_mappings_of_a_file_not_mapped_is_empty(tmp_path):
    f = tmp_path / "x"
    f.write_bytes(b"x")
    assert evict.mappings(f) == []
    evict.drop_cache(f)


def test_the_table_builder_on_canned_results():
    import bench_peers
    rows = [{"budget_pct": 50, "budget_bytes": 512 << 20, "name": "flashinfer-local int4", "condition": "--dram-budget",
             "decode_tps": 6.0, "ttft_s": 0.5, "read_bytes_per_token": 100 << 20, "peak_rss_bytes": 500 << 20,
             "text": "abc"},
            {"budget_pct": 50, "budget_bytes": 512 << 20, "name": "llama.cpp", "condition": "pages out",
             "decode_tps": 2.0, "ttft_s": 1.0, "read_bytes_per_token": 1 << 30, "peak_rss_bytes": 600 << 20,
             "text": "abd"},
            {"budget_pct": 25, "budget_bytes": 256 << 20, "name": "flashinfer-local int8", "condition": "--dram-budget",
             "error": "--dram-budget 256 MiB is too small"}]
    md = bench_peers.table(rows).splitlines()
    assert md[0].startswith("| budget | row |") and len(md) == 5
    assert "| 6.00 | 3.00x | 500 ms | 100 MiB | 500 MiB | yes |" in md[2]
    assert "| 2.00 | 1.00x |" in md[3] and md[3].endswith("| no |")
    assert "too small" in md[4]
    assert bench_peers.median_row([{"error": "x"}]) == {"error": "x"}
    m = bench_peers.median_row([{"decode_tps": t, "ttft_s": 1, "read_bytes_per_token": 2, "peak_rss_bytes": 3,
                                 "text": "t"} for t in (1.0, 3.0, 2.0)])
    assert m["decode_tps"] == 2.0 and m["runs"] == 3
