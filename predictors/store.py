"""Predictor files inside a bundle: ``predictor-<kind>.safetensors``, one per kind.

Tensors (per layer l; shapes in comments below), plus a JSON header entry ``predictor`` with the
format version, the kind, the calibration facts (corpus, tokens, seed, target sparsity) and the
per-layer report (rank, recall, precision). A file is written to a temporary name in the bundle
directory, flushed and renamed over the old one, so an interrupted calibrate leaves the bundle as it
was. The bundle's manifest does not list these files: a bundle without them is complete.

    freq.{l}        f32 [d_ff]       share of calibration tokens on which neuron j was active (|a| above
                                     the layer's threshold at the target sparsity): the placement input
    keep.{l}        f16 [len(KEEP_GRID), d_ff]  share of calibration tokens on which the run-time
                                     selector keeps neuron j at each sparsity of KEEP_GRID (placement plans
                                     with the row of the sparsity it runs at; files before it have none)
    wread.{l}, wocc.{l}  f16 [len(KEEP_GRID), d_ff]  in a recency window of WINDOW_STATS_K tokens:
                                     share of tokens on which neuron j is a window miss / holds a row
    coact.{l}, coact_w.{l}  int32 / f16 [d_ff, 16]  each neuron's most co-active neighbours at the
                                     default sparsity and their Jaccard weights (what reorder follows)
    lost.{l}        f32 [len(KEEP_GRID)]  share of the validation activation mass the neurons dropped at
                                     each sparsity carry (how ``layer_shares`` spreads a sparsity)
    cutoffs.{l}     f32 [len(GRID)]  score quantiles of layer l at each sparsity of GRID: a token keeps
                                     neuron j when score_j > cutoff(sparsity)
    A.{l}, B.{l}    f16 [r_l, d], [d_ff, r_l]   (lowrank) score = B (A x) + bias
    bias.{l}        f32 [d_ff]       (lowrank)
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from storage.config import ModelConfig
from storage.errors import BundleError, FlashinferError, OptionError

FORMAT_VERSION = 1
KINDS = ("threshold", "lowrank")
GRID = np.round(np.arange(0, 100) / 100, 2)       # sparsities with a stored cutoff: 0.00 .. 0.99
KEEP_GRID = GRID[::5]                              # sparsities with stored keep frequencies: 0.00 .. 0.95
WINDOW_STATS_K = 4                                 # the recency window wread/wocc are measured for


def grid_index(sparsity: float) -> int:
    """Index of the largest stored sparsity at or below ``sparsity``."""
    return int(np.clip(np.floor(sparsity * 100 + 1e-6), 0, len(GRID) - 1))


def predictor_path(bundle_dir: Path, kind: str) -> Path:
    if kind not in KINDS:
        raise OptionError("predictor", f"{kind} is not known (choose {' or '.join(KINDS)})")
    return Path(bundle_dir) / f"predictor-{kind}.safetensors"


def available(bundle_dir: Path) -> list[str]:
    """Kinds calibrated for this bundle, threshold first: lowrank's calibrated default is 0.00 on the
    SwiGLU models measured (README, Predictors), so threshold is the one that helps."""
    return [k for k in KINDS if predictor_path(bundle_dir, k).exists()]


def _hash_tensor(h, name: str, a: np.ndarray) -> None:
    a = np.ascontiguousarray(a)
    h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
    h.update(memoryview(a).cast("B"))


def data_sha256(tensors: dict[str, np.ndarray]) -> str:
    """One sha256 over every tensor (name, dtype, shape, bytes, in name order): stored in the header
    by ``save`` and checked by ``load``, so damaged predictor bytes are an error, not a different
    selection of neurons."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        _hash_tensor(h, k, tensors[k])
    return h.hexdigest()


# What a PredictorSelector holds (the rest of a file is calibration statistics for plan and reorder)
SELECTOR_TENSORS = ("cutoffs", "lost", "A", "B", "bias")


def _wanted(name: str, only: tuple[str, ...] | None) -> bool:
    return only is None or name.split(".")[0] in only


def save(bundle_dir: Path, kind: str, tensors: dict[str, np.ndarray], meta: dict) -> Path:
    path = predictor_path(bundle_dir, kind)
    return save_atomic(path, tensors, "predictor", {"format_version": FORMAT_VERSION, "kind": kind, **meta})


def save_atomic(path: Path, tensors: dict[str, np.ndarray], key: str, meta: dict) -> Path:
    """Write a safetensors file with ``meta`` (and the tensors' checksum) as the JSON header entry
    ``key``, atomically: temporary file in the same directory, fsync, rename, fsync the directory."""
    header = {key: json.dumps({**meta, "data_sha256": data_sha256(tensors)})}
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=header)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        raise FlashinferError(f"cannot write {path}: {e.strerror or e}; check the folder's permissions and free "
                              "space (the old file, if any, is unchanged)") from None
    finally:                     # after the rename there is nothing left under the temporary name
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


def neuron_order(manifest: dict) -> str:
    """The bundle's neuron order id (``reorder`` sets one; a converted bundle's is "original")."""
    return manifest.get("neuron_order", "original")


def load(bundle_dir: Path, kind: str, cfg: ModelConfig, order: str | None = None,
         only: tuple[str, ...] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, meta) of a bundle's predictor, checked against the model's shapes and (``order``:
    the bundle's ``neuron_order``) made for the bundle's order of neurons. ``only``: keep just the
    tensors of these names (``SELECTOR_TENSORS``); every tensor is still read once for the
    checksum, one at a time."""
    path = predictor_path(bundle_dir, kind)
    if not path.exists():
        have = available(bundle_dir)
        raise FlashinferError(f"{bundle_dir} has no {kind} predictor"
                              + (f" (it has: {', '.join(have)})" if have else "")
                              + f"; run: flashinfer-local calibrate {bundle_dir} --predictor {kind}")
    try:
        h, tensors = hashlib.sha256(), {}
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {})["predictor"])
            for k in sorted(f.keys()):
                t = f.get_tensor(k)
                _hash_tensor(h, k, t)
                if _wanted(k, only):
                    tensors[k] = t
    except Exception as e:        # noqa: BLE001 - OSError, KeyError, JSON and safetensors' own errors
        raise BundleError(f"{path}: unreadable predictor file ({e}); re-run calibrate") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        v = meta.get("format_version") if isinstance(meta, dict) else meta
        raise BundleError(f"{path}: predictor format version {str(v)[:20]}, this version "
                          f"reads {FORMAT_VERSION}; re-run calibrate")
    want_sum = meta.get("data_sha256")
    if want_sum is not None and want_sum != h.hexdigest():   # (files before the checksum have none)
        raise BundleError(f"{path}: damaged (its tensors do not match their checksum); re-run calibrate")
    if order is not None and meta.get("neuron_order", "original") != order:
        raise BundleError(f"{path}: stale: calibrated for another order of the FFN neurons than the bundle's "
                          f"(the bundle was reordered since); re-run calibrate")
    want = {"freq": (cfg.d_ff,), "cutoffs": (len(GRID),)}
    if kind == "lowrank":
        want["bias"] = (cfg.d_ff,)
    want = {k: v for k, v in want.items() if _wanted(k, only)}
    for layer in range(cfg.n_layers):
        for name, shape in want.items():
            t = tensors.get(f"{name}.{layer}")
            if t is None or t.shape != shape:
                raise BundleError(f"{path}: tensor {name}.{layer} missing or misshapen (want {shape}); "
                                  "re-run calibrate")
        lost = tensors.get(f"lost.{layer}")
        if lost is not None and lost.shape != (len(KEEP_GRID),):
            raise BundleError(f"{path}: tensor lost.{layer} misshapen; re-run calibrate")
        for name in ("keep", "wread", "wocc"):
            t = tensors.get(f"{name}.{layer}")
            if t is not None and t.shape != (len(KEEP_GRID), cfg.d_ff):
                raise BundleError(f"{path}: tensor {name}.{layer} misshapen; re-run calibrate")
        ids = tensors.get(f"coact.{layer}")
        if ids is not None and (ids.ndim != 2 or ids.shape[0] != cfg.d_ff or ids.min() < 0 or ids.max() >= cfg.d_ff):
            raise BundleError(f"{path}: tensor coact.{layer} malformed; re-run calibrate")
        if kind == "lowrank" and _wanted("A", only):
            a, b = tensors.get(f"A.{layer}"), tensors.get(f"B.{layer}")
            if a is None or b is None or a.shape[1] != cfg.d_model or b.shape != (cfg.d_ff, a.shape[0]):
                raise BundleError(f"{path}: low-rank factors of layer {layer} missing or misshapen; "
                                  "re-run calibrate")
    return tensors, meta


def read_meta(bundle_dir: Path, kind: str) -> dict | None:
    """The JSON header of a stored predictor (None when there is none or it is unreadable)."""
    path = predictor_path(bundle_dir, kind)
    try:
        with safe_open(str(path), framework="numpy") as f:
            return json.loads((f.metadata() or {})["predictor"])
    except Exception:   # noqa: BLE001 - absent or broken: inspect just says so
        return None


def file_tensor_bytes(bundle_dir: Path, kind: str, only: tuple[str, ...] | None = SELECTOR_TENSORS) -> int:
    """Bytes the predictor's tensors (``only`` these names) take once loaded, from the file's header."""
    path = predictor_path(bundle_dir, kind)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(min(n, 100 << 20)))
        return sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items()
                   if k != "__metadata__" and _wanted(k, only))
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return 0               # unreadable: loading it says what is wrong, in one line
