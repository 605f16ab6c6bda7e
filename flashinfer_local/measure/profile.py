"""`profile`: where a generation's memory goes, over time, and what it reads from the SSD.

A sampler thread records this process's RSS every few ms while the engine loads, prefills and
decodes (the three phases, marked by timing around ``Engine(...)`` and the first yielded token).
At the end of loading and after every token a snapshot attributes the RSS to owners, each measured
as the pages it really has resident (``measure.pages.PageMap``, /proc/self/pagemap), not as planned,
over the arrays the engine itself reports (``Engine.resident_arrays``):

    runtime     RSS before the model was opened (interpreter, torch, numba): ``runtime_baseline_bytes``
    dense       the memory-mapped dense.safetensors (copy-on-write map; pages load on first use)
    ffn_dram    every FFN record in DRAM (offload none; int8/int4: the records' gate/up part and the
                int8 down matrices)
    window      the window caches' record rows and bookkeeping arrays (rows load as they fill)
    buffers     the backend's read and compute scratch
    kv_cache    the KV cache as allocated (per layer, by its key/value heads) and the rotary tables
    selector    the selector's own weights (oracle); counted whole
    other       measured RSS minus all of the above: tokenizer, activations, allocator slack

The page cache held by the bundle's files (mincore) is recorded before and after the run: it is not
part of RSS, but a warm cache makes SSD reads look cheaper than they are.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil

from flashinfer_local.measure.pages import PageMap, page_cache_bytes, release_freed_memory
from flashinfer_local.runtime.backend import BACKEND_OWNERS
from flashinfer_local.runtime.rss import PeakRSS
from flashinfer_local.units import fmt_bytes

OWNERS = ("runtime", "dense", *BACKEND_OWNERS, "kv_cache", "selector", "draft")
PHASES = ("load", "prefill", "decode")

# The attribution check: |other| at the end of the run is at most this much. What "other" holds
# (tokenizer, Python objects, activations, thread stacks, allocator slack) is a few tens of MiB
# whatever the model size, so the tolerance is an absolute floor plus a share of the model's part.
OTHER_TOLERANCE_BYTES = 64 << 20
OTHER_TOLERANCE_SHARE = 0.10


def other_tolerance(rss: int, runtime: int) -> int:
    """Largest |other| the attribution accepts at an RSS of ``rss`` (see the constants above)."""
    return OTHER_TOLERANCE_BYTES + int(OTHER_TOLERANCE_SHARE * max(rss - runtime, 0))


class RSSRecorder(PeakRSS):
    """PeakRSS that also records (seconds since start, RSS bytes) of every sample.

    Once ``probe`` is set (a function returning a snapshot dict), the thread also takes a snapshot
    every ``probe_period`` s, tagged with the current ``phase``, so that owners are known inside a
    long prefill too, not only between tokens. ``lock`` is held while a probe runs: take it to
    stop probing before the engine is closed.
    """

    def __init__(self, period: float = 0.005, probe_period: float = 0.1):
        super().__init__(period)
        self.probe_period = probe_period
        self.t: list[float] = []
        self.rss: list[int] = []
        self.snapshots: list[dict] = []
        self.probe, self.phase = None, "load"
        self.lock = threading.Lock()
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def sample(self) -> int:
        r = super().sample()
        self.t.append(self.now())
        self.rss.append(r)
        return r

    def _run(self):
        next_probe = 0.0
        while not self._stop.wait(self.period):
            self.sample()
            if self.probe is not None and self.now() >= next_probe:
                with self.lock:
                    if self.probe is not None:
                        snap = self.probe()
                        self.snapshots.append({"t": self.now(), "phase": self.phase, "token": None, **snap})
                next_probe = self.now() + self.probe_period


def _draft_resident(pm, eng, session) -> int:
    """A speculative draft's resident bytes: a draft model's dense pages and FFN arrays, and the
    draft session's KV cache (the self draft has only that)."""
    n = 0
    d = eng.draft_engine
    if d is not None:
        n += pm.resident(*d.bundle.dense_span()) + sum(pm.array(a) for arrays in d.resident_arrays().values()
                                                       for a in arrays)
    ds = getattr(getattr(session, "draft", None), "session", None)
    if ds is not None:
        n += sum(pm.array(t) for t in (*ds.cache.k, *ds.cache.v, *ds.cache.tables))
    return n


def snapshot(eng, cache, session=None) -> dict:
    """Owners' resident bytes now, the KV cache per layer, window rows per layer, and RSS. Every
    owner is measured from the arrays the engine reports (``Engine.resident_arrays``); ``session``
    (when given) holds the speculative draft's state."""
    owners = dict.fromkeys(OWNERS, 0)
    owners["runtime"] = eng.runtime_baseline_bytes
    kv_layers = []
    with PageMap() as pm:
        owners["dense"] = pm.resident(*eng.bundle.dense_span())
        for owner, arrays in eng.resident_arrays().items():
            owners[owner] += sum(pm.array(a) for a in arrays)
        if cache is not None:
            kv_layers = [pm.array(k) + pm.array(v) for k, v in zip(cache.k, cache.v)]
            owners["kv_cache"] = sum(kv_layers) + sum(pm.array(t) for t in cache.tables)
        owners["draft"] = _draft_resident(pm, eng, session)
    owners["selector"] = int(eng.selector.nbytes)     # its own copies, written whole at load
    mem = psutil.Process().memory_info()
    rss = mem.rss
    return {"rss": rss, "rss_file": mem.shared, "owners": owners, "other": rss - sum(owners.values()),
            "kv_layers": kv_layers, "cache_rows": eng.ffn.cache_rows()}


def bundle_page_cache(path: Path) -> dict[str, int]:
    """Page-cache bytes of each file the bundle at ``path`` lists in its manifest."""
    from storage import format as fmt
    return {name: page_cache_bytes(Path(path) / name) for name in fmt.load_manifest(Path(path))["files"]}


@dataclass
class Profile:
    """Everything one profiled generation recorded (``to_dict`` is the JSON written to disk)."""
    model: str
    options: dict
    samples_t: list[float] = field(default_factory=list)
    samples_rss: list[int] = field(default_factory=list)
    phases: dict = field(default_factory=dict)        # name -> [start s, end s]
    snapshots: list[dict] = field(default_factory=list)
    tokens: list[dict] = field(default_factory=list)   # per forward: index, t, bytes read, hits
    page_cache: dict = field(default_factory=dict)    # "before"/"after" -> file -> bytes
    stats: dict = field(default_factory=dict)          # the engine's GenerationStats.to_dict()
    facts: dict = field(default_factory=dict)          # sizes and plan: budget, bundle, capacity
    text: str = ""

    def to_dict(self) -> dict:
        return {"model": self.model, "options": self.options, "facts": self.facts,
                "phases": self.phases, "samples": {"t": self.samples_t, "rss": self.samples_rss},
                "snapshots": self.snapshots, "tokens": self.tokens, "page_cache": self.page_cache,
                "stats": self.stats, "text": self.text, "summary": summarize(self)}


def _counters(eng) -> dict:
    c = eng.counters()
    return {"flash_bytes_read": c.flash_bytes_read, "read_ops": c.read_ops, "hits": c.hits, "lookups": c.lookups}


def profile_generation(path: Path, engine_options, prompt: str, max_tokens: int, sampling=None,
                       chat: bool = False, on_text=None, period: float = 0.005,
                       probe_period: float = 0.1) -> Profile:
    """Load the bundle at ``path`` with ``Engine(path, engine_options)`` (an EngineOptions or a
    dict of its fields), generate, and record.

    RSS is sampled every ``period`` s; owners are measured after loading, after every token and
    every ``probe_period`` s in between. ``on_text(str)`` receives the text as it is generated.
    """
    from flashinfer_local.runtime.engine import Engine
    from flashinfer_local.runtime.options import EngineOptions
    opts = EngineOptions.of(engine_options)
    prof = Profile(model=str(path), options={**asdict(opts), "prompt": prompt, "max_tokens": max_tokens,
                                             "chat": chat})
    prof.page_cache["before"] = bundle_page_cache(path)
    release_freed_memory()     # what earlier work freed must not be returned inside the run
    snaps = []
    with RSSRecorder(period, probe_period) as rec:
        t_load = rec.now()
        eng = Engine(path, opts)
        try:
            ids = eng.encode_prompt(prompt, chat)
            session = eng.session(len(ids) + max(max_tokens, 0))
            t = rec.now()
            prof.phases["load"] = [t_load, t]
            snaps.append({"t": t, "phase": "load", "token": None, **snapshot(eng, session.cache, session)})
            rec.phase, rec.probe = "prefill", lambda: snapshot(eng, session.cache, session)
            last, st, text = _counters(eng), None, []
            for i, step in enumerate(session.generate(ids, max_tokens=max_tokens, sampling=sampling)):
                t = rec.now()
                c = _counters(eng)
                prof.tokens.append({"index": i, "t": t, **{k: c[k] - last[k] for k in c}})
                last = c
                snaps.append({"t": t, "phase": rec.phase, "token": i, **snapshot(eng, session.cache, session)})
                if i == 0:
                    prof.phases["prefill"] = [prof.phases["load"][1], t]
                    rec.phase = "decode"
                text.append(step.text)
                if on_text:
                    on_text(step.text)
                st = step.stats
            t_end = rec.now()
            with rec.lock:
                rec.probe = None
            if "prefill" not in prof.phases:                 # the first token was end-of-sequence
                prof.phases["prefill"] = [prof.phases["load"][1], t_end]
            else:
                prof.phases["decode"] = [prof.phases["prefill"][1], t_end]
            prof.text = "".join(text)
            prof.facts = _facts(eng, session.cache)
            if st is not None:
                prof.stats = st.to_dict()
        finally:
            with rec.lock:
                rec.probe = None
            eng.close()
    prof.samples_t, prof.samples_rss = rec.t, rec.rss
    prof.snapshots = sorted(snaps + rec.snapshots, key=lambda s: s["t"])
    prof.page_cache["after"] = bundle_page_cache(path)
    return prof


def _facts(eng, cache) -> dict:
    cfg = eng.config
    return {"offload": eng.offload, "dram_budget_bytes": eng.dram_budget,
            "runtime_baseline_bytes": eng.runtime_baseline_bytes, "bundle": eng.bundle.sizes(),
            "n_layers": cfg.n_layers, "d_ff": cfg.d_ff, "n_kv_heads": list(cfg.n_kv_heads),
            "kv_bytes_per_token": cfg.kv_bytes_per_token(),
            "kv_capacity_tokens": cache.capacity, "kv_allocated_bytes": cache.nbytes,
            "planned": eng.resident(), "plan": eng.plan.to_dict(),
            "cache_rows_capacity": eng.plan.cache_rows_per_layer if eng.offload != "none" else None}


# ---------------------------------------------------------------- summary

def _owners_at(prof: Profile, t: float) -> dict | None:
    """The latest snapshot at or before ``t`` (None before the first)."""
    best = None
    for s in prof.snapshots:
        if s["t"] <= t:
            best = s
    return best


def summarize(prof: Profile) -> dict:
    """Peak RSS overall and per phase, owners at the end of each phase and at the peak, the
    attribution error, bytes read per token, cache hit rate, page cache."""
    t, rss = np.asarray(prof.samples_t), np.asarray(prof.samples_rss, dtype=np.int64)
    snaps = prof.snapshots
    runtime = prof.facts.get("runtime_baseline_bytes", 0)
    out = {"peak_rss_bytes": int(rss.max()) if len(rss) else 0}
    if len(rss):
        k = int(rss.argmax())
        out["peak_t"] = float(t[k])
        started = [p for p, (a, _) in prof.phases.items() if a <= t[k]]     # the phase it falls in
        out["peak_phase"] = started[-1] if started else "before load"
        at = _owners_at(prof, t[k])
        if at is not None:
            out["peak_owners"] = {**at["owners"], "other": int(rss[k]) - sum(at["owners"].values())}
    out["peak_above_runtime_bytes"] = out["peak_rss_bytes"] - runtime
    phases = {}
    for p, (a, b) in prof.phases.items():
        m = (t >= a) & (t <= b)
        end = [s for s in snaps if s["phase"] == p]
        phases[p] = {"start_s": a, "end_s": b, "peak_rss_bytes": int(rss[m].max()) if m.any() else 0}
        if end:
            phases[p].update(owners={**end[-1]["owners"], "other": end[-1]["other"]}, rss_bytes=end[-1]["rss"])
    out["phases"] = phases
    if snaps:
        last = snaps[-1]
        tol = other_tolerance(last["rss"], runtime)
        out["attribution"] = {"other_bytes": last["other"], "rss_bytes": last["rss"],
                              "tolerance_bytes": tol, "within_tolerance": abs(last["other"]) <= tol,
                              "max_abs_other_bytes": max(abs(s["other"]) for s in snaps)}
        # library code and data pages first touched after loading (file-backed RSS outside the
        # dense map): part of "other", the runtime growing past its measured baseline
        first = snaps[0]
        out["attribution"]["library_pages_growth_bytes"] = (
            (last["rss_file"] - last["owners"]["dense"]) - (first["rss_file"] - first["owners"]["dense"]))
    toks = prof.tokens
    dec = toks[1:]
    out["prefill_bytes_read"] = toks[0]["flash_bytes_read"] if toks else 0
    out["decode_bytes_per_token"] = (sum(x["flash_bytes_read"] for x in dec) / len(dec)) if dec else 0.0
    look = sum(x["lookups"] for x in dec)
    out["decode_cache_hit_rate"] = sum(x["hits"] for x in dec) / look if look else None
    out["decode_tokens_per_s"] = prof.stats.get("decode_tokens_per_s", 0.0)
    out["prefill_tokens_per_s"] = prof.stats.get("prefill_tokens_per_s", 0.0)
    out["generated_tokens"] = prof.stats.get("generated_tokens", 0)
    pc = prof.page_cache
    out["page_cache_bytes"] = {k: sum(v.values()) for k, v in pc.items()}
    return out


_LABEL = {"runtime": "runtime baseline", "dense": "dense (mapped)", "ffn_dram": "FFN in DRAM",
          "window": "window cache", "buffers": "read/compute buffers", "kv_cache": "KV cache",
          "selector": "selector/predictor", "draft": "speculative draft", "other": "other (RSS - owners)"}


def report_lines(d: dict) -> list[str]:
    """The terminal summary of a profile (``Profile.to_dict()`` output)."""
    s, f = d["summary"], d["facts"]
    budget = f.get("dram_budget_bytes")
    lines = [f"{Path(d['model']).name}: offload {f.get('offload')}, budget "
             f"{fmt_bytes(budget) if budget else 'unlimited'} | {s['generated_tokens']} tokens, prefill "
             f"{s['prefill_tokens_per_s']:.1f} tok/s, decode {s['decode_tokens_per_s']:.1f} tok/s",
             f"peak RSS {fmt_bytes(s['peak_rss_bytes'])} at {s.get('peak_t', 0):.2f}s "
             f"({s.get('peak_phase', '?')}); {fmt_bytes(s['peak_above_runtime_bytes'])} above the runtime "
             f"baseline of {fmt_bytes(f.get('runtime_baseline_bytes', 0))}"
             + (f" (budget {fmt_bytes(budget)})" if budget else "")]
    cols = [p for p in PHASES if "owners" in s["phases"].get(p, {})]
    heads = [f"end of {p}" for p in cols] + (["at peak"] if "peak_owners" in s else [])
    lines.append(f"{'owner':<24}" + "".join(f"{h:>15}" for h in heads))
    for o in (*OWNERS, "other"):
        vals = [s["phases"][p]["owners"][o] for p in cols] + ([s["peak_owners"][o]] if "peak_owners" in s else [])
        if any(vals) or o == "other":
            lines.append(f"{_LABEL[o]:<24}" + "".join(f"{fmt_bytes(v):>15}" for v in vals))
    rss = [s["phases"][p]["rss_bytes"] for p in cols] + ([s["peak_rss_bytes"]] if "peak_owners" in s else [])
    lines.append(f"{'RSS (measured)':<24}" + "".join(f"{fmt_bytes(v):>15}" for v in rss))
    lines.append(f"{'peak RSS in phase':<24}" + "".join(f"{fmt_bytes(s['phases'][p]['peak_rss_bytes']):>15}"
                                                         for p in cols))
    a = s.get("attribution")
    if a:
        lines.append(f"attribution: other = RSS - owners = {fmt_bytes(a['other_bytes'])} at the end "
                     f"({100 * a['other_bytes'] / a['rss_bytes']:+.1f}% of RSS; tolerance "
                     f"{fmt_bytes(a['tolerance_bytes'])}: {'ok' if a['within_tolerance'] else 'EXCEEDED'}); "
                     f"of which library pages first used after loading: "
                     f"{fmt_bytes(a['library_pages_growth_bytes'])}")
    kv = d["snapshots"][-1]["kv_layers"] if d["snapshots"] else []
    if kv:
        lines.append(f"KV cache: {fmt_bytes(sum(kv))} for {f['kv_capacity_tokens']} tokens "
                     f"({fmt_bytes(f['kv_bytes_per_token'])}/token); per layer "
                     + (fmt_bytes(kv[0]) if len(set(kv)) == 1 else ", ".join(fmt_bytes(x) for x in kv)))
    hr = s["decode_cache_hit_rate"]
    lines.append(f"SSD reads: prefill {fmt_bytes(s['prefill_bytes_read'])}, decode "
                 f"{fmt_bytes(s['decode_bytes_per_token'])}/token"
                 + (f", window cache hit rate {100 * hr:.1f}%" if hr is not None else ""))
    pc, total = s["page_cache_bytes"], f.get("bundle", {}).get("total_bytes", 0)
    if pc:
        lines.append(f"page cache of the bundle's files (not in RSS): {fmt_bytes(pc.get('before', 0))} "
                     f"before, {fmt_bytes(pc.get('after', 0))} after, of {fmt_bytes(total)}"
                     + (" -- a warm cache can make SSD reads look faster" if total and
                        pc.get("before", 0) > 0.5 * total else ""))
    return lines
