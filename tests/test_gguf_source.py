"""GGUFSource: config, tokenizer and tensors of GGUF files.

Two kinds of tests:

- tiny GGUFs written here with ``gguf.GGUFWriter`` (always run): the un-permutation of llama q/k
  against llama.cpp's own forward permutation, per-layer KV heads, biases, and the errors.
- the real GGUFs in the models folder (skipped when absent), compared with transformers' own GGUF
  loading: tokenizer ids, dequantized weights and config fields.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer

from flashinfer_local.workflows.fetch import models_dir
from storage.errors import CheckpointError, UnsupportedModelError
from storage.gguf_source import GGUFSource
from storage.gguf_tokenizer import build_tokenizer_json
from storage.source import open_source

MODELS = models_dir()       # $FLASHINFER_MODELS, else ~/.cache/flashinfer-local/models
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"          # arch llama, tokenizer pre "smollm"
QWEN = "qwen2.5-coder-0.5b-instruct-awq.gguf"     # arch qwen2, tokenizer pre "qwen2"

# Compared id for id with transformers. Not here: whitespace runs before a digit (SmolLM) and decomposed
# unicode (Qwen2), where transformers' GGUF tokenizers leave the original tokenizer.json (no Digits
# step, no NFC); test_pre_tokenizers_follow_the_original_tokenizer_json pins our behaviour there.
TEXTS = [
    "Hello, world! How are you today?",
    "I'm sure they'll say it's DON'T, we've",
    "def f(x):\n    if x > 0:\n        return x * 2\n\treturn None\n",
    "12345 and 3.14159, 1,000,000 or x2y",
    "Café naïve — 日本語のテキスト 🙂 Ünïcödé",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces   and trailing   \n\n\nnewlines  ",
]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of HF q_proj/k_proj rows (the forward one)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------- tiny GGUFs

def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character map, in byte order (the base tokens of a byte-level BPE)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


TINY = dict(d=8, d_ff=16, heads=2, head_dim=4, layers=2)
TINY_TOKENS = _byte_alphabet() + ["he", "<|end|>"]      # ids 256, 257
TINY_VOCAB = len(TINY_TOKENS)


def tiny_hf_weights(arch: str, kv=(1, 1), seed=0) -> dict[str, np.ndarray]:
    """Random HF-orientation tensors under our canonical names."""
    rng = np.random.default_rng(seed)
    d, f, hd = TINY["d"], TINY["d_ff"], TINY["head_dim"]
    q = TINY["heads"] * hd
    w = {"embed": rng.standard_normal((TINY_VOCAB, d)), "final_norm.weight": rng.standard_normal(d)}
    if arch == "qwen2":
        w["lm_head"] = rng.standard_normal((TINY_VOCAB, d))
    for i in range(TINY["layers"]):
        p = f"layers.{i}."
        shapes = {"attn_norm.weight": (d,), "ffn_norm.weight": (d,), "q.weight": (q, d),
                  "k.weight": (kv[i] * hd, d), "v.weight": (kv[i] * hd, d), "o.weight": (d, q),
                  "gate": (f, d), "up": (f, d), "down": (d, f)}
        if arch == "qwen2":
            shapes.update({"q.bias": (q,), "k.bias": (kv[i] * hd,), "v.bias": (kv[i] * hd,)})
        for k, s in shapes.items():
            w[p + k] = rng.standard_normal(s)
    return {k: v.astype(np.float32) for k, v in w.items()}


_TO_GGUF = {"embed": "token_embd.weight", "final_norm.weight": "output_norm.weight",
            "lm_head": "output.weight", "attn_norm.weight": "attn_norm.weight",
            "ffn_norm.weight": "ffn_norm.weight", "q.weight": "attn_q.weight",
            "k.weight": "attn_k.weight", "v.weight": "attn_v.weight", "q.bias": "attn_q.bias",
            "k.bias": "attn_k.bias", "v.bias": "attn_v.bias", "o.weight": "attn_output.weight",
            "gate": "ffn_gate.weight", "up": "ffn_up.weight", "down": "ffn_down.weight"}


def write_tiny_gguf(path: Path, arch="llama", kv=(1, 1), drop=(), pre="gpt2", replace=None):
    """Write a 2-layer GGUF as llama.cpp would (q/k permuted for llama); returns the HF weights."""
    hf = tiny_hf_weights(arch, kv)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(TINY["layers"])
    w.add_context_length(64)
    w.add_embedding_length(TINY["d"])
    w.add_feed_forward_length(TINY["d_ff"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(kv[0] if len(set(kv)) == 1 else list(kv))
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(TINY_TOKENS)
    w.add_token_types([1] * 257 + [3])              # "<|end|>" is a control token
    w.add_token_merges(["h e"])
    w.add_bos_token_id(257)
    w.add_eos_token_id(257)
    for name, t in hf.items():
        parts = name.split(".", 2)
        gname = (f"blk.{parts[1]}.{_TO_GGUF[parts[2]]}" if name.startswith("layers.")
                 else _TO_GGUF[name])
        if gname in drop:
            continue
        if arch == "llama" and name.endswith(("q.weight", "k.weight")):
            heads = TINY["heads"] if ".q." in name else kv[int(parts[1])]
            t = llama_cpp_permute(t, heads)
        w.add_tensor(gname, (replace or {}).get(gname, t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_tiny_llama_unpermutes_q_and_k(tmp_path):
    hf = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", kv=(2, 1))
    with open_source(tmp_path / "tiny.gguf") as src:
        c = src.config
        assert (c.arch, c.vocab_size, c.d_model, c.d_ff, c.n_layers, c.n_heads) == ("llama", 258, 8, 16, 2, 2)
        assert c.n_kv_heads == (2, 1) and c.head_dim == 4 and c.tie_embeddings
        assert c.bos_token_id == 257 and c.eos_token_ids == (257,)
        assert src.identity["kind"] == "gguf" and src.identity["name"] == "tiny.gguf"
        assert not src.has("lm_head") and not src.has("layers.0.q.bias") and not src.has("layers.2.up")
        for name, want in hf.items():
            got = src.load(name)
            assert got.dtype == np.float32 and got.flags.c_contiguous
            np.testing.assert_array_equal(got, want, err_msg=name)
        tok = Tokenizer.from_str(src.tokenizer.tokenizer_json)
        assert tok.encode("he<|end|>").ids == [256, 257]
        assert src.tokenizer.eos_token == "<|end|>"


def test_tiny_qwen2_is_not_permuted_and_has_biases(tmp_path):
    hf = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2")
    with GGUFSource(tmp_path / "tiny.gguf") as src:
        assert src.config.arch == "qwen2" and not src.config.tie_embeddings
        for name, want in hf.items():
            np.testing.assert_array_equal(src.load(name), want, err_msg=name)


def test_missing_tensor_is_a_checkpoint_error(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", drop={"blk.1.ffn_up.weight"})
    with GGUFSource(tmp_path / "tiny.gguf") as src:
        assert src.has("layers.0.up") and not src.has("layers.1.up")
        with pytest.raises(CheckpointError, match=r"'blk\.1\.ffn_up\.weight' \(layers\.1\.up\) is missing"):
            src.load("layers.1.up")


def test_wrong_shape_is_a_checkpoint_error(tmp_path):
    bad = np.zeros((TINY["d_ff"], TINY["d"]), np.float32)    # down must be [d, d_ff]
    write_tiny_gguf(tmp_path / "tiny.gguf", replace={"blk.0.ffn_down.weight": bad})
    with GGUFSource(tmp_path / "tiny.gguf") as src:
        with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_down\.weight.*\[16, 8\].*\[8, 16\]"):
            src.load("layers.0.down")


def test_unsupported_architecture_fails_at_open(tmp_path):
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match=r"'mamba'.*supported: llama, qwen2, gemma3"):
        open_source(path)


def test_unsupported_pre_tokenizer(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", pre="made-up-pre")
    with pytest.raises(UnsupportedModelError, match="made-up-pre"):
        GGUFSource(tmp_path / "tiny.gguf")


@pytest.mark.parametrize("pre, text, pieces", [
    # SmolLM2's tokenizer.json: Digits(individual) then GPT-2's regex, so a whitespace run before a
    # digit stays whole (transformers' GGUF tokenizer, lacking the Digits step, gives "ĠĠ", "Ġ42")
    ("smollm", "a   42", ["a", "ĠĠĠ", "4", "2"]),
    ("gpt2", "a   42", ["a", "ĠĠ", "Ġ42"]),
    ("qwen2", "a   42", ["a", "ĠĠ", "Ġ", "4", "2"]),
    ("llama-bpe", "x 12345", ["x", "Ġ", "123", "45"]),
    ("qwen2", "Don't", ["Don", "'t"]),
])
def test_pre_tokenizers_follow_the_original_tokenizer_json(pre, text, pieces):
    tok = Tokenizer.from_str(build_tokenizer_json("gpt2", pre, TINY_TOKENS, None, []))
    assert [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)] == pieces


def test_qwen2_normalizes_to_nfc():
    # Qwen2's tokenizer.json has an NFC normalizer: "e" + U+0301 encodes as the one character "é"
    tok = Tokenizer.from_str(build_tokenizer_json("gpt2", "qwen2", TINY_TOKENS, None, []))
    assert tok.encode("e\u0301").tokens == tok.encode("\u00e9").tokens == ["Ã", "©"]


def test_sentencepiece_tokenizer_is_unsupported():
    with pytest.raises(UnsupportedModelError, match="tokenizer model 'llama'"):
        build_tokenizer_json("llama", "default", TINY_TOKENS, None, [])


# ---------------------------------------------------------------------------- real GGUFs

def _real(name: str) -> Path:
    path = MODELS / name
    if not path.is_file():
        pytest.skip(f"{path} is absent: this comparison needs the real GGUF "
                    "(../shared/models/fetch.sh puts it in $FLASHINFER_MODELS)")
    return path


@pytest.fixture(scope="module")
def offline():
    """No model hub: transformers must read the local GGUF only."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


def _hf_tokenizer(name):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(MODELS), gguf_file=name)


def _hf_model(name):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF model")
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(MODELS), gguf_file=name).eval()


@pytest.fixture(scope="module")
def smol_src():
    with GGUFSource(_real(SMOL)) as src:
        yield src


@pytest.fixture(scope="module")
def smol_hf_model(smol_src, offline):
    return _hf_model(SMOL)


@pytest.fixture(scope="module")
def qwen_src():
    with GGUFSource(_real(QWEN)) as src:
        yield src


def _check_tokenizer(src, hf_tok):
    ours = Tokenizer.from_str(src.tokenizer.tokenizer_json)
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == hf_tok.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert hf_tok.decode(ids) == text
    assert src.tokenizer.bos_token == hf_tok.bos_token
    assert src.tokenizer.eos_token == hf_tok.eos_token
    assert src.tokenizer.chat_template == hf_tok.chat_template
    assert src.tokenizer.add_bos is False


def _check_config(cfg, hf):
    rope = (getattr(hf, "rope_parameters", None) or {}).get("rope_theta", getattr(hf, "rope_theta", None))
    assert (cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.n_heads) == (
        hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers, hf.num_attention_heads)
    assert cfg.n_kv_heads == (hf.num_key_value_heads,) * hf.num_hidden_layers
    assert cfg.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert cfg.max_position == hf.max_position_embeddings
    assert cfg.norm_eps == pytest.approx(hf.rms_norm_eps, rel=1e-6)
    assert cfg.rope_theta == pytest.approx(rope) and cfg.rope_scaling is None
    assert cfg.tie_embeddings == hf.tie_word_embeddings
    assert cfg.bos_token_id == hf.bos_token_id and cfg.eos_token_ids[0] == hf.eos_token_id


def _param(model, name) -> np.ndarray:
    return dict(model.named_parameters())[name].detach().float().numpy()


def test_smollm_tokenizer_matches_transformers(smol_src, offline):
    _check_tokenizer(smol_src, _hf_tokenizer(SMOL))


def test_smollm_weights_match_transformers(smol_src, smol_hf_model):
    pairs = {"embed": "model.embed_tokens.weight",
             "layers.0.q.weight": "model.layers.0.self_attn.q_proj.weight",
             "layers.0.k.weight": "model.layers.0.self_attn.k_proj.weight",
             "layers.0.down": "model.layers.0.mlp.down_proj.weight",
             "layers.29.k.weight": "model.layers.29.self_attn.k_proj.weight"}
    for ours, theirs in pairs.items():
        np.testing.assert_allclose(smol_src.load(ours), _param(smol_hf_model, theirs),
                                   rtol=0, atol=1e-6, err_msg=ours)
    # the file really is permuted: re-applying llama.cpp's permutation breaks the match
    cfg = smol_src.config
    for ours, theirs, heads in (("layers.0.q.weight", pairs["layers.0.q.weight"], cfg.n_heads),
                                ("layers.0.k.weight", pairs["layers.0.k.weight"], cfg.n_kv_heads[0])):
        raw = llama_cpp_permute(smol_src.load(ours), heads)
        assert not np.allclose(raw, _param(smol_hf_model, theirs), atol=1e-3)


def test_smollm_config_matches_transformers(smol_src, smol_hf_model):
    assert smol_src.config.arch == "llama"
    _check_config(smol_src.config, smol_hf_model.config)


@pytest.mark.slow
def test_qwen2_tokenizer_weights_config_match_transformers(qwen_src, offline):
    _check_tokenizer(qwen_src, _hf_tokenizer(QWEN))
    model = _hf_model(QWEN)
    assert qwen_src.config.arch == "qwen2"
    _check_config(qwen_src.config, model.config)
    for ours, theirs in (("layers.0.q.weight", "q_proj.weight"), ("layers.0.k.weight", "k_proj.weight"),
                         ("layers.0.q.bias", "q_proj.bias"), ("layers.0.k.bias", "k_proj.bias")):
        np.testing.assert_allclose(qwen_src.load(ours),
                                   _param(model, f"model.layers.0.self_attn.{theirs}"),
                                   rtol=0, atol=1e-6, err_msg=ours)


def test_low_codes_of_smollm2_tensors(smol_src):
    """SmolLM2's GGUF stores attention and FFN in Q4_1 and the tied embedding in Q8_0: only the
    former are on a 4-bit grid that int4's q4 matrices carry over exactly."""
    assert smol_src.low_codes("layers.0.q.weight") == smol_src.low_codes("layers.3.gate") == "q4"
    assert smol_src.low_codes("embed") is None and smol_src.low_codes("final_norm.weight") is None
    assert smol_src.low_codes("no.such.tensor") is None
