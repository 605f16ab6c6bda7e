"""Self-tests for tests/tiny_models.py (tiny random HF checkpoints)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_models  # noqa: E402
from tiny_models import (  # noqa: E402
    ARCHS,
    make_tiny_checkpoint,
    reference_greedy,
    reference_logits,
    reference_model,
)

PROMPT_TEXT = "def add(a, b):\n    return a + b\nThe quick brown fox"


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    # The models are tiny: intra-op threading only adds sync overhead, and on a
    # loaded 2-CPU box it made these tests 10x slower.  Restored afterwards.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module", params=ARCHS)
def ckpt(request, tmp_path_factory):
    arch = request.param
    out = make_tiny_checkpoint(tmp_path_factory.mktemp(arch) / "ckpt", arch, seed=0)
    return arch, out, reference_model(out)


def _tokenizer(ckpt_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(ckpt_dir / "tokenizer.json"))


def test_folder_layout(ckpt):
    arch, out, _ = ckpt
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["bos_token"] == "<s>" and tok_cfg["eos_token"] == "</s>"
    assert "<|im_start|>" in tok_cfg["chat_template"]
    tok = _tokenizer(out)
    assert tok.get_vocab_size() == cfg["vocab_size"] == tiny_models.VOCAB_SIZE
    assert cfg["bos_token_id"] == tok.token_to_id("<s>")
    assert cfg["eos_token_id"] == tok.token_to_id("</s>")
    if arch == "deci":
        assert cfg["model_type"] == "deci"
        assert cfg["architectures"] == ["DeciLMForCausalLM"]
        assert cfg["num_key_value_heads_per_layer"] == [4, 2, 1]


def test_weights(ckpt):
    from safetensors import safe_open

    arch, out, model = ckpt
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in names}
    assert all(t.dtype == torch.float32 for t in tensors.values())
    head_dim = tiny_models.HIDDEN // tiny_models.HEADS
    if arch == "deci":
        for i, kv in enumerate(tiny_models.DECI_KV_PER_LAYER):
            for proj in ("k_proj", "v_proj"):
                shape = tuple(tensors[f"model.layers.{i}.self_attn.{proj}.weight"].shape)
                assert shape == (kv * head_dim, tiny_models.HIDDEN)
            q = tensors[f"model.layers.{i}.self_attn.q_proj.weight"]
            assert tuple(q.shape) == (tiny_models.HEADS * head_dim, tiny_models.HIDDEN)
    if arch in ("llama", "qwen2", "deci"):
        assert "lm_head.weight" in names
    if arch == "qwen2":
        for proj in ("q_proj", "k_proj", "v_proj"):
            b = tensors[f"model.layers.0.self_attn.{proj}.bias"]
            assert b.abs().min() > 0 and b.std() > 0.01
    if arch == "opt":
        biases = [k for k in names if k.endswith(".bias")]
        assert len(biases) > 0
        for k in biases:
            assert tensors[k].std() > 0.01, k
        for k in names:
            if "layer_norm" in k and k.endswith(".weight"):
                assert (tensors[k] - 1).abs().max() > 0.01, k
    # the reference model really uses the saved weights
    sd = model.state_dict()
    for k, t in tensors.items():
        assert torch.equal(sd[k], t), k


def test_logits_and_greedy(ckpt):
    arch, out, model = ckpt
    ids = _tokenizer(out).encode(PROMPT_TEXT).ids
    assert len(ids) > 4

    logits = reference_logits(model, ids)
    assert logits.shape == (len(ids), tiny_models.VOCAB_SIZE)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.3  # not degenerate
    assert len(set(logits.argmax(-1).tolist())) > 1

    n = 32
    got = reference_greedy(model, ids, n)
    assert len(got) == n

    # manual no-cache argmax loop: validates the KV-cache path (esp. deci rebuild)
    seq = list(ids)
    for _ in range(n):
        seq.append(int(reference_logits(model, seq)[-1].argmax()))
    assert got == seq[len(ids):]
    assert len(set(got)) >= 4, got  # continuation is not a single repeated token


def test_deterministic(tmp_path):
    a = make_tiny_checkpoint(tmp_path / "a", "deci", seed=3)
    b = make_tiny_checkpoint(tmp_path / "b", "deci", seed=3)
    c = make_tiny_checkpoint(tmp_path / "c", "deci", seed=4)
    ra = (a / "model.safetensors").read_bytes()
    assert ra == (b / "model.safetensors").read_bytes()
    assert ra != (c / "model.safetensors").read_bytes()


def test_tokenizer_roundtrip(ckpt):
    _, out, _ = ckpt
    tok = _tokenizer(out)
    for s in (PROMPT_TEXT, "Hello, world! ünïcødé 🙂 {\"k\": [1, 2]}", "  two  spaces\n\ttab"):
        ids = tok.encode(s).ids
        assert all(0 <= i < tiny_models.VOCAB_SIZE for i in ids)
        assert tok.decode(ids) == s
    # special tokens are single ids
    for sp in ("<s>", "</s>", "<|im_start|>", "<|im_end|>"):
        assert tok.encode(sp).ids == [tok.token_to_id(sp)]


def test_chat_template(ckpt):
    _, out, _ = ckpt
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
