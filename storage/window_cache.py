"""The sliding-window neuron cache of one FFN layer, as in Apple's "LLM in a Flash".

DRAM holds a preallocated matrix of FFN records (one row = one neuron's record, ``record_bytes``
bytes, see ``storage/format.py``) and, per row, the neuron id it holds. Rows ``[0, n_used)`` are in
use and stay dense:

* a neuron used by one of the last ``window`` tokens stays resident;
* a neuron that leaves the window is deleted by moving a row from the end into its slot (so no
  holes and no free list; the cost is one record copy per hole);
* neurons newly needed are appended at the end in ascending id order, so consecutive ids land in
  consecutive rows and the reader fills them with one coalesced read;
* when the window wants more rows than ``capacity``, the cache never exceeds it; what goes depends
  on ``evict``:
  - ``"recency"``: rows not needed by the current token are evicted, least recently used first,
    then least used since they became resident, then lowest neuron id (deterministic ties); the
    misses of the current token always win a row over a row it does not need;
  - ``"frequency"``: resident rows the current token does not need and the current token's misses
    compete for the rows left: the ones selected by the most tokens so far (a per-neuron lifetime
    count) win, then the most recently used, then the lowest id. When the selections are larger
    than the cache this keeps the hot neurons resident instead of cycling the whole cache every
    token (a miss loses nothing by not being cached: it is read this token either way).
  Neurons that do not get a row are returned as ``overflow`` for the caller to stream through
  scratch memory.

All bookkeeping is vectorized numpy; the cost of one ``plan`` is a few passes over ``n_used`` rows
and the selection, plus the record copies of delete-by-move.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Plan:
    """What one ``LayerWindow.plan`` decided. Row indices refer to the state *after* the plan."""

    hit_ids: np.ndarray     # [h] int64: selected ids that were resident before this plan (ascending)
    hit_rows: np.ndarray    # [h] int32: their rows now (after delete-by-move), aligned with hit_ids
    new_ids: np.ndarray     # [k] int64: selected ids appended now (ascending); records still to read
    new_rows_start: int     # new_ids[j] occupies row new_rows_start + j (one contiguous block)
    overflow_ids: np.ndarray  # [o] int64: selected ids that did not fit; not cached (ascending)
    moved: int              # rows copied by delete-by-move (record copies: the data-movement cost)
    expired: int            # rows deleted because they left the window
    evicted: int            # rows deleted for capacity (still inside the window)

    @property
    def new_rows(self) -> slice:
        """The rows the caller must fill with the records of ``new_ids``, in order."""
        return slice(self.new_rows_start, self.new_rows_start + len(self.new_ids))


def least_recent(last_used: np.ndarray, uses: np.ndarray, ids: np.ndarray, k: int,
                 n_neurons: int) -> np.ndarray:
    """Positions of the ``k`` entries smallest in (last_used, uses, id) order (in no order).

    Inputs are [c] arrays with distinct ``ids`` in [0, n_neurons) and ``uses`` >= 0. The three keys
    are packed into one int64, ``((last_used - min) * (max_uses + 1) + uses) * n_neurons + id``,
    which orders exactly like the lexicographic triple and is unique, so ``argpartition`` (O(c))
    finds the same set as a full ``np.lexsort`` (O(c log c): 82 vs 22 us at c = 1500, 455 vs 42 us
    at c = 4000). Falls back to lexsort when the packed key could overflow (huge token gaps or
    use counts).
    """
    if k >= len(ids):
        return np.arange(len(ids))
    lo, umax = int(last_used.min()), int(uses.max())
    if (int(last_used.max()) - lo + 1) * (umax + 1) * n_neurons < 2**62:
        key = ((last_used - lo) * (umax + 1) + uses) * n_neurons + ids
        return np.argpartition(key, k - 1)[:k] if k > 0 else np.arange(0)
    return np.lexsort((ids, uses, last_used))[:k]    # last key is primary


EVICT = ("recency", "frequency")

# What a LayerWindow allocates besides its record rows (the budget asks these, never copies them):
ROW_META_BYTES = 4 + 8 + 8          # per row: ids (int32), last_used and uses (int64)
# per neuron, during one plan: at most one int64 of temporaries (transient, but the budget holds it)
PLAN_SCRATCH_BYTES_PER_NEURON = 8


def neuron_meta_bytes(evict: str) -> int:
    """Per-neuron metadata a LayerWindow allocates: slot (int32), and freq (int64) for frequency eviction."""
    return 4 + (8 if evict == "frequency" else 0)


def window_bytes(n_neurons: int, record_bytes: int, capacity: int, evict: str = "recency") -> int:
    """Bytes one LayerWindow of these dimensions allocates (its ``nbytes``)."""
    return capacity * (record_bytes + ROW_META_BYTES) + n_neurons * neuron_meta_bytes(evict)


class LayerWindow:
    """Sliding-window cache of one layer's FFN records.

    State (``capacity`` rows; only ``[0, n_used)`` are meaningful):

    * ``rows``      [capacity, record_bytes] uint8: record of the neuron held in each row
    * ``ids``       [capacity] int32: neuron held in each row (-1 past ``n_used``)
    * ``slot``      [n_neurons] int32: row of each neuron, -1 when absent (inverse of ``ids``)
    * ``last_used`` [capacity] int64: last token that selected the row's neuron
    * ``uses``      [capacity] int64: times the neuron was selected since it last became resident
    * ``freq``      [n_neurons] int64: tokens that selected each neuron so far (frequency eviction)
    * ``n_used``    int: rows in use
    * ``token``     int: the token of the latest plan (-1 before the first)
    """

    def __init__(self, n_neurons: int, record_bytes: int, capacity: int, window: int,
                 rows: np.ndarray | None = None, evict: str = "recency", pinned: np.ndarray | None = None):
        if evict not in EVICT:
            raise ValueError(f"LayerWindow: evict must be one of {EVICT}, got {evict!r}")
        if n_neurons < 1 or record_bytes < 1 or capacity < 0 or window < 1:
            raise ValueError(f"LayerWindow: need n_neurons >= 1, record_bytes >= 1, capacity >= 0, "
                             f"window >= 1 (got {n_neurons}, {record_bytes}, {capacity}, {window})")
        if capacity >= 2**31 or n_neurons >= 2**31:
            raise ValueError("LayerWindow: ids and rows are int32; capacity and n_neurons must be < 2**31")
        if rows is None:
            rows = np.zeros((capacity, record_bytes), np.uint8)
        elif (rows.dtype != np.uint8 or rows.shape != (capacity, record_bytes)
              or not rows.flags.c_contiguous or not rows.flags.writeable):
            # C-contiguous: a block of rows must be one span of memory for a single read into it
            raise ValueError(f"LayerWindow: rows must be a writable C-contiguous uint8 array of shape "
                             f"{(capacity, record_bytes)}, got {rows.dtype} {rows.shape}")
        self.n_neurons, self.record_bytes = n_neurons, record_bytes
        self.capacity, self.window = capacity, window
        self.rows = rows
        self.ids = np.full(capacity, -1, np.int32)
        self.slot = np.full(n_neurons, -1, np.int32)
        self.last_used = np.zeros(capacity, np.int64)
        self.uses = np.zeros(capacity, np.int64)
        self.evict = evict
        self.freq = np.zeros(n_neurons if evict == "frequency" else 0, np.int64)
        self.n_used = 0
        self.token = -1
        self.n_pinned = self.n_base = 0       # pinned rows; of them the placement's (the rest: ``repin``)
        if pinned is not None and len(pinned):
            self._pin(np.asarray(pinned, np.int64))

    def _pin(self, ids: np.ndarray) -> None:
        """Rows [0, len(ids)) hold ``ids`` (sorted unique) for good: a placement's DRAM-pinned
        neurons. They count as hits, are never expired, evicted or moved; the caller fills their
        records (``rows[:n_pinned]``, in ``ids`` order) before the first plan."""
        if len(ids) > self.capacity or (len(ids) > 1 and not (ids[1:] > ids[:-1]).all()) \
                or ids[0] < 0 or ids[-1] >= self.n_neurons:
            raise ValueError(f"LayerWindow: pinned must be at most {self.capacity} sorted unique ids "
                             f"in [0, {self.n_neurons})")
        k = len(ids)
        self.ids[:k] = ids
        self.slot[ids] = np.arange(k, dtype=np.int32)
        self.uses[:k] = 1
        self.n_used = self.n_pinned = self.n_base = k

    def repin(self, ids: np.ndarray) -> slice:
        """Hold ``ids`` (sorted unique, none pinned by the placement) pinned after the placement's
        rows, until the next repin; every other row is dropped. Returns the rows the caller fills
        with their records, in ``ids`` order (a prompt's most active neurons, ``--prompt-pin``)."""
        ids = np.asarray(ids, np.int64)
        base, n = self.n_base, self.n_used
        ok = len(ids) <= self.capacity - base and (len(ids) < 2 or (ids[1:] > ids[:-1]).all())
        if ok and len(ids):
            ok = 0 <= ids[0] and ids[-1] < self.n_neurons and not ((self.slot[ids] >= 0) & (self.slot[ids] < base)).any()
        if not ok:
            raise ValueError(f"LayerWindow.repin: at most {self.capacity - base} sorted unique ids in "
                             f"[0, {self.n_neurons}), none pinned by the placement")
        self.slot[self.ids[base:n]] = -1
        self.ids[base:n] = -1
        k = base + len(ids)
        self.ids[base:k] = ids
        self.slot[ids] = np.arange(base, k, dtype=np.int32)
        self.uses[base:k] = 1
        self.last_used[base:k] = max(self.token, 0)
        self.n_used = self.n_pinned = k
        return slice(base, k)

    # ------------------------------------------------------------------ planning
    def plan(self, token: int, selected: np.ndarray) -> Plan:
        """Update the window for ``token`` needing neurons ``selected`` (sorted, unique ids).

        Afterwards every selected id is resident (``hit_ids``/``new_ids``) or in ``overflow_ids``;
        the caller reads the records of ``new_ids`` into ``rows[plan.new_rows]`` before using them.
        ``token`` must not decrease from one call to the next (an equal token is allowed and counts
        its hits again).
        """
        sel = np.asarray(selected, dtype=np.int64).reshape(-1)       # [s]
        if token < self.token:
            raise ValueError(f"LayerWindow.plan: token {token} is before the previous token {self.token}")
        if sel.size and (sel[0] < 0 or sel[-1] >= self.n_neurons or
                         (sel.size > 1 and not (sel[1:] > sel[:-1]).all())):
            raise ValueError(f"LayerWindow.plan: selected must be sorted unique ids in [0, {self.n_neurons})")
        self.token = token
        n = self.n_used

        # 1. hits: refresh recency and count
        srow = self.slot[sel]                                        # [s] row of each id, -1 absent
        hit = srow >= 0
        # integer positions then take: ~2x faster than three boolean-mask compressions
        hi, mi = np.flatnonzero(hit), np.flatnonzero(~hit)
        hit_ids, hit_rows0 = sel.take(hi), srow.take(hi)             # [h]; rows before compaction
        lost = sel[:0]                                               # misses that lose a row (frequency)
        if self.evict == "frequency":
            self.freq[sel] += 1
        self.last_used[hit_rows0] = token
        self.uses[hit_rows0] += 1
        miss_ids = sel.take(mi)                                      # [m] ascending

        # 2. expire: rows whose last use is `window` or more tokens ago. Hits now have
        #    last_used == token > token - window, so the current selection never expires.
        #    Pinned rows never expire.
        dead = self.last_used[:n] <= token - self.window             # [n] rows to delete
        dead[:self.n_pinned] = False
        n_expired = int(np.count_nonzero(dead))

        # 3. capacity: evict more rows (not selected now) until the misses fit, or none is left.
        #    Done on the same `dead` mask so that one compaction pass serves both deletions
        #    (each hole is filled once instead of possibly twice).
        need = len(miss_ids) - (self.capacity - n + n_expired)
        n_evicted = 0
        if need > 0:
            live = ~dead
            live[hit_rows0] = False
            live[:self.n_pinned] = False
            cand = np.flatnonzero(live)                              # [c] evictable rows
            if self.evict == "frequency":
                cand, miss_ids, lost = self._compete(token, cand, miss_ids, need)
            elif cand.size > need:
                cand = cand[least_recent(self.last_used[cand], self.uses[cand], self.ids[cand],
                                         need, self.n_neurons)]
            dead[cand] = True
            n_evicted = int(cand.size)
        moved = self._delete(dead)

        # 4. append the misses that fit, lowest ids first, as one contiguous block of rows
        start = self.n_used
        k = min(len(miss_ids), self.capacity - start)
        new_ids, overflow = miss_ids[:k], miss_ids[k:]
        if len(lost):
            overflow = np.union1d(overflow, lost)
        end = start + k
        self.ids[start:end] = new_ids
        self.slot[new_ids] = np.arange(start, end, dtype=np.int32)
        self.last_used[start:end] = token
        self.uses[start:end] = 1
        self.n_used = end

        return Plan(hit_ids=hit_ids, hit_rows=self.slot[hit_ids], new_ids=new_ids,
                    new_rows_start=start, overflow_ids=overflow, moved=moved,
                    expired=n_expired, evicted=n_evicted)

    def _compete(self, token: int, cand: np.ndarray, miss_ids: np.ndarray,
                 need: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Frequency eviction: rows ``cand`` (resident, not selected now) and ``miss_ids`` compete
        for ``len(cand) + len(miss_ids) - need`` rows. The losers are the ``need`` entries smallest
        in (lifetime selections, last use, id) order (``least_recent`` with the lifetime count as
        its first key): losing rows are evicted, losing misses go to overflow. Returns (rows to
        evict, misses to append, misses that lost), ids ascending."""
        ids = np.concatenate((self.ids[cand].astype(np.int64), miss_ids))           # [c + m]
        last = np.concatenate((self.last_used[cand], np.full(len(miss_ids), token, np.int64)))
        lose = least_recent(self.freq[ids], last, ids, need, self.n_neurons)          # positions
        lost = np.zeros(len(ids), bool)
        lost[lose] = True
        c = len(cand)
        return cand[lost[:c]], miss_ids[~lost[c:]], miss_ids[lost[c:]]

    def _delete(self, dead: np.ndarray) -> int:
        """Delete the rows flagged in ``dead`` ([n_used] bool) by delete-by-move; returns rows moved.

        With d deleted rows the new end is m = n_used - d. Deleted rows below m are holes; the
        surviving rows in [m, n_used) are exactly as many, and fill them in ascending order
        (ascending-to-ascending keeps runs of consecutive rows in order).
        """
        n = self.n_used
        d = np.flatnonzero(dead)                                     # [d] ascending
        if d.size == 0:
            return 0
        m = n - d.size
        self.slot[self.ids[d]] = -1
        holes = d[: np.searchsorted(d, m)]                           # [q] deleted rows < m
        src = np.flatnonzero(~dead[m:]) + m                          # [q] surviving rows >= m
        if holes.size:
            # holes < m <= src: source and destination never overlap; one fancy-indexed copy each
            self.rows[holes] = self.rows[src]
            moved_ids = self.ids[src]
            self.ids[holes] = moved_ids
            self.last_used[holes] = self.last_used[src]
            self.uses[holes] = self.uses[src]
            self.slot[moved_ids] = holes
        self.ids[m:n] = -1
        self.n_used = m
        return int(holes.size)

    # ------------------------------------------------------------------ queries
    def rows_for(self, ids) -> np.ndarray:
        """Rows ([len(ids)] int32) of resident neurons ``ids``; KeyError if any is not resident."""
        ids = np.asarray(ids, dtype=np.int64)
        r = self.slot[ids]
        if (r < 0).any():
            raise KeyError(f"neurons not resident: {ids[r < 0][:10].tolist()}")
        return r

    @property
    def resident_ids(self) -> np.ndarray:
        """Ids held in rows [0, n_used), in row order (a view)."""
        return self.ids[: self.n_used]

    @property
    def nbytes(self) -> int:
        """DRAM held: record rows plus the metadata arrays."""
        return int(self.rows.nbytes + self.ids.nbytes + self.slot.nbytes
                   + self.last_used.nbytes + self.uses.nbytes + self.freq.nbytes)

    def check(self) -> None:
        """Assert the invariants (for tests; O(capacity + n_neurons)).

        * 0 <= n_used <= capacity; ids[n_used:] == -1;
        * ids[:n_used] are distinct valid neuron ids and slot is their exact inverse
          (slot[ids[r]] == r, and every other neuron has slot -1);
        * 1 <= uses, last_used <= token for every used row;
        * after a plan every resident row has last_used > token - window: expiry deletes every row
          that left the window unconditionally (a row selected now has last_used == token), and
          capacity eviction only ever deletes more, so no row is kept outside the window.
        """
        n, p = self.n_used, self.n_pinned
        assert 0 <= n <= self.capacity, (n, self.capacity)
        ids = self.ids[:n]
        assert (self.ids[n:] == -1).all()
        assert ((ids >= 0) & (ids < self.n_neurons)).all()
        assert (self.slot[ids] == np.arange(n)).all(), "slot is not the inverse of ids"
        assert np.count_nonzero(self.slot >= 0) == n, "slot holds stale rows"
        assert (self.uses[:n] >= 1).all()
        assert p <= n
        assert (self.last_used[:n] <= self.token).all()
        assert (self.last_used[p:n] > self.token - self.window).all(), "a row outlived the window"
