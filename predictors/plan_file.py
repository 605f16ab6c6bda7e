"""A bundle's stored placement: ``placement.safetensors``, written by ``flashinfer-local plan``.

Tensors: ``tier.{l}`` int8 [d_ff] (``placement.TIERS`` codes: 0 stream, 1 window, 2 pinned in DRAM,
3 on the device) and ``window_rows`` int32 [n_layers] (rows planned for the window beside the
pinned ones). The JSON header entry ``placement`` carries what it was solved for (budget, device,
selector, sparsity, window), the cost model, the figures (objective, greedy objective, solve time,
predicted tokens/s, per-layer counts) and what it depends on: the bundle's FFN file (its sha256
from the manifest), the order of its neurons (``neuron_order``) and the predictor whose keep
frequencies it used (that file's checksum). A plan whose dependencies changed is refused, with the
command that makes a new one. Written atomically, like the predictor files.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

from storage import format as fmt
from storage.errors import BundleError

from .placement import TIERS, Placement
from .store import data_sha256, neuron_order, predictor_path, read_meta, save_atomic

FILE = "placement.safetensors"
DEVICES = ("none", "cpu", "cuda", "mps")
FORMAT_VERSION = 1


def plan_path(bundle_dir: Path) -> Path:
    return Path(bundle_dir) / FILE


def bundle_identity(manifest: dict) -> dict:
    """What a plan (or a predictor) of this bundle depends on: the FFN file and the neuron order."""
    return {"ffn_sha256": manifest["files"][fmt.FFN_FILE]["sha256"],
            "neuron_order": neuron_order(manifest)}


def predictor_identity(bundle_dir: Path, kind: str | None) -> str | None:
    """The checksum of the predictor file a plan used (None: none used)."""
    if kind is None:
        return None
    meta = read_meta(bundle_dir, kind)
    return None if meta is None else meta.get("data_sha256")


def save(bundle_dir: Path, manifest: dict, plan: Placement, meta: dict) -> Path:
    tensors = {f"tier.{i}": t.astype(np.int8) for i, t in enumerate(plan.tiers)}
    tensors["window_rows"] = np.asarray(plan.window_rows, np.int32)
    return save_atomic(plan_path(bundle_dir), tensors, "placement",
                       {"format_version": FORMAT_VERSION, **bundle_identity(manifest), **meta})


def read_meta_of(bundle_dir: Path) -> dict | None:
    """The plan's JSON header (None when there is none or it is unreadable)."""
    try:
        with safe_open(str(plan_path(bundle_dir)), framework="numpy") as f:
            return json.loads((f.metadata() or {})["placement"])
    except Exception:    # noqa: BLE001 - absent or broken: inspect says so, load raises
        return None


def load(bundle_dir: Path, manifest: dict, n_layers: int, d_ff: int) -> tuple[list[np.ndarray], list[int], dict]:
    """(tiers per layer, window rows per layer, meta) of the stored plan, checked: readable,
    this format, its tensors intact and shaped for the model, made for this bundle's FFN records and
    neuron order and with the predictor file the bundle has now."""
    path = plan_path(bundle_dir)
    again = f"; run flashinfer-local plan {bundle_dir} again (or run with --placement none)"
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {})["placement"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:   # noqa: BLE001 - OSError, KeyError, JSON and safetensors' own errors
        raise BundleError(f"{path}: unreadable placement file ({e})" + again) from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: placement format version {str(meta.get('format_version') if isinstance(meta, dict) else meta)[:20]}, "
                          f"this version reads {FORMAT_VERSION}" + again)
    if meta.get("device") not in DEVICES or not isinstance(meta.get("dram_budget", 0), (int, type(None))) \
            or not isinstance(meta.get("solver", ""), str) or not isinstance(meta.get("predictor"), (str, type(None))):
        raise BundleError(f"{path}: malformed placement header (device, dram_budget, solver or predictor)" + again)
    if meta.get("data_sha256") != data_sha256(tensors):
        raise BundleError(f"{path}: damaged (its tensors do not match their checksum)" + again)
    ident = bundle_identity(manifest)
    if meta.get("ffn_sha256") != ident["ffn_sha256"] or meta.get("neuron_order") != ident["neuron_order"]:
        raise BundleError(f"{path}: stale: made for other FFN records or another neuron order than this "
                          "bundle's" + again)
    kind = meta.get("predictor")
    if kind is not None and meta.get("predictor_sha256") != predictor_identity(bundle_dir, kind):
        have = "a recalibrated" if predictor_path(bundle_dir, kind).exists() else "no"
        raise BundleError(f"{path}: stale: made with the {kind} predictor's frequencies, and the bundle now has "
                          f"{have} {kind} predictor" + again)
    tiers = []
    for i in range(n_layers):
        t = tensors.get(f"tier.{i}")
        if t is None or t.shape != (d_ff,) or t.dtype != np.int8 or t.min() < 0 or t.max() >= len(TIERS):
            raise BundleError(f"{path}: tensor tier.{i} missing or malformed" + again)
        tiers.append(t)
    rows = tensors.get("window_rows")
    if rows is None or rows.shape != (n_layers,) or (rows < 0).any() or (rows > d_ff).any():
        raise BundleError(f"{path}: tensor window_rows missing or malformed" + again)
    return tiers, [int(r) for r in rows], meta
