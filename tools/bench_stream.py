#!/usr/bin/env python3
"""Streaming benchmark: naive vs window (all / oracle / calibrated predictors) under one DRAM budget,
in one run.

    python tools/bench_stream.py BUNDLE [--budget-frac 0.5] [--prompt-tokens 128] [--gen 128]
                                 [--runs 3] [--rows naive,window-all,oracle-50,oracle-80]
                                 [--rows naive,window-all,predictor-lowrank,predictor-threshold-30]

Rows ``predictor-<kind>[-<sparsity %>]`` use the bundle's calibrated predictor (``calibrate``) at its
default or the given sparsity; their weights count inside the budget. Each row's greedy tokens are
compared with the first exact row's (naive or window-all) of the same run: agreement and the length
of the identical prefix, the quality of the row next to its speed.

Every row uses direct I/O (the page cache never serves FFN records) and the same budget. Reported
per row (medians over --runs): decode tokens/s, ms/token split (I/O wait, bookkeeping, compute,
selection), FFN bytes read per token, effective read throughput (bytes read per token / time per
token: conservative, since reads overlap compute), bookkeeping share of token time, peak RSS
above the runtime baseline, and in the same run the disk's sequential direct-read bandwidth
measured on the bundle's own FFN file before each run (median reported). Each row runs in its own interpreter. The oracle is a measuring tool: its dense copy of gate/up
weights is held outside the budget and subtracted from its peak RSS.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashinfer_local.runtime.engine import Engine  # noqa: E402
from flashinfer_local.runtime.sampling import SamplingParams  # noqa: E402
from flashinfer_local.units import fmt_bytes, parse_size  # noqa: E402
from storage.direct_io import measure_sequential_bandwidth  # noqa: E402
from storage.reader import Bundle  # noqa: E402

ROWS = {"naive": dict(offload="naive"), "window-all": dict(offload="window"),
        "oracle-50": dict(offload="window", selector="oracle", sparsity=0.5),
        "oracle-80": dict(offload="window", selector="oracle", sparsity=0.8),
        # frequency-first eviction, for comparison with the default (the paper's recency-first window)
        "oracle-50-frequency": dict(offload="window", selector="oracle", sparsity=0.5, evict="frequency"),
        # one request per run of adjacent records, no reading through gaps
        "oracle-50-nogap": dict(offload="window", selector="oracle", sparsity=0.5, read_gap=0)}
TEXT = ("In the beginning of computing, programs were written for machines with very little memory. "
        "Engineers learned to move data between fast and slow storage by hand, deciding which parts "
        "of a program had to stay close to the processor and which could wait on a drum or a tape. ")


def row_options(name: str) -> dict:
    if name in ROWS:
        return ROWS[name]
    parts = name.split("-")
    if parts[0] == "predictor" and len(parts) in (2, 3) and parts[1] in ("lowrank", "threshold"):
        kw = dict(offload="window", selector="predictor", predictor=parts[1])
        return kw if len(parts) == 2 else {**kw, "sparsity": int(parts[2]) / 100}
    raise SystemExit(f"unknown row {name!r}: one of {', '.join(ROWS)} or predictor-<kind>[-<sparsity %>]")


def agreement(tokens: list[int], exact: list[int]) -> tuple[float, int]:
    same = [a == b for a, b in zip(tokens, exact)]
    return sum(same) / max(len(same), 1), same.index(False) if False in same else len(same)


def run_row_isolated(path, name, budget, ids, gen):
    """Run one row in a fresh interpreter, so its runtime baseline and peak RSS are its own (in one
    process, memory the previous rows released but the allocator kept would count against it)."""
    import subprocess
    arg = json.dumps({"path": str(path), "name": name, "budget": budget, "ids": ids, "gen": gen})
    r = subprocess.run([sys.executable, __file__, "--one-row", arg], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"row {name} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_row(path, kw, budget, ids, gen):
    eng = Engine(path, dram_budget=budget, context=len(ids) + gen + 8, **kw)
    steps = list(eng.generate(ids, gen, SamplingParams(temperature=0), stop_at_eos=False))
    st, x = steps[-1].stats, steps[-1].stats.extra
    ms = x["ms_per_token"]
    io_s = ms["io_wait"] / 1000
    row = {"decode_tps": st.decode_tokens_per_s, "ms_per_token": 1000 / st.decode_tokens_per_s,
           **{f"ms_{k}": v for k, v in ms.items()},
           "bytes_per_token": x["flash_bytes_per_token"], "mean_read_bytes": x["mean_read_bytes"],
           "gap_bytes_per_token": x["gap_bytes_per_token"],
           # conservative: bytes per token over the whole token time (reads overlap compute)
           "read_throughput": x["flash_bytes_per_token"] * st.decode_tokens_per_s,
           "read_throughput_while_waiting": x["flash_bytes_per_token"] / io_s if io_s else 0.0,
           "cache_hit_rate": x["cache_hit_rate"], "cache_rows_per_layer": x["cache_rows_per_layer"],
           # the oracle's weights are held outside the budget; a predictor's inside it
           "peak_above_baseline": st.peak_rss_bytes - eng.runtime_baseline_bytes
           - (x["selector_bytes"] if kw.get("selector") == "oracle" else 0),
           "selector_bytes": x["selector_bytes"], "tokens": st.token_ids}
    eng.close()
    return row


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--one-row":
        j = json.loads(sys.argv[2])
        print(json.dumps(run_row(j["path"], row_options(j["name"]), j["budget"], j["ids"], j["gen"])))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--budget-frac", type=float, default=0.5)
    ap.add_argument("--budget", help="absolute budget (e.g. 4GiB); overrides --budget-frac")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--json", type=Path, default=Path("bench-out/stream.json"))
    a = ap.parse_args()
    b = Bundle(a.bundle)
    size = b.sizes()["total_bytes"]
    budget = parse_size(a.budget) if a.budget else int(size * a.budget_frac)
    from flashinfer_local.runtime.tokenizer import Tokenizer
    tok = Tokenizer(b)
    if tok.available:
        ids = (tok.encode(TEXT * 20))[:a.prompt_tokens]
    else:   # synthetic bundles have no tokenizer: fixed pseudo-random ids
        ids = [int(i) for i in np.random.default_rng(0).integers(0, b.config.vocab_size, a.prompt_tokens)]
    results, seqs = {}, []
    names = a.rows.split(",")
    for n in names:
        row_options(n)
    exact_row = next((n for n in names if n in ("naive", "window-all")), None)
    for r in range(a.runs):
        seqs.append(measure_sequential_bandwidth(b.ffn_path))     # the disk varies: once per run
        seq = statistics.median(seqs)
        for name in names:       # rows interleaved so machine noise hits all of them
            results.setdefault(name, []).append(run_row_isolated(a.bundle, name, budget, ids, a.gen))
            if exact_row is not None and exact_row in results and len(results[exact_row]) == r + 1:
                row = results[name][-1]
                row["agreement"], row["identical_prefix"] = agreement(row["tokens"], results[exact_row][r]["tokens"])
            print(f"run {r + 1} {name}: {results[name][-1]['decode_tps']:.3f} tok/s", file=sys.stderr)
            a.json.parent.mkdir(parents=True, exist_ok=True)       # partial results survive a cut-off
            a.json.write_text(json.dumps({"partial": True, "seq_read_bytes_per_s": seq, "runs": results}))
    med = {n: {k: statistics.median(run[k] for run in rs) for k in rs[0] if k != "tokens"}
           for n, rs in results.items()}
    print(f"\n{b.path.name}: bundle {fmt_bytes(size)}, budget {fmt_bytes(budget)} ({budget / size:.0%}), "
          f"prompt {len(ids)} tokens, {a.gen} generated, greedy, median of {a.runs}; naive's I/O limit at the "
          f"sequential bandwidth: {b.sizes()['ffn_bytes'] / seq:.2f} s/token; sequential direct "
          f"read bandwidth in this run: {seq / 1e9:.2f} GB/s\n")
    print("| row | tok/s | ms/token | I/O wait | bookkeeping | compute | selection | read/token | "
          "of which gaps | effective read GB/s (% of seq) | mean read | hit rate | peak RSS above baseline | "
          "agreement (identical prefix) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, m in med.items():
        print(f"| {n} | {m['decode_tps']:.3f} | {m['ms_per_token']:.0f} | {m['ms_io_wait']:.0f} | "
              f"{m['ms_bookkeeping']:.0f} | {m['ms_compute']:.0f} | {m['ms_selection']:.0f} | "
              f"{fmt_bytes(m['bytes_per_token'])} | {fmt_bytes(m['gap_bytes_per_token'])} | "
              f"{m['read_throughput'] / 1e9:.2f} "
              f"({100 * m['read_throughput'] / seq:.0f}%) | {fmt_bytes(m['mean_read_bytes'])} | "
              f"{100 * m['cache_hit_rate']:.0f}% | "
              f"{fmt_bytes(m['peak_above_baseline'])} | "
              + (f"{m['agreement']:.3f} ({m['identical_prefix']:.0f}) |" if "agreement" in m else "- |"))
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"bundle": str(a.bundle), "bundle_bytes": size, "budget_bytes": budget,
                                  "seq_read_bytes_per_s": seq, "seq_read_runs": seqs, "median": med,
                                  "runs": results}, indent=1))


if __name__ == "__main__":
    main()
