#!/usr/bin/env python3
"""Placement side by side: the window without a plan, the greedy plan and the MILP plan, per bundle.

    python tools/bench_placement.py --bundle f16=DIR --bundle int8=DIR [--share 0.5] [--tokens 16]
        [--rounds 3] [--out /tmp/placement]

Per bundle, the budget is ``--share`` of its files; the selector is the bundle's calibrated
threshold predictor at its default sparsity. Each plan is made once (``flashinfer-local plan``,
its cost model measured the first time), then rows run interleaved round by round, each in its own
interpreter (``run --stats-json``, direct I/O, the bundle's page cache dropped first), medians of
the rounds. Per row: decode tok/s, bytes and requests per token, mean read size, the plan's
predicted ms/token against the measured one, and whether the greedy text equals the no-plan row's.
Writes Markdown and JSON.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import evict  # noqa: E402

PROMPT = "def quicksort(xs):\n    \"\"\"Sort a list of numbers.\"\"\"\n"
ROWS = ("window", "greedy", "milp")


def bundle_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.suffix != ".tmp")


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashinfer_local", *map(str, args)], capture_output=True, text=True)


def make_plans(bundle: Path, budget: int, common: list[str], keep: Path) -> dict:
    plans = {}
    for solver in ("greedy", "milp"):
        r = cli("plan", bundle, "--dram-budget", f"{budget}B", "--solver", solver, *common, "--json", keep / f"{solver}.json")
        if r.returncode:
            raise SystemExit(f"plan {solver} failed: {r.stderr.strip()[-300:]}")
        shutil.copy(bundle / "placement.safetensors", keep / f"{solver}.safetensors")
        plans[solver] = json.loads((keep / f"{solver}.json").read_text())
        print(f"  plan {solver}: {plans[solver]['solver']}, predicted {plans[solver]['objective_ms']:.1f} ms/token "
              f"(greedy {plans[solver]['greedy_objective_ms']:.1f}), solved in {plans[solver]['solve_s']:.2f} s",
              flush=True)
    return plans


def run_row(bundle: Path, budget: int, common: list[str], tokens: int, row: str, keep: Path) -> dict:
    target = bundle / "placement.safetensors"
    target.unlink(missing_ok=True)
    if row != "window":
        shutil.copy(keep / f"{row}.safetensors", target)
    for f in bundle.iterdir():
        if f.is_file():
            evict.drop_cache(f)
    out = keep / "s.json"
    r = cli("run", bundle, "-p", PROMPT, "-n", tokens, "--temperature", "0", "--dram-budget", f"{budget}B",
            *common, "--stats-json", out, *(["--placement", "none"] if row == "window" else []))
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    s = json.loads(out.read_text())
    return {"decode_tps": s["decode_tokens_per_s"], "bytes_per_token": s.get("flash_bytes_per_token", 0.0),
            "reads_per_token": s.get("read_ops_per_token", 0.0), "mean_read": s.get("decode_mean_read_bytes", 0.0),
            "io_wait_ms": s.get("ms_per_token", {}).get("io_wait", 0.0),
            "compute_ms": s.get("ms_per_token", {}).get("compute", 0.0), "text": s["text"]}


def median_row(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    out = {k: statistics.median(r[k] for r in ok) for k in ok[0] if k != "text"}
    out["text"] = ok[0]["text"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", action="append", required=True, help="NAME=DIR (repeatable)")
    ap.add_argument("--share", type=float, default=0.5, help="budget as a share of each bundle's size")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("/tmp/placement"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    common = ["--selector", "predictor", "--context", str(a.context)]
    result = {"share": a.share, "tokens": a.tokens, "rounds": a.rounds, "bundles": {}}
    for spec in a.bundle:
        name, path = spec.split("=", 1)
        bundle = Path(path)
        budget = int(a.share * bundle_bytes(bundle))
        keep = Path(tempfile.mkdtemp(prefix=f"plan-{name}-", dir=a.out))
        print(f"{name}: budget {budget / 2**20:.0f} MiB", flush=True)
        saved = bundle / "placement.safetensors"
        backup = keep / "original.safetensors"
        if saved.exists():
            shutil.copy(saved, backup)
        try:
            plans = make_plans(bundle, budget, common, keep)
            runs = {row: [] for row in ROWS}
            for k in range(a.rounds):
                for row in ROWS:
                    runs[row].append(run_row(bundle, budget, common, a.tokens, row, keep))
                    print(f"  round {k + 1} {row}: {runs[row][-1].get('decode_tps', runs[row][-1].get('error'))}",
                          flush=True)
        finally:
            saved.unlink(missing_ok=True)
            if backup.exists():
                shutil.copy(backup, saved)
        rows = {row: median_row(runs[row]) for row in ROWS}
        for row in ("greedy", "milp"):
            rows[row]["predicted_ms"] = plans[row]["objective_ms"]
            rows[row]["plan"] = {k: plans[row][k] for k in ("solver", "objective_ms", "greedy_objective_ms", "solve_s")}
            rows[row]["pinned"] = sum(r["pinned"] for r in plans[row]["layers"])
            rows[row]["window_rows"] = sum(r["window_rows"] for r in plans[row]["layers"])
        result["bundles"][name] = {"budget": budget, "rows": rows, "sparsity": plans["milp"]["sparsity"]}
        (a.out / "placement.json").write_text(json.dumps(result, indent=1))
    lines = ["| bundle | row | tok/s | MiB/token | reads/token | mean read | I/O wait ms | predicted ms | measured ms "
             "| pinned | window rows | same text |", "|" + "---|" * 12]
    for name, b in result["bundles"].items():
        base = b["rows"]["window"].get("text")
        for row in ROWS:
            r = b["rows"][row]
            if "error" in r:
                lines.append(f"| {name} | {row} | {r['error']} |" + " |" * 10)
                continue
            meas = 1000 / r["decode_tps"] if r["decode_tps"] else float("nan")
            pred = f"{r['predicted_ms']:.0f}" if "predicted_ms" in r else "-"
            lines.append(f"| {name} | {row} | {r['decode_tps']:.2f} | {r['bytes_per_token'] / 2**20:.0f} | "
                         f"{r['reads_per_token']:.0f} | {r['mean_read'] / 1024:.1f} KiB | {r['io_wait_ms']:.0f} | {pred} | "
                         f"{meas:.0f} | {r.get('pinned', '-')} | {r.get('window_rows', '-')} | "
                         f"{'yes' if r['text'] == base else 'no'} |")
    (a.out / "placement.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
