"""The bundle format, version 5 (``FORMAT_VERSION``; versions 1 to 4 are still read): the one
place that says what is on disk.

A bundle is a directory::

    manifest.json        format name + version, normalized config, tokenizer facts, record layout,
                         per-file sizes and sha256, source identity
    dense.safetensors    embeddings, attention, norms, head (typed tensors, memory-mapped at run time)
    ffn.safetensors      per layer one U8 tensor "layers.{i}.ffn" shaped [n_neurons, record_bytes]
    tokenizer.json       Hugging Face `tokenizers` file (absent for checkpoints without one)

FFN records: record ``i`` of layer ``l`` holds everything neuron ``i`` needs, as consecutive fields
(``RecordLayout.fields``): for gated models gate row i, up row i, down column i; for OPT up row i,
down column i and the up bias of neuron i. A gate-split bundle (``convert --gate-split``, from
version 4; ``RecordLayout.gate_split``) keeps a gated model's gate rows out of the records, as a
dense matrix ``layers.{i}.gate`` [d_ff, d] (q8 where it can be, see ``gate_codes``): its records hold
up row i and down column i only, so a selector that scores neurons by their gate reads a third fewer
bytes per kept neuron and the FFN reuses the gate values it computed. ``record_bytes`` is rounded
up to a multiple of ``RECORD_ALIGN`` (512, the smallest direct-I/O unit) with zero padding at the
record's end, and every record tensor starts at a file offset that is a multiple of
``TENSOR_ALIGN`` (4 KiB): the safetensors
header is padded with spaces, and where one layer's tensor ends off a 4 KiB boundary a small U8
tensor "layers.{i}.ffn_pad" fills the gap (safetensors allows no holes). So a direct read of records
``[a, b)`` of layer ``l`` is one aligned span: ``offset(l) + a * record_bytes``.

A recursive bundle (from version 5) stores a shared layer once: its config's ``layer_map`` lists the
stored layer each position runs (``ModelConfig.stack``), and every ``layers.{i}`` name below counts
stored layers.

Canonical dense tensor names (shapes in the HF orientation, ``out x in``)::

    embed [vocab, d]            final_norm.weight [d]      final_norm.bias [d] (opt)
    lm_head [vocab, d] (untied) pos_embed [max_pos + 2, d] (opt)
    layers.{i}.attn_norm.weight/bias   layers.{i}.ffn_norm.weight/bias (bias: opt)
    layers.{i}.q.weight [H*hd, d]  layers.{i}.k.weight [KV_i*hd, d]  layers.{i}.v.weight [KV_i*hd, d]
    layers.{i}.q/k/v.bias (qwen2, opt)   layers.{i}.o.weight [d, H*hd]  layers.{i}.o.bias (opt)
    layers.{i}.down_bias [d] (opt: fc2's bias is per output, not per neuron, so it is dense)
    layers.{i}.q_norm.weight/k_norm.weight [hd]  layers.{i}.post_attn_norm.weight/post_ffn_norm.weight [d]
        (gemma3; its norms are the factors applied, 1 + w of the HF checkpoint)

Canonical FFN source tensors (assembled into records by the converter)::

    layers.{i}.gate [d_ff, d]   layers.{i}.up [d_ff, d]   layers.{i}.down [d, d_ff]
    layers.{i}.up_bias [d_ff] (opt)

Extending the format: add a field to the manifest (readers ignore unknown keys) or a file to the
directory; bump ``FORMAT_VERSION`` only when an old reader would misread the bundle.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import validate
from .config import ModelConfig
from .errors import BundleError

FORMAT_NAME = "flashinfer-local-bundle"
FORMAT_VERSION = 5
# versions this reader opens: 1 is 2 without the int8 tied embedding, 2 is 3 with every quantized
# dense matrix in q8 (see ``dense_matrix_dtypes``), 3 is 4 without the gate split, 4 is 5 without a
# layer map (a reader before 5 would run a recursive bundle's stored layers once each). q5 dense
# matrices came within 5: a reader before them refuses their manifest ("not q8 or q4")
READS_VERSIONS = (1, 2, 3, 4, 5)
MANIFEST = "manifest.json"
MANIFEST_SUM = "manifest.sha256"   # the manifest's own sha256 (bundles before it have none)
DENSE_FILE = "dense.safetensors"
FFN_FILE = "ffn.safetensors"
TOKENIZER_FILE = "tokenizer.json"
RECORD_ALIGN = 512
TENSOR_ALIGN = 4096

# dtype names used in the manifest -> numpy dtype, and the safetensors spelling
DTYPES = {"f32": np.float32, "f16": np.float16}
# the FFN records' precision. int8/int4 records hold group-quantized vectors (storage.quant); such a
# bundle's dense matrices are quantized too (``dense_matrix_dtypes``), norms and biases stay float.
FFN_DTYPES = ("f32", "f16", "int8", "int4")
# what `convert --dtype` accepts: a record precision, or a named mix (``Precision``)
CONVERT_DTYPES = FFN_DTYPES + ("int4-q8",)
FIELD_BITS = {"f32": 32, "f16": 16, "q8": 8, "q5": 5, "q4": 4}
ST_DTYPE = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.uint8): "U8",
            np.dtype(np.int8): "I8", np.dtype(np.int32): "I32", np.dtype(np.int64): "I64"}
NP_DTYPE = {v: k for k, v in ST_DTYPE.items()}


@dataclass(frozen=True)
class Precision:
    """What ``convert --dtype`` writes: the records' dtype and each quantized matrix's codes.

    ``int4``: records in the most precise codes that keep them at their all-q4 size (records are
    rounded up to 512 bytes; ``record_layout``); every dense matrix (attention, head, embedding) by
    what the checkpoint stores (``auto``, ``storage.source.Source.low_codes``): q4 where it is on a
    4-bit grid (carried over exactly), q5 where it has 5 or 6 bits (Q5_0 exactly, Q6_K re-rounded),
    else q8. Measured on Qwen2.5-Coder-1.5B (README, bundle format): down columns at q4 cost 1.5%
    perplexity, its Q6_K head at q4 0.9%; on Qwen2.5-Coder-0.5B, whose matrices are Q5_0, q4
    attention cost 3%.
    ``int4-q8`` keeps the down columns and every dense matrix in q8 (format version 2's int4; the
    gate/up codes still by the rule).
    ``int8``: q8 everywhere."""
    ffn: str                      # a key of FFN_DTYPES
    down: str | None = None       # quantized records: the down column's codes (None: by the rule above)
    attention: str = "q8"         # codes of the q/k/v/o matrices: q8, q4, or auto (q4 if stored in 4 bits)
    head: str = "q8"              # codes of the head, and of the embedding when they are tied (or auto)
    embed: str = "q8"             # codes of an untied embedding
    gate_up: str | None = None    # int4 records: the gate/up vectors' codes (None: by the rule above)
    gate_split: bool = False      # gated models: the gate rows as a dense matrix, not in the records

    @classmethod
    def named(cls, name: "str | Precision") -> "Precision":
        if isinstance(name, Precision):
            return name
        if name == "int4":
            return cls("int4", None, "auto", "auto", "auto")
        if name == "int4-q8":
            return cls("int4", "q8")
        return cls(name)


def gate_codes(cfg: ModelConfig, ffn_dtype: str) -> str:
    """How a gate-split bundle stores its dense gate matrices: q8 (the codes the threshold selector
    scored with before the split: half the bytes of f16, and the values its cutoffs are calibrated
    on) where d_model is a multiple of 32, except in f32 bundles (kept exact); else the float dtype
    of the bundle's dense part."""
    if ffn_dtype == "f32":
        return "f32"
    from .quant import GROUP
    return "q8" if cfg.d_model % GROUP == 0 else "f16"


def gate_names(cfg: ModelConfig) -> list[str]:
    return [f"layers.{i}.gate" for i in range(cfg.n_layers)]


def quantized_dense(cfg: ModelConfig, ffn_dtype: str, version: int = FORMAT_VERSION) -> list[str]:
    """Dense matrices an int8/int4 bundle stores quantized (``dense_matrix_dtypes``): the attention
    projections and the head, which is the embedding when the two are tied (from format version 2:
    read in full every token, it was the largest matrix left in f16), and from version 3 an untied
    embedding too (only looked up, but its f16 copy was a third of a 4-bit bundle). Norms and
    biases keep their float precision."""
    if ffn_dtype in DTYPES:
        return []
    names = [f"layers.{i}.{m}.weight" for i in range(cfg.n_layers) for m in "qkvo"]
    if not cfg.tie_embeddings:
        return names + ["lm_head"] + (["embed"] if version >= 3 else [])
    return names + (["embed"] if version >= 2 else [])


def dense_matrix_dtypes(cfg: ModelConfig, precision: Precision, version: int = FORMAT_VERSION,
                        low_codes=lambda name: None) -> dict[str, str]:
    """name -> codes ("q8", "q5" or "q4") of each quantized dense matrix. q8: ``name`` I8 [out, in]
    and ``name.scale`` F16 [out, in / 32]; q4: ``name`` U8 [out, in / 2] (packed as in
    ``storage.quant``) and ``name.scale`` F16 [out, in / 16], each row's group scales then its
    group minimums; q5: ``name`` U8 [out, 5 in / 8] (q4's nibbles, then the fifth bits)
    and the same scales. Bundles before version 3 hold q8 only. ``auto`` resolves by
    ``low_codes(name)``: the codes of what the checkpoint stores (``storage.source.Source.low_codes``;
    None: q8)."""
    names = quantized_dense(cfg, precision.ffn, version)
    gate = (gate_names(cfg) if precision.gate_split and gate_codes(cfg, precision.ffn) == "q8" else [])
    if version < 3:
        return {n: "q8" for n in names + gate}
    head = {"lm_head": precision.head, "embed": precision.head if cfg.tie_embeddings else precision.embed}
    kinds = {n: head.get(n, precision.attention) for n in names}
    return {n: (low_codes(n) or "q8") if k == "auto" else k for n, k in kinds.items()} | {n: "q8" for n in gate}


def ffn_tensor_name(layer: int) -> str:
    return f"layers.{layer}.ffn"


def dense_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """The logical shape of dense tensor ``name`` (a q4 matrix stores half as many columns of bytes)."""
    d, hd, H = cfg.d_model, cfg.head_dim, cfg.n_heads
    leaf = name.split(".", 2)[-1] if name.startswith("layers.") else name
    kv = cfg.n_kv_heads[int(name.split(".")[1])] if name.startswith("layers.") else 0
    return {
        "embed": (cfg.vocab_size, d), "lm_head": (cfg.vocab_size, d),
        "pos_embed": (cfg.max_position + cfg.position_offset, d),
        "q.weight": (H * hd, d), "q.bias": (H * hd,),
        "k.weight": (kv * hd, d), "k.bias": (kv * hd,),
        "v.weight": (kv * hd, d), "v.bias": (kv * hd,),
        "o.weight": (d, H * hd), "o.bias": (d,), "down_bias": (d,), "gate": (cfg.d_ff, d),
        "q_norm.weight": (hd,), "k_norm.weight": (hd,),
    }.get(leaf, (d,))  # norms


def quantized_matrix_specs(name: str, shape: tuple[int, int], kind: str) -> list[tuple[str, np.dtype, tuple]]:
    """(name, dtype, shape) of the two tensors a q8, q5 or q4 matrix of logical ``shape`` is stored
    as: the codes (q4: two per byte; q5: those nibbles, then a bit per value) and the f16 group
    scales (q4, q5: scales then minimums per row)."""
    from . import quant
    r, c = shape
    if kind == "q8":
        return [(name, np.dtype(np.int8), (r, c)), (name + ".scale", np.dtype(np.float16), (r, c // quant.GROUP))]
    cols = c // 2 if kind == "q4" else 5 * c // 8
    return [(name, np.dtype(np.uint8), (r, cols)), (name + ".scale", np.dtype(np.float16), (r, 2 * c // quant.GROUP))]


def dense_tensor_names(cfg: ModelConfig, gate_split: bool = False) -> list[str]:
    """Every dense tensor of a model, in the order the converter writes them (``gate_split``: with
    each layer's gate matrix)."""
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
        if cfg.qk_norm:
            names += [p + "q_norm.weight", p + "k_norm.weight"]
        names.append(p + "o.weight")
        if cfg.attn_out_bias:
            names.append(p + "o.bias")
        if cfg.post_norms:
            names.append(p + "post_attn_norm.weight")
        names.append(p + "ffn_norm.weight")
        if bias:
            names.append(p + "ffn_norm.bias")
        if cfg.post_norms:
            names.append(p + "post_ffn_norm.weight")
        if not cfg.gated:
            names.append(p + "down_bias")
        if gate_split:
            names.append(p + "gate")
    names.append("final_norm.weight")
    if bias:
        names.append("final_norm.bias")
    if not cfg.tie_embeddings:
        names.append("lm_head")
    return names


def ffn_source_names(cfg: ModelConfig, layer: int, gate_split: bool = False) -> list[str]:
    """Canonical source tensors one layer's FFN records are assembled from."""
    p = f"layers.{layer}."
    if cfg.gated:
        return ([] if gate_split else [p + "gate"]) + [p + "up", p + "down"]
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
    gate_split: bool = False   # a gated model's gate rows are the dense matrices layers.{i}.gate

    @property
    def padding_bytes(self) -> int:
        return self.record_bytes - self.payload_bytes

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def vectors(self) -> list[str]:
        """The per-neuron vectors a record holds (each d_model values), in record order."""
        return [f.name for f in self.fields if "." not in f.name and f.name != "up_bias"]

    def to_dict(self) -> dict:
        return {"record_bytes": self.record_bytes, "payload_bytes": self.payload_bytes,
                "fields": [vars(f) for f in self.fields]} | ({"gate_split": True} if self.gate_split else {})

    @classmethod
    def from_dict(cls, d: dict) -> "RecordLayout":
        return cls(tuple(Field(**f) for f in d["fields"]), d["record_bytes"], d["payload_bytes"],
                   d.get("gate_split", False))


def weight_fields(cfg: ModelConfig, gate_split: bool = False) -> list[str]:
    """The per-neuron vectors a record holds (each d_model values), in record order."""
    return (["up", "down"] if gate_split else ["gate", "up", "down"]) if cfg.gated else ["up", "down"]


# int4 records: (gate/up, down) codes from the most to the least precise; a record takes the first
# that keeps it at its all-q4 size. Five-bit gate/up rows come before an eight-bit down column:
# gemma3-270m (Q5_0 gate/up rows, 1536-byte records) lost 5.64% perplexity with q4/q8 and 0.31%
# with q5/q5 (README, Gemma 3); no other model here has room for both.
INT4_CODES = (("q5", "q8"), ("q5", "q5"), ("q4", "q8"), ("q4", "q5"), ("q4", "q4"))


def record_layout(cfg: ModelConfig, dtype: str, down: str | None = None, gate_up: str | None = None,
                  gate_split: bool = False) -> RecordLayout:
    """The FFN record of one neuron for this model stored in ``dtype`` (a key of FFN_DTYPES).

    f32/f16: the weight vectors, then (OPT) the up bias. int8: (OPT: the up bias, f32), the f16
    group scales of each vector, then the int8 codes of each vector. int4: the bias, then scale and
    minimum per q4/q5 vector, then the codes, in the first of INT4_CODES that keeps the all-q4
    record size (``down`` / ``gate_up`` force one): SmolLM2 q5/q8, Qwen2.5-Coder-0.5B and Gemma 3
    270M q5/q5, -1.5B q4/q5. Fields are ordered so every one is aligned to its element size. ``gate_split``: a gated
    model's records without the gate row (see the module docstring); int4 keeps the unsplit
    record's down codes and takes the most precise up codes in the smallest record that holds
    them (Qwen2.5-Coder-1.5B: q5/q5 in 2560 bytes; the all-q4 2048 would cost the down column's
    +1.5% perplexity)."""
    if dtype not in FFN_DTYPES:
        raise ValueError(f"unknown record dtype {dtype!r} (choose one of {FFN_DTYPES})")
    if gate_split and not cfg.gated:
        raise ValueError(f"--gate-split needs a gated FFN, and {cfg.arch} has none (its records are up/down already)")
    if dtype == "int4" and (down is None or gate_up is None):
        if gate_split and down is None:      # the unsplit record's down codes: the split loses nothing
            down = record_layout(cfg, dtype, None, gate_up).field("down").dtype
        small = record_layout(cfg, dtype, down or "q4", "q4", gate_split).record_bytes
        for gu, dn in INT4_CODES:
            if (gate_up or gu) == gu and (down or dn) == dn:
                lay = record_layout(cfg, dtype, dn, gu, gate_split)
                if lay.record_bytes == small:
                    return lay
        return record_layout(cfg, dtype, down or "q4", gate_up or "q4", gate_split)
    fields, off = [], 0

    def add(name, dt, count):
        nonlocal off
        fields.append(Field(name, dt, off, count))
        off += fields[-1].nbytes
    vectors = weight_fields(cfg, gate_split)
    if dtype in DTYPES:
        for n in vectors:
            add(n, dtype, cfg.d_model)
        if not cfg.gated:
            add("up_bias", dtype, 1)
    else:
        from .quant import GROUP
        if cfg.d_model % GROUP:
            raise ValueError(f"--dtype {dtype} needs d_model divisible by {GROUP} (got {cfg.d_model})")
        # a checkpoint's down matrix is grouped along its input (d_ff), a record's column along
        # d_model, so 4-bit codes re-gridded across the source's groups lose much more there
        # (measured on Qwen2.5-Coder-1.5B's Q4_K_M GGUF: 7.3% relative RMS error for down, 0.07%
        # for gate/up, whose groups are the source's)
        q = {n: "q8" if dtype == "int8" else (down or "q4") if n == "down" else (gate_up or "q4") for n in vectors}
        if not cfg.gated:
            add("up_bias", "f32", 1)
        for n in vectors:
            add(n + ".scale", "f16", cfg.d_model // GROUP)
            if q[n] != "q8":
                add(n + ".min", "f16", cfg.d_model // GROUP)
        for n in vectors:
            add(n, q[n], cfg.d_model)
    rec = -(-off // RECORD_ALIGN) * RECORD_ALIGN
    return RecordLayout(tuple(fields), rec, off, gate_split)


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
    low = quant.dequantize_q5 if f.dtype == "q5" else quant.dequantize_q4
    return low(raw, scale, field_values(records, layout, name + ".min"))


# ---------------------------------------------------------------- safetensors headers

def read_safetensors_header(path: Path, header_sha256: str | None = None, fd: int | None = None) -> tuple[dict, int]:
    """Parse and validate a safetensors header; returns (tensors, data_start).

    ``tensors`` maps name -> {"dtype", "shape", "data_offsets"} with offsets relative to data_start.
    Checks every entry's types, that offsets are in bounds, contiguous and match shapes, that the
    file is not truncated, and (``header_sha256``, from the manifest) that the header is the one
    the bundle was written with.
    """
    try:
        opened = fd is None
        fd = os.open(path, os.O_RDONLY) if opened else fd       # ``fd``: the file already open
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, 8, 0)
            if len(head) < 8:
                raise BundleError(f"{path}: truncated safetensors file ({size} bytes); re-run convert")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise BundleError(f"{path}: corrupted safetensors header (length {n}); re-run convert")
            raw = os.pread(fd, n, 8)
        finally:
            if opened:
                os.close(fd)
        if header_sha256 is not None and validate.sha256_hex(head + raw) != header_sha256:
            raise BundleError(f"{path}: its header does not match the manifest (damaged, or the file comes from "
                              "another conversion); re-run convert")
        meta = json.loads(raw)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        if isinstance(e, BundleError):
            raise
        raise BundleError(f"{path}: unreadable safetensors file ({e}); re-run convert") from None
    if not isinstance(meta, dict):
        raise BundleError(f"{path}: the safetensors header is not an object; re-run convert")
    meta.pop("__metadata__", None)
    data_start = 8 + n
    spans = {name: validate.check_header_entry(path, name, t) for name, t in meta.items()}
    end = 0
    for name, (a, b) in sorted(spans.items(), key=lambda kv: kv[1]):
        t = meta[name]
        dt = NP_DTYPE.get(t["dtype"])
        if dt is None:
            raise BundleError(f"{path}: tensor '{name}' has unsupported dtype {t['dtype']}")
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
    """Read and check ``manifest.json``: its checksum (``manifest.sha256``, where the bundle has
    one), the format name and version, and every field's type (``validate.check_manifest``)."""
    path = Path(bundle) / MANIFEST
    if not Path(bundle).is_dir():
        raise BundleError(f"{bundle}: not a bundle directory (convert a checkpoint with "
                          "`flashinfer-local convert SRC OUT`)")
    try:
        raw = path.read_bytes()
        if len(raw) > 64 << 20:
            raise BundleError(f"{path}: {len(raw)} bytes is not a manifest; re-run convert")
        sums = Path(bundle) / MANIFEST_SUM
        if sums.exists():
            want = sums.read_text(errors="replace").split()[:1]
            if want != [validate.sha256_hex(raw)]:
                raise BundleError(f"{path}: damaged or modified (its sha256 does not match {MANIFEST_SUM}); "
                                  "re-run convert")
        m = json.loads(raw)
    except FileNotFoundError:
        raise BundleError(f"{bundle}: no {MANIFEST}; this is not a complete bundle, re-run convert") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: corrupted manifest ({e}); re-run convert") from None
    except OSError as e:
        raise BundleError(f"{path}: unreadable ({e.strerror or e})") from None
    if not isinstance(m, dict):
        raise BundleError(f"{path}: the manifest is a JSON {type(m).__name__}, not an object; re-run convert")
    if m.get("format") != FORMAT_NAME:
        raise BundleError(f"{path}: format {str(m.get('format'))[:40]!r} is not {FORMAT_NAME}")
    v = m.get("format_version")
    if not validate.is_int(v) or v not in READS_VERSIONS:
        raise BundleError(f"{path}: bundle format version {str(v)[:20]} is not supported by this flashinfer-local "
                          f"(reads versions {', '.join(map(str, READS_VERSIONS))}); re-convert the checkpoint "
                          "with this version")
    validate.check_manifest(m, path, (DENSE_FILE, FFN_FILE, TOKENIZER_FILE))
    for k in (DENSE_FILE, FFN_FILE):
        if k not in m["files"]:
            raise BundleError(f"{path}: files lacks {k}; re-run convert")
    return m
