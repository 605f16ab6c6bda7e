"""One llama.cpp row, run by the peer's own interpreter (llama-cpp-python): greedy decoding of a
prompt with the GGUF memory-mapped, and (``--page-out``) its mapped pages pushed out after every
token, which is what reclaim does to a cyclic scan larger than memory. The time spent evicting is
not counted. Prints one JSON line: tok/s, time to first token, disk bytes read per token
(/proc/self/io), peak RSS, the text.

    python llama_row.py GGUF --prompt TEXT --tokens N [--page-out] [--threads 2] [--ctx 512]
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peers import evict  # noqa: E402


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("read_bytes:")).split()[1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--page-out", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512)
    a = ap.parse_args()
    import psutil
    from llama_cpp import Llama
    evict.drop_cache(a.gguf)
    llm = Llama(a.gguf, n_ctx=a.ctx, n_threads=a.threads, use_mmap=True, verbose=False)
    ids = llm.tokenize(a.prompt.encode(), add_bos=True)
    if a.page_out:
        evict.page_out(a.gguf)
    proc, peak = psutil.Process(), 0
    evict_s, out, times = 0.0, [], []
    r0, t0 = read_bytes(), time.perf_counter()
    for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
        times.append(time.perf_counter() - evict_s)
        peak = max(peak, proc.memory_info().rss)
        if tok == llm.token_eos() or len(out) >= a.tokens:
            break
        out.append(tok)
        if a.page_out:
            e = time.perf_counter()
            evict.page_out(a.gguf)
            evict_s += time.perf_counter() - e
    n = len(out)
    decode = (times[n - 1] - times[0]) if n > 1 else 0.0
    print(json.dumps({"peer": "llama.cpp", "page_out": a.page_out, "tokens": n, "ttft_s": times[0] - t0,
                      "decode_tps": (n - 1) / decode if decode > 0 else 0.0,
                      "read_bytes_per_token": (read_bytes() - r0) / max(n, 1), "peak_rss_bytes": peak,
                      "evict_s": evict_s, "text": llm.detokenize(out).decode(errors="replace")}))


if __name__ == "__main__":
    main()
