"""``plan``: decide where each FFN neuron lives for a DRAM budget (and a device), store it in the bundle.

1. The budget's fixed part for streaming (``runtime.budget``): what is left holds the placement's
   rows (pinned and window), and a CPU device's tensors.
2. The keep frequency of every neuron at the run's sparsity (the predictor's ``keep`` statistics, and
   its measured window reuse where calibrated for the run's window; ``--selector all``: every neuron
   every token).
3. The cost model (``measure.costs``: cached, or measured with ``--measure``).
4. Greedy and the mixed-integer program (``predictors.placement``); the chosen one is stored
   atomically in ``placement.safetensors`` with both objectives.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import numpy as np

from predictors import calibration as cal
from predictors import placement as pl
from predictors import plan_file, store
from storage.errors import FlashinferError, OptionError
from storage.reader import Bundle

from flashinfer_local.measure import costs as cost_model
from flashinfer_local.runtime.budget import Sizes, default_predictor, placement_dram_bytes, predictor_bytes
from flashinfer_local.runtime.options import EngineOptions
from flashinfer_local.runtime.placed import DEVICES
from flashinfer_local.units import fmt_bytes

SOLVERS = ("milp", "greedy")


def _interp_rows(rows: np.ndarray, s: float) -> np.ndarray:
    """rows [len(KEEP_GRID), d_ff] at sparsity s (linear between grid points)."""
    j = int(np.clip(np.searchsorted(store.KEEP_GRID, s), 1, len(store.KEEP_GRID) - 1))
    a, b = store.KEEP_GRID[j - 1], store.KEEP_GRID[j]
    f = float(np.clip((s - a) / (b - a), 0.0, 1.0))
    return (1 - f) * rows[j - 1] + f * rows[j]


def keep_statistics(bundle: Bundle, selector: str, predictor: str | None, sparsity: float | None,
                    window: int, shares: str = "auto") -> tuple[list, list | None, list | None, dict]:
    """(keep frequency per layer, window reads, window occupancy (None: not measured for this
    window), what they came from)."""
    cfg = bundle.config
    if selector == "all":
        ones = [np.ones(cfg.d_ff, np.float32) for _ in range(cfg.n_layers)]
        return ones, None, None, {"selector": "all", "predictor": None, "sparsity": 0.0}
    if selector != "predictor":
        raise OptionError("selector", f"{selector}: a placement is planned for all or predictor", flag="--selector")
    kind = predictor or default_predictor(bundle.path)
    tensors, meta = store.load(bundle.path, kind, cfg, store.neuron_order(bundle.manifest),
                               only=("keep", "wread", "wocc", "cutoffs", "lost"))
    if "keep.0" not in tensors:
        raise FlashinferError(f"the {kind} predictor of {bundle.path} has no keep statistics (calibrated by an "
                              f"older version); run: flashinfer-local calibrate {bundle.path} --predictor {kind}")
    lost = np.stack([tensors[f"lost.{i}"] for i in range(cfg.n_layers)]) if "lost.0" in tensors else None
    mode = cal.shares_mode(lost, meta, shares)
    s = sparsity if sparsity is not None else meta["layer_default_sparsity" if mode == "layer" else "default_sparsity"]
    if not 0 <= s <= store.KEEP_GRID[-1]:
        raise OptionError("sparsity", f"{s} must be in [0, {store.KEEP_GRID[-1]}]", flag="--sparsity")
    per_layer = cal.spread(lost, mode, float(s), cfg.n_layers)

    def at(name):
        return [_interp_rows(tensors[f"{name}.{i}"].astype(np.float32), per_layer[i])
                for i in range(cfg.n_layers)]
    keep = at("keep")
    reads = occ = None
    if "wread.0" in tensors and meta.get("window_stats_k") == window:
        reads, occ = at("wread"), at("wocc")
    select_ms = sum(r.get("predict_ms", 0.0) for r in meta["layers"])
    return keep, reads, occ, {"selector": "predictor", "predictor": kind, "sparsity": float(s),
                              "layer_shares": mode, "layer_sparsities": per_layer,
                              "predictor_sha256": plan_file.predictor_identity(bundle.path, kind),
                              "selector_ms": select_ms}


def make_plan(path: str | Path, dram_budget: int, options: EngineOptions | None = None, gpu_mem: int = 0,
              device: str | None = None, solver: str = "milp", remeasure: bool = False,
              reorder: str | None = None, say=lambda msg: None) -> dict:
    """Solve and store the bundle's placement; returns the report (also in the plan's header).
    ``reorder`` ("coact" or "frequency"): also renumber the neurons for long reads
    (``workflows.reorder``), the placement stored in the new order."""
    opts = EngineOptions.of(options)
    if solver not in SOLVERS:
        raise OptionError("solver", f"{solver} is not known (choose {', '.join(SOLVERS)})")
    device = device or ("cuda" if gpu_mem else "none")
    if device not in ("none", *DEVICES):
        raise OptionError("device", f"{device} is not known (choose {', '.join(DEVICES)})")
    if device != "none" and not gpu_mem:
        raise OptionError("gpu_mem", f"--device {device} needs --gpu-mem, the memory the device may hold "
                          "(e.g. 4GiB)", flag="--gpu-mem")
    with contextlib.closing(Bundle(path)) as bundle:
        cfg = bundle.config
        if cfg.layer_map:
            raise FlashinferError(f"{bundle.path} is a recursive model ({cfg.depth} layer positions over "
                                  f"{cfg.n_layers} stored layers): the placement's cost model counts each layer once "
                                  "per token and cannot plan it yet; run it without a plan (--offload window)")
        sizes = Sizes.of(bundle)             # (whether the lean tokenizer reads its file, without loading it)
        context = min(opts.context, cfg.max_position)
        sel = predictor_bytes(bundle, opts.predictor) if opts.selector == "predictor" else 0
        free, least = placement_dram_bytes(sizes, dram_budget, context, sel, opts.evict)
        if free < 0:
            raise FlashinferError(f"--dram-budget {fmt_bytes(dram_budget)} is below the {fmt_bytes(least)} streaming "
                                  "needs before any neuron is placed; raise it (flashinfer-local estimate shows the "
                                  "minimum)")
        keep, reads, occ, src = keep_statistics(bundle, opts.selector, opts.predictor, opts.sparsity, opts.window,
                                                opts.layer_shares)
        costs, fresh = cost_model.costs_for(bundle, device, opts.io_threads, opts.threads, remeasure, say,
                                            opts.read_gap)
        costs = replace(costs, dense_s=costs.dense_s + src.pop("selector_ms", 0.0) / 1000)
        prob = pl.Problem(keep, costs, int(free), int(gpu_mem if device != "none" else 0), opts.window,
                          window_read=reads, window_occ=occ)
        say("timing reads of the plan's streamed neurons in the bundle's order ...")
        factor = _order_factor(bundle, prob, pl.greedy(prob).tiers, opts)
        prob = replace(prob, costs=_scaled_reads(costs, factor))
        say("solving ...")
        greedy = pl.greedy(prob)
        chosen = greedy if solver == "greedy" else pl.milp(prob)
        label = chosen.solver if solver == "greedy" or chosen.solver == "milp" else "milp (greedy was best)"
        meta = {"solver": label,
                "objective_ms": 1000 * chosen.objective_s, "greedy_objective_ms": 1000 * greedy.objective_s,
                "solve_s": chosen.solve_s, "predicted_tokens_per_s": 1 / chosen.objective_s,
                "dram_budget": int(dram_budget), "context": context, "device": device, "gpu_mem": int(gpu_mem),
                "window": opts.window, "evict": opts.evict, "window_reuse_measured": reads is not None,
                **src, "costs": costs.to_dict(), "costs_measured_now": fresh, "read_factor": factor,
                "layers": chosen.counts(), "layer_ms": [1000 * t for t in chosen.layer_s],
                "dram_for_placement": int(free)}
        if reorder is None:
            plan_file.save(bundle.path, bundle.manifest, chosen, meta)
    if reorder is not None:
        from flashinfer_local.workflows.reorder import reorder as do_reorder
        facts, perms = do_reorder(path, chosen, meta, keep, reorder, say)
        meta = _predict_reordered(path, _permuted(prob, perms), [t[p] for t, p in zip(chosen.tiers, perms)],
                                  chosen, {**meta, "reorder": facts}, costs, opts, say)
    return {"path": str(plan_file.plan_path(path)), **meta}


def _order_factor(bundle: Bundle, prob: pl.Problem, tiers: list, opts: EngineOptions) -> float:
    streamed = [np.flatnonzero((t != pl.PINNED) & (t != pl.DEVICE)) for t in tiers]
    return cost_model.order_factor(bundle, prob.costs, streamed, prob.keep, opts.io_threads, read_gap=opts.read_gap)


def _scaled_reads(costs: pl.CostModel, factor: float) -> pl.CostModel:
    return replace(costs, read_s_per_record=[v * factor for v in costs.read_s_per_record])


def _permuted(prob: pl.Problem, perms: list[np.ndarray]) -> pl.Problem:
    """The problem with every per-neuron statistic in a new order (``perms``: new -> old)."""
    def each(arrays):
        return None if arrays is None else [a[p] for a, p in zip(arrays, perms)]
    return replace(prob, keep=each(prob.keep), window_read=each(prob.window_read), window_occ=each(prob.window_occ))


def _predict_reordered(path, prob: pl.Problem, tiers: list, chosen: pl.Placement, meta: dict,
                       costs: pl.CostModel, opts: EngineOptions, say) -> dict:
    """After a reorder: the placement's expected time in the bundle's new order (its reads timed
    again there, against the unscaled read table ``costs``), stored in the plan's header; returns
    the header."""
    say("timing reads in the new order ...")
    with contextlib.closing(Bundle(path)) as bundle:
        factor = _order_factor(bundle, replace(prob, costs=costs), tiers, opts)
        obj, layer_s = pl.evaluate(replace(prob, costs=_scaled_reads(costs, factor)), tiers, chosen.window_rows)
        meta = {**meta, "unreordered_objective_ms": meta["objective_ms"], "objective_ms": 1000 * obj,
                "predicted_tokens_per_s": 1 / obj, "read_factor": factor, "layer_ms": [1000 * t for t in layer_s],
                "predictor_sha256": plan_file.predictor_identity(bundle.path, meta["predictor"])}
        plan_file.save(bundle.path, bundle.manifest, replace(chosen, tiers=tiers, objective_s=obj, layer_s=layer_s),
                       meta)
    return meta


def summary_lines(rep: dict) -> list[str]:
    """What `plan` prints."""
    lay = rep["layers"]
    tot = {k: sum(r[k] for r in lay) for k in ("device", "pinned", "window_rows")}
    n = sum(sum(r[t] for t in pl.TIERS) for r in lay)
    c = rep["costs"]
    out = [f"placement for --dram-budget {fmt_bytes(rep['dram_budget'])}"
           + (f", {rep['device']} {fmt_bytes(rep['gpu_mem'])}" if rep["device"] != "none" else "")
           + f", selector {rep['selector']}" + (f" ({rep['predictor']}, sparsity {rep['sparsity']:.2f})"
                                                if rep["predictor"] else "") + f": {rep['solver']}",
           f"  {tot['device']} neurons on the device, {tot['pinned']} pinned in DRAM, {tot['window_rows']} window "
           f"rows, of {n} ({fmt_bytes(rep['dram_for_placement'])} of DRAM for them)",
           f"  expected {rep['objective_ms']:.1f} ms/token ({rep['predicted_tokens_per_s']:.2f} tok/s); greedy "
           f"{rep['greedy_objective_ms']:.1f} ms; solved in {rep['solve_s']:.2f} s"
           + (f"; {rep['unreordered_objective_ms']:.1f} ms before the reorder" if "unreordered_objective_ms" in rep else ""),
           f"  reads in the bundle's order take {rep['read_factor']:.2f}x the read table's time (timed on the "
           "plan's streamed neurons)",
           f"  costs ({'measured now' if rep['costs_measured_now'] else 'cached; --measure measures again'}): "
           f"dense {1000 * c['dense_s']:.1f} ms/token, CPU {1e9 * c['cpu_s_per_record']:.0f} ns/neuron, reads "
           f"{1e6 * c['read_s_per_record'][0]:.1f}-{1e6 * c['read_s_per_record'][-1]:.2f} us/record (sparse-dense), "
           f"sequential {c['sequential_bytes_per_s'] / 1e9:.2f} GB/s",
           "  layer  device  pinned  window  stream   ms"]
    for i, (r, ms) in enumerate(zip(lay, rep["layer_ms"])):
        out.append(f"  {i:>5}  {r['device']:>6}  {r['pinned']:>6}  {r['window_rows']:>6}  "
                   f"{r['stream'] + r['window']:>6}  {ms:5.2f}")
    return out
