"""The bundle format, version 2 (``FORMAT_VERSION``; version 1 is still read): the one place that
says what is on disk.

A bundle is a directory::

    manifest.json        format name + version, normalized config, tokenizer facts, record layout,
                         per-file sizes and sha256, source identity
    dense.safetensors    embeddings, attention, norms, head (typed tensors, memory-mapped at run time)
    ffn.safetensors      per layer one U8 tensor "layers.{i}.ffn" shaped [n_neurons, record_bytes]
    tokenizer.json       Hugging Face `tokenizers` file (absent for checkpoints without one)

FFN records: record ``i`` of layer ``l`` holds everything neuron ``i`` needs, as consecutive fields
(``RecordLayout.fields``): for gated models gate row i, up row i, down column i; for OPT up row i,
down column i and the up bias of neuron i. ``record_bytes`` is rounded up to a multiple of
``RECORD_ALIGN`` (512, the smallest direct-I/O unit) with zero padding at the record's end, and every
record tensor starts at a file offset that is a multiple of ``TENSOR_ALIGN`` (4 KiB): the safetensors
header is padded with spaces, and where one layer's tensor ends off a 4 KiB boundary a small U8
tensor "layers.{i}.ffn_pad" fills the gap (safetensors allows no holes). So a direct read of records
``[a, b)`` of layer ``l`` is one aligned span: ``offset(l) + a * record_bytes``.

Canonical dense tensor names (shapes in the HF orientation, ``out x in``)::

    embed [vocab, d]            final_norm.weight [d]      final_norm.bias [d] (opt)
    lm_head [vocab, d] (untied) pos_embed [max_pos + 2, d] (opt)
    layers.{i}.attn_norm.weight/bias   layers.{i}.ffn_norm.weight/bias (bias: opt)
    layers.{i}.q.weight [H*hd, d]  layers.{i}.k.weight [KV_i*hd, d]  layers.{i}.v.weight [KV_i*hd, d]
    layers.{i}.q/k/v.bias (qwen2, opt)   layers.{i}.o.weight [d, H*hd]  layers.{i}.o.bias (opt)
    layers.{i}.down_bias [d] (opt: fc2's bias is per output, not per neuron, so it is dense)

Canonical FFN source tensors (assembled into records by the converter)::

    layers.{i}.gate [d_ff, d]   layers.{i}.up [d_ff, d]   layers.{i}.down [d, d_ff]
    layers.{i}.up_bias [d_ff] (opt)

Extending the format: add a field to the manifest (readers ignore unknown keys) or a file to the
directory; bump ``FORMAT_VERSION`` only when an old reader would misread the bundle.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import BundleError

FORMAT_NAME = "flashinfer-local-bundle"
FORMAT_VERSION = 2
# versions this reader opens: 1 is 2 without the int8 tied embedding (see ``quantized_dense``)
READS_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
DENSE_FILE = "dense.safetensors"
FFN_FILE = "ffn.safetensors"
TOKENIZER_FILE = "tokenizer.json"
RECORD_ALIGN = 512
TENSOR_ALIGN = 4096

# dtype names used in the manifest -> numpy dtype, and the safetensors spelling
DTYPES = {"f32": np.float32, "f16": np.float16}
# what `convert --dtype` accepts: the FFN records' precision. int8/int4 records hold group-quantized
# vectors (storage.quant); such a bundle's dense matrices are int8 (``quantized_dense``), the rest f16.
FFN_DTYPES = ("f32", "f16", "int8", "int4")
FIELD_BITS = {"f32": 32, "f16": 16, "q8": 8, "q4": 4}
ST_DTYPE = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.uint8): "U8",
            np.dtype(np.int8): "I8", np.dtype(np.int32): "I32", np.dtype(np.int64): "I64"}
NP_DTYPE = {v: k for k, v in ST_DTYPE.items()}


def quantized_dense(cfg: ModelConfig, ffn_dtype: str, version: int = FORMAT_VERSION) -> list[str]:
    """Dense matrices an int8/int4 bundle stores as int8 codes (tensor ``name``, I8 [out, in]) plus
    f16 group scales (``name + ".scale"``, [out, in / 32]): the attention projections and the head,
    which is the embedding when the two are tied (from format version 2: read in full every token,
    it was the largest matrix left in f16). An untied embedding (only looked up), norms and biases
    keep their float precision."""
    if ffn_dtype in DTYPES:
        return []
    names = [f"layers.{i}.{m}.weight" for i in range(cfg.n_layers) for m in "qkvo"]
    if not cfg.tie_embeddings:
        return names + ["lm_head"]
    return names + (["embed"] if version >= 2 else [])


def ffn_tensor_name(layer: int) -> str:
    return f"layers.{layer}.ffn"


def dense_tensor_names(cfg: ModelConfig) -> list[str]:
    """Every dense tensor of a model, in the order the converter writes them."""
    names = ["embed"]
    if cfg.learned_positions:
        names.append("pos_embed")
    bias = cfg.norm == "layer"
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        names.append(p + "attn_norm.weight")
        if bias:
            names.append(p + "attn_norm.bias")
        for m in "qkv":
            names.append(p + f"{m}.weight")
            if cfg.attn_qkv_bias:
                names.append(p + f"{m}.bias")
        names.append(p + "o.weight")
        if cfg.attn_out_bias:
            names.append(p + "o.bias")
        names.append(p + "ffn_norm.weight")
        if bias:
            names.append(p + "ffn_norm.bias")
        if not cfg.gated:
            names.append(p + "down_bias")
    names.append("final_norm.weight")
    if bias:
        names.append("final_norm.bias")
    if not cfg.tie_embeddings:
        names.append("lm_head")
    return names


def ffn_source_names(cfg: ModelConfig, layer: int) -> list[str]:
    """Canonical source tensors one layer's FFN records are assembled from."""
    p = f"layers.{layer}."
    if cfg.gated:
        return [p + "gate", p + "up", p + "down"]
    return [p + "up", p + "down", p + "up_bias"]


@dataclass(frozen=True)
class Field:
    name: str      # gate | up | down | up_bias, or gate.scale / gate.min ... (quantized records)
    dtype: str     # a key of FIELD_BITS
    offset: int    # bytes from the start of the record
    count: int     # elements

    @property
    def nbytes(self) -> int:
        return self.count * FIELD_BITS[self.dtype] // 8


@dataclass(frozen=True)
class RecordLayout:
    fields: tuple[Field, ...]
    record_bytes: int          # multiple of RECORD_ALIGN, includes padding
    payload_bytes: int         # bytes actually used by fields

    @property
    def padding_bytes(self) -> int:
        return self.record_bytes - self.payload_bytes

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"record_bytes": self.record_bytes, "payload_bytes": self.payload_bytes,
                "fields": [vars(f) for f in self.fields]}

    @classmethod
    def from_dict(cls, d: dict) -> "RecordLayout":
        return cls(tuple(Field(**f) for f in d["fields"]), d["record_bytes"], d["payload_bytes"])


def weight_fields(cfg: ModelConfig) -> list[str]:
    """The per-neuron vectors a record holds (each d_model values), in record order."""
    return ["gate", "up", "down"] if cfg.gated else ["up", "down"]


def record_layout(cfg: ModelConfig, dtype: str) -> RecordLayout:
    """The FFN record of one neuron for this model stored in ``dtype`` (a key of FFN_DTYPES).

    f32/f16: the weight vectors, then (OPT) the up bias. int8: (OPT: the up bias, f32), the f16
    group scales of each vector, then the int8 codes of each vector. int4: the bias, then scale and
    minimum per vector, then the packed codes. Fields are ordered so every one is aligned to its
    element size."""
    if dtype not in FFN_DTYPES:
        raise ValueError(f"unknown record dtype {dtype!r} (choose one of {FFN_DTYPES})")
    fields, off = [], 0

    def add(name, dt, count):
        nonlocal off
        fields.append(Field(name, dt, off, count))
        off += fields[-1].nbytes
    vectors = weight_fields(cfg)
    if dtype in DTYPES:
        for n in vectors:
            add(n, dtype, cfg.d_model)
        if not cfg.gated:
            add("up_bias", dtype, 1)
    else:
        from .quant import GROUP
        if cfg.d_model % GROUP:
            raise ValueError(f"--dtype {dtype} needs d_model divisible by {GROUP} (got {cfg.d_model})")
        # int4 records keep the down column at q8: a checkpoint's down matrix is grouped along its
        # input (d_ff), a record's column along d_model, so 4-bit codes re-gridded across the
        # source's groups lose much more there (measured on SmolLM2's Q4_1 GGUF: 8% relative RMS
        # error for down, 0.02% for gate/up)
        q = {n: ("q8" if dtype == "int8" or n == "down" else "q4") for n in vectors}
        if not cfg.gated:
            add("up_bias", "f32", 1)
        for n in vectors:
            add(n + ".scale", "f16", cfg.d_model // GROUP)
            if q[n] == "q4":
                add(n + ".min", "f16", cfg.d_model // GROUP)
        for n in vectors:
            add(n, q[n], cfg.d_model)
    rec = -(-off // RECORD_ALIGN) * RECORD_ALIGN
    return RecordLayout(tuple(fields), rec, off)


def field_values(records: np.ndarray, layout: RecordLayout, name: str) -> np.ndarray:
    """Field ``name`` of records [m, record_bytes] u8 as float32 [m, count] (dequantized if needed)."""
    from . import quant
    f = layout.field(name)
    raw = records[:, f.offset:f.offset + f.nbytes]
    if f.dtype in DTYPES:
        return raw.view(DTYPES[f.dtype]).astype(np.float32)
    scale = field_values(records, layout, name + ".scale")
    if f.dtype == "q8":
        return quant.dequantize_q8(raw.view(np.int8), scale)
    return quant.dequantize_q4(raw, scale, field_values(records, layout, name + ".min"))


# ---------------------------------------------------------------- safetensors headers

def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse and validate a safetensors header; returns (tensors, data_start).

    ``tensors`` maps name -> {"dtype", "shape", "data_offsets"} with offsets relative to data_start.
    Checks that offsets are in bounds, contiguous and match shapes, and that the file is not truncated.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise BundleError(f"{path}: truncated safetensors file ({size} bytes); re-run convert")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise BundleError(f"{path}: corrupted safetensors header (length {n}); re-run convert")
            meta = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        if isinstance(e, BundleError):
            raise
        raise BundleError(f"{path}: unreadable safetensors file ({e}); re-run convert") from None
    meta.pop("__metadata__", None)
    data_start = 8 + n
    end = 0
    for name, t in sorted(meta.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        dt = NP_DTYPE.get(t.get("dtype"))
        if dt is None:
            raise BundleError(f"{path}: tensor '{name}' has unsupported dtype {t.get('dtype')}")
        a, b = t["data_offsets"]
        want = int(np.prod(t["shape"], dtype=np.int64)) * dt.itemsize
        if a != end or b - a != want:
            raise BundleError(f"{path}: tensor '{name}' has inconsistent offsets; re-run convert")
        end = b
    if data_start + end > size:
        raise BundleError(
            f"{path}: truncated: header promises {data_start + end} bytes, file has {size}; "
            "re-run convert")
    return meta, data_start


def load_manifest(bundle: Path) -> dict:
    """Read and check ``manifest.json``: format name, version and required keys."""
    path = Path(bundle) / MANIFEST
    if not Path(bundle).is_dir():
        raise BundleError(f"{bundle}: not a bundle directory (convert a checkpoint with "
                          "`flashinfer-local convert SRC OUT`)")
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{bundle}: no {MANIFEST}; this is not a complete bundle, re-run convert") from None
    except ValueError as e:
        raise BundleError(f"{path}: corrupted manifest ({e}); re-run convert") from None
    if m.get("format") != FORMAT_NAME:
        raise BundleError(f"{path}: format '{m.get('format')}' is not {FORMAT_NAME}")
    v = m.get("format_version")
    if v not in READS_VERSIONS:
        raise BundleError(f"{path}: bundle format version {v} is not supported by this flashinfer-local "
                          f"(reads versions {', '.join(map(str, READS_VERSIONS))}); re-convert the checkpoint "
                          "with this version")
    for k in ("config", "dense", "ffn", "files"):
        if k not in m:
            raise BundleError(f"{path}: manifest lacks '{k}'; re-run convert")
    return m
