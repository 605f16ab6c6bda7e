#!/usr/bin/env python3
"""The same benchmark on two source trees, alternating, in one run: is a change speed-neutral?

    python tools/bench_ab.py --old /path/to/old-checkout [--rounds 3] decode [bench_decode args]
    python tools/bench_ab.py --old /path/to/old-checkout [--rounds 3] stream BUNDLE [bench_stream args]

Each round runs ``tools/bench_decode.py`` (with --no-transformers) or ``tools/bench_stream.py`` once
from each tree, in its own interpreter, the order swapping every round so drift hits both; the
table gives each row's median tokens/s per tree and the ratio new/old (bytes read per token for
streaming rows too: a refactor must not change them). Both trees must read the same bundle format;
pass --bundle-dir to bench_decode so the bundles are converted once. Make the old tree with
``git worktree add /tmp/old <commit>``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

NEW = Path(__file__).resolve().parents[1]


def run_once(tree: Path, kind: str, args: list[str], out: Path) -> dict[str, dict]:
    """{row: {"tps": ..., "bytes": ...}} of one benchmark run from ``tree``."""
    script = tree / "tools" / ("bench_decode.py" if kind == "decode" else "bench_stream.py")
    extra = ["--no-transformers"] if kind == "decode" else []
    r = subprocess.run([sys.executable, str(script), *args, *extra, "--json", str(out)], cwd=tree,
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{script} failed:\n{r.stderr[-3000:]}")
    d = json.loads(out.read_text())
    if kind == "decode":
        return {f"{row['model']} {col}": {"tps": v} for row in d for col, v in row["median_tps"].items()
                if col.startswith("flashinfer-local")}
    return {name: {"tps": m["decode_tps"], "bytes": m["bytes_per_token"]} for name, m in d["median"].items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=Path, required=True, help="the other source tree (the baseline)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=Path("bench-out/ab.json"))
    ap.add_argument("kind", choices=["decode", "stream"])
    a, rest = ap.parse_known_args()
    trees = {"old": a.old.resolve(), "new": NEW}
    res = {"old": {}, "new": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
                got = run_once(trees[side], a.kind, rest, Path(tmp) / f"{side}-{r}.json")
                for row, v in got.items():
                    res[side].setdefault(row, []).append(v)
                print(f"round {r + 1} {side}: " + ", ".join(f"{k} {v['tps']:.2f}" for k, v in got.items()),
                      file=sys.stderr)
    rows = []
    print(f"\n{a.kind}, median of {a.rounds} rounds, tokens/s (new / old); {' '.join(rest)}\n")
    print("| row | old tok/s | new tok/s | new/old | old read/token | new read/token |\n|---|---:|---:|---:|---:|---:|")
    for row in res["new"]:
        med = {s: statistics.median(v["tps"] for v in res[s][row]) for s in res if row in res[s]}
        byt = {s: statistics.median(v["bytes"] for v in res[s][row]) for s in res
               if row in res[s] and "bytes" in res[s][row][0]}
        rows.append({"row": row, "median_tps": med, "median_bytes_per_token": byt,
                     "runs": {s: res[s].get(row) for s in res}})
        ratio = med["new"] / med["old"] if med.get("old") else float("nan")
        b = [f"{byt[s] / 2**20:.1f} MiB" if s in byt else "-" for s in ("old", "new")]
        print(f"| {row} | {med.get('old', float('nan')):.2f} | {med['new']:.2f} | {ratio:.3f} | {b[0]} | {b[1]} |")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"kind": a.kind, "args": rest, "rounds": a.rounds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
