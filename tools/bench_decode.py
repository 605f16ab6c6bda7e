#!/usr/bin/env python3
"""Decode speed, all weights in DRAM: this engine's bundles (f16, int8, int4) vs llama.cpp and
transformers fp32 on the same GGUF, in one run.

    python tools/bench_decode.py [--models smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b]
                                 [--dtypes f16 int8 int4] [--tokens 128] [--runs 3]

Every side is timed the same way: a generation of N greedy tokens minus a generation of 1 token
(prefill + first token), divided by N - 1. Median of --runs; within a run the implementations
alternate so machine noise hits all of them. llama.cpp runs through llama-cpp-python when it is
importable (``pip install llama-cpp-python``: it builds llama.cpp from source, about 8 minutes on
2 cores), on the GGUF file itself, i.e. at the GGUF's own quantization. Prints a markdown table and
writes --json.
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
from flashinfer_local.runtime.engine import Engine  # noqa: E402
from flashinfer_local.runtime.sampling import SamplingParams  # noqa: E402
from flashinfer_local.workflows.fetch import models_dir  # noqa: E402
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


def llama_cpp_runner(path: Path, ids: list[int], threads: int):
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=threads, n_batch=512, verbose=False)

    def run(n):
        gen = llm.generate(ids, temp=0.0, top_k=1, reset=True)
        for _ in range(n):     # generate() does not stop at end-of-sequence: exactly n tokens
            next(gen)
        gen.close()
    return run


def decode_tps(run, n: int) -> float:
    return (n - 1) / (timed(lambda: run(n)) - timed(lambda: run(1)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"], choices=FILES)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["f16", "int8", "int4"],
                    choices=["f32", "f16", "int8", "int4"], help="bundle precisions")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--bundle-dir", type=Path, default=None,
                    help="keep the converted bundles here as MODEL-DTYPE (reused when present; default: "
                         "a temporary directory)")
    ap.add_argument("--json", type=Path, default=Path("bench-out/decode.json"))
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(a.threads)
    try:
        import llama_cpp  # noqa: F401
        have_llama = True
    except ImportError:
        have_llama = False
        print("llama-cpp-python is not installed: no llama.cpp column", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bdir = a.bundle_dir or Path(tmp)
        for name in a.models:
            path = models_dir() / FILES[name]
            if not path.exists():
                print(f"skip {name}: {path} missing (../shared/models/fetch.sh {name})", file=sys.stderr)
                continue
            runners, held = {}, []
            for dt in a.dtypes:
                out = bdir / f"{name}-{dt}"
                if not (out / "manifest.json").exists():
                    convert(path, out, dtype=dt, progress=False)
                eng = Engine(out, threads=a.threads)
                ids = eng.tokenizer.encode(PROMPT)
                runners[f"flashinfer-local {dt}"] = engine_runner(eng, ids)
                held.append(eng)
            if have_llama:
                runners["llama.cpp (GGUF)"] = llama_cpp_runner(path, ids, a.threads)
            if not a.no_transformers:
                from transformers import AutoModelForCausalLM
                hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                          torch_dtype=torch.float32).eval()
                runners["transformers fp32"] = hf_runner(hf, ids)
            for r in runners.values():   # warm-up: page in weights, JIT, allocator
                r(4)
            tps = {k: [] for k in runners}
            for _ in range(a.runs):
                for k, r in runners.items():
                    tps[k].append(decode_tps(r, a.tokens))
            med = {k: statistics.median(v) for k, v in tps.items()}
            rows.append({"model": name, "gguf": path.name, "prompt_tokens": len(ids), "tokens": a.tokens,
                         "runs": tps, "median_tps": med})
            del runners, held
    cols = list(dict.fromkeys(k for r in rows for k in r["median_tps"]))
    ref = "llama.cpp (GGUF)" if have_llama else "transformers fp32"
    print(f"\nDecode tokens/s, all weights in DRAM, {a.tokens} greedy tokens, median of {a.runs}, "
          f"{a.threads} threads; (x) = ratio to {ref}\n")
    print("| model | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols))
    for r in rows:
        m = r["median_tps"]
        base = m.get(ref)
        cells = [f"{m[c]:.1f}" + (f" ({m[c] / base:.2f}x)" if base and c in m else "") if c in m else "-"
                 for c in cols]
        print(f"| {r['model']} | " + " | ".join(cells) + " |")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
