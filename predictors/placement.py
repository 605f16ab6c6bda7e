"""Where each FFN neuron lives: a PowerInfer-style placement, solved as a mixed-integer program.

Per layer, each neuron goes to one of four tiers:

    device   pinned on the accelerator (torch tensors there), computed every token in parallel
             with the CPU's share (``--device cpu``: the same tensors on the CPU, computed in turn)
    pinned   held in DRAM for the whole run (rows at the front of the layer's window cache)
    window   competes for the layer's sliding-window rows (resident while one of the last K tokens
             used it)
    stream   no row planned: read from the SSD each token that keeps it

The objective is the expected time of a decode token (``CostModel``, measured on this machine):

    layer time  t_l >= cpu_l + sync_l                    (a CPU device: + dev_l instead of sync_l)
                t_l >= io_l + cpu_new_l + sync_l         the resident part is computed while reads fly
                t_l >= dev_l                             an accelerator runs beside the CPU
    cpu_l     = sum over CPU-held neurons of p * cpu_s_per_record
    io_l      = reads * read_s_per_record(density of the layer's reads)
    sync_l    = device_sync_s * y_l: the CPU thread's launch and copies when layer l uses the device
    dev_l     = sync_l + device neurons * device_s_per_record   (dense on the device)
    reads     = window neurons' misses + stream neurons' p      (p: keep frequency; a window
                miss and a row's occupancy measured by calibrate, else p (1 - p)^(K - 1) and
                1 - (1 - p)^K as if tokens were independent)

subject to the DRAM left after the fixed parts (pinned rows, and window rows at their expected
occupancy), and the device's memory. A layer pays the device's synchronisation only if it uses the
device (y_l binary), so a layer gets enough device neurons to beat that cost, or none: PowerInfer's
threshold, here a term of the objective rather than a constant to tune. Neurons are taken in
groups of similar keep frequency (sorted, ``GROUPS`` per layer; counts integer in small groups),
so the program has a few thousand variables and HiGHS (``scipy.optimize.milp``) solves it in under
a second without a device. The read cost per record falls as reads get denser (they coalesce); the
program takes it at one density for the whole model, that of the greedy plan, then of its own
previous solution (``ROUNDS``). Every candidate is scored by ``evaluate`` (per-layer densities,
integer counts) and the best, greedy's included, is returned. ``greedy`` is what PowerInfer ships:
every neuron in one list by keep frequency, the hottest to the device until it is full, the next
pinned in DRAM until the budget is spent.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

GROUPS = 32                 # neuron groups per layer in the program
INTEGER_GROUP = 64          # groups smaller than this get integer counts
TIME_LIMIT_S = 10.0         # per round: HiGHS returns its best solution so far
ROUNDS = 3                  # re-solves with the read density of the previous solution
TIERS = ("stream", "window", "pinned", "device")
STREAM, WINDOW, PINNED, DEVICE = range(4)


@dataclass(frozen=True)
class CostModel:
    """Measured costs of one decode token's parts (``measure.costs``; seconds, bytes)."""
    record_bytes: int                   # one neuron's record as read from the SSD
    row_bytes: int                      # DRAM one resident row costs (record + window bookkeeping)
    cpu_s_per_record: float             # CPU kernel time per computed neuron (one token)
    read_density: list[float]           # share of a layer's records read per token ...
    read_s_per_record: list[float]      # ... and the measured time per record read at that density
    dense_s: float = 0.0                # attention, norms, head, selector: everything but the FFN
    device: str = "none"                # none | cpu | cuda | mps
    device_s_per_record: float = 0.0    # device time per neuron (dense: every device neuron, every token)
    device_sync_s: float = 0.0          # per layer that uses the device: launch, copy in and out
    device_bytes_per_record: int = 0    # device memory per device-pinned neuron
    sequential_bytes_per_s: float = 0.0  # for the report
    measured: dict = field(default_factory=dict)

    @property
    def parallel(self) -> bool:
        """Whether the device computes beside the CPU (a CPU "device" takes the same cores)."""
        return self.device not in ("none", "cpu")

    def read_s(self, density: float) -> float:
        """Seconds per record read at this read density (interpolated; denser reads coalesce)."""
        return float(np.interp(density, self.read_density, self.read_s_per_record))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CostModel:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class Placement:
    """A solved placement: per layer the tier of every neuron (``TIERS`` codes) and the window rows
    planned beside the pinned ones; the cost model's figures for it."""
    tiers: list[np.ndarray]             # [n_layers] of int8 [d_ff]
    window_rows: list[int]              # per layer, rows for the window tier (beside the pinned rows)
    objective_s: float                  # expected FFN + dense seconds per token (the cost model's)
    layer_s: list[float]
    solver: str
    solve_s: float = 0.0
    info: dict = field(default_factory=dict)

    def counts(self) -> list[dict]:
        return [{t: int((tr == k).sum()) for k, t in enumerate(TIERS)} | {"window_rows": int(w)}
                for tr, w in zip(self.tiers, self.window_rows)]


@dataclass(frozen=True)
class Problem:
    """What a placement is solved for."""
    keep: list[np.ndarray]              # [n_layers] of f32 [d_ff]: keep frequency of each neuron
    costs: CostModel
    dram_bytes: int                     # DRAM for pinned and window rows (and CPU-device neurons)
    device_bytes: int = 0               # accelerator memory for device neurons (0: no device tier)
    window: int = 4                     # the window's recency K (tokens)
    groups: int = GROUPS
    # measured in calibration at this K (None: from keep alone, as if tokens were independent):
    window_read: list[np.ndarray] | None = None   # per neuron, reads per token in the window tier
    window_occ: list[np.ndarray] | None = None    # per neuron, share of tokens it holds a row

    def window_stats(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(reads per token, occupancy) of each of the layer's neurons in the window tier."""
        if self.window_read is not None:
            return (self.window_read[layer].astype(np.float64), self.window_occ[layer].astype(np.float64))
        p = self.keep[layer].astype(np.float64)
        return window_reads(p, self.window), occupancy(p, self.window)


def occupancy(p: np.ndarray, k: int) -> np.ndarray:
    """Expected share of tokens a window row holds a neuron kept with frequency p: 1 - (1 - p)^K."""
    return 1.0 - (1.0 - p) ** k


def window_reads(p: np.ndarray, k: int) -> np.ndarray:
    """Expected reads per token of a window-tier neuron: kept now, unused by the K - 1 before."""
    return p * (1.0 - p) ** (k - 1)


def _device_dram(c: CostModel) -> int:
    """DRAM a device neuron takes (a CPU device holds its tensors in DRAM)."""
    return c.device_bytes_per_record if c.device == "cpu" else 0


def evaluate(prob: Problem, tiers: list[np.ndarray], window_rows: list[int]) -> tuple[float, list[float]]:
    """Expected seconds per token of a placement under the cost model (the same terms the program
    optimizes, on integer counts: what the solvers report and the benchmark compares)."""
    c = prob.costs
    layer_s = []
    for i, (tr, w_rows) in enumerate(zip(tiers, window_rows)):
        p = prob.keep[i].astype(np.float64)
        dev = tr == DEVICE
        reads = _reads(prob, i, tr, w_rows)
        density = reads / len(p)
        cpu = p[~dev].sum() * c.cpu_s_per_record
        io = reads * c.read_s(density)
        cpu_new = reads * c.cpu_s_per_record
        sync = c.device_sync_s if dev.any() else 0.0
        d = sync + dev.sum() * c.device_s_per_record
        if c.parallel:
            t = max(cpu + sync, io + cpu_new + sync, d)
        else:
            t = max(cpu, io + cpu_new) + d
        layer_s.append(float(t))
    return c.dense_s + sum(layer_s), layer_s


def _reads(prob: Problem, layer: int, tiers: np.ndarray, rows: int) -> float:
    """Expected reads per token of a layer: window and stream neurons share the window's ``rows``,
    the hottest of them holding rows (at their occupancy), the rest read each time they are kept."""
    p = prob.keep[layer].astype(np.float64)
    wr, occ = prob.window_stats(layer)
    cand = np.flatnonzero((tiers == WINDOW) | (tiers == STREAM))
    cand = cand[np.argsort(-p[cand], kind="stable")]
    fits = np.cumsum(occ[cand]) <= rows + 1e-9
    return float(wr[cand[fits]].sum() + p[cand[~fits]].sum())


def _groups(p: np.ndarray, n: int) -> list[np.ndarray]:
    """Neurons by keep frequency, hottest first, cut into ``n`` near-equal groups of ids."""
    order = np.argsort(-p, kind="stable")
    return [g for g in np.array_split(order, min(n, len(p))) if len(g)]


def greedy(prob: Problem) -> Placement:
    """PowerInfer's shipped placement: one list of every (layer, neuron) by keep frequency; the
    hottest to the device while it has memory, then pinned in DRAM while the budget lasts."""
    t0 = time.perf_counter()
    c = prob.costs
    L = len(prob.keep)
    flat = np.concatenate(prob.keep)
    layer_of = np.repeat(np.arange(L), [len(p) for p in prob.keep])
    order = np.argsort(-flat, kind="stable")
    tier = np.full(len(flat), STREAM, np.int8)
    n_dev = 0
    if prob.device_bytes and c.device_bytes_per_record:
        n_dev = min(len(flat), prob.device_bytes // c.device_bytes_per_record)
        if _device_dram(c):                       # a CPU device's tensors are in DRAM too
            n_dev = min(n_dev, max(0, prob.dram_bytes) // _device_dram(c))
        tier[order[:n_dev]] = DEVICE
    dram = prob.dram_bytes - n_dev * _device_dram(c)
    n_pin = int(min(len(flat) - n_dev, max(0, dram) // c.row_bytes))
    tier[order[n_dev:n_dev + n_pin]] = PINNED
    tiers = [tier[layer_of == i] for i in range(L)]
    rows = [0] * L
    obj, layer_s = evaluate(prob, tiers, rows)
    return Placement(tiers, rows, obj, layer_s, "greedy", time.perf_counter() - t0)


def milp(prob: Problem, rounds: int = ROUNDS) -> Placement:
    """The placement that minimizes the cost model's expected time per token (see the module
    docstring), solved with HiGHS; the best of its rounds, or the greedy plan where that is better
    (``solver`` says which)."""
    t0 = time.perf_counter()
    best = greedy(prob)
    reads = [_reads(prob, i, t, w) / len(t) for i, (t, w) in enumerate(zip(best.tiers, best.window_rows))]
    density = [float(np.mean(reads))] * len(reads)
    tried = []
    for _ in range(rounds):
        plan = _solve(prob, density)
        if plan is None:
            break
        tried.append(plan.objective_s)
        if plan.objective_s <= best.objective_s:
            best = plan
        density = [float(np.mean(plan.info["density"]))] * len(density)
    best.solve_s = time.perf_counter() - t0
    best.info["round_objectives_s"] = tried
    return best


def _solve(prob: Problem, density: list[float]) -> Placement | None:
    """One mixed-integer program with the read cost taken at ``density`` per layer."""
    from scipy.optimize import Bounds, LinearConstraint, milp as highs
    from scipy.sparse import coo_matrix

    c = _scaled(prob.costs)
    L = len(prob.keep)
    grouped = [_groups(p.astype(np.float64), prob.groups) for p in prob.keep]
    has_dev = bool(prob.device_bytes and c.device_bytes_per_record and c.device != "none")
    # variables: per (layer, group) counts dev, pin, win (stream: the rest), then y_l, t_l
    G = [len(gs) for gs in grouped]
    base = np.concatenate([[0], np.cumsum(G)])
    nv = 3 * base[-1] + 2 * L
    Y, T = 3 * base[-1], 3 * base[-1] + L

    def v(layer, g, k):
        return 3 * (base[layer] + g) + k
    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0

    def con(entries, lb, ub):
        nonlocal r
        for col, val in entries:
            rows.append(r), cols.append(col), vals.append(val)
        lo.append(lb), hi.append(ub)
        r += 1
    dram, devmem = [], []
    ub = np.zeros(nv)
    for i, gs in enumerate(grouped):
        p = prob.keep[i].astype(np.float64)
        w_read, w_occ = prob.window_stats(i)
        rs = c.read_s(density[i])
        cpu_row, io_row, dev_row = [], [], []
        for g, idx in enumerate(gs):
            # counts of the group's neurons on the device, pinned, in the window (the rest stream),
            # each neuron at the group's mean keep frequency, read rate and occupancy
            n, pg = len(idx), p[idx]
            sp, wr, oc = pg.mean(), w_read[idx].mean(), w_occ[idx].mean()
            dv, pv, wv = v(i, g, 0), v(i, g, 1), v(i, g, 2)
            ub[[dv, pv, wv]] = n
            con([(dv, 1), (pv, 1), (wv, 1)], 0, n)
            cpu_row += [(dv, -sp * c.cpu_s_per_record)]                  # cpu = sum(p) (all but the device)
            reads = [(wv, wr - sp), (dv, -sp), (pv, -sp)]                # reads = sum(p) + sum(coef * count)
            io_row += [(col, coef * (rs + c.cpu_s_per_record)) for col, coef in reads]
            dev_row += [(dv, c.device_s_per_record)]
            dram += [(pv, c.row_bytes), (wv, oc * c.row_bytes), (dv, _device_dram(c))]
            devmem += [(dv, c.device_bytes_per_record)]
            if has_dev:
                con([(dv, 1), (Y + i, -n)], -np.inf, 0)                  # device neurons only if y_l
        sp_all = p.sum()
        cpu0 = sp_all * c.cpu_s_per_record
        io0 = sp_all * (rs + c.cpu_s_per_record)
        sync = [(Y + i, c.device_sync_s)]
        dev = dev_row + sync
        if c.parallel:        # the CPU's thread launches and copies (the sync), then computes its share
            con([(T + i, 1)] + [(a, -b) for a, b in cpu_row + sync], cpu0, np.inf)   # t >= cpu + sync
            con([(T + i, 1)] + [(a, -b) for a, b in io_row + sync], io0, np.inf)     # t >= io + new + sync
            con([(T + i, 1)] + [(a, -b) for a, b in dev], 0, np.inf)                 # t >= dev
        else:
            con([(T + i, 1)] + [(a, -b) for a, b in cpu_row + dev], cpu0, np.inf)
            con([(T + i, 1)] + [(a, -b) for a, b in io_row + dev], io0, np.inf)
    con(dram, -np.inf, max(0, prob.dram_bytes) / MIB)
    if has_dev:
        con(devmem, -np.inf, prob.device_bytes / MIB)
    A = coo_matrix((vals, (rows, cols)), shape=(r, nv)).tocsr()
    obj = np.zeros(nv)
    obj[T:] = 1.0
    ub[Y:T] = 1.0 if has_dev else 0.0
    ub[T:] = np.inf
    if not has_dev:
        ub[0:Y:3] = 0.0
    # counts are integers in small groups; in large ones the relaxation's fraction of one neuron is
    # noise, and leaving them continuous keeps the program a few binaries (y_l) over an LP
    integrality = np.zeros(nv)
    integrality[Y:T] = 1
    small = sum(len(p) for p in prob.keep) < 4096
    for i, gs in enumerate(grouped):
        for g, idx in enumerate(gs):
            if len(idx) < INTEGER_GROUP:
                integrality[v(i, g, 0):v(i, g, 0) + 3] = 1
    res = highs(obj, constraints=LinearConstraint(A, lo, hi), integrality=integrality,
                bounds=Bounds(np.zeros(nv), ub), options={"time_limit": TIME_LIMIT_S, "mip_rel_gap": 1e-6 if small else 1e-3})
    if res.x is None:
        return None
    x = res.x
    tiers, wrows = [], []
    for i, gs in enumerate(grouped):
        p = prob.keep[i].astype(np.float64)
        w_occ = prob.window_stats(i)[1]
        tier = np.full(len(p), STREAM, np.int8)
        w_rows = 0.0
        for g, idx in enumerate(gs):           # within a group the hottest go to the higher tier
            n = len(idx)
            nd = int(round(x[v(i, g, 0)]))
            npin = min(int(round(x[v(i, g, 1)])), n - nd)
            nw = min(int(round(x[v(i, g, 2)])), n - nd - npin)
            tier[idx[:nd]] = DEVICE
            tier[idx[nd:nd + npin]] = PINNED
            tier[idx[nd + npin:nd + npin + nw]] = WINDOW
            w_rows += w_occ[idx[nd + npin:nd + npin + nw]].sum()
        tiers.append(tier)
        wrows.append(int(np.floor(w_rows)))
    tiers, wrows = _fit_memory(prob, tiers, wrows)
    objective, layer_s = evaluate(prob, tiers, wrows)
    reads = [_reads(prob, i, tr, w) / len(tr) for i, (tr, w) in enumerate(zip(tiers, wrows))]
    return Placement(tiers, wrows, objective, layer_s, "milp",
                     info={"density": reads, "mip_gap": float(getattr(res, "mip_gap", 0.0) or 0.0),
                           "program_objective_s": float(res.fun) / US + prob.costs.dense_s})


US, MIB = 1e6, float(1 << 20)


def _scaled(c: CostModel) -> CostModel:
    """The cost model in microseconds and MiB: the program's coefficients near 1, so HiGHS's
    feasibility tolerances are small beside them (seconds and bytes left it 1e-6 s astray)."""
    return CostModel(record_bytes=c.record_bytes / MIB, row_bytes=c.row_bytes / MIB,
                     cpu_s_per_record=c.cpu_s_per_record * US, read_density=c.read_density,
                     read_s_per_record=[r * US for r in c.read_s_per_record], dense_s=c.dense_s * US,
                     device=c.device, device_s_per_record=c.device_s_per_record * US,
                     device_sync_s=c.device_sync_s * US, device_bytes_per_record=c.device_bytes_per_record / MIB)


def _fit_memory(prob: Problem, tiers: list[np.ndarray], wrows: list[int]) -> tuple[list[np.ndarray], list[int]]:
    """Rounding may overshoot the DRAM by a few rows: take window rows, then pinned neurons (the
    coldest first), until the plan fits."""
    c = prob.costs
    used = sum(((t == PINNED).sum() + w) * c.row_bytes + (t == DEVICE).sum() * _device_dram(c)
               for t, w in zip(tiers, wrows))
    over = used - prob.dram_bytes
    i = 0
    while over > 0 and any(wrows):
        if wrows[i % len(wrows)]:
            wrows[i % len(wrows)] -= 1
            over -= c.row_bytes
        i += 1
    for layer in range(len(tiers)):
        if over <= 0:
            break
        pin = np.flatnonzero(tiers[layer] == PINNED)
        drop = pin[np.argsort(prob.keep[layer][pin])][:int(-(-over // c.row_bytes))]
        tiers[layer][drop] = STREAM
        over -= len(drop) * c.row_bytes
    return tiers, wrows


def solve(prob: Problem, solver: str = "milp") -> Placement:
    if solver == "greedy":
        return greedy(prob)
    return milp(prob)
