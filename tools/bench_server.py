#!/usr/bin/env python3
"""`serve` against `run` on the same bundle and prompt: what the HTTP layer costs, and how many
short requests per minute one engine answers for several clients at once.

    python tools/bench_server.py BUNDLE [BUNDLE ...] [--tokens 128] [--rounds 3] [--clients 4]

Per bundle and round, interleaved: `run --stats-json` in its own interpreter (time to first token
from the generate call to the first token: tokenizing, prefill, the first sample; decode tok/s
from its stats), then a fresh `serve` in its own interpreter with one
streaming chat request from the `openai` client (time to first token = request sent to first text
chunk, decode tok/s = tokens after the first over the time after it), once read with plain
http.client and once with the `openai` client (whose parsing shares the cores with the engine).
All are greedy on the same prompt, so they generate the same tokens. Medians of the rounds; overhead = server / CLI - 1.
Then, on the first bundle, ``--clients`` threads each send short chat requests (``--requests``
each) to one server: requests per minute and mean latency, next to one client sending them alone.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

PROMPT = "Write a Python function that checks whether a string is a palindrome, and explain it."
SHORT = ["What is the capital of China?", "Name a primary colour.", "What is 2 + 3?", "Say hello in French.",
         "What is the capital of Japan?", "Name a planet.", "What day comes after Monday?", "Spell cat."]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_row(bundle: Path, tokens: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "s.json"
        subprocess.run([sys.executable, "-m", "flashinfer_local", "run", str(bundle), "--chat", "-p", PROMPT, "-n",
                        str(tokens), "--temperature", "0", "--stats-json", str(out), *extra],
                       check=True, capture_output=True)
        s = json.loads(out.read_text())
    return {"ttft_s": s["time_to_first_token_s"], "decode_tps": s["decode_tokens_per_s"], "tokens": s["generated_tokens"],
            "text": s["text"]}


class Served:
    def __init__(self, bundle: Path, extra: list[str]):
        self.port = _port()
        self.proc = subprocess.Popen([sys.executable, "-m", "flashinfer_local", *(["-v"] if "-v" in extra else []), "serve", str(bundle), "--port",
                                      str(self.port), *[e for e in extra if e != "-v"]], stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2).read()
                break
            except OSError:
                if self.proc.poll() is not None:
                    raise SystemExit(f"serve failed: {self.proc.stderr.read()[-2000:]}")
                time.sleep(0.2)
        import openai
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="-", max_retries=0, timeout=600)
        self.model = self.client.models.list().data[0].id

    def close(self):
        self.proc.terminate()
        self.proc.wait(60)


def _raw_stream(srv: Served, tokens: int):
    """(time of each text chunk, the text) of one streaming chat request over plain http.client:
    the server's own cost, without a client library's parsing beside it on the same cores."""
    import http.client
    body = json.dumps({"model": srv.model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    times, text, n = [], [], 0
    _raw_stream.timings = None
    for line in resp:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        d = json.loads(line[6:])
        if d.get("usage"):
            n = d["usage"]["completion_tokens"]
        if d.get("timings"):
            _raw_stream.timings = d["timings"]
        if d["choices"] and d["choices"][0]["delta"].get("content"):
            times.append(time.perf_counter())
            text.append(d["choices"][0]["delta"]["content"])
    conn.close()
    return times, "".join(text), n


def server_row(bundle: Path, tokens: int, extra: list[str], raw: bool = False) -> dict:
    srv = Served(bundle, extra)
    if raw:
        try:
            t0 = time.perf_counter()
            times, text, n = _raw_stream(srv, tokens)
        finally:
            srv.close()
        return {"ttft_s": times[0] - t0, "decode_tps": (n - 1) / (times[-1] - times[0]) if n > 1 else 0.0,
                "tokens": n, "text": text, "engine_tps": _raw_stream.timings["predicted_per_second"]}
    try:
        t0 = time.perf_counter()
        first = last = None
        text, n = [], 0
        for ch in srv.client.chat.completions.create(model=srv.model, messages=[{"role": "user", "content": PROMPT}],
                                                     max_tokens=tokens, temperature=0, stream=True,
                                                     stream_options={"include_usage": True}):
            if ch.usage is not None:
                n = ch.usage.completion_tokens
            if ch.choices and ch.choices[0].delta.content:
                last = time.perf_counter()
                first = first or last
                text.append(ch.choices[0].delta.content)
    finally:
        srv.close()
    return {"ttft_s": first - t0, "decode_tps": (n - 1) / (last - first) if n > 1 else 0.0, "tokens": n,
            "text": "".join(text)}


def throughput(bundle: Path, clients: int, requests: int, extra: list[str]) -> dict:
    srv = Served(bundle, extra + ["--queue", str(max(8, clients))])
    out = {}
    try:
        for n in (1, clients):
            lat, errors = [], []

            def one(k):
                for i in range(requests):
                    q = SHORT[(k * requests + i) % len(SHORT)]
                    t = time.perf_counter()
                    try:
                        srv.client.chat.completions.create(model=srv.model, messages=[{"role": "user", "content": q}],
                                                           max_tokens=32, temperature=0)
                        lat.append(time.perf_counter() - t)
                    except Exception as e:       # counted, not hidden
                        errors.append(repr(e))
            t0 = time.perf_counter()
            threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            out[f"{n} client{'s' if n > 1 else ''}"] = {
                "requests": len(lat), "errors": errors, "wall_s": wall, "requests_per_min": 60 * len(lat) / wall,
                "mean_latency_s": statistics.mean(lat) if lat else None}
    finally:
        srv.close()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=6, help="short requests per client")
    ap.add_argument("--engine-args", default="", help="extra engine options for both, e.g. '--dram-budget 300MiB'")
    ap.add_argument("--json", type=Path, default=Path("bench-out/server.json"))
    a = ap.parse_args()
    extra = a.engine_args.split()
    rows = []
    for b in a.bundles:
        got = {"cli": [], "server": [], "server_openai": []}
        sides = list(got)
        for r in range(a.rounds):
            for side in (sides if r % 2 == 0 else sides[::-1]):
                if side == "cli":
                    got[side].append(cli_row(b, a.tokens, extra))
                else:
                    got[side].append(server_row(b, a.tokens, extra, raw=side == "server"))
                x = got[side][-1]
                print(f"{b.name} round {r + 1} {side}: ttft {1000 * x['ttft_s']:.0f} ms, {x['decode_tps']:.1f} tok/s, "
                      f"{x['tokens']} tokens", file=sys.stderr)
        med = {s: {k: statistics.median(x[k] for x in v) for k in ("ttft_s", "decode_tps")} for s, v in got.items()}
        med["server_engine"] = {"decode_tps": statistics.median(x["engine_tps"] for x in got["server"]),
                                "ttft_s": float("nan")}
        rows.append({"bundle": str(b), "median": med, "runs": got,
                     "same_text": len({x["text"] for v in got.values() for x in v}) == 1,
                     "decode_overhead": med["cli"]["decode_tps"] / med["server"]["decode_tps"] - 1,
                     "decode_overhead_openai": med["cli"]["decode_tps"] / med["server_openai"]["decode_tps"] - 1,
                     "decode_overhead_engine": med["cli"]["decode_tps"] / med["server_engine"]["decode_tps"] - 1,
                     "ttft_overhead_ms": 1000 * (med["server"]["ttft_s"] - med["cli"]["ttft_s"])})
    tp = throughput(a.bundles[0], a.clients, a.requests, extra)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"rows": rows, "throughput": {"bundle": str(a.bundles[0]), **tp},
                                  "tokens": a.tokens, "rounds": a.rounds, "engine_args": extra}, indent=1))
    print(f"\nmedian of {a.rounds}, greedy, {a.tokens} tokens, chat prompt; each row in its own interpreter\n")
    print("| bundle | client | TTFT | decode | decode overhead vs run | same text |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        m = r["median"]
        for side, label in (("cli", "run (no HTTP)"), ("server_engine", "serve, the engine's own timing"),
                            ("server", "serve, plain HTTP client"), ("server_openai", "serve, openai client")):
            over = {"cli": "", "server": f"{100 * r['decode_overhead']:+.1f}%",
                    "server_engine": f"{100 * r['decode_overhead_engine']:+.1f}%",
                    "server_openai": f"{100 * r['decode_overhead_openai']:+.1f}%"}[side]
            ttft = "" if side == "server_engine" else f"{1000 * m[side]['ttft_s']:.0f} ms"
            print(f"| {Path(r['bundle']).name} | {label} | {ttft} | "
                  f"{m[side]['decode_tps']:.1f} tok/s | {over} | {'yes' if r['same_text'] else 'no'} |")
    print(f"\nshort chat requests (max_tokens 32) on {a.bundles[0].name}:")
    for k, v in tp.items():
        print(f"  {k}: {v['requests']} requests in {v['wall_s']:.1f} s = {v['requests_per_min']:.0f}/min, mean latency "
              f"{v['mean_latency_s']:.2f} s, {len(v['errors'])} errors")


if __name__ == "__main__":
    main()
