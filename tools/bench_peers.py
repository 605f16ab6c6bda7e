#!/usr/bin/env python3
"""This engine side by side with what a user would run instead, under the same memory condition.

    python tools/bench_peers.py --gguf qwen2.5-coder-1.5b-instruct-q4_k_m.gguf \\
        --bundle int4=DIR --bundle int8=DIR [--budgets 25,50,100] [--tokens 16] [--rounds 3]

Budgets are shares of the GGUF's size. Per budget, rows interleaved round by round, each in its own
interpreter, medians of the rounds:
- this engine: `run --dram-budget B` on each bundle (direct I/O, its own budget);
- llama.cpp (llama-cpp-python, from ``--llama-python``: an interpreter that has it; the project does
  not depend on it): the GGUF memory-mapped, its page cache evicted before the run; below 100% of
  its size its mapped pages are pushed out after every token (``peers.evict.page_out``: what reclaim
  does to a cyclic scan larger than memory; no real memory cap is set, the machine's memory cgroup
  is not ours to change). Eviction time is not counted.
Per row: decode tok/s, time to first token, disk bytes read per token, peak RSS, and whether its
greedy text equals the first row's (same model, other precisions: reported, not required).
- with ``--f16-bundle``: this engine's f16 bundle and accelerate (transformers on the same GGUF in
  fp16, ``max_memory`` capping the CPU at the same budget, the rest offloaded to disk and its pages
  pushed out after every token) at ``--f16-share`` of the f16 bundle's size.
Writes Markdown and JSON (``--out``). AirLLM rows are not implemented yet.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import evict  # noqa: E402

HERE = Path(__file__).resolve().parent
PROMPT = "def quicksort(xs):\n    \"\"\"Sort a list of numbers.\"\"\"\n"


def engine_row(bundle: Path, budget: int, prompt: str, tokens: int, extra: list[str] = ()) -> dict:
    for f in bundle.iterdir():
        if f.is_file():
            evict.drop_cache(f)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "s.json"
        r = subprocess.run([sys.executable, "-m", "flashinfer_local", "run", str(bundle), "-p", prompt, "-n", str(tokens),
                            "--temperature", "0", "--dram-budget", f"{budget}B", "--stats-json", str(out), *extra],
                           capture_output=True, text=True)
        if r.returncode:
            return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:200]}
        s = json.loads(out.read_text())
    return {"tokens": s["generated_tokens"], "ttft_s": s["time_to_first_token_s"], "decode_tps": s["decode_tokens_per_s"],
            "read_bytes_per_token": s.get("flash_bytes_per_token", 0.0), "peak_rss_bytes": s["peak_rss_bytes"],
            "mode": s.get("offload"), "text": s["text"]}


def llama_row(python: str, gguf: Path, page_out: bool, prompt: str, tokens: int) -> dict:
    r = subprocess.run([python, str(HERE / "peers" / "llama_row.py"), str(gguf), "--prompt", prompt, "--tokens",
                        str(tokens), *(["--page-out"] if page_out else [])], capture_output=True, text=True)
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def accelerate_row(gguf: Path, budget: int, prompt: str, tokens: int) -> dict:
    r = subprocess.run([sys.executable, str(HERE / "peers" / "accelerate_row.py"), str(gguf), "--budget", str(budget),
                        "--prompt", prompt, "--tokens", str(tokens)], capture_output=True, text=True)
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def median_row(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"]}
    med = {k: statistics.median(r[k] for r in ok) for k in ("decode_tps", "ttft_s", "read_bytes_per_token",
                                                             "peak_rss_bytes")}
    return {**med, "runs": len(ok), "text": ok[0]["text"], "mode": ok[0].get("mode")}


def _mib(b: float) -> str:
    return f"{b / 2**20:.0f} MiB"


def table(rows: list[dict]) -> str:
    """Markdown of rows {"budget_pct", "budget_bytes", "name", "condition", + median_row's keys}; the
    ratio column compares each row with the llama.cpp row of the same budget."""
    lines = ["| budget | row | condition | decode tok/s | x peer | TTFT | read/token | peak RSS | same text as first row |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    first_text = next((r["text"] for r in rows if "text" in r), None)
    for r in rows:
        ref = next((x for x in rows if x["budget_pct"] == r["budget_pct"] and x["name"] in ("llama.cpp", "accelerate fp16")
                    and "decode_tps" in x), None)
        head = f"| {r['budget_pct']}% ({_mib(r['budget_bytes'])}) | {r['name']} | {r['condition']} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | | | |")
            continue
        ratio = f"{r['decode_tps'] / ref['decode_tps']:.2f}x" if ref and ref["decode_tps"] else ""
        lines.append(f"{head} {r['decode_tps']:.2f} | {ratio} | {1000 * r['ttft_s']:.0f} ms | "
                     f"{_mib(r['read_bytes_per_token'])} | {_mib(r['peak_rss_bytes'])} | "
                     f"{'yes' if r['text'] == first_text else 'no'} |")
    return "\n".join(lines)


def run_specs(specs: list, rounds: int, label: str) -> dict[str, list[dict]]:
    """Every (name, condition, fn) of ``specs`` once per round, the order reversed every other round
    so drift hits all rows alike -> {name: [each round's result]}."""
    runs = {name: [] for name, _, _ in specs}
    for r in range(rounds):
        for name, _, fn in (specs if r % 2 == 0 else specs[::-1]):
            x = fn()
            runs[name].append(x)
            print(f"{label} round {r + 1} {name}: " + (x.get("error") or f"{x['decode_tps']:.2f} tok/s, "
                  f"{_mib(x['read_bytes_per_token'])}/token"), file=sys.stderr, flush=True)
    return runs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--bundle", action="append", default=[], help="NAME=DIR, e.g. int4=/tmp/b-int4 (repeatable)")
    ap.add_argument("--budgets", default="25,50,100", help="shares of the GGUF's size, in %%")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--llama-python", default=sys.executable, help="an interpreter with llama-cpp-python")
    ap.add_argument("--f16-bundle", type=Path, default=None,
                    help="this engine's f16 bundle: adds rows at --f16-share of its size, next to accelerate")
    ap.add_argument("--f16-share", type=int, default=50, help="%% of the f16 bundle's size for those rows")
    ap.add_argument("--engine-args", default="", help="more options for this engine's rows, e.g. '--context 512'")
    ap.add_argument("--out", type=Path, default=Path("bench-out/peers"))
    a = ap.parse_args()
    size = a.gguf.stat().st_size
    bundles = dict(b.split("=", 1) for b in a.bundle)
    has_llama = subprocess.run([a.llama_python, "-c", "import llama_cpp"], capture_output=True).returncode == 0
    if not has_llama:
        print(f"llama.cpp row skipped: {a.llama_python} has no llama_cpp (pip install llama-cpp-python there)",
              file=sys.stderr)
    rows = []
    for pct in (int(p) for p in a.budgets.split(",")):
        budget = size * pct // 100
        specs = [(f"flashinfer-local {n}", f"--dram-budget {_mib(budget)} {a.engine_args}".strip(),
                  lambda n=n: engine_row(Path(bundles[n]), budget, a.prompt, a.tokens, a.engine_args.split()))
                 for n in bundles]
        if has_llama:
            cond = "mmap, pages out after every token" if pct < 100 else "mmap, fits"
            specs.append(("llama.cpp", cond, lambda pct=pct: llama_row(a.llama_python, a.gguf, pct < 100, a.prompt,
                                                                         a.tokens)))
        runs = run_specs(specs, a.rounds, f"{pct}%")
        for name, cond, _ in specs:
            rows.append({"budget_pct": pct, "budget_bytes": budget, "name": name, "condition": cond,
                         **median_row(runs[name])})
    if a.f16_bundle is not None:
        f16 = sum(f.stat().st_size for f in a.f16_bundle.iterdir() if f.is_file())
        budget = f16 * a.f16_share // 100
        specs = [("flashinfer-local f16", f"--dram-budget {_mib(budget)} {a.engine_args}".strip(),
                  lambda: engine_row(a.f16_bundle, budget, a.prompt, a.tokens, a.engine_args.split())),
                 ("accelerate fp16", "max_memory cpu, the rest offloaded to disk, pages out after every token",
                  lambda: accelerate_row(a.gguf, budget, a.prompt, a.tokens))]
        runs = run_specs(specs, a.rounds, f"f16 {a.f16_share}%")
        for name, cond, _ in specs:
            rows.append({"budget_pct": f"f16 {a.f16_share}", "budget_bytes": budget, "name": name, "condition": cond,
                         **median_row(runs[name])})
    a.out.mkdir(parents=True, exist_ok=True)
    md = table(rows)
    (a.out / "peers.md").write_text(md + "\n")
    (a.out / "peers.json").write_text(json.dumps({"gguf": str(a.gguf), "tokens": a.tokens, "rounds": a.rounds,
                                                  "rows": rows}, indent=1))
    print(md)
    print("\nAirLLM: not implemented in this version of the tool")


if __name__ == "__main__":
    main()
