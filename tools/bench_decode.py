#!/usr/bin/env python3
"""Decode speed, all weights in DRAM: this engine vs transformers fp32 on the same GGUF, in one run.

    python tools/bench_decode.py [--models smollm2-135m qwen2.5-coder-0.5b] [--tokens 128] [--runs 3]

Both sides are timed the same way: a generation of N greedy tokens minus a generation of 1 token
(prefill + first token), divided by N - 1. Median of --runs, rows alternate between the two
implementations so machine noise hits both. Prints a markdown table and writes --json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashinfer_local.engine import Engine  # noqa: E402
from flashinfer_local.fetch import models_dir  # noqa: E402
from flashinfer_local.generate import SamplingParams  # noqa: E402
from storage.convert import convert  # noqa: E402

FILES = {"smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf",
         "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b-instruct-awq.gguf",
         "qwen2.5-coder-1.5b": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"}
PROMPT = "Write a short story about a robot who learns to paint. Once upon a time,"


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def engine_runner(eng: Engine, ids: list[int]):
    greedy = SamplingParams(temperature=0)
    return lambda n: list(eng.generate(ids, max_tokens=n, sampling=greedy, stop_at_eos=False))


def hf_runner(model, ids: list[int]):
    x = torch.tensor([ids])

    def run(n):
        with torch.inference_mode():
            model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return run


def decode_tps(run, n: int) -> float:
    return (n - 1) / (timed(lambda: run(n)) - timed(lambda: run(1)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"], choices=FILES)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtype", default="f16", choices=["f16", "f32"], help="bundle precision")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", type=Path, default=Path("bench-out/decode.json"))
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models:
            path = models_dir() / FILES[name]
            if not path.exists():
                print(f"skip {name}: {path} missing (../shared/models/fetch.sh {name})", file=sys.stderr)
                continue
            eng = Engine(convert(path, Path(tmp) / name, dtype=a.dtype, progress=False), threads=a.threads)
            ids = eng.tokenizer.encode(PROMPT)
            hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                      torch_dtype=torch.float32).eval()
            runners = {"flashinfer-local": engine_runner(eng, ids), "transformers fp32": hf_runner(hf, ids)}
            for r in runners.values():   # warm-up: page in weights, JIT, allocator
                r(4)
            tps = {k: [] for k in runners}
            for _ in range(a.runs):
                for k, r in runners.items():
                    tps[k].append(decode_tps(r, a.tokens))
            med = {k: statistics.median(v) for k, v in tps.items()}
            rows.append({"model": name, "prompt_tokens": len(ids), "tokens": a.tokens, "runs": tps,
                         "median_tps": med,
                         "ratio": med["flashinfer-local"] / med["transformers fp32"]})
            del eng, hf
    print(f"\nDecode tokens/s, all weights in DRAM, {a.tokens} greedy tokens, median of {a.runs}, "
          f"{a.threads} threads, bundle {a.dtype}\n")
    print("| model | flashinfer-local | transformers fp32 | ratio |\n|---|---:|---:|---:|")
    for r in rows:
        m = r["median_tps"]
        print(f"| {r['model']} | {m['flashinfer-local']:.1f} | {m['transformers fp32']:.1f} | {r['ratio']:.2f}x |")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
