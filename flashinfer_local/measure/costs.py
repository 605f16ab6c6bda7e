"""The placement's cost model, measured on this machine (``plan --measure``) and cached.

What is timed, each on this bundle's own files and kernels:
- the SSD: sequential bandwidth, and the time per record read (direct I/O, the engine's reader and
  thread count) for random selections of a layer at several densities (sparse reads are bound by
  the request rate, dense ones coalesce);
- the CPU: the record kernel's time per neuron for one token;
- the dense part: a decode token with every neuron skipped (attention, norms, head), plus the
  predictor's time per token from its calibration report;
- the device (when one is asked for): torch's time per neuron for a layer's device share, and the
  cost of using it at all in a layer (copy in, launch, copy out).
The result is cached in ``~/.cache/flashinfer-local/costs.json`` under the bundle's FFN checksum,
the device and the thread counts; ``plan --measure`` measures again.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from predictors.activation import gate_activation
from predictors.placement import CostModel
from storage import format as fmt
from storage import window_cache as wc
from storage.direct_io import RecordReader, aligned_empty, measure_sequential_bandwidth
from storage.reader import Bundle

from flashinfer_local.kernels import RecordKernel
from flashinfer_local.runtime.streaming import MAX_GAP_BYTES

DENSITIES = (0.01, 0.03, 0.1, 0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
READ_SECONDS = 0.8            # per density
MAX_PASSES = 20               # ... or this many passes' worth of records
TOKENS = 8                    # decode tokens timed for the dense part


def cache_path() -> Path:
    root = Path(os.environ.get("FLASHINFER_LOCAL_HOME", Path.home() / ".cache" / "flashinfer-local"))
    return root / "costs.json"


def cache_key(bundle: Bundle, device: str, io_threads: int, threads: int, read_gap: int) -> str:
    return f"{bundle.manifest['files'][fmt.FFN_FILE]['sha256']}:{device}:{io_threads}:{threads}:gap{read_gap}"


def cached(key: str) -> CostModel | None:
    try:
        return CostModel.from_dict(json.loads(cache_path().read_text())[key])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store(key: str, costs: CostModel) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
        table[key] = costs.to_dict()
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass                              # a cache that cannot be written is measured again next time


def _reader(bundle: Bundle, io_threads: int, read_gap: int) -> RecordReader:
    """A reader as the streaming backend opens one (its threads, its gap merging)."""
    cfg, lay = bundle.config, bundle.layout
    return RecordReader(bundle.file_path(fmt.FFN_FILE), lay.record_bytes,
                        [bundle.ffn_offset(i) for i in range(cfg.n_layers)], threads=io_threads,
                        max_gap_bytes=read_gap)


def _read_pipelined(r: RecordReader, dest: list[np.ndarray], batches) -> tuple[float, int]:
    """Read ``batches`` of (layer, sorted ids) as the streaming backend does, the next submitted
    before the current one is waited for (two in flight): (seconds, records read)."""
    pending, recs = None, 0
    t0 = time.perf_counter()
    for k, (layer, ids) in enumerate(batches):
        batch = r.submit(int(layer), ids, dest[k % 2][:len(ids)])
        if pending is not None:
            pending.wait()
        pending, recs = batch, recs + len(ids)
    if pending is not None:
        pending.wait()
    return time.perf_counter() - t0, recs


def read_costs(bundle: Bundle, io_threads: int = 8, seconds: float = READ_SECONDS,
               read_gap: int = MAX_GAP_BYTES) -> tuple[list, list, float]:
    """(densities, seconds per record read at each, sequential bytes/s) of this bundle's FFN file:
    random selections of each density, layer after layer."""
    cfg, lay = bundle.config, bundle.layout
    rng = np.random.default_rng(0)

    def batches(n):        # time-bound, or (a small model) enough passes over the whole FFN file
        t0, recs, layer = time.perf_counter(), 0, 0
        while (time.perf_counter() - t0 < seconds and recs < MAX_PASSES * cfg.n_layers * cfg.d_ff) or recs == 0:
            yield layer, np.sort(rng.choice(cfg.d_ff, n, replace=False)).astype(np.int64)
            recs, layer = recs + n, (layer + 1) % cfg.n_layers
    per = []
    with _reader(bundle, io_threads, read_gap) as r:
        dest = [aligned_empty((cfg.d_ff, lay.record_bytes)) for _ in range(2)]
        for dens in DENSITIES:
            took, recs = _read_pipelined(r, dest, batches(max(1, int(round(dens * cfg.d_ff)))))
            per.append(took / recs)
    seq = measure_sequential_bandwidth(bundle.file_path(fmt.FFN_FILE), seconds=1.0)
    # a denser selection is never slower per record (its reads only coalesce more): the running
    # minimum from the sparsest end takes out the noise of single measurements
    per = np.minimum.accumulate(np.asarray(per))
    return list(DENSITIES), [float(v) for v in per], seq


def order_factor(bundle: Bundle, costs: CostModel, streamed: list[np.ndarray], keep: list[np.ndarray],
                 io_threads: int = 8, layers: int = 6, tokens: int = 3, read_gap: int = MAX_GAP_BYTES) -> float:
    """How much faster (< 1) or slower the reads of a plan are than the read table says: per
    sampled layer and token, the streamed neurons a token keeps (each with its keep frequency) are
    read from the bundle in its own order, and the time per record is set against the table's at
    that density. Hot neurons next to each other (a reordered bundle) coalesce into longer reads."""
    cfg, lay = bundle.config, bundle.layout
    rng = np.random.default_rng(3)
    picks = np.linspace(0, cfg.n_layers - 1, min(layers, cfg.n_layers)).round().astype(int)
    batches = []
    for layer in picks:
        for _ in range(tokens):
            ids = streamed[layer][rng.random(len(streamed[layer])) < keep[layer][streamed[layer]]]
            if len(ids):
                batches.append((layer, np.sort(ids).astype(np.int64)))
    table = sum(len(ids) * costs.read_s(len(ids) / cfg.d_ff) for _, ids in batches)
    with _reader(bundle, io_threads, read_gap) as r:
        measured, _ = _read_pipelined(r, [aligned_empty((cfg.d_ff, lay.record_bytes)) for _ in range(2)], batches)
    return float(np.clip(measured / table, 0.2, 5.0)) if table > 0 else 1.0


def cpu_cost(bundle: Bundle, reps: int = 20) -> float:
    """Seconds per neuron of the record kernel for one token (activations and down pass)."""
    cfg = bundle.config
    k = RecordKernel(bundle.layout, bundle.ffn_dtype, cfg.d_model, cfg.d_ff, cfg.activation)
    recs = bundle.read_ffn_layer(cfg.n_layers // 2)
    n = min(cfg.d_ff, 4096)
    ids = np.sort(np.random.default_rng(1).choice(cfg.d_ff, n, replace=False)).astype(np.int64)
    x = np.random.default_rng(2).standard_normal((1, cfg.d_model)).astype(np.float32)
    out = np.zeros((1, cfg.d_model), np.float32)
    gate = np.random.default_rng(3).standard_normal((1, cfg.d_ff)).astype(np.float32) if k.split else None
    ts = []
    for _ in range(reps + 2):
        t0 = time.perf_counter()
        k.begin(x, gate)
        k.activations(recs, ids, ids, None)
        k.down(recs, ids, ids)
        k.finish(out)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts[2:])) / n


def device_costs(bundle: Bundle, device: str, reps: int = 20) -> tuple[float, float, int]:
    """(seconds per device neuron, seconds per layer that uses the device, bytes per neuron)."""
    from flashinfer_local.runtime.placed import check_device, device_bytes_per_neuron, device_dtype, device_ffn
    cfg = bundle.config
    dev, dt = check_device(device), device_dtype(device)
    d, n = cfg.d_model, min(cfg.d_ff, 4096)
    w = {k: torch.randn(n, d, dtype=torch.float32).to(dev, dt) for k in bundle.layout.vectors}
    if not cfg.gated:
        w["up_bias"] = torch.zeros(n, dtype=dt, device=dev)
    x = torch.randn(1, d)
    gate = torch.randn(1, n) if bundle.gate_split else None        # the engine's gate values

    def once(m):
        return device_ffn(x, {k: v[:m] for k, v in w.items()}, None,
                          None if gate is None else gate[:, :m], gate_activation(cfg)).to("cpu", torch.float32)

    def timed(m):
        ts = []
        for _ in range(reps + 2):
            t0 = time.perf_counter()
            once(m)
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts[2:]))
    small, big = timed(8), timed(n)
    per = (big - small) / (n - 8) if n > 8 else 0.0
    if per <= 0:                     # a layer too small to tell the two apart: all of it per neuron
        per = big / n
    return per, max(0.0, small - 8 * per), device_bytes_per_neuron(cfg, device, bundle.gate_split)


def dense_cost(path: Path, threads: int | None) -> float:
    """Seconds of a decode token with every FFN neuron skipped: the dense part's time."""
    from flashinfer_local.runtime.engine import Engine

    class _Nothing:
        name, nbytes = "nothing", 0

        def mask(self, layer, x, gate=None):
            return torch.zeros(x.shape[0], d_ff, dtype=torch.bool)
    eng = Engine(path, offload="naive", threads=threads, context=64, placement="none")
    try:
        d_ff = eng.config.d_ff
        with eng.selecting(_Nothing()):
            cache = eng.new_cache(TOKENS + 2)
            tok = torch.tensor([1])
            eng.forward(tok, 0, cache)
            ts = []
            for i in range(TOKENS):
                t0 = time.perf_counter()
                eng.forward(tok, i + 1, cache)
                ts.append(time.perf_counter() - t0)
        return float(np.median(ts))
    finally:
        eng.close()


def measure(bundle: Bundle, device: str = "none", io_threads: int = 8, threads: int | None = None,
            say=lambda msg: None, read_gap: int = MAX_GAP_BYTES) -> CostModel:
    say("measuring the SSD's read cost ...")
    dens, per, seq = read_costs(bundle, io_threads, read_gap=read_gap)
    say("measuring the CPU kernels and the dense part ...")
    cpu = cpu_cost(bundle)
    dense = dense_cost(bundle.path, threads)
    dev = (0.0, 0.0, 0)
    if device != "none":
        say(f"measuring {device} ...")
        dev = device_costs(bundle, device)
    rec = bundle.layout.record_bytes
    return CostModel(record_bytes=rec, row_bytes=rec + wc.ROW_META_BYTES, cpu_s_per_record=cpu,
                     read_density=dens, read_s_per_record=per, dense_s=dense, device=device,
                     device_s_per_record=dev[0], device_sync_s=dev[1], device_bytes_per_record=dev[2],
                     sequential_bytes_per_s=seq, measured={"at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                                           "threads": threads, "io_threads": io_threads,
                                                           "read_gap": read_gap})


def costs_for(bundle: Bundle, device: str, io_threads: int, threads: int | None, remeasure: bool,
              say=lambda msg: None, read_gap: int = MAX_GAP_BYTES) -> tuple[CostModel, bool]:
    """(the cost model, whether it was measured now): the cached one unless ``remeasure``."""
    key = cache_key(bundle, device, io_threads, threads or 0, read_gap)
    if not remeasure and (c := cached(key)) is not None:
        return c, False
    c = measure(bundle, device, io_threads, threads, say, read_gap)
    store(key, c)
    return c, True
