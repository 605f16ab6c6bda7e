#!/usr/bin/env python3
"""Decode and prefill speed, all weights in DRAM: this engine's bundles (f16, int8, int4) vs
llama.cpp and transformers fp32 on the same GGUF, in one run; with each bundle's size and minimum
budget next to the GGUF's size, and optionally (--quality) held-out perplexity against f16 and
(--memory) the peak RSS of a 2048-token prompt under the minimum budget.

    python tools/bench_decode.py [--models smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b]
                                 [--dtypes f16 int8 int4] [--tokens 128] [--runs 3]
                                 [--prefill-tokens 512] [--quality] [--memory]

Decode is timed the same way on every side: a generation of N greedy tokens minus a generation of
1 token (prefill + first token), divided by N - 1; prefill as the time of a 1-token generation
after a --prefill-tokens prompt. Median of --runs; within a run the implementations alternate so
machine noise hits all of them. --memory runs each bundle in its own interpreter (peak RSS is a
process's): a window-mode engine at the minimum budget for a 2048-token context, prefilling a
2040-token prompt, its peak RSS above the runtime baseline against the plan. llama.cpp runs through llama-cpp-python when it is
importable (``pip install llama-cpp-python``: it builds llama.cpp from source, about 8 minutes on
2 cores), on the GGUF file itself, i.e. at the GGUF's own quantization. Prints a markdown table and
writes --json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashinfer_local.runtime.engine import Engine  # noqa: E402
from flashinfer_local.runtime.sampling import SamplingParams  # noqa: E402
from flashinfer_local.units import fmt_bytes  # noqa: E402
from flashinfer_local.workflows.fetch import models_dir  # noqa: E402
from storage.convert import convert  # noqa: E402

FILES = {"smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf", "gemma3-270m": "gemma-3-270m-q4_k_m.gguf",
         "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b-instruct-awq.gguf",
         "qwen2.5-coder-1.5b": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"}
PROMPT = "Write a short story about a robot who learns to paint. Once upon a time,"


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def engine_runner(eng: Engine, ids: list[int]):
    greedy = SamplingParams(temperature=0)
    return lambda n, prompt=None: list(eng.generate(prompt or ids, max_tokens=n, sampling=greedy, stop_at_eos=False))


def hf_runner(model, ids: list[int]):
    def run(n, prompt=None):
        with torch.inference_mode():
            model.generate(torch.tensor([prompt or ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return run


def long_prompt(eng: Engine, n: int) -> list[int]:
    """Exactly n token ids of real text (the standard library's held-out modules, repeated if short)."""
    from flashinfer_local.measure.evaluate import stdlib_corpus
    ids = [t for text in stdlib_corpus().values() for t in eng.tokenizer.encode(text)]
    return (ids * (n // len(ids) + 1))[:n]


def perplexity_vs(eng: Engine) -> float:
    """Mean NLL over held-out prose and code, two 512-token windows each (the tests' measure)."""
    from flashinfer_local.measure.evaluate import perplexity, stdlib_corpus
    texts = stdlib_corpus().values()
    return sum(perplexity(eng, eng.tokenizer.encode(t), window=512, max_windows=2)["nll"] for t in texts) / len(texts)


def memory_child(bundle: Path, threads: int) -> dict:
    """In this interpreter: a window-mode engine at the minimum budget of a 2048-token context,
    a 2040-token prompt and 4 tokens; peak RSS above the runtime baseline against the plan."""
    from flashinfer_local.runtime.budget import minimum_budget
    from flashinfer_local.runtime.rss import PeakRSS
    from storage.reader import Bundle
    least = minimum_budget(Bundle(bundle), 2048, "window")
    eng = Engine(bundle, dram_budget=least, context=2048, offload="window", threads=threads)
    ids = long_prompt(eng, 2040)
    with PeakRSS() as peak:
        t = timed(lambda: list(eng.generate(ids, max_tokens=4, sampling=SamplingParams(temperature=0),
                                            stop_at_eos=False)))
    return {"budget_bytes": least, "planned_bytes": eng.plan.total_bytes,
            "peak_above_baseline_bytes": peak.peak - eng.runtime_baseline_bytes, "seconds": t}


def llama_cpp_runner(path: Path, ids: list[int], threads: int):
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_ctx=2048, n_threads=threads, n_batch=512, verbose=False)

    def run(n, prompt=None):
        gen = llm.generate(prompt or ids, temp=0.0, top_k=1, reset=True)
        for _ in range(n):     # generate() does not stop at end-of-sequence: exactly n tokens
            next(gen)
        gen.close()
    return run


def bundle_facts(bundle: Path, gguf: Path) -> dict:
    from flashinfer_local.runtime.budget import minimum_budget
    from storage.reader import Bundle
    b = Bundle(bundle)
    return {"bundle_bytes": b.sizes()["total_bytes"], "minimum_budget_bytes": minimum_budget(b, 2048, "window")}


def decode_tps(run, n: int) -> float:
    return (n - 1) / (timed(lambda: run(n)) - timed(lambda: run(1)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"], choices=FILES)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["f16", "int8", "int4"],
                    choices=["f32", "f16", "int8", "int4", "int4-q8"], help="bundle precisions")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--bundle-dir", type=Path, default=None,
                    help="keep the converted bundles here as MODEL-DTYPE (reused when present; default: "
                         "a temporary directory)")
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--quality", action="store_true", help="held-out perplexity of each precision against f16")
    ap.add_argument("--memory", action="store_true", help="peak RSS of a 2048-token prompt at the minimum budget")
    ap.add_argument("--memory-child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=Path("bench-out/decode.json"))
    a = ap.parse_args()
    if a.memory_child:
        print(json.dumps(memory_child(a.memory_child, a.threads)))
        return
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
            runners, held, facts = {}, [], {}
            for dt in a.dtypes:
                out = bdir / f"{name}-{dt}"
                if not (out / "manifest.json").exists():
                    convert(path, out, dtype=dt, progress=False)
                eng = Engine(out, threads=a.threads)
                ids = eng.tokenizer.encode(PROMPT)
                runners[f"flashinfer-local {dt}"] = engine_runner(eng, ids)
                held.append(eng)
                facts[dt] = bundle_facts(out, path)
                if a.quality:
                    facts[dt]["nll"] = perplexity_vs(eng)
                if a.memory:
                    facts[dt]["memory"] = json.loads(subprocess.run(
                        [sys.executable, __file__, "--memory-child", str(out), "--threads", str(a.threads)],
                        check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            long = long_prompt(held[0], a.prefill_tokens)
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
            pre = {k: [] for k in runners}
            for _ in range(a.runs):
                for k, r in runners.items():
                    tps[k].append(decode_tps(r, a.tokens))
                    pre[k].append(len(long) / timed(lambda: r(1, long)))
            med = {k: statistics.median(v) for k, v in tps.items()}
            rows.append({"model": name, "gguf": path.name, "gguf_bytes": path.stat().st_size,
                         "prompt_tokens": len(ids), "tokens": a.tokens, "runs": tps, "median_tps": med,
                         "prefill_tokens": len(long), "prefill_runs": pre,
                         "median_prefill_tps": {k: statistics.median(v) for k, v in pre.items()}, "bundles": facts})
            del runners, held
    cols = list(dict.fromkeys(k for r in rows for k in r["median_tps"]))
    ref = "llama.cpp (GGUF)" if have_llama else "transformers fp32"
    for key, what in (("median_tps", f"Decode tokens/s, {a.tokens} greedy tokens"),
                      ("median_prefill_tps", f"Prefill tokens/s, a {a.prefill_tokens}-token prompt")):
        print(f"\n{what}, all weights in DRAM, median of {a.runs}, {a.threads} threads; (x) = ratio to {ref}\n")
        print("| model | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols))
        for r in rows:
            m = r[key]
            base = m.get(ref)
            cells = [f"{m[c]:.1f}" + (f" ({m[c] / base:.2f}x)" if base and c in m else "") if c in m else "-"
                     for c in cols]
            print(f"| {r['model']} | " + " | ".join(cells) + " |")
    print("\nBundles against their GGUF: size, the minimum budget (window mode, 2048-token context)"
          + (", perplexity against f16" if a.quality else "")
          + (", peak RSS of a 2048-token prompt at that budget (above the runtime baseline)" if a.memory else "") + "\n")
    print("| model | GGUF | precision | bundle | x GGUF | minimum budget | x GGUF |"
          + (" perplexity vs f16 |" if a.quality else "") + (" prompt peak / plan |" if a.memory else ""))
    print("|---|---:|---|---:|---:|---:|---:|" + ("---:|" if a.quality else "") + ("---:|" if a.memory else ""))
    for r in rows:
        g = r["gguf_bytes"]
        for dt, f in r["bundles"].items():
            cells = [r["model"], fmt_bytes(g), dt, fmt_bytes(f["bundle_bytes"]), f"{f['bundle_bytes'] / g:.2f}",
                     fmt_bytes(f["minimum_budget_bytes"]), f"{f['minimum_budget_bytes'] / g:.2f}"]
            if a.quality:
                base = r["bundles"].get("f16", {}).get("nll")
                cells.append(f"{(math.exp(f['nll'] - base) - 1) * 100:+.2f}%" if base is not None else "-")
            if a.memory:
                m = f["memory"]
                cells.append(f"{fmt_bytes(m['peak_above_baseline_bytes'])} / {fmt_bytes(m['planned_bytes'])}")
            print("| " + " | ".join(cells) + " |")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
