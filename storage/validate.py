"""Checks a bundle's metadata before anything trusts it: every manifest field's type and range,
file names confined to the bundle, the record layout against the one the format defines for the
config, and safetensors header entries. Each failure is one BundleError naming the file, the
field and the fix; after these checks no kernel can index outside its buffers, whatever the
manifest said (the layout is the format's own, the tensors' shapes and offsets fit their files).
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

from .errors import BundleError

FIX = "re-run convert"


def _bad(path: Path, field: str, why: str) -> BundleError:
    return BundleError(f"{path}: {field} {why}; the bundle's metadata is damaged, {FIX}")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def need(path: Path, d, field: str, kind, optional: bool = False):
    """d[field] if it is of ``kind`` (a type, a tuple of types, or "int"), else a BundleError."""
    if not isinstance(d, dict):
        raise _bad(path, field.rsplit(".", 1)[0] or "the manifest", "is not an object")
    key = field.rsplit(".", 1)[-1]
    if key not in d:
        if optional:
            return None
        raise _bad(path, field, "is missing")
    v = d[key]
    if optional and v is None:
        return None
    ok = is_int(v) if kind == "int" else isinstance(v, kind) and not (kind in (int, float) and isinstance(v, bool))
    if not ok:
        name = "a whole number" if kind == "int" else getattr(kind, "__name__", str(kind))
        raise _bad(path, field, f"must be {name}, not {type(v).__name__} {str(v)[:40]!r}")
    return v


def file_name(path: Path, field: str, name: str) -> str:
    """A file name inside the bundle: no folders, no '..', nothing absolute."""
    if not name or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        raise _bad(path, field, f"{name!r} is not a plain file name inside the bundle")
    return name


def check_manifest(m, path: Path, known_files: tuple[str, ...]) -> None:
    """Types and ranges of every field the reader uses (``load_manifest`` has checked the format
    name and version)."""
    if not isinstance(m, dict):
        raise BundleError(f"{path}: the manifest is a JSON {type(m).__name__}, not an object; {FIX}")
    need(path, m, "config", dict)
    dense = need(path, m, "dense", dict)
    need(path, dense, "dense.dtype", str)
    mats = need(path, dense, "dense.matrices", dict, optional=True)
    for k, v in (mats or {}).items():
        if v not in ("q8", "q5", "q4"):
            raise _bad(path, f"dense.matrices.{k}", f"is {v!r}, not q8, q5 or q4")
    ffn = need(path, m, "ffn", dict)
    need(path, ffn, "ffn.dtype", str)
    lay = need(path, ffn, "ffn.layout", dict)
    for k in ("record_bytes", "payload_bytes"):
        if need(path, lay, f"ffn.layout.{k}", "int") <= 0:
            raise _bad(path, f"ffn.layout.{k}", "must be positive")
    need(path, lay, "ffn.layout.gate_split", bool, optional=True)
    fields = need(path, lay, "ffn.layout.fields", list)
    for i, f in enumerate(fields):
        where = f"ffn.layout.fields[{i}]"
        need(path, f, f"{where}.name", str)
        need(path, f, f"{where}.dtype", str)
        for k in ("offset", "count"):
            if need(path, f, f"{where}.{k}", "int") < 0:
                raise _bad(path, f"{where}.{k}", "must not be negative")
        if set(f) - {"name", "dtype", "offset", "count"}:
            raise _bad(path, where, f"has unknown keys {sorted(set(f) - {'name', 'dtype', 'offset', 'count'})}")
    files = need(path, m, "files", dict)
    for name, info in files.items():
        file_name(path, f"files[{name!r}]", name)
        if name not in known_files and not name.startswith("predictor-"):
            raise _bad(path, f"files[{name!r}]", f"is not a file of this format ({', '.join(known_files)})")
        if need(path, info, f"files.{name}.bytes", "int") < 0:
            raise _bad(path, f"files[{name!r}].bytes", "must not be negative")
        sha = need(path, info, f"files.{name}.sha256", str)
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise _bad(path, f"files[{name!r}].sha256", "is not a sha256 hex digest")
        need(path, info, f"files.{name}.header_sha256", str, optional=True)
    src = need(path, m, "source", dict)
    for k in ("kind", "name"):
        need(path, src, f"source.{k}", str, optional=True)
    need(path, m, "created_by", str, optional=True)
    order = need(path, m, "neuron_order", str, optional=True)       # set by reorder
    if order is not None and not 0 < len(order) <= 64:
        raise _bad(path, "neuron_order", "must be a short id")
    tok = need(path, m, "tokenizer", dict)
    tf = need(path, tok, "tokenizer.file", str, optional=True)
    if tf is not None:
        file_name(path, "tokenizer.file", tf)
        if tf not in files:
            raise _bad(path, "tokenizer.file", f"{tf!r} is not among the bundle's files")
    for k in ("chat_template", "bos_token", "eos_token"):
        need(path, tok, f"tokenizer.{k}", str, optional=True)
    need(path, tok, "tokenizer.add_bos", bool, optional=True)


def check_config_dict(d: dict, path: Path) -> None:
    """The stored config's fields are of the right types (ModelConfig then checks their ranges)."""
    ints = ("vocab_size", "d_model", "d_ff", "n_layers", "n_heads", "head_dim", "max_position")
    for k in ints:
        need(path, d, f"config.{k}", "int")
    need(path, d, "config.arch", str)
    kv = need(path, d, "config.n_kv_heads", list)
    if not all(is_int(x) for x in kv):
        raise _bad(path, "config.n_kv_heads", "must list whole numbers")
    for k in ("norm_eps", "rope_theta"):
        v = need(path, d, f"config.{k}", (int, float), optional=k == "rope_theta")
        if v is not None and not (math.isfinite(v) and v > 0):
            raise _bad(path, f"config.{k}", f"{v} must be a positive number")
    for k in ("sliding_layers", "layer_map"):
        if not all(is_int(x) for x in need(path, d, f"config.{k}", list, optional=True) or []):
            raise _bad(path, f"config.{k}", "must list whole numbers")
    need(path, d, "config.tie_embeddings", bool, optional=True)
    need(path, d, "config.activation", str, optional=True)
    need(path, d, "config.rope_scaling", dict, optional=True)
    need(path, d, "config.bos_token_id", "int", optional=True)
    eos = need(path, d, "config.eos_token_ids", list, optional=True) or []
    if not all(is_int(x) and 0 <= x < d["vocab_size"] for x in eos):
        raise _bad(path, "config.eos_token_ids", "must list token ids inside the vocabulary")
    bos = d.get("bos_token_id")
    if bos is not None and not 0 <= bos < d["vocab_size"]:
        raise _bad(path, "config.bos_token_id", f"{bos} is outside the vocabulary")


def check_layout(layout, expected, path: Path) -> None:
    """The stored record layout must be the one the format defines for this config and precision
    (so every field lies inside ``record_bytes``, at the offsets the kernels compute with)."""
    if layout != expected:
        raise _bad(path, "ffn.layout", f"does not match the format's layout for this model "
                   f"({expected.record_bytes} bytes per record)")


def check_header_entry(path: Path, name: str, t) -> tuple[int, int]:
    """One safetensors header entry: {"dtype": str, "shape": [int...], "data_offsets": [a, b]}."""
    where = f"tensor {name!r}"
    if not isinstance(t, dict):
        raise BundleError(f"{path}: {where} is not an object in the header; {FIX}")
    if not isinstance(t.get("dtype"), str):
        raise BundleError(f"{path}: {where} has no dtype; {FIX}")
    shape, offs = t.get("shape"), t.get("data_offsets")
    if not isinstance(shape, list) or not all(is_int(x) and x >= 0 for x in shape):
        raise BundleError(f"{path}: {where} has a malformed shape {str(shape)[:40]}; {FIX}")
    if not isinstance(offs, list) or len(offs) != 2 or not all(is_int(x) and x >= 0 for x in offs):
        raise BundleError(f"{path}: {where} has malformed data_offsets {str(offs)[:40]}; {FIX}")
    return offs[0], offs[1]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
