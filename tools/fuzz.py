#!/usr/bin/env python3
"""Hostile input at scale: mutated copies of a real bundle, GGUF and predictor file, each opened,
inspected and run (in DRAM and streamed) in a worker process; counts of every outcome.

    python tools/fuzz.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf [--n 300] [--seed 0] [--json FILE]

Outcomes (see tests/fuzz_harness.py): same, clean (a one-line error), verify (weight bytes that
`inspect --verify` names), different (GGUF: a valid file of another model), and the failures:
misread, traceback, crash, hang. Families: the bundle as converted (manifest checksum and header
hashes), the same without its manifest checksum (bundles from before it), streamed, the GGUF,
and the threshold and lowrank predictor files. Mutant copies hard-link the files they leave alone.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import fuzz_harness as fh  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--n", type=int, default=300, help="mutants per family")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="int8")
    ap.add_argument("--families", default="bundle,nosum,streamed,gguf,threshold,lowrank")
    ap.add_argument("--json", type=Path, default=Path("bench-out/fuzz.json"))
    a = ap.parse_args()
    from storage.convert import convert
    from flashinfer_local.workflows.calibrate import calibrate
    out = {}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        tmp = Path(tmp)
        b = convert(a.gguf, tmp / "b", dtype=a.dtype, progress=False)
        nosum = tmp / "nosum"
        shutil.copytree(b, nosum)
        (nosum / "manifest.sha256").unlink()
        prompt = {"prompt": "The capital of France is"}
        fams = {"bundle": ("bundle", lambda d: fh.bundle_mutants(b, d, a.n, a.seed), b, {}),
                "nosum": ("bundle", lambda d: fh.bundle_mutants(nosum, d, a.n, a.seed + 1), nosum, {}),
                "streamed": ("bundle", lambda d: fh.bundle_mutants(b, d, a.n, a.seed + 2), b,
                             {"offload": "window", "dram_budget": int(0.8 * sum(f.stat().st_size for f in b.iterdir()))
                              + (200 << 20)}),
                "gguf": ("gguf", lambda d: fh.gguf_mutants(a.gguf, d, a.n, a.seed + 3), a.gguf, None)}
        for kind in ("threshold", "lowrank"):
            def make(d, kind=kind):
                pb = tmp / f"b-{kind}"
                if not pb.exists():
                    shutil.copytree(b, pb)
                    calibrate(pb, kind, tokens=1024, seed=0)
                return fh.predictor_mutants(pb, kind, d, a.n, a.seed + 4)
            fams[kind] = ("bundle", make, tmp / f"b-{kind}", {"selector": "predictor", "predictor": kind, "sparsity": 0.3})
        for name in a.families.split(","):
            kind, make, ref, engine = fams[name]
            d = tmp / f"m-{name}"
            d.mkdir()
            t = time.time()
            items = make(d)
            extra = {**prompt, "reference": str(ref), "dtype": a.dtype}
            if engine is not None:
                extra["engine"] = engine
            res = fh.run_all(kind, items, timeout=120, extra=extra)
            c = fh.counts(res)
            out[name] = {"counts": c, "failures": [r for r in res if r["outcome"] not in fh.GOOD], "seconds": time.time() - t}
            print(f"{name}: {len(res)} mutants in {time.time() - t:.0f} s: {c}", flush=True)
            for r in out[name]["failures"][:10]:
                print(f"   {r['outcome']} {r['what']}: {r['detail'][:150]}")
            shutil.rmtree(d)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
