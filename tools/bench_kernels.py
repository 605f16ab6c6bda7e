#!/usr/bin/env python3
"""One FFN layer and one matrix-vector product per precision, side by side: the numba record
kernels (f16, int8, int4 records: the int4 default's q5 down columns, and q4/q8 ones) against
torch on dense f16/f32 weights, and the in-DRAM int4 path's gate/up activations alone (its down
columns are a separate q8 matrix there), for one decode token, each next to the DRAM read bandwidth
measured in the same run (a parallel sum over 512 MiB, the most a kernel that reads its weights
once can reach).

    python tools/bench_kernels.py [--d-model 1536] [--d-ff 8960] [--layers 8] [--reps 7]

Random weights of the given shape (default: Qwen2.5-Coder-1.5B's FFN). ``--layers`` distinct layers
are cycled so that, as in a real model, the weights come from DRAM rather than the CPU cache (each
layer is far larger than the last-level cache). Reports the median over --reps passes of ms per
layer and the bytes of weights read per second. Within a pass the variants alternate, so machine
noise hits all of them.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashinfer_local.kernels import QuantMatrix, RecordKernel  # noqa: E402
from storage.config import ModelConfig  # noqa: E402
from storage.convert import build_records  # noqa: E402
from storage.format import record_layout  # noqa: E402
from storage.convert import quantize_rows_q4, quantize_rows_q8  # noqa: E402


def read_bandwidth(reps: int) -> float:
    """Bytes per second a parallel sum reads from a 512 MiB array (median of ``reps``)."""
    a = torch.ones(128 << 20)
    a.sum()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a.sum()
        t.append(time.perf_counter() - t0)
    return a.numel() * 4 / statistics.median(t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=1536)
    ap.add_argument("--d-ff", type=int, default=8960)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    d, n = a.d_model, a.d_ff
    cfg = ModelConfig(arch="llama", n_layers=1, d_model=d, d_ff=n, n_heads=1, n_kv_heads=(1,), head_dim=d,
                      vocab_size=2, max_position=8, norm_eps=1e-5)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(d).astype(np.float32)
    xt = torch.from_numpy(x)[None]
    rows = np.arange(n)
    variants, nbytes = {}, {}

    def layer_weights():
        return {"gate": rng.standard_normal((n, d), np.float32) * 0.02,
                "up": rng.standard_normal((n, d), np.float32) * 0.02,
                "down": rng.standard_normal((d, n), np.float32) * 0.02}
    ws = [layer_weights() for _ in range(a.layers)]
    for dt, down in (("f16", None), ("int8", None), ("int4", "q5"), ("int4", "q4"), ("int4", "q8")):
        lay = record_layout(cfg, dt, down)
        recs = [build_records(cfg, lay, w) for w in ws]
        k, out = RecordKernel(lay, dt, d, n), np.zeros(d, np.float32)
        name = f"FFN records {dt}{f' (down {down})' if down else ''} (numba)"
        variants[name] = [lambda r=r, k=k, out=out: k(r, rows, x, out) for r in recs]
        nbytes[name] = recs[0].nbytes
    for gu in ("q4", "q5"):         # the in-DRAM int4 path: gate/up rows of the records, down apart
        lay = record_layout(cfg, "int4", "q5", gu)
        recs = [np.ascontiguousarray(build_records(cfg, lay, w)[:, :lay.field("down").offset]) for w in ws]
        k = RecordKernel(lay, "int4", d, n)
        name = f"gate/up activations {gu} (numba, in-DRAM int4)"
        variants[name] = [lambda r=r, k=k: (k.begin(x[None]), k.activations(r, rows, rows)) for r in recs]
        nbytes[name] = recs[0].nbytes
    for name, tdt in (("FFN dense f16 (torch)", torch.float16), ("FFN dense f32 (torch)", torch.float32)):
        dense = [{k: torch.from_numpy(v).to(tdt) for k, v in w.items()} for w in ws]
        xin = xt.to(tdt)
        variants[name] = [lambda w=w, xin=xin: F.linear(F.silu(F.linear(xin, w["gate"])) * F.linear(xin, w["up"]),
                                                      w["down"]) for w in dense]
        nbytes[name] = 3 * n * d * torch.finfo(tdt).bits // 8
    for kind, rows_of in (("q8", quantize_rows_q8), ("q4", quantize_rows_q4)):
        qm = [QuantMatrix(*rows_of(w["gate"])) for w in ws]
        variants[f"matvec {kind} (numba)"] = [lambda m=m: m.matmul(xt) for m in qm]
        nbytes[f"matvec {kind} (numba)"] = qm[0].codes.nbytes + qm[0].scales16.nbytes
    g16 = [torch.from_numpy(w["gate"]).half() for w in ws]
    variants["matvec f16 (torch)"] = [lambda g=g: F.linear(xt.half(), g) for g in g16]
    nbytes["matvec f16 (torch)"] = n * d * 2
    for fs in variants.values():                   # compile and warm up
        fs[0]()
    times = {k: [] for k in variants}
    for _ in range(a.reps):
        for k, fs in variants.items():
            t = time.perf_counter()
            for f in fs:
                f()
            times[k].append((time.perf_counter() - t) / len(fs))
    bw = read_bandwidth(a.reps)
    print(f"\nOne decode token, d_model {d}, d_ff {n}, {torch.get_num_threads()} threads, "
          f"median of {a.reps} passes over {a.layers} layers; DRAM read bandwidth {bw / 1e9:.1f} GB/s\n")
    print("| variant | ms per layer | weights read | GB/s | of read bandwidth |\n|---|---:|---:|---:|---:|")
    for k, v in times.items():
        ms = statistics.median(v) * 1e3
        print(f"| {k} | {ms:.2f} | {nbytes[k] / 2**20:.1f} MiB | {nbytes[k] / ms / 1e6:.1f} | "
              f"{nbytes[k] / ms * 1e3 / bw:.0%} |")


if __name__ == "__main__":
    main()
