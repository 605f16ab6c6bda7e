"""Quality measurements: perplexity on held-out text and greedy agreement with a reference model.

The default corpus needs no download: real prose and real code from the Python standard library
that every install carries (module docstrings as prose, module sources as code), picked by a fixed
list of modules so that every run on the same Python version scores the same text.
"""
from __future__ import annotations

import ast
import math
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from storage.errors import FlashinferError

# stdlib modules whose text is used; CALIBRATION for fitting, HELD_OUT for scoring (disjoint)
CALIBRATION_MODULES = ("argparse", "collections/__init__", "dataclasses", "difflib", "email/message",
                       "functools", "inspect", "json/decoder", "logging/__init__", "pathlib",
                       "pickle", "shutil", "subprocess", "tarfile", "threading", "typing")
HELD_OUT_MODULES = ("textwrap", "fractions", "heapq", "calendar", "statistics", "gettext",
                    "string", "bisect")


def _stdlib_file(module: str) -> Path:
    p = Path(sysconfig.get_paths()["stdlib"]) / f"{module}.py"
    if not p.exists():
        raise FlashinferError(f"the standard library file {p} is missing; give text files to score instead",
                              cli=f"the standard library file {p} is missing; pass --corpus FILE instead")
    return p


def _docstrings(source: str) -> list[str]:
    """Module, class and function docstrings of ``source``, longest-first within the module."""
    tree = ast.parse(source)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 200:
                out.append(doc)
    return out


def stdlib_corpus(modules=HELD_OUT_MODULES) -> dict[str, str]:
    """{"prose": docstrings, "code": sources} of the given stdlib modules."""
    prose, code = [], []
    for m in modules:
        src = _stdlib_file(m).read_text(encoding="utf-8")
        prose.extend(_docstrings(src))
        code.append(src)
    return {"prose": "\n\n".join(prose), "code": "\n\n".join(code)}


@torch.inference_mode()
def perplexity(engine, ids: list[int], window: int = 256, max_windows: int | None = None) -> dict:
    """exp(mean next-token NLL) of ``ids`` scored in consecutive windows of ``window`` tokens, each
    from an empty cache (the first token of a window is context only)."""
    if len(ids) < 2:
        raise FlashinferError("the evaluation text is shorter than 2 tokens")
    nll, n = 0.0, 0
    starts = range(0, len(ids) - 1, window)
    for k, a in enumerate(starts):
        if max_windows is not None and k >= max_windows:
            break
        chunk = ids[a:a + window + 1]
        if len(chunk) < 2:
            break
        logits = engine.logits(chunk[:-1])                                     # [t, vocab]
        nll += F.cross_entropy(logits.float(), torch.tensor(chunk[1:]), reduction="sum").item()
        n += len(chunk) - 1
    return {"perplexity": math.exp(nll / n), "nll": nll / n, "tokens": n}


def text_ids(tokenizer, files: list[Path] | None, tokens: int, modules=HELD_OUT_MODULES) -> dict[str, list[int]]:
    """Token ids by part: {"corpus"} from the given files (``tokens`` at most), else {"prose", "code"}
    of the stdlib ``modules`` (half of ``tokens`` each)."""
    if files:
        ids = []
        for f in files:
            ids += tokenizer.encode(Path(f).read_text(encoding="utf-8", errors="replace"))
        return {"corpus": ids[:tokens]}
    c = stdlib_corpus(modules)
    return {"prose": tokenizer.encode(c["prose"])[:tokens // 2],
            "code": tokenizer.encode(c["code"])[:tokens - tokens // 2]}


def held_out_ids(tokenizer, files: list[Path] | None, tokens: int) -> dict[str, list[int]]:
    """The held-out text ``eval`` scores (HELD_OUT_MODULES unless files are given)."""
    return text_ids(tokenizer, files, tokens, HELD_OUT_MODULES)


class _Density:
    """An engine observer (``Engine.observe``): the kept share of each layer over the tokens seen."""

    def __init__(self, n_layers: int):
        self.kept, self.tokens = np.zeros(n_layers), np.zeros(n_layers)

    def __call__(self, layer: int, x: torch.Tensor, m: torch.Tensor | None) -> None:
        self.kept[layer] += x.shape[0] if m is None else float(m.float().mean(1).sum())
        self.tokens[layer] += x.shape[0]

    def share(self) -> np.ndarray:
        return self.kept / np.maximum(self.tokens, 1)


def perplexity_parts(engine, parts: dict, window: int) -> dict:
    """Perplexity of each part of ``parts`` and of all of them together ("all")."""
    out, nll, n = {}, 0.0, 0
    for k, ids in parts.items():
        r = perplexity(engine, ids, window)
        out[k] = r["perplexity"]
        nll, n = nll + r["nll"] * r["tokens"], n + r["tokens"]
    out["all"] = math.exp(nll / n)
    return out


@torch.inference_mode()
def evaluate(engine, sparsities: list[float], parts: dict[str, list[int]], gen_tokens: int = 128,
             prompt_tokens: int = 64, window: int = 256, timing_tokens: int = 16, on_step=None) -> dict:
    """Quality of ``engine.selector`` (a PredictorSelector on an offload-none engine) at each sparsity
    against the exact model on the same engine:

    - perplexity of each part of ``parts`` and of all of it (each token with its own selection);
    - greedy agreement: the exact model generates ``gen_tokens`` greedily after the first
      ``prompt_tokens`` of the first part; the sparse model, fed the same sequence, predicts each of
      them (``agreement``: share equal; ``identical_prefix``: tokens before the first difference, which
      is also how long a free-running sparse generation stays identical);
    - kept share per layer, and from it the bytes a token would read with no cache;
    - predictor time per decode token, and its share of a decode token's time in DRAM.
    """
    sel, cfg, lay = engine.selector, engine.config, engine.bundle.layout
    timing_tokens = max(1, min(timing_tokens, gen_tokens))
    uses = np.array([cfg.uses(i) for i in range(cfg.n_layers)])
    all_bytes = cfg.depth * cfg.d_ff * lay.record_bytes
    with engine.selecting(None):                                  # the exact model
        exact = perplexity_parts(engine, parts, window)
        prompt = next(iter(parts.values()))[:prompt_tokens]
        session = engine.session(len(prompt) + gen_tokens)
        logits = session.append(prompt, last_only=True)
        gen = []
        for k in range(gen_tokens):
            gen.append(int(logits[-1].argmax()))
            logits = session.append(gen[-1:], last_only=True)
    seq = prompt + gen
    rows = []
    for s in sparsities:
        sel.set_sparsity(s)
        dens = _Density(cfg.n_layers)
        with engine.observe(dens):
            pred = engine.logits(seq[:-1])[len(prompt) - 1:].argmax(-1).tolist()    # [gen_tokens]
        share = dens.share()
        kept = float((share * uses).sum() / cfg.depth)      # over positions: a shared layer counts at each
        same = [p == g for p, g in zip(pred, gen)]
        ppl = perplexity_parts(engine, parts, window)
        # time: decode a few tokens with and without the selector (predictor share of a token)
        timed = engine.session(len(prompt) + timing_tokens)
        timed.append(prompt, last_only=True)
        sel.seconds = 0.0
        t1 = time.perf_counter()
        for k in range(timing_tokens):
            timed.append(gen[k:k + 1], last_only=True)
        tok_s = (time.perf_counter() - t1) / timing_tokens
        row = {"sparsity": float(s), "perplexity": ppl,
               "ppl_increase": {k: ppl[k] / exact[k] - 1 for k in ppl},
               "agreement": sum(same) / len(same),
               "identical_prefix": same.index(False) if False in same else len(same),
               "kept_share_per_layer": share.tolist(), "kept_share": kept, "bytes_per_token": kept * all_bytes,
               "predictor_ms_per_token": 1000 * sel.seconds / timing_tokens,
               "predictor_share_of_dram_token": sel.seconds / timing_tokens / tok_s}
        rows.append(row)
        if on_step:
            on_step(row)
    return {"exact_perplexity": exact, "all_bytes_per_token": all_bytes,
            "tokens": {k: len(v) for k, v in parts.items()}, "gen_tokens": gen_tokens,
            "predictor": sel.kind, "default_sparsity": sel.meta["default_sparsity"], "rows": rows}
