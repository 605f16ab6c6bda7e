"""Speculative decoding benchmark: each configuration without a draft and with the 0.5B draft model,
prompt lookup and the self draft, side by side in one run; code and prose prompts reported apart.

    python tools/bench_speculative.py --f16 BUNDLE --int4 BUNDLE --draft BUNDLE [--gguf GGUF]
                                      [--parts a,b] [--budget-frac 0.5] [--gen 32] [--runs 3]

(a) the f16 and the int4 target streamed at --budget-frac of its own bundle (the draft's memory
    inside that budget), with window `all` and with the threshold predictor at its calibrated
    default (``calibrate --predictor threshold`` first);
(b) the int4 target all in DRAM with the drafts, next to llama.cpp (llama-cpp-python) on --gguf
    without and with its prompt-lookup decoding (``LlamaPromptLookupDecoding``).

Every row runs in its own interpreter (its own runtime baseline and peak RSS); within a run the
rows alternate so machine noise hits all of them; medians of --runs. Greedy: a row with a draft
must give the tokens of the same row without one (``lossless`` column); a sparse row's tokens are
compared with the exact row of the same bundle (``agreement``). Speed counts generated tokens per
second of decoding (the prefill and its first token excluded), bytes read per generated token,
tokens per target forward; the disk's sequential direct-read bandwidth is measured in the run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashinfer_local.units import fmt_bytes  # noqa: E402

PROMPTS = {
    "code": '''import json
from dataclasses import dataclass


@dataclass
class Point:
    x: float
    y: float

    def to_dict(self) -> dict:
        return {"x": self.x, "y": self.y}

    @classmethod
    def from_dict(cls, d: dict) -> "Point":
        return cls(x=d["x"], y=d["y"])


@dataclass
class Rect:
    top_left: Point
    bottom_right: Point

    def to_dict(self) -> dict:
''',
    "prose": ("The history of the lighthouse is a history of people trying to make the dark sea a little "
              "less dangerous. Long before electric lamps, keepers climbed narrow stairs every evening to "
              "light fires or oil lamps, and they stayed awake through storms to keep the flame alive. "
              "Ships depended on them to find harbours and to avoid the rocks that lay hidden under the "
              "waves. Over time, the work of the keepers"),
}
DRAFTS = ("none", "model", "lookup", "self")


def engine_row(spec: dict) -> dict:
    """One row in this interpreter: open the engine, generate from each prompt."""
    from flashinfer_local.runtime.engine import Engine
    from flashinfer_local.runtime.sampling import SamplingParams
    kw = {k: v for k, v in spec["engine"].items()}
    eng = Engine(spec["bundle"], **kw)
    out = {}
    for name, text in PROMPTS.items():
        if spec.get("check"):       # the same engine without speculating, before: the lossless check
            plain = [s.token_id for s in eng.generate(text, spec["gen"], SamplingParams(temperature=0),
                                                       stop_at_eos=False, speculate=False)]
        steps = list(eng.generate(text, spec["gen"], SamplingParams(temperature=0), stop_at_eos=False))
        st = steps[-1].stats
        x = st.extra
        out[name] = {"decode_tps": st.decode_tokens_per_s, "tokens": st.token_ids,
                     "bytes_per_token": x.get("flash_bytes_per_token", 0.0), **st.speculation(),
                     "peak_above_baseline": st.peak_rss_bytes - eng.runtime_baseline_bytes,
                     "prompt_tokens": st.prompt_tokens}
        if spec.get("check"):
            out[name]["same_as_plain"] = plain == st.token_ids
    out["plan"] = {"draft_bytes": eng.plan.draft_bytes, "cache_rows_per_layer": eng.plan.cache_rows_per_layer,
                   "mode": eng.plan.mode}
    eng.close()
    return out


def llama_row(spec: dict) -> dict:
    """llama.cpp on the GGUF (all in DRAM through its mmap), optionally with prompt lookup."""
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    draft = LlamaPromptLookupDecoding(num_pred_tokens=10) if spec["lookup"] else None
    llm = Llama(model_path=spec["gguf"], n_ctx=1024, n_threads=spec["threads"], n_batch=512, verbose=False,
                draft_model=draft)
    out = {}
    for name, text in PROMPTS.items():
        ids = llm.tokenize(text.encode())
        gen = llm.generate(ids, temp=0.0, top_k=1, reset=True)
        toks = [next(gen)]
        t0 = time.perf_counter()             # after the prefill and first token, as the engine counts
        for _ in range(spec["gen"] - 1):
            toks.append(next(gen))
        dt = time.perf_counter() - t0
        gen.close()
        out[name] = {"decode_tps": (spec["gen"] - 1) / dt, "tokens": [int(t) for t in toks],
                     "bytes_per_token": 0.0, "tokens_per_forward": 0.0, "acceptance_rate": 0.0,
                     "prompt_tokens": len(ids)}
    return out


def run_isolated(spec: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "--one-row", json.dumps(spec)], capture_output=True, text=True)
    if r.returncode:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def rows_for(a) -> list[tuple[str, dict]]:
    from storage.reader import Bundle
    rows = []
    draft_of = {"none": None, "model": str(a.draft), "lookup": "lookup", "self": "self"}
    ctx = 512
    if "a" in a.parts:
        for label, path in (("f16", a.f16), ("int4", a.int4)):
            if path is None:
                continue
            b = Bundle(path)
            budget = int(b.sizes()["total_bytes"] * a.budget_frac)
            b.close()
            for sel in ("all", "threshold"):
                sk = {"selector": "predictor", "predictor": "threshold"} if sel == "threshold" else {}
                for d in DRAFTS:
                    eng = {"offload": "window", "dram_budget": budget, "context": ctx, "draft": draft_of[d], **sk}
                    rows.append((f"(a) {label} {a.budget_frac:.0%} {sel} draft={d}",
                                 {"kind": "engine", "bundle": str(path), "engine": eng, "gen": a.gen,
                                  "group": f"a-{label}-{sel}", "draft": d, "exact_group": f"a-{label}-all"}))
    if "b" in a.parts and a.int4 is not None:
        for d in ("none", "model", "lookup"):
            rows.append((f"(b) int4 DRAM draft={d}",
                         {"kind": "engine", "bundle": str(a.int4), "gen": a.gen, "group": "b-int4", "draft": d,
                          "engine": {"offload": "none", "context": ctx, "draft": draft_of[d]},
                          "exact_group": "b-int4"}))
        if a.gguf is not None:
            for lk in (False, True):
                rows.append((f"(b) llama.cpp GGUF{' + prompt lookup' if lk else ''}",
                             {"kind": "llama", "gguf": str(a.gguf), "lookup": lk, "gen": a.gen,
                              "threads": a.threads, "group": "b-llama", "draft": "lookup" if lk else "none"}))
    return rows


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--one-row":
        spec = json.loads(sys.argv[2])
        print(json.dumps(engine_row(spec) if spec["kind"] == "engine" else llama_row(spec)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--f16", type=Path)
    ap.add_argument("--int4", type=Path)
    ap.add_argument("--draft", type=Path, required=True)
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--parts", default="a,b")
    ap.add_argument("--budget-frac", type=float, default=0.5)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default=None, help="only rows whose label contains one of these (comma-separated)")
    ap.add_argument("--check-lossless", action="store_true",
                    help="instead of timing: each draft row's engine generates without speculating, then "
                    "with, and the table says whether the tokens are the same (the lossless property: "
                    "the same engine, since a different budget splits the prefill's sums differently)")
    ap.add_argument("--json", type=Path, default=Path("bench-out/speculative.json"))
    a = ap.parse_args()
    from storage.direct_io import measure_sequential_bandwidth
    from storage.reader import Bundle
    rows = rows_for(a)
    if a.rows:
        rows = [r for r in rows if any(s in r[0] for s in a.rows.split(","))]
    if a.check_lossless:
        rows = [(label, {**spec, "check": True}) for label, spec in rows
                if spec["kind"] == "engine" and spec["draft"] != "none"]
        for label, spec in rows:
            res = run_isolated(spec)
            print(f"| {label} | " + (res["error"][:90] if "error" in res else " | ".join(
                f"{p}: {'same' if res[p]['same_as_plain'] else 'DIFFERENT'}" for p in PROMPTS)) + " |")
        return
    results, seqs = {}, []
    probe = a.f16 or a.int4
    for r in range(a.runs):
        if probe is not None:
            b = Bundle(probe)
            seqs.append(measure_sequential_bandwidth(b.ffn_path))
            b.close()
        for label, spec in rows:
            res = run_isolated(spec)
            results.setdefault(label, []).append(res)
            msg = res.get("error") or "  ".join(f"{p} {res[p]['decode_tps']:.2f} tok/s" for p in PROMPTS)
            print(f"run {r + 1} {label}: {msg}", file=sys.stderr)
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps({"partial": True, "seq_read": seqs, "runs": results}))
    table(rows, results, seqs, a)


def _median(runs: list[dict], prompt: str, key: str) -> float:
    vals = [r[prompt][key] for r in runs if "error" not in r]
    return statistics.median(vals) if vals else float("nan")


def table(rows, results, seqs, a) -> None:
    seq = statistics.median(seqs) if seqs else 0.0
    print(f"\ngreedy, {a.gen} tokens generated per prompt, median of {a.runs} runs, budget {a.budget_frac:.0%} "
          f"of each bundle in (a); sequential direct read bandwidth in this run {seq / 1e9:.2f} GB/s\n")
    base = {}      # (group, prompt) -> the no-draft row's results
    for label, spec in rows:
        if spec["draft"] == "none":
            base[spec["group"]] = results[label]
    for prompt in PROMPTS:
        print(f"\n{prompt} prompts\n")
        print("| row | tok/s | vs no draft | tokens/forward | acceptance | read/token | peak RSS above "
              "baseline | lossless | agreement with exact |")
        print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
        for label, spec in rows:
            runs = results[label]
            if all("error" in r for r in runs):
                print(f"| {label} | failed: {runs[0]['error'][:80]} |||||||")
                continue
            ok = [r for r in runs if "error" not in r]
            tps = _median(runs, prompt, "decode_tps")
            ref = base.get(spec["group"])
            ratio = tps / _median(ref, prompt, "decode_tps") if ref else float("nan")
            lossless = "-"
            if ref and spec["draft"] != "none":
                lossless = "yes" if all(r[prompt]["tokens"] == ref[0][prompt]["tokens"] for r in ok) else "NO"
            exact = base.get(spec.get("exact_group"))
            agree = "-"
            if exact:
                want, got = exact[0][prompt]["tokens"], ok[0][prompt]["tokens"]
                agree = f"{sum(x == y for x, y in zip(got, want)) / max(len(want), 1):.2f}"
            peak = _median(runs, prompt, "peak_above_baseline") if "peak_above_baseline" in ok[0][prompt] else 0
            print(f"| {label} | {tps:.2f} | {ratio:.2f}x | {_median(runs, prompt, 'tokens_per_forward'):.2f} | "
                  f"{_median(runs, prompt, 'acceptance_rate'):.2f} | "
                  f"{fmt_bytes(_median(runs, prompt, 'bytes_per_token'))} | {fmt_bytes(peak) if peak else '-'} | "
                  f"{lossless} | {agree} |")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"seq_read": seqs, "gen": a.gen, "runs": results,
                                  "rows": [[label, spec] for label, spec in rows]}, indent=1))


if __name__ == "__main__":
    main()
