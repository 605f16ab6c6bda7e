"""One Hugging Face accelerate row: the GGUF loaded by transformers in fp16 with the CPU capped at
``--budget`` bytes (``max_memory``) and the rest offloaded to disk (``offload_folder``), greedy
decoding one token per forward. After every token the offloaded files' pages are pushed out of this
process and the page cache (``peers.evict.page_out``), as reclaim would under that budget; the
eviction time is not counted. Prints one JSON line like ``llama_row``.

    python accelerate_row.py GGUF --budget BYTES --prompt TEXT --tokens N
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peers import evict  # noqa: E402
from peers.llama_row import read_bytes  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--budget", type=int, required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--tokens", type=int, default=16)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import psutil
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(os.cpu_count() or 1)
    d, f = str(a.gguf.parent), a.gguf.name
    with tempfile.TemporaryDirectory(dir="/tmp") as off:
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float16, device_map="auto",
                                                     max_memory={"cpu": a.budget}, offload_folder=off)
        files = [p for p in Path(off).rglob("*") if p.is_file()]

        def evict_all():
            for p in files:
                evict.page_out(p)
        ids = tok(a.prompt, return_tensors="pt").input_ids
        evict_all()
        proc, peak, out, times, evict_s = psutil.Process(), 0, [], [], 0.0
        past, x = None, ids
        r0, t0 = read_bytes(), time.perf_counter()
        with torch.inference_mode():
            for _ in range(a.tokens):
                o = model(x, past_key_values=past, use_cache=True)
                past = o.past_key_values
                nxt = int(o.logits[0, -1].argmax())
                times.append(time.perf_counter() - evict_s)
                peak = max(peak, proc.memory_info().rss)
                if nxt == tok.eos_token_id:
                    break
                out.append(nxt)
                x = torch.tensor([[nxt]])
                e = time.perf_counter()
                evict_all()
                evict_s += time.perf_counter() - e
        n = len(out)
        decode = (times[n - 1] - times[0]) if n > 1 else 0.0
        print(json.dumps({"peer": "accelerate", "tokens": n, "ttft_s": times[0] - t0,
                          "decode_tps": (n - 1) / decode if decode > 0 else 0.0,
                          "read_bytes_per_token": (read_bytes() - r0) / max(n, 1), "peak_rss_bytes": peak,
                          "offloaded_files": len(files), "evict_s": evict_s, "text": tok.decode(out)}))


if __name__ == "__main__":
    main()
