"""``plan --reorder``: renumber each layer's FFN neurons so that reads are long, and rewrite the bundle.

The new order of a layer: its device-pinned neurons, then its DRAM-pinned ones (one contiguous
run: read once, sequentially), then the rest along a path that keeps co-active neurons adjacent
(``coact``: Ripple-style, from the hottest unvisited neuron to its most co-active unvisited
neighbour, calibrate's ``coact`` statistics; ``frequency``: by keep frequency, the baseline).

Everything indexed by neuron is rewritten consistently: the FFN records, every predictor file's
per-neuron tensors (frequencies, keep and window statistics, low-rank rows, co-activation ids), and
the placement's tiers. The manifest gets a new ``neuron_order`` id, which predictor and plan files
carry and are checked against. The new bundle is built beside the old one (files not rewritten are
hard links) and swapped in as ``convert`` does, so an interrupted reorder leaves the bundle as it was.
The model computes the same function: only the order of the FFN's sums changes (float rounding).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from predictors import plan_file, store
from predictors.placement import DEVICE, PINNED, Placement
from storage import format as fmt
from storage import validate
from storage.convert import build_beside, ffn_specs, progress_bar, remove_stale
from storage.errors import FlashinferError, OptionError
from storage.reader import Bundle
from storage.st_writer import SafetensorsWriter

METHODS = ("coact", "frequency")


def coact_path(ids: np.ndarray, keep: np.ndarray, nbrs: np.ndarray | None) -> np.ndarray:
    """``ids`` in path order: from the hottest unvisited, to its most co-active unvisited neighbour
    among ``ids`` (rows of ``nbrs`` [d_ff, k], strongest first), else the next hottest unvisited."""
    by_heat = ids[np.argsort(-keep[ids], kind="stable")]
    if nbrs is None:
        return by_heat
    free = np.zeros(len(keep), bool)               # among ids and not yet on the path
    free[ids] = True
    out, cursor, cur = [], 0, -1
    while len(out) < len(ids):
        nxt = next((int(j) for j in nbrs[cur] if free[j]), -1) if cur >= 0 else -1
        if nxt < 0:
            while not free[by_heat[cursor]]:
                cursor += 1
            nxt = int(by_heat[cursor])
        free[nxt] = False
        out.append(nxt)
        cur = nxt
    return np.asarray(out, np.int64)


def layer_order(tiers: np.ndarray, keep: np.ndarray, nbrs: np.ndarray | None, method: str) -> np.ndarray:
    """New position -> old id of one layer: device, pinned, then the rest (``method``)."""
    def hot(sel):
        ids = np.flatnonzero(sel)
        return ids[np.argsort(-keep[ids], kind="stable")]
    rest = np.flatnonzero((tiers != DEVICE) & (tiers != PINNED))
    tail = coact_path(rest, keep, nbrs if method == "coact" else None)
    return np.concatenate([hot(tiers == DEVICE), hot(tiers == PINNED), tail]).astype(np.int64)


def order_id(previous: str, perms: list[np.ndarray]) -> str:
    h = hashlib.sha256(previous.encode())
    for p in perms:
        h.update(p.astype(np.int64).tobytes())
    return h.hexdigest()[:16]


def permute_predictor(tensors: dict, perms: list[np.ndarray]) -> dict:
    """A predictor's tensors with every per-neuron axis in the new order (``perms``: new -> old)."""
    out = dict(tensors)
    for i, perm in enumerate(perms):
        inv = np.empty_like(perm)
        inv[perm] = np.arange(len(perm))
        for name in ("freq", "bias", "B", "coact_w"):
            if f"{name}.{i}" in out:
                out[f"{name}.{i}"] = np.ascontiguousarray(out[f"{name}.{i}"][perm])
        for name in ("keep", "wread", "wocc"):
            if f"{name}.{i}" in out:
                out[f"{name}.{i}"] = np.ascontiguousarray(out[f"{name}.{i}"][:, perm])
        if f"coact.{i}" in out:
            out[f"coact.{i}"] = inv[out[f"coact.{i}"][perm]].astype(np.int32)
    return out


def reorder(path: str | Path, placement: Placement, plan_meta: dict, keep: list[np.ndarray],
            method: str = "coact", say=lambda msg: None) -> tuple[dict, list[np.ndarray]]:
    """Renumber the neurons of the bundle at ``path`` for ``placement`` (solved on its current order)
    and store the placement in the new order; returns (facts about the new order, per layer the
    permutation: new position -> old id)."""
    if method not in METHODS:
        raise OptionError("reorder", f"{method} is not known (choose {', '.join(METHODS)})")
    out = Path(path).absolute()
    remove_stale(out)
    with contextlib.closing(Bundle(out)) as b:
        cfg, old_order = b.config, store.neuron_order(b.manifest)
        preds = {k: store.load(out, k, cfg, old_order) for k in store.available(out)}
        nbrs = None
        for tensors, _ in preds.values():
            if "coact.0" in tensors:
                nbrs = [tensors[f"coact.{i}"] for i in range(cfg.n_layers)]
                break
        if method == "coact" and nbrs is None:
            raise FlashinferError(f"{out}'s predictor has no co-activation statistics (calibrated by an older "
                                  f"version); run: flashinfer-local calibrate {out}, or --reorder frequency")
        perms = [layer_order(t, k.astype(np.float64), None if nbrs is None else nbrs[i], method)
                 for i, (t, k) in enumerate(zip(placement.tiers, keep))]
        new_order = order_id(old_order, perms)
        build_beside(out, lambda tmp: _write(b, tmp, perms, new_order, preds, placement, plan_meta, say),
                     f"disk full while reordering {out}; free some space (the bundle is as it was)",
                     f"cannot reorder {out} (the bundle is as it was)")
    return {"method": method, "neuron_order": new_order, "previous_order": old_order}, perms


def _write(b: Bundle, tmp: Path, perms, new_order: str, preds: dict, placement: Placement, plan_meta: dict,
           say) -> None:
    cfg, lay = b.config, b.layout
    specs = ffn_specs(cfg, lay)
    need = sum(int(np.prod(s)) * np.dtype(d).itemsize for _, d, s in specs)
    dense = b.manifest["files"][fmt.DENSE_FILE]["bytes"] if b.gate_split else 0    # rewritten too: its gate rows
    free = shutil.disk_usage(tmp).free
    if free < need + dense + (64 << 20):
        what = "the FFN file needs" + (" (and the dense file, for its gate rows)" if dense else "")
        raise FlashinferError(f"not enough disk space to reorder {b.path}: {what} {(need + dense) / 2**30:.2f}GiB "
                              f"plus a 64MiB margin, {free / 2**30:.2f}GiB is free")
    say(f"rewriting the FFN records in the new order ({need / 2**30:.2f}GiB) ...")
    w = SafetensorsWriter(tmp / fmt.FFN_FILE, specs)
    try:
        with progress_bar(need, sys.stderr.isatty(), "reorder") as bar:
            for name, dt, shape in specs:
                if name.endswith("_pad"):
                    w.write(name, np.zeros(shape, np.uint8))
                    continue
                layer = int(name.split(".")[1])
                w.write(name, np.ascontiguousarray(b.read_ffn_layer(layer)[perms[layer]]))
                bar.update(int(np.prod(shape)) * np.dtype(dt).itemsize)
        info = w.close()
    finally:
        w.abort()
    dense_info = None
    if dense:
        say(f"rewriting the dense file with its gate rows in the new order ({dense / 2**30:.2f}GiB) ...")
        dense_info = _write_dense(b, tmp, perms)
    rewritten = {fmt.FFN_FILE, fmt.MANIFEST, fmt.MANIFEST_SUM, plan_file.FILE} | \
        {store.predictor_path(b.path, k).name for k in store.KINDS} | ({fmt.DENSE_FILE} if dense_info else set())
    for f in b.path.iterdir():                     # everything else as it is: hard links
        if f.is_file() and f.name not in rewritten and not f.name.startswith("."):
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
    m = json.loads(json.dumps(b.manifest))
    m["files"][fmt.FFN_FILE] = info
    if dense_info:
        m["files"][fmt.DENSE_FILE] = dense_info
    m["neuron_order"] = new_order
    raw = json.dumps(m, indent=1).encode()
    (tmp / fmt.MANIFEST).write_bytes(raw)
    (tmp / fmt.MANIFEST_SUM).write_text(f"{validate.sha256_hex(raw)}  {fmt.MANIFEST}\n")
    pred_sha = {}
    for kind, (tensors, meta) in preds.items():
        t = permute_predictor(tensors, perms)
        store.save_atomic(tmp / store.predictor_path(b.path, kind).name, t, "predictor",
                          {**meta, "neuron_order": new_order})
        pred_sha[kind] = store.data_sha256(t)
    tiers = [t[p] for t, p in zip(placement.tiers, perms)]
    moved = Placement(tiers, placement.window_rows, placement.objective_s, placement.layer_s, placement.solver,
                      placement.solve_s, placement.info)
    meta = {**plan_meta, "predictor_sha256": pred_sha.get(plan_meta.get("predictor"))}
    plan_file.save(tmp, m, moved, meta)


def _write_dense(b: Bundle, tmp: Path, perms) -> dict:
    """A gate-split bundle's dense file with each layer's gate rows (and their scales) in the new
    neuron order, every other tensor as it was; returns its manifest entry."""
    gates = {f"layers.{i}.gate": i for i in range(b.config.n_layers)}
    specs = b.dense_specs()
    w = SafetensorsWriter(tmp / fmt.DENSE_FILE, specs)
    try:
        for n, _, _ in specs:
            layer = gates.get(n.removesuffix(".scale"))
            a = b.dense(n)
            w.write(n, a if layer is None else np.ascontiguousarray(a[perms[layer]]))
        return w.close()
    finally:
        w.abort()
