"""Mutate a bundle, a GGUF file or a predictor file and see what the engine makes of each copy.

Every mutant runs in a worker process (one per batch, restarted after a crash or a hang), which
opens it and generates a few greedy tokens (bundles, predictors) or converts it (GGUF). The
outcome is one of:

    same       the output equals the original's (the mutation did not matter)
    clean      a FlashinferError: one line naming the problem
    verify     different output, and ``Bundle.verify`` names the damaged file (weight bytes)
    misread    different output and nothing noticed it: a silent misread
    different  (GGUF) a valid file of a different model: GGUF carries no checksums
    traceback  any other exception
    crash      the worker died (a signal, e.g. a segmentation fault)
    hang       no answer within the timeout

``python tools/fuzz.py`` runs the families at scale; ``tests/test_fuzz.py`` a fixed-seed sample.
"""
from __future__ import annotations

import json
import os
import random
import select
import shutil
import struct
import subprocess
import sys
from pathlib import Path

GOOD = ("same", "clean", "verify", "different")


# ---------------------------------------------------------------- mutations
def _json_leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _json_leaves(v, path + (i,))
    yield path, obj


def _set(obj, path, value):
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def _delete(obj, path):
    for k in path[:-1]:
        obj = obj[k]
    del obj[path[-1]]


WEIRD = [None, True, False, -2, 0, 1, 2 ** 40, -(2 ** 40), 1.5, float("1e308"), "", "x", "../../etc/passwd",
         "/dev/zero", [], {}, [1, 2], {"a": 1}]


def mutate_json(data: bytes, rng: random.Random) -> bytes:
    """A JSON document with one leaf changed, deleted or its key renamed (or the whole replaced)."""
    doc = json.loads(data)
    leaves = [p for p, _ in _json_leaves(doc) if p]
    r = rng.random()
    if r < 0.03 or not leaves:
        return json.dumps(rng.choice([None, [], 0, "manifest"])).encode()
    path = rng.choice(leaves)
    old = doc
    for k in path:
        old = old[k]
    if r < 0.15 and isinstance(path[-1], str):
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        parent[path[-1] + rng.choice(["_", "x", ""]) + "y"] = parent.pop(path[-1])
    elif r < 0.25:
        _delete(doc, path)
    elif isinstance(old, bool):
        _set(doc, path, not old)
    elif isinstance(old, int) and r < 0.7:
        _set(doc, path, rng.choice([old + 1, old - 1, old * 2, old // 2, -old, old + 4096, 2 ** 40, -2]))
    elif isinstance(old, str) and r < 0.6:
        _set(doc, path, old[:-1] + chr(ord(old[-1]) ^ 1) if old else "x")
    else:
        _set(doc, path, rng.choice(WEIRD))
    return json.dumps(doc).encode()


def flip_bytes(data: bytes, rng: random.Random, lo: int = 0, hi: int | None = None, n: int = 1) -> bytes:
    b = bytearray(data)
    hi = len(b) if hi is None else min(hi, len(b))
    for _ in range(n):
        if hi > lo:
            b[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
    return bytes(b)


def safetensors_header_span(data: bytes) -> tuple[int, int]:
    (n,) = struct.unpack("<Q", data[:8])
    return 8, 8 + n


def mutate_safetensors(data: bytes, rng: random.Random, region: str) -> bytes:
    """``region``: "length" (the 8-byte header length), "header" (the JSON header: one leaf, or a
    byte), "data" (a weight byte), "truncate"."""
    a, b = safetensors_header_span(data)
    if region == "length":
        (n,) = struct.unpack("<Q", data[:8])
        return struct.pack("<Q", rng.choice([n - 1, n + 1, 0, 2 ** 40, n + 8])) + data[8:]
    if region == "header":
        if rng.random() < 0.7:
            head = mutate_json(data[a:b], rng)
            return struct.pack("<Q", len(head)) + head + data[b:]
        return flip_bytes(data, rng, a, b)
    if region == "data":
        return flip_bytes(data, rng, b, n=rng.choice([1, 8]))
    return data[:rng.randrange(0, len(data))]


def _copy(src: Path, dst: Path) -> None:
    """A copy of a bundle whose files are hard links (a mutation writes a new file over its link)."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    shutil.copytree(src, dst, copy_function=link)


def _rewrite(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def bundle_mutants(bundle: Path, out: Path, n: int, seed: int) -> list[tuple[str, Path]]:
    """``n`` mutated copies of ``bundle`` under ``out``: (what was done, path)."""
    rng = random.Random(seed)
    files = sorted(p.name for p in bundle.iterdir() if p.is_file())
    made = []
    for i in range(n):
        dst = out / f"m{i:04d}"
        _copy(bundle, dst)
        name = rng.choice(files + ["manifest.json"] * 3)         # the manifest most often
        data = (dst / name).read_bytes()
        if name.endswith(".json") and rng.random() < 0.85:
            new, what = mutate_json(data, rng), "json"
        elif name.endswith(".safetensors"):
            region = rng.choice(["length", "header", "header", "header", "data", "data", "truncate"])
            new, what = mutate_safetensors(data, rng, region), region
        elif rng.random() < 0.5:
            new, what = flip_bytes(data, rng), "byte"
        else:
            new, what = data[:rng.randrange(0, max(1, len(data)))], "truncate"
        _rewrite(dst / name, new)
        made.append((f"{name}:{what}", dst))
    return made


def gguf_mutants(gguf: Path, out: Path, n: int, seed: int) -> list[tuple[str, Path]]:
    """Mutated copies of a GGUF file: bytes of its metadata and tensor table (the first part of the
    file, where the keys, types, counts and offsets are), a length field set huge, truncations."""
    rng = random.Random(seed)
    data = gguf.read_bytes()
    meta_end = _gguf_data_start(gguf, len(data))
    made = []
    for i in range(n):
        r = rng.random()
        if r < 0.6:
            new, what = flip_bytes(data, rng, 8, meta_end), "metadata byte"
        elif r < 0.8:                 # a 64-bit length or count somewhere in the metadata set huge
            b = bytearray(data)
            at = rng.randrange(8, meta_end - 8)
            b[at:at + 8] = struct.pack("<Q", rng.choice([2 ** 40, 2 ** 63, 0, 1]))
            new, what = bytes(b), "metadata u64"
        elif r < 0.9:
            new, what = data[:rng.randrange(0, len(data))], "truncate"
        else:
            new, what = flip_bytes(data, rng, meta_end, n=4), "tensor data"
        dst = out / f"g{i:04d}.gguf"
        dst.write_bytes(new)
        made.append((what, dst))
    return made


def _gguf_data_start(path: Path, size: int) -> int:
    """Where the GGUF's tensor data begins (the metadata and tensor table lie before it)."""
    try:
        from gguf import GGUFReader
        return int(GGUFReader(path).data_offset)
    except Exception:
        return min(size, 1 << 16)


def predictor_mutants(bundle: Path, kind: str, out: Path, n: int, seed: int) -> list[tuple[str, Path]]:
    rng = random.Random(seed)
    name = f"predictor-{kind}.safetensors"
    made = []
    for i in range(n):
        dst = out / f"p{i:04d}"
        _copy(bundle, dst)
        data = (dst / name).read_bytes()
        region = rng.choice(["length", "header", "header", "header", "data", "truncate"])
        _rewrite(dst / name, mutate_safetensors(data, rng, region))
        made.append((f"{name}:{region}", dst))
    return made


# ---------------------------------------------------------------- running them
def run_all(kind: str, items: list[tuple[str, Path]], timeout: float = 60.0, extra: dict | None = None) -> list[dict]:
    """Outcomes of every mutant (in order), each {"what", "path", "outcome", "detail"}."""
    todo = list(items)
    results: list[dict] = []
    reference = _reference(kind, extra)
    while todo:
        proc = subprocess.Popen([sys.executable, "-c", WORKER, kind, json.dumps(extra or {})], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        proc.stdin.write("".join(f"{path}\n" for _, path in todo).encode())
        proc.stdin.close()
        fd, buf, done = proc.stdout.fileno(), b"", 0
        while done < len(todo):
            ready, _, _ = select.select([fd], [], [], timeout)
            what, path = todo[done]
            if not ready:                                      # no answer in time: a hang
                proc.kill()
                results.append({"what": what, "path": str(path), "outcome": "hang", "detail": f"> {timeout} s"})
                done += 1
                break
            chunk = os.read(fd, 1 << 16)
            if not chunk:                                      # the worker died: a crash
                proc.wait()
                results.append({"what": what, "path": str(path), "outcome": "crash",
                                "detail": f"worker exit {proc.returncode}"})
                done += 1
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                what, path = todo[done]
                results.append(_classify(kind, what, path, json.loads(line), reference))
                done += 1
        proc.wait()
        todo = todo[done:]
    return results


def _reference(kind: str, extra: dict | None) -> dict:
    src = (extra or {}).get("reference")
    if src is None:
        return {}
    r = subprocess.run([sys.executable, "-c", WORKER, kind, json.dumps(extra or {})], input=src + "\n",
                       capture_output=True, text=True, timeout=600)
    return json.loads(r.stdout.splitlines()[0])


def _classify(kind: str, what: str, path: Path, r: dict, ref: dict) -> dict:
    out = {"what": what, "path": str(path), "detail": r.get("detail", "")}
    if r["status"] != "ok":
        out["outcome"] = r["status"]
    elif r.get("output") == ref.get("output"):
        out["outcome"] = "same"
    elif r.get("verify_bad"):
        out["outcome"] = "verify"
    elif kind == "gguf":
        out["outcome"] = "different"
    else:
        out["outcome"] = "misread"
        out["detail"] = f"output {r.get('output')!r:.80} differs"
    return out


def counts(results: list[dict]) -> dict[str, int]:
    c: dict[str, int] = {}
    for r in results:
        c[r["outcome"]] = c.get(r["outcome"], 0) + 1
    return c


# The worker: one mutant path per stdin line, one JSON result per stdout line.
WORKER = r'''
import json, sys, os, traceback, tempfile, contextlib
os.environ.setdefault("HF_HUB_OFFLINE", "1")
kind, extra = sys.argv[1], json.loads(sys.argv[2])
import torch
from storage.errors import FlashinferError

def bundle_run(path, opts):
    from flashinfer_local.runtime.engine import Engine
    from flashinfer_local.runtime.sampling import SamplingParams
    from storage.reader import Bundle
    eng = Engine(path, **opts)
    try:
        steps = list(eng.generate(extra.get("prompt", "hello world"), max_tokens=4,
                                  sampling=SamplingParams(temperature=0)))
        out = [s.token_id for s in steps]
    finally:
        eng.close()
    return out

def one(path):
    if kind == "gguf":
        from storage.convert import convert
        with tempfile.TemporaryDirectory() as tmp:
            b = convert(path, os.path.join(tmp, "b"), dtype=extra.get("dtype", "f32"), progress=False)
            from storage.reader import Bundle
            bb = Bundle(b)
            out = {"config": bb.config.to_dict()}
            out["tokens"] = bundle_run(b, {})
            bb.close()
        return out
    from click.testing import CliRunner
    from flashinfer_local.cli import main
    for args in (["inspect", path], ["inspect", "--json", path]):     # no traceback from inspect either
        res = CliRunner().invoke(main, args)
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            raise res.exception
    opts = extra.get("engine", {})
    return bundle_run(path, opts)

for line in sys.stdin:
    path = line.strip()
    r = {}
    try:
        with open(os.devnull, "w") as dn, contextlib.redirect_stderr(dn):
            r = {"status": "ok", "output": one(path)}
    except FlashinferError as e:
        r = {"status": "clean", "detail": str(e)[:300]}
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        r = {"status": "traceback", "detail": f"{type(e).__name__}: {e}"[:300] + " @ " +
             traceback.format_exc().strip().splitlines()[-3][:200]}
    if r["status"] == "ok" and kind != "gguf":
        try:
            from storage.reader import Bundle
            b = Bundle(path)
            r["verify_bad"] = b.verify()
            b.close()
        except FlashinferError:
            r["verify_bad"] = ["(open)"]
        except BaseException as e:
            r["verify_bad"] = []
            r["status"] = "traceback"
            r["detail"] = f"verify: {type(e).__name__}: {e}"[:300]
    print(json.dumps(r), flush=True)
'''
