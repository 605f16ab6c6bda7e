"""The placement solver (predictors.placement): against brute force on small instances, equal to
greedy where the cost is linear, and within its memory."""
import itertools

import numpy as np
import pytest

from predictors import placement as pl


def _costs(device="none", read_s=2e-6, flat=True, **kw):
    return pl.CostModel(record_bytes=1000, row_bytes=1024, cpu_s_per_record=1e-6,
                        read_density=[0.0, 1.0], read_s_per_record=[read_s, read_s if flat else read_s / 4],
                        dense_s=1e-3, device=device, **kw)


def _brute(prob):
    """Every assignment of stream / pinned / device to every neuron (no window rows), the cheapest
    that fits."""
    c = prob.costs
    sizes = [len(p) for p in prob.keep]
    best = np.inf
    for combo in itertools.product((pl.STREAM, pl.PINNED, pl.DEVICE), repeat=sum(sizes)):
        t = np.array(combo, np.int8)
        dev, pin = (t == pl.DEVICE).sum(), (t == pl.PINNED).sum()
        if dev and not prob.device_bytes:
            continue
        if pin * c.row_bytes + dev * (c.device_bytes_per_record if c.device == "cpu" else 0) > prob.dram_bytes:
            continue
        if dev * c.device_bytes_per_record > prob.device_bytes:
            continue
        tiers = np.split(t, np.cumsum(sizes)[:-1])
        best = min(best, pl.evaluate(prob, tiers, [0] * len(sizes))[0])
    return best


@pytest.mark.parametrize("seed", range(4))
def test_milp_matches_brute_force_with_a_device(seed):
    rng = np.random.default_rng(seed)
    keep = [rng.uniform(0.05, 1.0, 4).astype(np.float32) for _ in range(2)]
    costs = _costs("cuda", device_s_per_record=2e-7, device_sync_s=float(rng.uniform(1e-6, 8e-6)),
                   device_bytes_per_record=500)
    prob = pl.Problem(keep, costs, dram_bytes=int(rng.integers(0, 5)) * 1024, device_bytes=int(rng.integers(0, 6)) * 500,
                      window=1, groups=4)
    got = pl.milp(prob)
    assert got.objective_s == pytest.approx(_brute(prob), rel=1e-9)
    assert got.objective_s <= pl.greedy(prob).objective_s + 1e-15


@pytest.mark.parametrize("seed", range(3))
def test_milp_matches_brute_force_cpu_device(seed):
    rng = np.random.default_rng(10 + seed)
    keep = [rng.uniform(0.05, 1.0, 4).astype(np.float32) for _ in range(2)]
    costs = _costs("cpu", device_s_per_record=5e-7, device_sync_s=1e-6, device_bytes_per_record=600)
    prob = pl.Problem(keep, costs, dram_bytes=3 * 1024, device_bytes=4 * 600, window=1, groups=4)
    assert pl.milp(prob).objective_s == pytest.approx(_brute(prob), rel=1e-9)


def test_greedy_equals_milp_when_the_cost_is_linear():
    """No device, no window, a read cost independent of density: the cost is linear in the pinned
    set, so the hottest neurons across layers are the optimum, which greedy picks."""
    rng = np.random.default_rng(1)
    keep = [rng.beta(2, 2, 300).astype(np.float32) for _ in range(3)]
    prob = pl.Problem(keep, _costs(), dram_bytes=250 * 1024, window=1)
    g, m = pl.greedy(prob), pl.milp(prob)
    assert m.objective_s == pytest.approx(g.objective_s, rel=1e-6)
    assert sum(c["pinned"] for c in g.counts()) == 250


def test_independent_tokens_make_pinning_better_than_the_window():
    """Without measured reuse (tokens independent), a row pinned saves more reads than a window
    row: the program pins, as greedy does."""
    rng = np.random.default_rng(2)
    keep = [rng.beta(0.6, 1.5, 512).astype(np.float32) for _ in range(4)]
    prob = pl.Problem(keep, _costs(flat=False), dram_bytes=400 * 1024, window=4)
    m = pl.milp(prob)
    assert sum(c["window_rows"] for c in m.counts()) == 0
    assert m.objective_s == pytest.approx(pl.greedy(prob).objective_s, rel=1e-6)


def test_milp_uses_the_window_and_stays_within_memory():
    """Bursty neurons (measured: kept in runs, so a window row is reused and held a small share of
    tokens) are cheaper as window rows than pinned: the program uses both and beats greedy; every
    plan fits its DRAM."""
    rng = np.random.default_rng(2)
    keep = [rng.beta(0.6, 1.5, 512).astype(np.float32) for _ in range(4)]
    reads = [0.15 * p for p in keep]                     # 85% of a bursty neuron's uses hit the window
    occ = [np.minimum(1.0, 1.3 * p) for p in keep]
    prob = pl.Problem(keep, _costs(flat=False), dram_bytes=400 * 1024, window=4, window_read=reads, window_occ=occ)
    g, m = pl.greedy(prob), pl.milp(prob)
    assert m.objective_s < g.objective_s
    for plan in (g, m):
        rows = sum(c["pinned"] + c["window_rows"] for c in plan.counts())
        assert rows * 1024 <= prob.dram_bytes
    assert m.solve_s < 10


def test_device_or_none_per_layer():
    """Device memory for a few neurons and a costly synchronisation: the program puts them all in
    one layer (one sync); greedy spreads them by frequency and pays a sync in every layer."""
    rng = np.random.default_rng(3)
    keep = [rng.uniform(0.4, 0.6, 64).astype(np.float32) for _ in range(3)]
    costs = _costs("cuda", device_s_per_record=1e-8, device_sync_s=2e-5, device_bytes_per_record=100)
    prob = pl.Problem(keep, costs, dram_bytes=0, device_bytes=40 * 100, window=1, groups=8)
    g, m = pl.greedy(prob), pl.milp(prob)
    assert sum(c["device"] > 0 for c in g.counts()) == 3
    assert sum(c["device"] > 0 for c in m.counts()) <= 1
    assert m.objective_s < g.objective_s
    assert sum(c["device"] for c in m.counts()) <= 40
