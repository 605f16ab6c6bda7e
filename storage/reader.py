"""Open a bundle: validate it, map the dense part, locate and read FFN records."""
from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path

import numpy as np

from . import format as fmt
from . import validate
from .config import ModelConfig
from .errors import BundleError, FlashinferError


class Bundle:
    """A validated, opened bundle. Dense tensors are copy-on-write memory maps (no data copied)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fds: dict[str, int] = {}
        self._dense_map = None
        self._sizes = None
        try:
            for attempt in range(3):           # a `convert --force` may swap the bundle while it opens
                self._open()
                if fmt.load_manifest(self.path) == self.manifest:
                    break                      # the files held open belong to this manifest
                self._close_fds()
            else:
                raise BundleError(f"{self.path}: the bundle keeps changing while it is opened; wait for the "
                                  "convert that replaces it to finish")
        except BaseException:
            self._close_fds()
            raise

    def _open(self) -> None:
        self.manifest = m = fmt.load_manifest(self.path)       # every field's type checked
        mpath = self.path / fmt.MANIFEST
        self.format_version = m["format_version"]
        self.dense_dtype = m["dense"]["dtype"]
        self.ffn_dtype = m["ffn"]["dtype"]
        if self.ffn_dtype not in fmt.FFN_DTYPES or self.dense_dtype not in fmt.DTYPES:
            raise BundleError(f"{mpath}: record precision {self.ffn_dtype!r} / dense "
                              f"{self.dense_dtype!r} is not one this version reads "
                              f"({', '.join(fmt.FFN_DTYPES)}); upgrade flashinfer-local or re-run convert")
        validate.check_config_dict(m["config"], mpath)
        try:
            self.config = ModelConfig.from_dict(m["config"])
            self.layout = fmt.RecordLayout.from_dict(m["ffn"]["layout"])
        except FlashinferError as e:
            raise BundleError(f"{mpath}: {e}; re-run convert") from None
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{mpath}: malformed config or layout ({e}); re-run convert") from None
        validate.check_layout(self.layout, self._expected_layout(), mpath)
        files = m["files"]
        for name, info in files.items():
            f = self.path / name
            try:
                fd = self._fds[name] = os.open(f, os.O_RDONLY)       # held: the same inode from now on
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                raise BundleError(f"{f}: missing; the bundle is incomplete, re-run convert") from None
            size = os.fstat(fd).st_size
            if size != info["bytes"]:
                raise BundleError(f"{f}: {size} bytes, manifest says {info['bytes']} "
                                  "(truncated or modified); re-run convert")
        self._dense_meta, self._dense_start = fmt.read_safetensors_header(
            self.path / fmt.DENSE_FILE, files[fmt.DENSE_FILE].get("header_sha256"), self._fds[fmt.DENSE_FILE])
        self._ffn_meta, self._ffn_start = fmt.read_safetensors_header(
            self.path / fmt.FFN_FILE, files[fmt.FFN_FILE].get("header_sha256"), self._fds[fmt.FFN_FILE])
        self._check_tensors()

    def _close_fds(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def file_path(self, name: str) -> Path:
        """A path that opens the very file this bundle opened (Linux: through /proc, so a bundle
        replaced on disk since cannot mix in; elsewhere the file's own path)."""
        fd = self._fds.get(name)
        proc = Path(f"/proc/self/fd/{fd}")
        return proc if fd is not None and proc.exists() else self.path / name

    def _expected_layout(self):
        """The layout the format defines for this config and precision (int4: with the codes the
        stored layout names for down and gate/up, if they are ones the format knows)."""
        down = gate_up = None
        if self.ffn_dtype == "int4":
            kinds = {f.name: f.dtype for f in self.layout.fields}
            down, gate_up = kinds.get("down"), kinds.get("up")
            if (gate_up, down) not in fmt.INT4_CODES:
                raise BundleError(f"{self.path / fmt.MANIFEST}: ffn.layout's codes {gate_up}/{down} are not "
                                  "ones this format writes; re-run convert")
        try:
            return fmt.record_layout(self.config, self.ffn_dtype, down, gate_up, self.layout.gate_split)
        except (ValueError, KeyError) as e:
            raise BundleError(f"{self.path / fmt.MANIFEST}: ffn.layout: {e}; re-run convert") from None

    def _check_tensors(self) -> None:
        cfg = self.config
        names = fmt.dense_tensor_names(cfg, self.gate_split) + [n + ".scale" for n in self.quantized_dense]
        for name in names:
            if name not in self._dense_meta:
                raise BundleError(f"{self.path / fmt.DENSE_FILE}: tensor '{name}' missing; re-run convert")
        self._check_dense_shapes()
        for i in range(cfg.n_layers):
            t = self._ffn_meta.get(fmt.ffn_tensor_name(i))
            if t is None or t["shape"] != [cfg.d_ff, self.layout.record_bytes]:
                raise BundleError(f"{self.path / fmt.FFN_FILE}: layer {i} records missing or misshapen; "
                                  "re-run convert")
            if self.ffn_offset(i) % fmt.TENSOR_ALIGN:
                raise BundleError(f"{self.path / fmt.FFN_FILE}: layer {i} records are not 4 KiB aligned")

    def _check_dense_shapes(self) -> None:
        """Every dense tensor has the shape and dtype its role needs, so no model code indexes past it."""
        qd = self.quantized_dense
        for name in fmt.dense_tensor_names(self.config, self.gate_split):
            shape, t = fmt.dense_shape(self.config, name), self._dense_meta[name]
            if name in qd:
                ok = all(tuple(self._dense_meta[n]["shape"]) == sh and fmt.NP_DTYPE[self._dense_meta[n]["dtype"]] == dt
                         for n, dt, sh in fmt.quantized_matrix_specs(name, shape, qd[name]))
            else:
                ok = tuple(t["shape"]) == shape and t["dtype"] in ("F16", "F32")
            if not ok:
                raise BundleError(f"{self.path / fmt.DENSE_FILE}: tensor '{name}' has shape {t['shape']} "
                                  f"{t['dtype']}, not what {self.config.arch} needs; re-run convert")

    # ---- dense part
    @property
    def gate_split(self) -> bool:
        """Whether the gate rows are dense matrices ``layers.{i}.gate`` rather than record fields."""
        return self.layout.gate_split

    @property
    def quantized_dense(self) -> dict[str, str]:
        """Dense matrices stored as codes + f16 group scales: name -> "q8", "q5" or "q4"
        (``storage.format.dense_matrix_dtypes``; before version 3 every one is q8)."""
        listed = self.manifest["dense"].get("matrices")
        if isinstance(listed, dict):
            return listed
        return {n: "q8" for n in fmt.quantized_dense(self.config, self.ffn_dtype, self.format_version)}

    def dense(self, name: str) -> np.ndarray:
        """A dense tensor as a read-only-in-spirit copy-on-write memory map (pages load on use)."""
        if self._dense_map is None:
            self._dense_map = mmap.mmap(self._fds[fmt.DENSE_FILE], 0, access=mmap.ACCESS_COPY)
        t = self._dense_meta[name]
        a, b = t["data_offsets"]
        dt = fmt.NP_DTYPE[t["dtype"]]
        return np.frombuffer(self._dense_map, dtype=dt, count=(b - a) // dt.itemsize,
                             offset=self._dense_start + a).reshape(t["shape"])

    def dense_span(self) -> tuple[int, int]:
        """(address, length) of this process's map of dense.safetensors; (0, 0) before it is mapped."""
        m = self._dense_map
        if m is None:
            return 0, 0
        view = np.frombuffer(m, np.uint8, count=1)        # a one-byte view, dropped at once: the map
        addr = view.__array_interface__["data"][0]        # must stay closable
        del view
        return addr, len(m)

    def dense_nbytes(self, name: str) -> int:
        a, b = self._dense_meta[name]["data_offsets"]
        return b - a

    def dense_specs(self) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
        """(name, dtype, shape) of every tensor of dense.safetensors, in file order."""
        meta = self._dense_meta
        return [(n, fmt.NP_DTYPE[meta[n]["dtype"]], tuple(meta[n]["shape"]))
                for n in sorted(meta, key=lambda n: meta[n]["data_offsets"][0])]

    def has_dense(self, name: str) -> bool:
        return name in self._dense_meta

    # ---- FFN records
    def ffn_offset(self, layer: int) -> int:
        """Absolute file offset of layer ``layer``'s first record (a multiple of 4 KiB)."""
        return self._ffn_start + self._ffn_meta[fmt.ffn_tensor_name(layer)]["data_offsets"][0]

    @property
    def ffn_path(self) -> Path:
        return self.path / fmt.FFN_FILE

    def read_ffn_layer(self, layer: int) -> np.ndarray:
        """All records of one layer, read into memory: [d_ff, record_bytes] uint8."""
        n, rb = self.config.d_ff, self.layout.record_bytes
        out = np.empty((n, rb), np.uint8)
        with open(self.file_path(fmt.FFN_FILE), "rb", buffering=0) as f:
            f.seek(self.ffn_offset(layer))
            got = f.readinto(memoryview(out).cast("B"))
        if got != out.nbytes:
            raise BundleError(f"{self.ffn_path}: short read in layer {layer}; re-run convert")
        return out

    def field(self, records: np.ndarray, name: str) -> np.ndarray:
        """Typed view [m, count] of one float field of records [m, record_bytes] (no copy)."""
        f = self.layout.field(name)
        return records[:, f.offset:f.offset + f.nbytes].view(fmt.DTYPES[f.dtype])

    def field_f32(self, records: np.ndarray, name: str) -> np.ndarray:
        """Field ``name`` of records [m, record_bytes] as float32 [m, count], dequantized if needed."""
        return fmt.field_values(records, self.layout, name)

    def vector_f32(self, layer: int, records: np.ndarray, name: str, ids: np.ndarray | None = None) -> np.ndarray:
        """Vector ``name`` (gate, up, down, up_bias) of neurons ``ids`` (None: all) of ``layer`` as
        float32 [m, count], whose records are ``records`` [m, record_bytes]: from the records, or
        for a gate-split bundle's gate from its dense matrix."""
        if name != "gate" or not self.gate_split:
            return self.field_f32(records, name)
        key = f"layers.{layer}.gate"
        g = self.dense(key) if ids is None else self.dense(key)[ids]
        if key not in self.quantized_dense:
            return g.astype(np.float32)
        from .quant import dequantize_q8
        s = self.dense(key + ".scale")
        return dequantize_q8(g, s if ids is None else s[ids])

    # ---- facts for inspect
    @property
    def tokenizer_file(self) -> Path | None:
        name = self.manifest["tokenizer"].get("file")
        return self.file_path(name) if name else None        # (a plain name: validate.check_manifest)

    def sizes(self) -> dict:
        """Bytes per file and part, record size and padding (computed once: a bundle is immutable)."""
        if self._sizes is None:
            self._sizes = self._compute_sizes()
        return self._sizes

    def _compute_sizes(self) -> dict:
        cfg = self.config
        files = {k: v["bytes"] for k, v in self.manifest["files"].items()}
        return {
            "files": files,
            "total_bytes": sum(files.values()),
            "dense_bytes": files[fmt.DENSE_FILE],
            "ffn_bytes": files[fmt.FFN_FILE],
            "tokenizer_bytes": files.get(fmt.TOKENIZER_FILE, 0),
            "record_bytes": self.layout.record_bytes,
            "record_padding_bytes": self.layout.padding_bytes,
            "ffn_padding_bytes": (self.layout.padding_bytes * cfg.d_ff * cfg.n_layers
                                  + sum(int(np.prod(t["shape"])) for k, t in self._ffn_meta.items()
                                        if k.endswith("_pad"))),
        }

    def verify(self, progress=None) -> list[str]:
        """Recompute every file's sha256; returns the names that do not match (empty: all good).
        The manifest itself is checked against ``manifest.sha256`` whenever the bundle is opened
        (bundles written before that file existed have none)."""
        bad = []
        for name, info in self.manifest["files"].items():
            h = hashlib.sha256()
            with open(self.file_path(name), "rb") as f:
                while chunk := f.read(16 << 20):
                    h.update(chunk)
                    if progress:
                        progress(len(chunk))
            if h.hexdigest() != info["sha256"]:
                bad.append(name)
        return bad

    def close(self) -> None:
        if self._dense_map is not None:
            try:
                self._dense_map.close()
            except BufferError:  # arrays still view it; the map closes when they are gone
                pass
            self._dense_map = None
        self._close_fds()
