"""Checkpoint -> bundle conversion, streamed tensor by tensor.

Peak memory is about one dequantized tensor (or one layer's gate/up/down) plus its converted copy,
never the whole model. Everything is written into a hidden temporary directory beside ``out`` that is
renamed into place only when complete, so an interrupted or failed convert leaves no bundle at
``out`` and never touches an existing one (``force`` swaps it out only after the new one is done).
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from . import format as fmt
from . import validate
from . import quant
from .config import ModelConfig
from .errors import CheckpointError, FlashinferError, OptionError
from .source import Source, open_source
from .st_writer import SafetensorsWriter

log = logging.getLogger(__name__)

SMALL = ("norm.weight", "norm.bias", ".bias", "down_bias")  # kept f32: tiny, precision-sensitive


def dense_dtype(dtype: str) -> str:
    """Precision of the dense part for a bundle whose records are ``dtype`` (quantized: f16)."""
    return dtype if dtype in fmt.DTYPES else "f16"


def dense_specs(cfg: ModelConfig, dtype: "str | fmt.Precision",
                low_codes=lambda name: None) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every dense tensor, derived from the config, the ``convert --dtype``
    name (or its Precision) and the codes of what the checkpoint stores (``low_codes``,
    ``format.dense_matrix_dtypes``)."""
    precision = fmt.Precision.named(dtype)
    big = np.dtype(fmt.DTYPES[dense_dtype(precision.ffn)])
    quantized = fmt.dense_matrix_dtypes(cfg, precision, fmt.FORMAT_VERSION, low_codes)
    specs = []
    for name in fmt.dense_tensor_names(cfg, precision.gate_split):
        shape = fmt.dense_shape(cfg, name)
        if name in quantized:
            specs += fmt.quantized_matrix_specs(name, shape, quantized[name])
        else:
            specs.append((name, np.dtype(np.float32) if name.endswith(SMALL) else big, shape))
    return specs


def quantize_rows_q8(a: np.ndarray, rows: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """quant.quantize_q8 of a [out, in] matrix a few thousand rows at a time (bounded scratch)."""
    q = np.empty(a.shape, np.int8)
    s = np.empty((a.shape[0], a.shape[1] // quant.GROUP), np.float16)
    for r in range(0, a.shape[0], rows):
        q[r:r + rows], s[r:r + rows] = quant.quantize_q8(a[r:r + rows])
    return q, s


def quantize_rows_q4(a: np.ndarray, rows: int = 4096, kind: str = "q4") -> tuple[np.ndarray, np.ndarray]:
    """quant.quantize_q4 (``kind`` q5: quantize_q5) of a [out, in] matrix -> (codes [out, in / 2],
    q5: [out, 5 in / 8]; scales then minimums [out, in / 16]): the layout of a q4 or q5 dense matrix
    (``format.dense_matrix_dtypes``)."""
    ng = a.shape[1] // quant.GROUP
    q = np.empty((a.shape[0], a.shape[1] // 2 if kind == "q4" else 5 * a.shape[1] // 8), np.uint8)
    s = np.empty((a.shape[0], 2 * ng), np.float16)
    fit = quant.quantize_q4 if kind == "q4" else quant.quantize_q5
    for r in range(0, a.shape[0], rows):
        q[r:r + rows], s[r:r + rows, :ng], s[r:r + rows, ng:] = fit(a[r:r + rows])
    return q, s


def ffn_specs(cfg: ModelConfig, layout: fmt.RecordLayout) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """Per layer the U8 record tensor, plus a pad tensor where needed to keep 4 KiB alignment."""
    specs = []
    for i in range(cfg.n_layers):
        specs.append((fmt.ffn_tensor_name(i), np.dtype(np.uint8), (cfg.d_ff, layout.record_bytes)))
        gap = (-cfg.d_ff * layout.record_bytes) % fmt.TENSOR_ALIGN
        if gap and i + 1 < cfg.n_layers:
            specs.append((f"layers.{i}.ffn_pad", np.dtype(np.uint8), (gap,)))
    return specs


def build_records(cfg: ModelConfig, layout: fmt.RecordLayout, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """Assemble one layer's records [d_ff, record_bytes] (U8) from its canonical FFN tensors.

    tensors: "gate"/"up" [d_ff, d], "down" [d, d_ff] (transposed here: neuron i is column i),
    "up_bias" [d_ff].
    """
    rec = np.zeros((cfg.d_ff, layout.record_bytes), np.uint8)
    fields = {f.name: f for f in layout.fields}

    def put(name: str, a: np.ndarray) -> None:
        f = fields[name]
        rec[:, f.offset:f.offset + f.nbytes] = np.ascontiguousarray(a).view(np.uint8).reshape(cfg.d_ff, -1)
    for name, f in fields.items():
        if "." in name:
            continue                             # scales/minimums: written with their vector
        src = tensors[name].T if name == "down" else tensors[name]
        src = src.reshape(cfg.d_ff, f.count)
        if f.dtype in fmt.DTYPES:
            put(name, src.astype(fmt.DTYPES[f.dtype]))
        elif f.dtype == "q8":
            q, sc = quant.quantize_q8(src)
            put(name, q)
            put(name + ".scale", sc)
        else:
            q, sc, mn = (quant.quantize_q5 if f.dtype == "q5" else quant.quantize_q4)(src)
            put(name, q)
            put(name + ".scale", sc)
            put(name + ".min", mn)
    return rec


def _check_shape(src: Source, name: str, a: np.ndarray, shape: tuple) -> np.ndarray:
    if tuple(a.shape) != tuple(shape):
        raise CheckpointError(f"{src.identity['path']}: tensor '{name}' has shape {tuple(a.shape)}, "
                              f"the config implies {tuple(shape)}")
    return a


def _ffn_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    return {"gate": (cfg.d_ff, cfg.d_model), "up": (cfg.d_ff, cfg.d_model),
            "down": (cfg.d_model, cfg.d_ff), "up_bias": (cfg.d_ff,)}


def progress_bar(total: int, enabled: bool, desc: str):
    """A byte-counting progress bar on stderr (``enabled``: usually whether stderr is a terminal)."""
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=not enabled, leave=False)


def _write_bundle(src: Source, tmp: Path, dtype: str, progress: bool) -> None:
    cfg = src.config
    precision = fmt.Precision.named(dtype)
    try:
        layout = fmt.record_layout(cfg, precision.ffn, precision.down, precision.gate_up, precision.gate_split)
    except ValueError as e:
        raise FlashinferError(str(e)) from None
    dspecs, fspecs = dense_specs(cfg, precision, src.low_codes), ffn_specs(cfg, layout)
    need = sum(int(np.prod(s)) * d.itemsize for _, d, s in dspecs + fspecs)
    free = shutil.disk_usage(tmp).free
    if free < need + (64 << 20):
        raise FlashinferError(f"not enough disk space in {tmp.parent}: the bundle needs "
                              f"{need / 2**30:.2f}GiB plus a 64MiB margin, {free / 2**30:.2f}GiB is free; "
                              "free some space or choose another OUT")
    files = {}
    with progress_bar(need, progress, "convert") as bar:
        w = SafetensorsWriter(tmp / fmt.DENSE_FILE, dspecs)
        quantized = fmt.dense_matrix_dtypes(cfg, precision, fmt.FORMAT_VERSION, src.low_codes)
        try:
            for name, dt, shape in dspecs:
                if name.endswith(".scale"):
                    continue                     # written right after its matrix
                if name == "lm_head" and not src.has("lm_head"):
                    raise CheckpointError(f"{src.identity['path']}: the head ('lm_head') is missing")
                want = fmt.dense_shape(cfg, name) if name in quantized else shape    # codes: packed
                a = _check_shape(src, name, src.load(name), want)
                if name in quantized:
                    a = np.asarray(a, np.float32)
                    kind = quantized[name]
                    q, sc = quantize_rows_q8(a) if kind == "q8" else quantize_rows_q4(a, kind=kind)
                    w.write(name, q)
                    w.write(name + ".scale", sc)
                    bar.update(q.nbytes + sc.nbytes)
                    del q, sc
                else:
                    w.write(name, a.astype(dt, copy=False))
                    bar.update(a.size * dt.itemsize)
                del a
            files[fmt.DENSE_FILE] = w.close()
        finally:
            w.abort()
        w = SafetensorsWriter(tmp / fmt.FFN_FILE, fspecs)
        try:
            shapes = _ffn_shapes(cfg)
            for name, dt, shape in fspecs:
                if name.endswith("_pad"):
                    w.write(name, np.zeros(shape, np.uint8))
                    continue
                layer = int(name.split(".")[1])
                parts = {}
                for full in fmt.ffn_source_names(cfg, layer, layout.gate_split):
                    leaf = full.rsplit(".", 1)[-1]
                    parts[leaf] = _check_shape(src, full, src.load(full), shapes[leaf])
                rec = build_records(cfg, layout, parts)
                del parts
                w.write(name, rec)
                bar.update(rec.nbytes)
            files[fmt.FFN_FILE] = w.close()
        finally:
            w.abort()
    tok = src.tokenizer
    if tok.tokenizer_json is not None:
        data = tok.tokenizer_json.encode()
        (tmp / fmt.TOKENIZER_FILE).write_bytes(data)
        import hashlib
        files[fmt.TOKENIZER_FILE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    from . import __version__
    manifest = {
        "format": fmt.FORMAT_NAME,
        "format_version": fmt.FORMAT_VERSION,
        "created_by": f"flashinfer-local {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": src.identity,
        "config": cfg.to_dict(),
        "tokenizer": {"file": fmt.TOKENIZER_FILE if tok.tokenizer_json is not None else None,
                      "chat_template": tok.chat_template, "bos_token": tok.bos_token,
                      "eos_token": tok.eos_token, "add_bos": tok.add_bos},
        "precision": dtype if isinstance(dtype, str) and not precision.gate_split else vars(precision),
        "dense": {"file": fmt.DENSE_FILE, "dtype": dense_dtype(precision.ffn), "small_tensors_dtype": "f32",
                  "matrices": quantized},
        "ffn": {"file": fmt.FFN_FILE, "dtype": precision.ffn, "tensor": "layers.{i}.ffn",
                "n_neurons": cfg.d_ff, "layout": layout.to_dict()},
        "files": files,
    }
    raw = json.dumps(manifest, indent=1).encode()
    (tmp / fmt.MANIFEST).write_bytes(raw)
    (tmp / fmt.MANIFEST_SUM).write_text(f"{validate.sha256_hex(raw)}  {fmt.MANIFEST}\n")


def swap_bundle(tmp: Path, out: Path) -> None:
    """Put the complete bundle ``tmp`` at ``out``, replacing any old one, with Ctrl-C held off so the
    renames happen together (a kill between them is undone by the next convert: ``remove_stale``)."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if old.exists() and not out.exists():
            old.rename(out)                      # put the old bundle back
        raise
    finally:
        if main_thread:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def build_beside(out: Path, write, disk_full: str, failed: str) -> None:
    """Build a bundle with ``write(tmp)`` in a folder beside ``out`` and swap it in
    (``swap_bundle``); whatever happens (an error, Ctrl-C), nothing partial stays behind, and an
    OSError is one line: ``disk_full`` for a full disk, else ``failed: why``."""
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        swap_bundle(tmp, out)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise FlashinferError(disk_full) from None
        raise FlashinferError(f"{failed}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(out: Path) -> None:
    """Remove what an interrupted convert of ``out`` left beside it (``.OUT.partial-PID``,
    ``.OUT.old-PID`` of processes that are gone); an ``.old`` left where OUT itself is missing
    (killed between the two renames) is put back first."""
    for p in sorted(out.parent.glob(f".{out.name}.*-*")):
        kind, _, pid = p.name[len(out.name) + 2:].partition("-")
        if kind not in ("partial", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not out.exists() and (p / fmt.MANIFEST).exists():
            p.rename(out)
            log.warning("restored %s from an interrupted convert", out)
            continue
        shutil.rmtree(p, ignore_errors=True)
        log.warning("removed %s, left by an interrupted convert (process %s)", p, pid)


def _bytes_of(p: Path) -> int:
    try:
        return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.iterdir() if f.is_file())
    except OSError:
        return 0


def convert(src_path: str | Path | Source, out: str | Path, dtype: str | fmt.Precision = "f16",
            force: bool = False, progress: bool | None = None, gate_split: bool = False) -> Path:
    """Convert a checkpoint (HF folder or GGUF file, or an open :class:`Source`) into a bundle
    directory at ``out``; ``dtype`` a name of ``format.CONVERT_DTYPES`` (or a ``format.Precision``
    spelled out, for measurements). ``gate_split``: a gated model's gate rows as dense matrices
    (``format.gate_codes``), records of up and down only. ``progress``: a line at once and a bar on
    stderr (default: when stderr is a terminal)."""
    if progress is None:
        progress = sys.stderr.isatty()
    if not isinstance(dtype, fmt.Precision) and dtype not in fmt.CONVERT_DTYPES:
        raise OptionError("dtype", f"{dtype} is not supported (choose one of: {', '.join(fmt.CONVERT_DTYPES)})")
    if gate_split:
        dtype = dataclasses.replace(fmt.Precision.named(dtype), gate_split=True)
    out = Path(out).absolute()
    if out.parent.is_dir():
        remove_stale(out)
    if out.exists() and not force:
        raise FlashinferError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not (out / fmt.MANIFEST).exists() and any(out.iterdir()):
        raise FlashinferError(f"{out} exists and is not a bundle; refusing to replace it, choose another OUT")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FlashinferError(f"cannot create {out.parent}: {e.strerror or e}; choose another OUT") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise FlashinferError(f"cannot write into {out.parent} (not writable); choose another OUT")
    t0 = time.perf_counter()
    if progress and not isinstance(src_path, Source):      # opening a large GGUF takes seconds: say so first
        size = _bytes_of(Path(src_path))
        print(f"convert: reading {src_path} ({size / 2**30:.2f}GiB) into {out} ...", file=sys.stderr, flush=True)

    def write(tmp: Path) -> None:
        with (src_path if isinstance(src_path, Source) else open_source(src_path)) as src:
            _write_bundle(src, tmp, dtype, progress)
    build_beside(out, write, f"disk full while writing the bundle in {out.parent}; free some space and re-run "
                 "convert (nothing was written)", f"cannot write the bundle in {out.parent}")
    log.info("converted %s -> %s in %.1fs", src_path, out, time.perf_counter() - t0)
    return out
