"""``calibrate``: run the exact model over real text, fit a sparsity predictor per layer, store it.

1. Tokenize the corpus (default: the standard library's docstrings as prose and its sources as code,
   ``evaluate.CALIBRATION_MODULES``, disjoint from the held-out text ``eval`` scores) and run the
   exact model over it in windows, recording every layer's FFN input x (f16).
2. Per layer: the true activations a of those inputs from the layer's records, the threshold on |a|
   at the target sparsity, per-neuron activation frequencies, and the predictor (threshold: the
   quantiles of |act(gate . x)|; lowrank: trained, ``predictors.lowrank.fit``), with its recall and
   precision on the validation tokens (the last ``VAL_SHARE`` of the windows, not trained on).
3. The default sparsity: the largest of DEFAULT_CANDIDATES whose validation perplexity is at most
   ``max_ppl_increase`` above the exact model's (binary search; perplexity rises with sparsity).
4. Write ``predictor-<kind>.safetensors`` into the bundle atomically (``predictors.store``).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from predictors import calibration as cal
from predictors import lowrank, store
from storage.errors import FlashinferError, OptionError

from flashinfer_local.runtime.engine import Engine
from flashinfer_local.measure.evaluate import CALIBRATION_MODULES, perplexity, perplexity_parts, text_ids
from flashinfer_local.models.common import embed_rows
from flashinfer_local.runtime.selection import PredictorSelector

log = logging.getLogger(__name__)

WINDOW = 256                      # tokens per forward pass (each from an empty cache)
VAL_SHARE = 0.125                 # of the calibration windows, held out for recall and the default
DEFAULT_CANDIDATES = tuple(np.round(np.arange(0.05, 0.951, 0.05), 2))
MAX_PPL_INCREASE = 0.01


class _Recorder:
    """An engine observer (``Engine.observe``): keeps each layer's FFN inputs x [T, d] (f16)."""

    def __init__(self, n_layers: int):
        self.xs = [[] for _ in range(n_layers)]

    def __call__(self, layer: int, x: torch.Tensor, mask) -> None:
        self.xs[layer].append(x.to(torch.float16))


def corpus_ids(tokenizer, files: list[Path] | None, tokens: int) -> list[int]:
    """``tokens`` ids: from the files in turn, or half stdlib prose and half stdlib code."""
    ids = [i for part in text_ids(tokenizer, files, tokens, CALIBRATION_MODULES).values() for i in part]
    if len(ids) < 2 * WINDOW:
        raise FlashinferError(f"the calibration text has {len(ids)} tokens; it needs at least {2 * WINDOW} "
                              "(pass more --corpus files or raise --tokens)")
    return ids


def _windows(ids: list[int]) -> list[list[int]]:
    return [ids[a:a + WINDOW] for a in range(0, len(ids) - 1, WINDOW) if len(ids[a:a + WINDOW]) > 1]


def _layer_fields(bundle, layer: int) -> dict[str, torch.Tensor]:
    rec = bundle.read_ffn_layer(layer)
    names = ["gate", "up"] if bundle.config.gated else ["up", "up_bias"]
    w = {n: torch.from_numpy(np.ascontiguousarray(bundle.vector_f32(layer, rec, n))) for n in names}
    if "up_bias" in w:
        w["up_bias"] = w["up_bias"][:, 0].contiguous()
    return w


def _val_ppl(eng: Engine, windows: list[list[int]]) -> float:
    return perplexity_parts(eng, dict(enumerate(windows)), WINDOW)["all"]


def _choose_default(eng: Engine, sel: PredictorSelector, val: list[list[int]], exact_ppl: float,
                    max_increase: float, floor: float) -> tuple[float, list]:
    """Largest candidate sparsity (at least ``floor``, the ReLU natural zeros, kept for free) whose
    validation perplexity stays within ``max_increase`` of exact; binary search over the candidates."""
    cands = [s for s in DEFAULT_CANDIDATES if s > floor]
    curve, lo, hi, best = [], 0, len(cands) - 1, floor
    with eng.selecting(sel):
        while lo <= hi:
            mid = (lo + hi) // 2
            sel.set_sparsity(cands[mid])
            ppl = _val_ppl(eng, val)
            curve.append({"sparsity": float(cands[mid]), "perplexity": ppl, "increase": ppl / exact_ppl - 1})
            if ppl <= exact_ppl * (1 + max_increase):
                best, lo = float(cands[mid]), mid + 1
            else:
                hi = mid - 1
    return best, sorted(curve, key=lambda c: c["sparsity"])


def calibrate(bundle_path: str | Path, kind: str = "threshold", corpus: list[Path] | None = None,
              tokens: int = 4096, target_sparsity: float = 0.5, rank: int | None = None,
              recall_target: float = 0.95, seed: int = 0, max_ppl_increase: float = MAX_PPL_INCREASE,
              progress: bool = False, threads: int | None = None) -> dict:
    """Calibrate ``kind`` for the bundle and store it; returns the report (also stored in the file)."""
    store.predictor_path(Path(bundle_path), kind)                       # validates kind
    if not 0 < target_sparsity < 1:
        raise OptionError("target_sparsity", f"{target_sparsity} must be between 0 and 1")
    if not 0 < recall_target <= 1:
        raise OptionError("recall_target", f"{recall_target} must be in (0, 1]", flag="--recall")
    if rank is not None and rank < 1:
        raise OptionError("rank", f"{rank} must be at least 1")
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    eng = Engine(bundle_path, threads=threads, offload="none")
    cfg, bundle = eng.config, eng.bundle
    windows = _windows(corpus_ids(eng.tokenizer, corpus, tokens))
    n_val = max(1, round(len(windows) * VAL_SHARE))
    train_w, val_w = windows[:-n_val], windows[-n_val:]
    rec = _Recorder(cfg.n_layers)
    bar = _bar(progress, len(windows) + cfg.n_layers, "calibrate")
    exact_nll = n_tok = 0
    with eng.observe(rec):
        for k, w in enumerate(windows):
            if k < len(train_w):
                eng.logits(w)
            else:                  # validation windows: recorded too, and scored for the exact perplexity
                r = perplexity(eng, w, window=len(w))
                exact_nll, n_tok = exact_nll + r["nll"] * r["tokens"], n_tok + r["tokens"]
            bar.update(1)
    n_train = sum(len(w) for w in train_w)
    tensors, layers = {}, []
    natural = []
    coact_scores = []                 # per layer, the scores of COACT_TOKENS training tokens (f16)
    sample = torch.from_numpy(np.linspace(0, n_train - 1, min(n_train, cal.COACT_TOKENS)).astype(np.int64))
    for i in range(cfg.n_layers):
        x = torch.cat(rec.xs[i]).float()                                   # [N, d]
        rec.xs[i] = None
        xt, xv = x[:n_train], x[n_train:]
        w = _layer_fields(bundle, i)
        abs_a = cal.activations(xt, w, cfg.activation).abs()                    # [N, d_ff]
        abs_av = cal.activations(xv, w, cfg.activation).abs()
        natural.append(cal.natural_sparsity(abs_a))
        thr = cal.threshold(abs_a, target_sparsity, cfg.gated, seed)
        # ReLU: active = non-zero, so the kept share to compare with is the layer's own zeros' share
        s_fit = target_sparsity if cfg.gated else natural[-1]
        tensors[f"freq.{i}"] = cal.frequencies(abs_a, thr)
        t0 = time.perf_counter()
        if kind == "threshold":
            score = cal.gate_scores(xt, w, cfg.activation)
            cut = cal.cutoff_table(score, seed)
            k_t = store.grid_index(s_fit)
            score_v = cal.gate_scores(xv, w, cfg.activation)
            q = cal.selection_quality(score_v, float(cut[k_t]), abs_av, thr)
            rep = {**q, "rank": None}
        else:
            m, cut, rep = lowrank.fit(xt, abs_a, xv, abs_av, thr, s_fit,
                                      w["gate"] if cfg.gated else w["up"], None if cfg.gated else w["up_bias"],
                                      recall_target, seed + i, (rank,) if rank else lowrank.RANKS, act=cfg.activation)
            tensors[f"A.{i}"] = m.A.numpy().astype(np.float16)
            tensors[f"B.{i}"] = m.B.numpy().astype(np.float16)
            tensors[f"bias.{i}"] = m.bias.numpy().astype(np.float32)
            score, score_v = m.scores(xt), m.scores(xv)
        tensors[f"cutoffs.{i}"] = cut
        tensors[f"lost.{i}"] = cal.mass_lost(score_v, abs_av, cut)
        del score_v
        tensors[f"keep.{i}"] = cal.keep_frequencies(score, cut)
        tensors[f"wread.{i}"], tensors[f"wocc.{i}"] = cal.window_statistics(score, cut, WINDOW, store.WINDOW_STATS_K)
        coact_scores.append(score[sample].half())
        del score
        layers.append({"layer": i, "threshold": thr, "fit_s": time.perf_counter() - t0, **rep})
        log.info("layer %d: %s", i, {k: v for k, v in layers[-1].items() if k != "tried"})
        bar.update(1)
    bar.close()
    floor = float(np.mean(natural)) if not cfg.gated else 0.0
    meta = {"target_sparsity": target_sparsity, "recall_target": recall_target, "seed": seed,
            "corpus": [str(p) for p in corpus] if corpus else "stdlib:" + ",".join(CALIBRATION_MODULES),
            "train_tokens": n_train, "val_tokens": sum(len(w) for w in val_w),
            "natural_sparsity": float(np.mean(natural)), "layers": layers,
            "max_ppl_increase": max_ppl_increase, "window_stats_k": store.WINDOW_STATS_K,
            "neuron_order": store.neuron_order(bundle.manifest), "exact_val_perplexity": float(np.exp(exact_nll / n_tok))}
    sel = PredictorSelector(bundle, kind, sparsity=0.0, tensors=tensors, meta={**meta, "default_sparsity": 0.0})
    _time_layers(sel, layers, val_w[0][:1], eng)
    meta["default_sparsity"], meta["default_curve"] = _choose_default(
        eng, sel, val_w, meta["exact_val_perplexity"], max_ppl_increase, round(floor, 2))
    sel.shares = "layer"                      # the same search with per-layer shares of the sparsity
    meta["layer_default_sparsity"], meta["layer_default_curve"] = _choose_default(
        eng, sel, val_w, meta["exact_val_perplexity"], max_ppl_increase, round(floor, 2))
    sel.set_sparsity(meta["layer_default_sparsity"])
    meta["layer_sparsities"] = [float(v) for v in sel.layer_sparsity]
    for i in range(cfg.n_layers):        # co-activation at the default sparsity: what reorder follows
        c = float(np.interp(meta["default_sparsity"], store.GRID, tensors[f"cutoffs.{i}"]))
        tensors[f"coact.{i}"], tensors[f"coact_w.{i}"] = cal.coactivation(coact_scores[i].float() > c)
        coact_scores[i] = None
    meta["coact_sparsity"] = meta["default_sparsity"]
    meta["calibrate_s"] = time.perf_counter() - t_start
    path = store.save(bundle.path, kind, tensors, meta)
    eng.close()
    return {"path": str(path), "kind": kind, **meta}


def _time_layers(sel: PredictorSelector, layers: list[dict], ids: list[int], eng: Engine, reps: int = 20) -> None:
    """Each layer's predictor time for one decode token (median of ``reps``), into its report."""
    x = embed_rows(eng.weights["embed"], torch.tensor(ids))               # [1, d]; any input will do
    with torch.inference_mode():
        for i, rep in enumerate(layers):
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                sel.scores(i, x)
                ts.append(time.perf_counter() - t0)
            rep["predict_ms"] = 1000 * float(np.median(ts))


def _bar(enabled: bool, total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False)
