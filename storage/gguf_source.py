"""A GGUF file (llama.cpp's format) as a :class:`Source`.

The file is memory-mapped by ``gguf.GGUFReader``; each :meth:`GGUFSource.load` dequantizes one tensor
to float32 with ``gguf.quants.dequantize``. GGUF lists a matrix's dims innermost first (``ne``), and
dequantizing gives the row-major array ``[ne1, ne0]``, which is already the HF ``out x in``
orientation: nothing is transposed. What differs from HF:

- llama.cpp's converter permutes the rows of Llama's ``q_proj``/``k_proj`` so its RoPE kernel can
  rotate adjacent pairs; :meth:`GGUFSource.load` undoes that for arch ``llama`` (Qwen2 files are not
  permuted).
- there is no ``config.json`` or ``tokenizer.json``: both are rebuilt from metadata
  (tokenizer: :mod:`storage.gguf_tokenizer`).
"""
from __future__ import annotations

import logging
import mmap
import re
import struct
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import CheckpointError, UnsupportedModelError
from .gguf_check import check_gguf
from .gguf_tokenizer import GEMMA_CHAT_TEMPLATE, build_spm_tokenizer_json, build_tokenizer_json
from .source import Source, TokenizerInfo

logger = logging.getLogger(__name__)

SUPPORTED_ARCHS = ("llama", "qwen2", "gemma3")   # GGUF general.architecture values (= our arch names)

# canonical name -> GGUF tensor name; per-layer names are relative to "layers.{i}." / "blk.{i}."
_GLOBAL = {"embed": "token_embd.weight", "final_norm.weight": "output_norm.weight",
           "lm_head": "output.weight"}
_LAYER = {
    "attn_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
    "q.weight": "attn_q.weight", "k.weight": "attn_k.weight", "v.weight": "attn_v.weight",
    "q.bias": "attn_q.bias", "k.bias": "attn_k.bias", "v.bias": "attn_v.bias",
    "o.weight": "attn_output.weight",
    "gate": "ffn_gate.weight", "up": "ffn_up.weight", "down": "ffn_down.weight",
    # gemma3 (its ffn_norm is the norm before the FFN, as for llama)
    "q_norm.weight": "attn_q_norm.weight", "k_norm.weight": "attn_k_norm.weight",
    "post_attn_norm.weight": "post_attention_norm.weight", "post_ffn_norm.weight": "post_ffw_norm.weight",
}
# llama.cpp's Gemma 3 constants (not in the metadata): every sixth layer global, the local layers'
# rotary base, the 27B model's query scale
GEMMA3_EVERY, GEMMA3_LOCAL_THETA, GEMMA3_27B_LAYERS = 6, 10000.0, 62
_LAYER_NAME = re.compile(r"layers\.(\d+)\.(.+)")
_REQUIRED = object()


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's ``reshape(n_head, 2, rows//n_head//2, ...).swapaxes(1, 2)`` on rows.

    llama.cpp stores each head's rows interleaved (pair j of a head = rows 2j, 2j+1); HF keeps the
    two rotary halves apart (rows j and j + head_dim/2). Works on a weight [rows, cols] or a bias [rows].
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# GGUF types whose blocks of 32 values lie on 16 levels (scale and minimum per block or sub-block),
# and those of 5 or 6 bits (Q5_0/Q5_1 on 32 levels per 32 values, Q5_K/Q6_K re-rounded to them)
FOUR_BIT_TYPES = ("Q4_0", "Q4_1", "Q4_K")
FIVE_SIX_BIT_TYPES = ("Q5_0", "Q5_1", "Q5_K", "Q6_K")


class GGUFSource(Source):
    """A llama/qwen2/gemma3 GGUF file: config and tokenizer from its metadata, tensors loaded lazily."""

    def __init__(self, path: Path):
        import gguf  # imported here: only GGUF conversions need it

        self.path = Path(path).resolve()
        try:
            with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                check_gguf(self.path, m)          # lengths, types and offsets, before the reader trusts them
            self._reader = gguf.GGUFReader(self.path)
        except CheckpointError:
            raise
        except Exception as e:   # the reader raises ValueError/struct.error/... on damaged files
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({e})") from None
        self._dequantize = gguf.quants.dequantize
        try:
            self._tensors = {t.name: t for t in self._reader.tensors}
            arch = self._meta("general.architecture")
            if arch not in SUPPORTED_ARCHS:
                raise UnsupportedModelError(
                    f"{self.path.name}: GGUF architecture '{str(arch)[:40]}' is not supported "
                    f"(supported: {', '.join(SUPPORTED_ARCHS)})")
            self.arch = arch
            self.tokenizer, vocab_from_tokens = self._read_tokenizer()
            self.config = self._read_config(vocab_from_tokens)
        except CheckpointError:
            raise
        except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, OverflowError, ZeroDivisionError,
                AttributeError, struct.error) as e:          # a damaged value of the right shape
            raise CheckpointError(f"{self.path}: damaged GGUF metadata ({type(e).__name__}: {str(e)[:100]}); "
                                  "fetch or export the file again") from None
        st = self.path.stat()
        self.identity = {"kind": "gguf", "name": self.path.name, "path": str(self.path),
                         "bytes": st.st_size, "mtime": st.st_mtime}
        logger.info("opened GGUF %s: %s, %d layers, d_model %d, %d tensors", self.path.name, arch,
                    self.config.n_layers, self.config.d_model, len(self._tensors))

    # ------------------------------------------------------------------ metadata

    def _meta(self, key: str, default=_REQUIRED):
        """A metadata value (int/float/str/bool, or a list for arrays); ``default`` if absent."""
        f = self._reader.fields.get(key)
        if f is None:
            if default is _REQUIRED:
                raise CheckpointError(f"{self.path}: metadata key '{key}' is missing; "
                                      "the GGUF is incomplete")
            return default
        return f.contents()

    def _read_config(self, vocab_from_tokens: int | None) -> ModelConfig:
        a = self.arch
        d_model = int(self._meta(f"{a}.embedding_length"))
        n_layers = int(self._meta(f"{a}.block_count"))
        n_heads = int(self._meta(f"{a}.attention.head_count"))
        # head_count_kv: one number, or one per layer (variable GQA, e.g. DeciLM)
        kv = self._meta(f"{a}.attention.head_count_kv", n_heads)
        n_kv = tuple(int(x) for x in kv) if isinstance(kv, list) else (int(kv),) * n_layers
        head_dim = int(self._meta(f"{a}.attention.key_length", d_model // n_heads))
        v_dim = int(self._meta(f"{a}.attention.value_length", head_dim))
        rot = int(self._meta(f"{a}.rope.dimension_count", head_dim))
        if v_dim != head_dim or rot != head_dim:
            raise UnsupportedModelError(
                f"{self.path.name}: head_dim {head_dim} with value length {v_dim} and rotary dims "
                f"{rot} is not supported (all three must be equal)")
        if a == "llama" and "blk.0.attn_q.bias" in self._tensors:
            raise UnsupportedModelError(f"{self.path.name}: llama GGUF with attention biases "
                                        "is not supported")

        vocab = self._meta(f"{a}.vocab_size", None) or vocab_from_tokens
        if vocab is None and "token_embd.weight" in self._tensors:
            vocab = int(self._tensors["token_embd.weight"].shape[1])   # ne = [d_model, vocab]
        if vocab is None:
            raise CheckpointError(f"{self.path}: cannot tell the vocabulary size (no "
                                  f"'{a}.vocab_size', tokens or token_embd.weight)")

        scaling = None
        kind = self._meta(f"{a}.rope.scaling.type", None)
        if kind == "linear":
            scaling = {"rope_type": "linear", "factor": float(self._meta(f"{a}.rope.scaling.factor"))}
        elif kind not in (None, "none"):
            raise UnsupportedModelError(f"{self.path}: rope scaling '{kind}' is not supported (linear, "
                                        "or Llama 3.1-style per-dimension factors)")
        if "rope_freqs.weight" in self._tensors:
            # Llama 3.1+: llama.cpp stores the llama3 scaling as one divisor per rotary frequency
            t = self._tensors["rope_freqs.weight"]
            factors = np.asarray(self._dequantize(t.data, t.tensor_type), np.float32).reshape(-1)
            scaling = {"rope_type": "freq_factors", "factors": [float(x) for x in factors]}

        eos = []
        for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
            t = self._meta(f"tokenizer.ggml.{key}", None)
            if t is not None and int(t) not in eos:
                eos.append(int(t))
        bos = self._meta("tokenizer.ggml.bos_token_id", None)
        gemma = a == "gemma3"
        window = self._meta(f"{a}.attention.sliding_window", None) if gemma else None
        if gemma and self._end_of_turn is not None and self._end_of_turn not in eos:
            eos.append(self._end_of_turn)        # a chat turn ends there (llama.cpp's EOT for Gemma)
        return ModelConfig(
            arch=a, vocab_size=int(vocab), d_model=d_model,
            d_ff=int(self._meta(f"{a}.feed_forward_length")), n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=n_kv, head_dim=head_dim,
            max_position=int(self._meta(f"{a}.context_length")),
            norm_eps=float(self._meta(f"{a}.attention.layer_norm_rms_epsilon")),
            rope_theta=float(self._meta(f"{a}.rope.freq_base", 10000.0)), rope_scaling=scaling,
            tie_embeddings="output.weight" not in self._tensors, activation="gelu_tanh" if gemma else "silu",
            bos_token_id=None if bos is None else int(bos), eos_token_ids=tuple(eos),
            sliding_window=None if window is None else int(window),
            sliding_layers=tuple(i for i in range(n_layers) if (i + 1) % GEMMA3_EVERY) if window else (),
            rope_local_theta=GEMMA3_LOCAL_THETA if gemma else None,
            attn_scale=(n_heads / d_model) ** 0.5 if gemma and n_layers == GEMMA3_27B_LAYERS else None)

    def _read_tokenizer(self) -> tuple[TokenizerInfo, int | None]:
        """The tokenizer facts, and the number of tokens (a fallback for the vocabulary size)."""
        model = self._meta("tokenizer.ggml.model", None)
        chat = self._meta("tokenizer.chat_template", None)
        self._end_of_turn = None
        if model is None:
            logger.warning("%s: no tokenizer in the GGUF metadata", self.path.name)
            return TokenizerInfo(chat_template=chat), None
        tokens = self._meta("tokenizer.ggml.tokens")
        types = self._meta("tokenizer.ggml.token_type", None)
        if model == "llama":             # SentencePiece BPE: merges follow the pieces' scores
            text = build_spm_tokenizer_json(tokens, self._meta("tokenizer.ggml.scores"), types,
                                            bool(self._meta("tokenizer.ggml.add_space_prefix", True)),
                                            where=self.path.name)
        else:
            text = build_tokenizer_json(model, self._meta("tokenizer.ggml.pre", None), tokens, types,
                                        self._meta("tokenizer.ggml.merges", []), where=self.path.name)
        self._end_of_turn = tokens.index("<end_of_turn>") if self.arch == "gemma3" and "<end_of_turn>" in tokens \
            else None
        if chat is None and self.arch == "gemma3":
            chat = GEMMA_CHAT_TEMPLATE
            logger.info("%s: no chat template in the file; using Gemma's turn format", self.path.name)

        def token(key):
            i = self._meta(f"tokenizer.ggml.{key}", None)
            return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

        info = TokenizerInfo(tokenizer_json=text, chat_template=chat, bos_token=token("bos_token_id"),
                             eos_token=token("eos_token_id"),
                             add_bos=bool(self._meta("tokenizer.ggml.add_bos_token", False)))
        return info, len(tokens)

    # ------------------------------------------------------------------ tensors

    def _gguf_name(self, name: str) -> tuple[str, int | None, str] | None:
        """(GGUF tensor name, layer or None, canonical suffix) for a canonical name, or None."""
        if name in _GLOBAL:
            return _GLOBAL[name], None, name
        m = _LAYER_NAME.fullmatch(name)
        if m and m.group(2) in _LAYER:
            i = int(m.group(1))
            if i < self.config.n_layers:
                return f"blk.{i}.{_LAYER[m.group(2)]}", i, m.group(2)
        return None

    def _expected_shape(self, layer: int | None, key: str) -> tuple[int, ...]:
        c = self.config
        d, q = c.d_model, c.n_heads * c.head_dim
        kv = c.n_kv_heads[layer] * c.head_dim if layer is not None else 0
        return {"embed": (c.vocab_size, d), "lm_head": (c.vocab_size, d), "final_norm.weight": (d,),
                "attn_norm.weight": (d,), "ffn_norm.weight": (d,), "post_attn_norm.weight": (d,),
                "post_ffn_norm.weight": (d,), "q_norm.weight": (c.head_dim,), "k_norm.weight": (c.head_dim,),
                "q.weight": (q, d), "k.weight": (kv, d), "v.weight": (kv, d),
                "q.bias": (q,), "k.bias": (kv,), "v.bias": (kv,), "o.weight": (d, q),
                "gate": (c.d_ff, d), "up": (c.d_ff, d), "down": (d, c.d_ff)}[key]

    def has(self, name: str) -> bool:
        g = self._gguf_name(name)
        return g is not None and g[0] in self._tensors

    def low_codes(self, name: str) -> str | None:
        g = self._gguf_name(name)
        t = self._tensors.get(g[0]) if g is not None else None
        kind = t.tensor_type.name if t is not None else None
        return "q4" if kind in FOUR_BIT_TYPES else "q5" if kind in FIVE_SIX_BIT_TYPES else None

    def load(self, name: str) -> np.ndarray:
        """The canonical tensor ``name`` as a float32 array (its own memory), HF orientation."""
        if self._reader is None:
            raise CheckpointError(f"{self.path}: source is closed")
        g = self._gguf_name(name)
        if g is None:
            raise CheckpointError(f"{self.path}: no GGUF tensor corresponds to '{name}'")
        gname, layer, key = g
        t = self._tensors.get(gname)
        if t is None:
            raise CheckpointError(f"{self.path}: tensor '{gname}' ({name}) is missing; "
                                  "the GGUF is incomplete")
        try:
            w = self._dequantize_rows(t)
        except NotImplementedError:
            raise UnsupportedModelError(f"{self.path.name}: tensor '{gname}' is stored as "
                                        f"{t.tensor_type.name}, which cannot be dequantized") from None
        # F32 data comes back as a view of the memory map: copy so nothing outlives close()
        w = w.copy() if np.may_share_memory(w, t.data) else w
        w = w.astype(np.float32, copy=False)
        self._release(t)
        want = self._expected_shape(layer, key)
        if w.shape != want:
            raise CheckpointError(f"{self.path}: tensor '{gname}' ({name}) has shape "
                                  f"{list(w.shape)}, the config implies {list(want)}")
        if self.arch == "llama" and key in ("q.weight", "k.weight"):
            heads = self.config.n_heads if key[0] == "q" else self.config.n_kv_heads[layer]
            w = np.ascontiguousarray(_unpermute_rows(w, heads))
        return w

    def _dequantize_rows(self, t, chunk_bytes: int = 32 << 20) -> np.ndarray:
        """Dequantize in row chunks into one float32 array: numpy's dequantizers make several
        temporaries the size of their input, which for a large embedding would triple peak memory."""
        data = t.data
        if data.ndim < 2 or data.nbytes <= chunk_bytes:
            return self._dequantize(data, t.tensor_type)
        step = max(1, chunk_bytes // max(1, data[0].nbytes))
        first = self._dequantize(data[:step], t.tensor_type)
        out = np.empty((data.shape[0],) + first.shape[1:], np.float32)
        out[:step] = first
        for a in range(step, data.shape[0], step):
            out[a:a + step] = self._dequantize(data[a:a + step], t.tensor_type)
        return out

    def _release(self, t) -> None:
        """Drop the mapped pages of a tensor already converted, so a streaming convert's RSS holds
        about one tensor, not the whole GGUF (the pages are file-backed: dropping them loses nothing)."""
        mm = getattr(self._reader.data, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise"):
            return
        page = mmap.PAGESIZE
        start = (int(t.data_offset) // page) * page
        end = int(t.data_offset) + int(t.n_bytes)
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):   # best effort: only memory use is at stake
            pass

    def close(self) -> None:
        """Drop the memory map (arrays returned by :meth:`load` stay valid: they are copies)."""
        self._reader = None
        self._tensors = {}
