"""The sliding-window neuron cache (storage/window_cache.py) against an obviously-correct reference."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.window_cache import LayerWindow, least_recent


class ReferenceWindow:
    """Dict-based model of the policy: id -> [last_used, uses]; no rows, no order."""

    def __init__(self, capacity: int, window: int, evict: str = "recency"):
        self.capacity, self.window, self.evict = capacity, window, evict
        self.res: dict[int, list[int]] = {}
        self.freq: dict[int, int] = {}          # tokens that selected each id (lifetime)

    def plan(self, token: int, selected: list[int]):
        """Returns (hit_ids, new_ids, overflow_ids) as ascending lists."""
        sel = sorted(selected)
        for i in sel:
            self.freq[i] = self.freq.get(i, 0) + 1
        hits = [i for i in sel if i in self.res]
        for i in hits:
            self.res[i][0] = token
            self.res[i][1] += 1
        for i in list(self.res):                      # expire: left the window
            if self.res[i][0] <= token - self.window:
                del self.res[i]
        misses = [i for i in sel if i not in self.res]
        free = self.capacity - len(self.res)
        if len(misses) > free and self.evict == "frequency":
            # resident-but-unneeded and missing ids compete; the fewest lifetime selections lose,
            # then the least recently used (misses are used now), then the lowest id
            cands = [(self.freq[i], lu, i) for i, (lu, _) in self.res.items() if i not in set(sel)]
            cands += [(self.freq[i], token, i) for i in misses]
            lost = {i for _, _, i in sorted(cands)[: len(misses) - free]}
            for i in lost & set(self.res):
                del self.res[i]
            kept = [i for i in misses if i not in lost]
            for i in kept:
                self.res[i] = [token, 1]
            return hits, kept, sorted(lost & set(misses))
        if len(misses) > free:                        # evict: oldest, then fewest uses, then lowest id
            cands = sorted((lu, u, i) for i, (lu, u) in self.res.items() if i not in set(sel))
            for _, _, i in cands[: len(misses) - free]:
                del self.res[i]
        k = min(len(misses), self.capacity - len(self.res))
        for i in misses[:k]:
            self.res[i] = [token, 1]
        return hits, misses[:k], misses[k:]


def patterns(n_neurons: int, record_bytes: int) -> np.ndarray:
    """[n_neurons, record_bytes] u8: a distinct byte pattern per neuron (7 is invertible mod 251)."""
    i = np.arange(n_neurons)[:, None]
    j = np.arange(record_bytes)[None, :]
    return ((i * 7 + j * 13 + 1) % 251).astype(np.uint8)


def read_new(w: LayerWindow, plan, pat: np.ndarray) -> None:
    """What the engine's reader does: fill the appended rows with the records of new_ids."""
    w.rows[plan.new_rows] = pat[plan.new_ids]


def check_against(w: LayerWindow, ref: ReferenceWindow, plan, out, sel, pat):
    hits, new, overflow = out
    w.check()
    n = w.n_used
    assert n <= w.capacity
    assert set(w.resident_ids.tolist()) == set(ref.res)
    assert plan.hit_ids.tolist() == hits
    assert plan.new_ids.tolist() == new
    assert plan.overflow_ids.tolist() == overflow
    if len(sel) <= w.capacity and w.evict == "recency":   # frequency may keep a hotter row instead
        assert len(plan.overflow_ids) == 0
    resident = set(w.resident_ids.tolist())
    assert set(sel) == (set(sel) & resident) | set(overflow)
    assert not (set(overflow) & resident)
    # recency and counts follow the reference
    rows = w.rows_for(list(ref.res))
    assert w.last_used[rows].tolist() == [ref.res[i][0] for i in ref.res]
    assert w.uses[rows].tolist() == [ref.res[i][1] for i in ref.res]
    # plan rows point at the right neurons; the appended block is contiguous and in id order
    assert (w.ids[plan.hit_rows] == plan.hit_ids).all()
    assert plan.new_rows_start + len(plan.new_ids) == n
    assert (w.ids[plan.new_rows] == plan.new_ids).all()
    assert plan.moved <= plan.expired + plan.evicted
    # row contents follow ids: delete-by-move copied the records along with the ids
    read_new(w, plan, pat)
    assert (w.rows[:n] == pat[w.ids[:n]]).all()


@st.composite
def scenarios(draw):
    n = draw(st.integers(1, 60))
    cap = draw(st.integers(1, n))
    window = draw(st.integers(1, 5))
    rb = draw(st.integers(1, 24))
    steps, prev = [], []
    for _ in range(draw(st.integers(1, 30))):
        dt = draw(st.integers(1, 3))                  # tokens increase, sometimes with gaps
        sel = set(draw(st.lists(st.integers(0, n - 1), max_size=n)))
        if prev and draw(st.booleans()):              # realistic overlap: keep part of the last one
            sel |= set(draw(st.lists(st.sampled_from(prev), max_size=len(prev))))
        prev = sorted(sel)
        steps.append((dt, prev))
    return n, cap, window, rb, steps


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.sampled_from(["recency", "frequency"]))
def test_matches_reference(sc, evict):
    n, cap, window, rb, steps = sc
    w, ref, pat = (LayerWindow(n, rb, cap, window, evict=evict), ReferenceWindow(cap, window, evict),
                   patterns(n, rb))
    token = 0
    for dt, sel in steps:
        token += dt
        plan = w.plan(token, np.array(sel, dtype=np.int64))
        check_against(w, ref, plan, ref.plan(token, sel), sel, pat)


def test_delete_by_move_hand_worked():
    pat = patterns(10, 4)
    w = LayerWindow(10, 4, capacity=5, window=2)
    p = w.plan(0, np.arange(5))                       # rows 0..4 = ids 0..4
    read_new(w, p, pat)
    assert (p.new_rows_start, p.new_ids.tolist(), w.ids.tolist()) == (0, [0, 1, 2, 3, 4], [0, 1, 2, 3, 4])
    p = w.plan(1, np.array([1, 3]))                   # hits; nothing left the window (-1 < 0)
    assert (p.hit_rows.tolist(), p.moved, p.expired) == ([1, 3], 0, 0)
    # token 2: ids 0, 2, 4 (last used 0 <= 2 - 2) leave. New end m = 2; hole 0 < m is filled by the
    # surviving row past m, row 3 (id 3); id 1 stays in row 1.
    p = w.plan(2, np.array([3]))
    assert (p.expired, p.moved, p.hit_ids.tolist(), p.hit_rows.tolist()) == (3, 1, [3], [0])
    assert w.n_used == 2 and w.ids.tolist() == [3, 1, -1, -1, -1]
    assert w.slot.tolist() == [-1, 1, -1, 0] + [-1] * 6
    assert (w.rows[0] == pat[3]).all() and (w.rows[1] == pat[1]).all()
    assert (w.last_used[:2].tolist(), w.uses[:2].tolist()) == ([2, 1], [3, 2])
    # token 3: id 1 leaves (row 1 is the last row: no move); 5, 6, 7 are appended at rows 1..3
    p = w.plan(3, np.array([5, 6, 7]))
    assert (p.expired, p.moved, p.new_rows_start, p.new_ids.tolist()) == (1, 0, 1, [5, 6, 7])
    assert w.ids.tolist() == [3, 5, 6, 7, -1]
    w.check()


def test_consecutive_ids_get_consecutive_rows():
    w = LayerWindow(100, 8, capacity=40, window=3)
    w.plan(0, np.array([3, 50, 70]))
    p = w.plan(1, np.array([3, 10, 11, 12, 13, 14, 15, 60, 61, 62]))
    assert p.new_ids.tolist() == [10, 11, 12, 13, 14, 15, 60, 61, 62]
    assert p.new_rows_start == 3 and p.new_rows == slice(3, 12)
    assert w.rows_for(p.new_ids).tolist() == list(range(3, 12))
    assert np.diff(w.rows_for(np.arange(10, 16))).tolist() == [1] * 5


def test_eviction_order_recency_then_frequency_then_id():
    w = LayerWindow(10, 1, capacity=3, window=5)
    w.plan(0, np.array([0, 1, 2]))
    w.plan(1, np.array([0]))
    w.plan(2, np.array([0, 1]))   # last_used/uses: 0 -> 2/3, 1 -> 2/2, 2 -> 0/1
    p = w.plan(3, np.array([3, 4]))
    assert (p.evicted, p.expired, p.overflow_ids.tolist()) == (2, 0, [])
    assert sorted(w.resident_ids.tolist()) == [0, 3, 4]   # 2 (oldest), then 1 (fewer uses than 0)
    w2 = LayerWindow(10, 1, capacity=3, window=5)
    w2.plan(0, np.array([5, 6, 7]))                        # full tie: the lowest ids go first
    w2.plan(1, np.array([8]))                              # one row needed: 5 goes
    assert sorted(w2.resident_ids.tolist()) == [6, 7, 8]
    w2.check()


def test_selection_larger_than_capacity_overflows():
    w = LayerWindow(20, 4, capacity=4, window=3)
    w.plan(0, np.array([15, 16]))
    p = w.plan(1, np.array([1, 2, 3, 4, 5, 6, 16]))
    assert p.hit_ids.tolist() == [16] and p.evicted == 1   # 15 is not selected: evicted
    assert p.new_ids.tolist() == [1, 2, 3] and p.overflow_ids.tolist() == [4, 5, 6]
    assert sorted(w.resident_ids.tolist()) == [1, 2, 3, 16]
    w.check()


def test_window_one_keeps_only_current_selection():
    w = LayerWindow(30, 2, capacity=30, window=1)
    w.plan(5, np.arange(0, 30, 2))
    p = w.plan(6, np.array([0, 1, 2]))
    assert sorted(w.resident_ids.tolist()) == [0, 1, 2] and p.expired == 13
    w.check()


def test_preallocated_aligned_rows_and_nbytes():
    cap, rb = 6, 512
    buf = np.zeros(cap * rb + 4096, np.uint8)
    off = (-buf.ctypes.data) % 4096
    rows = buf[off: off + cap * rb].reshape(cap, rb)
    w = LayerWindow(10, rb, cap, 2, rows=rows)
    assert w.rows is rows and w.rows.ctypes.data % 4096 == 0
    assert w.nbytes == cap * rb + cap * 4 + 10 * 4 + cap * 8 * 2
    with pytest.raises(ValueError):
        LayerWindow(10, rb, cap, 2, rows=np.zeros((cap, rb), np.float32))
    with pytest.raises(ValueError):
        LayerWindow(10, rb, cap, 2, rows=np.zeros((cap + 1, rb), np.uint8))


def test_bad_inputs():
    w = LayerWindow(10, 1, capacity=4, window=2)
    w.plan(3, np.array([1, 2]))
    for bad in ([2, 1], [1, 1], [-1], [10]):
        with pytest.raises(ValueError):
            w.plan(4, np.array(bad))
    with pytest.raises(ValueError):
        w.plan(2, np.array([1]))                       # token went back
    with pytest.raises(KeyError):
        w.rows_for([1, 5])
    p = w.plan(4, np.array([], dtype=np.int64))        # empty selection is fine
    assert len(p.new_ids) == len(p.hit_ids) == len(p.overflow_ids) == 0
    with pytest.raises(ValueError):
        LayerWindow(10, 1, capacity=4, window=0)


@settings(max_examples=300, deadline=None)
@given(st.data(), st.integers(1, 80), st.sampled_from([1, 10**6, 10**17]))
def test_least_recent_matches_lexsort(data, n_neurons, scale):
    """Packed-key argpartition and the lexsort fallback (huge values) both pick the lexsort prefix."""
    c = data.draw(st.integers(0, n_neurons))
    ids = np.array(data.draw(st.permutations(range(n_neurons)))[:c], dtype=np.int32)
    lu = np.array(data.draw(st.lists(st.integers(0, 4), min_size=c, max_size=c)), np.int64) * scale
    uses = np.array(data.draw(st.lists(st.integers(1, 5), min_size=c, max_size=c)), np.int64) * scale
    k = data.draw(st.integers(0, c))
    got = least_recent(lu, uses, ids, k, n_neurons)
    assert sorted(got.tolist()) == sorted(np.lexsort((ids, uses, lu))[:k].tolist())


def test_repin_keeps_the_placements_pins_and_holds_the_new_ones():
    w = LayerWindow(50, 8, 20, 2, pinned=np.array([3, 7]))
    w.rows[:2] = [[3] * 8, [7] * 8]
    w.plan(0, np.array([1, 2, 30]))
    rows = w.repin(np.array([10, 11, 40]))
    assert rows == slice(2, 5) and w.n_base == 2 and w.n_pinned == w.n_used == 5
    assert list(w.resident_ids) == [3, 7, 10, 11, 40] and (w.rows[:2, 0] == [3, 7]).all()
    for t, sel in enumerate([list(range(12, 30)), [10, 40, 45], list(range(20, 38))], start=1):
        p = w.plan(t, np.array(sel))
        w.check()
        assert list(w.ids[:5]) == [3, 7, 10, 11, 40]            # never expired or evicted
        assert set(p.hit_ids) >= {10, 11, 40} & set(sel)
    w.repin(np.array([], np.int64))                              # the next prompt pins nothing
    assert w.n_pinned == 2 and list(w.resident_ids) == [3, 7]
    for bad in ([3, 8], [9, 8], [60], list(range(19))):          # a placement pin, unsorted, out of range, too many
        with pytest.raises(ValueError):
            w.repin(np.array(bad))
