#!/usr/bin/env python3
"""Placement side by side: the window without a plan, the greedy plan and the MILP plan, per bundle.

    python tools/bench_placement.py --bundle f16=DIR --bundle int8=DIR [--share 0.5] [--tokens 16]
        [--rounds 3] [--out /tmp/placement] [--budget NAME=SIZE] [--rows 0,2,5,7] [--prompt-file F]

Per bundle, the budget is ``--share`` of its files (``--budget NAME=SIZE``: that size instead, so
that a gate-split bundle runs under the same memory as the unsplit one); the selector is the bundle's calibrated
threshold predictor at its default sparsity. Each plan is made once (``flashinfer-local plan``,
its cost model measured the first time), then every bundle's rows run interleaved round by round,
each in its own interpreter (``run --stats-json``, direct I/O, the bundle's page cache dropped first), medians of
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
# (row, extra run args (without --selector: the threshold predictor's), plan: None | "greedy" |
# "milp", reorder, layer shares)
ROWS = (("window all", ["--selector", "all"], None, None, "auto"),
        ("window", [], None, None, "uniform"),
        ("window", [], None, None, "auto"),
        ("greedy plan", [], "greedy", None, "auto"),
        ("milp plan", [], "milp", None, "uniform"),
        ("milp plan", [], "milp", None, "auto"),
        ("milp + reorder (frequency)", [], "milp", "frequency", "auto"),
        ("milp + reorder (coact)", [], "milp", "coact", "auto"),
        ("window all + prompt pins 0.5", ["--selector", "all", "--prompt-pin", "0.5"], None, None, "auto"),
        ("window + prompt pins 0.5", ["--prompt-pin", "0.5"], None, None, "auto"))


def bundle_bytes(path: Path) -> int:
    """The model's files (the manifest's), not the predictor or plan files beside them."""
    return sum(int(f["bytes"]) for f in json.loads((path / "manifest.json").read_text())["files"].values())


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashinfer_local", *map(str, args)], capture_output=True, text=True)


def key(row) -> str:
    name, _, _, _, shares = row
    return f"{name} [{'per-layer' if shares == 'auto' else 'uniform'} shares]" if not name.startswith("window all") else name


def prepare(bundle: Path, budget: int, context: int, keep: Path) -> dict:
    """Each row's bundle directory and stored plan: plans for the original bundle are kept as files
    and copied in before their rows; a reordered row gets its own copy of the bundle (hard links but
    for the rewritten files) with its plan inside."""
    out = {}
    for row in ROWS:
        name, sel, solver, reorder, shares = row
        if solver is None:
            out[key(row)] = {"dir": bundle, "plan": None}
            continue
        target = bundle
        if reorder:
            target = keep / f"reordered-{reorder}"
            if not target.exists():
                subprocess.run(["cp", "-al", str(bundle), str(target)], check=True)
        args = ["plan", target, "--dram-budget", f"{budget}B", "--solver", solver, "--selector", "predictor",
                "--context", context, "--layer-shares", shares, "--json", keep / "p.json"]
        r = cli(*args, *(["--reorder", reorder] if reorder else []))
        if r.returncode:
            raise SystemExit(f"{key(row)}: plan failed: {r.stderr.strip()[-400:]}")
        rep = json.loads((keep / "p.json").read_text())
        saved = keep / f"plan-{len(out)}.safetensors"
        shutil.copy(target / "placement.safetensors", saved)
        out[key(row)] = {"dir": target, "plan": saved, "report": rep}
        print(f"  {key(row)}: {rep['solver']}, predicted {rep['objective_ms']:.1f} ms/token (greedy "
              f"{rep['greedy_objective_ms']:.1f}), solved in {rep['solve_s']:.2f} s", flush=True)
    return out


def run_row(row, prep: dict, budget: int, context: int, tokens: int, keep: Path, prompt: list) -> dict:
    name, sel, solver, reorder, shares = row
    d = prep["dir"]
    (d / "placement.safetensors").unlink(missing_ok=True)
    if prep["plan"] is not None:
        shutil.copy(prep["plan"], d / "placement.safetensors")
    for f in d.iterdir():
        if f.is_file():
            evict.drop_cache(f)
    out = keep / "s.json"
    predictor = [] if "--selector" in sel else ["--selector", "predictor", "--layer-shares", shares]
    r = cli("run", d, *prompt, "-n", tokens, "--temperature", "0", "--dram-budget", f"{budget}B",
            "--context", context, *predictor, *sel, "--stats-json", out)
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
    ap.add_argument("--budget", action="append", default=[], help="NAME=SIZE: that bundle's budget (e.g. 1697MiB)")
    ap.add_argument("--rows", help="which of the rows to run, by index (default: all)")
    ap.add_argument("--prompt-file", type=Path, help="the prompt (default: a one-line code prompt)")
    a = ap.parse_args()
    prompt = ["--prompt-file", a.prompt_file] if a.prompt_file else ["-p", PROMPT]
    global ROWS
    if a.rows:
        ROWS = tuple(ROWS[int(i)] for i in a.rows.split(","))
    from flashinfer_local.units import parse_size
    budgets = {n: parse_size(v) for n, _, v in (b.partition("=") for b in a.budget)}
    a.out.mkdir(parents=True, exist_ok=True)
    result = {"share": a.share, "tokens": a.tokens, "rounds": a.rounds, "bundles": {}}
    setups = {}                      # name -> (bundle, budget, keep dir, rows' prepared plans, backup)
    try:
        for spec in a.bundle:
            name, path = spec.split("=", 1)
            bundle = Path(path)
            budget = budgets.get(name) or int(a.share * bundle_bytes(bundle))
            keep = Path(tempfile.mkdtemp(prefix=f"plan-{name}-", dir=a.out))
            print(f"{name}: budget {budget / 2**20:.0f} MiB", flush=True)
            saved, backup = bundle / "placement.safetensors", keep / "original.safetensors"
            if saved.exists():
                shutil.copy(saved, backup)
            setups[name] = (bundle, budget, keep, None, backup)        # restored below even if prepare fails
            setups[name] = (bundle, budget, keep, prepare(bundle, budget, a.context, keep), backup)
        runs = {(n, key(row)): [] for n in setups for row in ROWS}
        for k in range(a.rounds):                 # every bundle's rows interleaved, round by round
            for name, (bundle, budget, keep, prep, _) in setups.items():
                for row in ROWS:
                    got = run_row(row, prep[key(row)], budget, a.context, a.tokens, keep, prompt)
                    runs[name, key(row)].append(got)
                    print(f"  round {k + 1} {name} {key(row)}: {got.get('decode_tps', got.get('error'))}", flush=True)
    finally:
        for name, (bundle, _, keep, prep, backup) in setups.items():
            saved = bundle / "placement.safetensors"
            saved.unlink(missing_ok=True)
            if backup.exists():
                shutil.copy(backup, saved)
            for row in ROWS:                      # the reordered copies' own files (hard links elsewhere)
                if row[3]:
                    shutil.rmtree(keep / f"reordered-{row[3]}", ignore_errors=True)
    for name, (bundle, budget, keep, prep, _) in setups.items():
        rows = {}
        for row in ROWS:
            r = rows[key(row)] = median_row(runs[name, key(row)])
            rep = prep[key(row)].get("report")
            if rep:
                r["predicted_ms"] = rep["objective_ms"]
                r["plan"] = {k: rep[k] for k in ("solver", "objective_ms", "greedy_objective_ms", "solve_s",
                                                 "sparsity", "layer_shares")}
                r["pinned"] = sum(x["pinned"] for x in rep["layers"])
                r["window_rows"] = sum(x["window_rows"] for x in rep["layers"])
        result["bundles"][name] = {"budget": budget, "rows": rows}
    (a.out / "placement.json").write_text(json.dumps(result, indent=1))
    lines = ["| bundle | row | tok/s | MiB/token | reads/token | mean read | I/O wait ms | predicted ms | measured ms "
             "| pinned | window rows | same text |", "|" + "---|" * 12]
    for name, b in result["bundles"].items():
        base = b["rows"].get("window [per-layer shares]", {}).get("text")     # the no-plan row's text
        for row in ROWS:
            row = key(row)
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
