"""`profile --sweep`: the same generation at several DRAM budgets, each in a fresh interpreter.

Each budget runs ``python -m flashinfer_local profile ... --json-only`` in its own process, so its
peak RSS and runtime baseline are its own (one process reusing freed memory would flatter later
rows). A budget below the model's minimum is reported as a row, not run.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from storage.errors import OptionError

from flashinfer_local.units import fmt_bytes, parse_size


def parse_budgets(text: str, bundle_bytes: int) -> list[tuple[str, int]]:
    """"25%,50%,1.5GiB" -> [(label, bytes)], a percentage being a share of the bundle's size."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part.endswith("%"):
            try:
                share = float(part[:-1]) / 100
            except ValueError:
                raise OptionError("sweep", f"'{part}' is not a percentage; write it like 25%") from None
            if share <= 0:
                raise OptionError("sweep", f"'{part}' must be above 0%")
            out.append((part, int(share * bundle_bytes)))
        else:
            out.append((part, parse_size(part)))
    if not out:
        raise OptionError("sweep", "needs budgets, e.g. 25%,50%,75%,100% or 300MiB,500MiB")
    return sorted(out, key=lambda lb: lb[1])


def _row(label: str, budget: int, d: dict) -> dict:
    s, f = d["summary"], d["facts"]
    rows = f.get("cache_rows_capacity")
    return {"label": label, "budget_bytes": budget, "status": "ok", "offload": f["offload"],
            "cache_rows_per_layer": rows, "ffn_share_cached": rows / f["d_ff"] if rows is not None else 1.0,
            "decode_tokens_per_s": s["decode_tokens_per_s"], "prefill_tokens_per_s": s["prefill_tokens_per_s"],
            "decode_bytes_per_token": s["decode_bytes_per_token"],
            "decode_cache_hit_rate": s["decode_cache_hit_rate"], "peak_rss_bytes": s["peak_rss_bytes"],
            "runtime_baseline_bytes": f["runtime_baseline_bytes"],
            "peak_above_runtime_bytes": s["peak_above_runtime_bytes"],
            "within_budget": s["peak_above_runtime_bytes"] <= budget}


def run_sweep(path: Path, budgets: list[tuple[str, int]], minimum: int, child_args: list[str], out: Path,
              target_tps: float | None = None, on_row=None) -> dict:
    """Profile the bundle at ``path`` at each budget; ``child_args`` are the run options passed on
    (prompt, tokens, sampling, offload ...). ``on_row(row)`` is called as each row completes."""
    rows = []
    for i, (label, budget) in enumerate(budgets):
        if budget < minimum:
            row = {"label": label, "budget_bytes": budget, "status": f"too small (minimum {fmt_bytes(minimum)})"}
        else:
            sub = out / f"budget-{i}-{budget}"
            cmd = [sys.executable, "-m", "flashinfer_local", "profile", str(path), "--dram-budget",
                   f"{budget}B", "--json-only", "--out", str(sub), *child_args]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                err = (r.stderr.strip().splitlines() or ["exit code %d" % r.returncode])[-1]
                row = {"label": label, "budget_bytes": budget, "status": f"failed: {err}"}
            else:
                row = _row(label, budget, json.loads((sub / "profile.json").read_text()))
        rows.append(row)
        if on_row:
            on_row(row)
    ok = [r for r in rows if r["status"] == "ok"]
    res = {"model": str(path), "minimum_budget_bytes": minimum, "target_tps": target_tps, "rows": rows}
    if target_tps is not None:
        hit = [r for r in ok if r["decode_tokens_per_s"] >= target_tps]
        res["smallest_budget_reaching_target"] = min(hit, key=lambda r: r["budget_bytes"]) if hit else None
    return res


def table_lines(res: dict) -> list[str]:
    lines = [f"{'budget':>16} {'offload':>8} {'FFN cached':>10} {'decode tok/s':>12} {'SSD/token':>11} "
             f"{'hit rate':>8} {'peak RSS':>10} {'above base':>10}  within budget"]
    for r in res["rows"]:
        b = f"{r['label']} ({fmt_bytes(r['budget_bytes'])})" if r["label"].endswith("%") else r["label"]
        if r["status"] != "ok":
            lines.append(f"{b:>16} {r['status']}")
            continue
        hr = r["decode_cache_hit_rate"]
        lines.append(f"{b:>16} {r['offload']:>8} {100 * r['ffn_share_cached']:>9.0f}% "
                     f"{r['decode_tokens_per_s']:>12.1f} {fmt_bytes(r['decode_bytes_per_token']):>11} "
                     f"{'-' if hr is None else f'{100 * hr:.0f}%':>8} {fmt_bytes(r['peak_rss_bytes']):>10} "
                     f"{fmt_bytes(r['peak_above_runtime_bytes']):>10}  {'yes' if r['within_budget'] else 'NO'}")
    if res.get("target_tps") is not None:
        best = res["smallest_budget_reaching_target"]
        lines.append(f"smallest swept budget reaching {res['target_tps']:g} tok/s: "
                     + (f"{best['label']} ({fmt_bytes(best['budget_bytes'])}, {best['decode_tokens_per_s']:.1f} tok/s)"
                        if best else "none"))
    return lines
