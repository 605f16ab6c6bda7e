"""Tiny random Hugging Face checkpoints for tests (no model hub needed).

Plain helper module (not a conftest).  Public API::

    make_tiny_checkpoint(out_dir: Path, arch: str, seed: int = 0) -> Path
    reference_model(ckpt_dir: Path) -> torch.nn.Module
    reference_greedy(model, ids: list[int], n: int) -> list[int]
    reference_logits(model, ids: list[int]) -> torch.Tensor

``arch`` is one of ``ARCHS``: "llama", "llama_tied", "qwen2", "opt", "deci", "gemma3", "mistral".
"gemma3" is a Gemma3ForCausalLM (GeGLU, sandwich and query/key norms, a query scale other than
head_dim's) with local layers 0-1 and a global layer 2; "mistral" a MistralForCausalLM with a
sliding window on every layer. Both windows are SLIDING_WINDOW tokens, so a short test crosses them.

Every checkpoint folder holds config.json, model.safetensors, tokenizer.json and
tokenizer_config.json (with a ChatML-style ``chat_template``).  Weights are fp32,
drawn from a seeded normal distribution (deterministic in ``seed``).

"deci" is a DeciLM-style variable-GQA Llama: config.json has
``model_type: "deci"``, ``architectures: ["DeciLMForCausalLM"]``, the usual Llama
keys (``rope_theta`` at top level, as real DeciLM checkpoints have it) and
``num_key_value_heads_per_layer``; like real DeciLM configs it has *no*
``num_key_value_heads`` key.  Tensor names are exactly Llama's, with
``k_proj``/``v_proj`` of layer i shaped ``[kv_i * head_dim, hidden]``.

transformers 5.x notes for consumers of these folders:
* llama/qwen2 config.json (written by save_pretrained) carry RoPE as
  ``"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}`` and have
  no top-level ``rope_theta``; the dtype key is ``"dtype"`` (not ``torch_dtype``).
* Tied checkpoints ("llama_tied", "opt") have no ``lm_head.weight`` tensor.
* OPT's ``model.decoder.embed_positions.weight`` has ``max_position_embeddings + 2``
  rows (position ids are offset by 2).
* The tokenizer has no post-processor: encoding adds no BOS.  Special tokens
  ``<s>``, ``</s>``, ``<|im_start|>``, ``<|im_end|>`` are ids 0, 1, 2, 3.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

ARCHS = ("llama", "llama_tied", "qwen2", "opt", "deci", "gemma3", "mistral")

VOCAB_SIZE = 300
HIDDEN = 64
INTERMEDIATE = 160
LAYERS = 3
HEADS = 4
KV_HEADS = 2
MAX_POS = 256
RMS_EPS = 1e-5
ROPE_THETA = 10000.0
DECI_KV_PER_LAYER = [4, 2, 1]
SLIDING_WINDOW = 6           # gemma3 (layers 0 and 1 local, 2 global) and mistral (every layer local)

SPECIAL_TOKENS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, 3
BOS_TOKEN, EOS_TOKEN = "<s>", "</s>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Init scales: large enough that activations/logits are non-trivial and greedy
# continuations vary, small enough that everything stays finite.
EMBED_STD = 0.15  # token / position embeddings (also the tied LM head)
LINEAR_STD = 0.3  # linear layers (incl. an untied lm_head)
BIAS_STD = 0.1
NORM_STD = 0.1  # norm weights are 1 + NORM_STD * N(0, 1), norm biases NORM_STD * N(0, 1)

_CORPUS = """
The quick brown fox jumps over the lazy dog. A tiny model is a model that is tiny.
Once upon a time there was a little engine that could run on any machine.
It read the tokens one by one, and it wrote new tokens after them.
Hello, world! How are you today? I am fine, thank you. What is your name?
The cat sat on the mat. The dog ate the bone. The bird sang a song in the tree.
We test the engine with small random weights so that the tests run very fast.
def add(a, b):
    return a + b

def greet(name):
    print("Hello, " + name + "!")

for i in range(10):
    if i % 2 == 0:
        print(i, "is even")
    else:
        print(i, "is odd")

class Cache:
    def __init__(self, size):
        self.size = size
        self.data = {}

    def get(self, key):
        return self.data.get(key)

import torch
x = torch.zeros(4, 8)
y = x + 1.0
print(y.sum())
{"role": "user", "content": "What is the capital of France?"}
{"role": "assistant", "content": "The capital of France is Paris."}
1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828
"""


# ---------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------


def _build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    got = tok.get_vocab_size()
    if got != vocab_size:
        raise RuntimeError(f"tokenizer vocab size {got} != requested {vocab_size}")
    return tok


def _write_tokenizer(out_dir: Path, vocab_size: int) -> dict[str, int]:
    tok = _build_tokenizer(vocab_size)
    tok.save(str(out_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    tok_cfg = {
        "chat_template": CHAT_TEMPLATE,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return ids


# ---------------------------------------------------------------------------
# configs / models
# ---------------------------------------------------------------------------


def _llama_config(tied: bool, bos: int, eos: int, num_kv: int = KV_HEADS):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=num_kv,
        max_position_embeddings=MAX_POS,
        rms_norm_eps=RMS_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=tied,
        bos_token_id=bos,
        eos_token_id=eos,
        architectures=["LlamaForCausalLM"],
    )


def _qwen2_config(bos: int, eos: int):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POS,
        rms_norm_eps=RMS_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=bos,
        eos_token_id=eos,
        architectures=["Qwen2ForCausalLM"],
    )


def _gemma3_config(bos: int, eos: int):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=16,
        max_position_embeddings=MAX_POS, rms_norm_eps=RMS_EPS, query_pre_attn_scalar=24,
        sliding_window=SLIDING_WINDOW, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": ROPE_THETA}},
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos,
        pad_token_id=eos, architectures=["Gemma3ForCausalLM"],
    )


def _mistral_config(bos: int, eos: int):
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POS, rms_norm_eps=RMS_EPS, sliding_window=SLIDING_WINDOW,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA}, tie_word_embeddings=False,
        bos_token_id=bos, eos_token_id=eos, architectures=["MistralForCausalLM"],
    )


def _opt_config(bos: int, eos: int):
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        ffn_dim=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=MAX_POS,
        do_layer_norm_before=True,
        word_embed_proj_dim=HIDDEN,
        enable_bias=True,
        layer_norm_elementwise_affine=True,
        activation_function="relu",
        dropout=0.0,
        attention_dropout=0.0,
        layerdrop=0.0,
        tie_word_embeddings=True,
        # OPT's default pad id (1) is also its padding_idx; keep it == eos so the
        # HF generate() attention-mask inference never kicks in.
        pad_token_id=eos,
        bos_token_id=bos,
        eos_token_id=eos,
        architectures=["OPTForCausalLM"],
    )


def _deci_llama_config(deci_cfg: dict):
    """LlamaConfig used to rebuild a DeciLM model (num_key_value_heads = max)."""
    from transformers import LlamaConfig

    kv = list(deci_cfg["num_key_value_heads_per_layer"])
    return LlamaConfig(
        vocab_size=deci_cfg["vocab_size"],
        hidden_size=deci_cfg["hidden_size"],
        intermediate_size=deci_cfg["intermediate_size"],
        num_hidden_layers=deci_cfg["num_hidden_layers"],
        num_attention_heads=deci_cfg["num_attention_heads"],
        num_key_value_heads=max(kv),
        max_position_embeddings=deci_cfg["max_position_embeddings"],
        rms_norm_eps=deci_cfg["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": float(deci_cfg["rope_theta"])},
        tie_word_embeddings=bool(deci_cfg.get("tie_word_embeddings", False)),
        hidden_act=deci_cfg.get("hidden_act", "silu"),
        bos_token_id=deci_cfg.get("bos_token_id"),
        eos_token_id=deci_cfg.get("eos_token_id"),
    )


def _build_deci_model(llama_cfg, kv_per_layer: list[int]):
    """LlamaForCausalLM whose layer i attention has kv_per_layer[i] KV heads."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaAttention

    llama_cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(llama_cfg)
    assert len(kv_per_layer) == len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        cfg_i = copy.deepcopy(llama_cfg)
        cfg_i.num_key_value_heads = int(kv_per_layer[i])
        layer.self_attn = LlamaAttention(cfg_i, layer_idx=i)
    return model.float().eval()


def _deci_config_json(bos: int, eos: int) -> dict:
    return {
        "architectures": ["DeciLMForCausalLM"],
        "model_type": "deci",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads_per_layer": list(DECI_KV_PER_LAYER),
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POS,
        "rms_norm_eps": RMS_EPS,
        "rope_theta": ROPE_THETA,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": "float32",
    }


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Deterministically overwrite every parameter (tied ones once)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        leaf = name.rsplit(".", 1)[-1]
        is_norm = "norm" in name.lower() or "layer_norm" in name.lower()
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if is_norm and leaf == "weight":
            val = 1.0 + NORM_STD * noise
        elif is_norm and leaf == "bias":
            val = NORM_STD * noise
        elif leaf == "bias":
            val = BIAS_STD * noise
        elif "embed" in name:
            val = EMBED_STD * noise
        else:
            val = LINEAR_STD * noise
        p.copy_(val.to(p.dtype))


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def make_tiny_checkpoint(out_dir: Path, arch: str, seed: int = 0) -> Path:
    """Write a tiny random HF checkpoint for ``arch`` into ``out_dir``; return it."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    ids = _write_tokenizer(out_dir, VOCAB_SIZE)
    bos, eos = ids[BOS_TOKEN], ids[EOS_TOKEN]

    torch.manual_seed(seed)  # module construction draws from the global RNG
    if arch == "deci":
        from safetensors.torch import save_file

        cfg_json = _deci_config_json(bos, eos)
        model = _build_deci_model(_deci_llama_config(cfg_json), DECI_KV_PER_LAYER)
        _randomize(model, seed)
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        (out_dir / "config.json").write_text(json.dumps(cfg_json, indent=2))
        return out_dir

    from transformers import AutoModelForCausalLM

    if arch in ("llama", "llama_tied"):
        cfg = _llama_config(tied=(arch == "llama_tied"), bos=bos, eos=eos)
    elif arch == "qwen2":
        cfg = _qwen2_config(bos, eos)
    elif arch == "gemma3":
        cfg = _gemma3_config(bos, eos)
    elif arch == "mistral":
        cfg = _mistral_config(bos, eos)
    else:
        cfg = _opt_config(bos, eos)
    cfg.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _randomize(model, seed)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    # generation_config.json is not required; drop it so the folder is minimal.
    gen_cfg = out_dir / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()
    return out_dir


def reference_model(ckpt_dir: Path) -> torch.nn.Module:
    """Eval-mode fp32 transformers model (eager attention) loaded from ``ckpt_dir``."""
    ckpt_dir = Path(ckpt_dir)
    cfg_json = json.loads((ckpt_dir / "config.json").read_text())
    if cfg_json.get("model_type") == "deci":
        from safetensors.torch import load_file

        model = _build_deci_model(
            _deci_llama_config(cfg_json), cfg_json["num_key_value_heads_per_layer"]
        )
        state = load_file(str(ckpt_dir / "model.safetensors"))
        model.load_state_dict(state, strict=True)
        return model.float().eval()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(ckpt_dir), dtype=torch.float32, attn_implementation="eager"
    )
    return model.float().eval()


@torch.no_grad()
def reference_logits(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] float32 logits of one full (no-cache) forward."""
    input_ids = torch.tensor([list(ids)], dtype=torch.long)
    out = model(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        use_cache=False,
    )
    return out.logits[0].float()


@torch.no_grad()
def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    """Exactly ``n`` new greedy tokens (argmax, no EOS stop) using a KV cache."""
    from transformers import DynamicCache

    ids = list(ids)
    if n <= 0:
        return []
    cache = DynamicCache()
    out_tokens: list[int] = []
    step_ids = torch.tensor([ids], dtype=torch.long)
    total = len(ids)
    for _ in range(n):
        out = model(
            input_ids=step_ids,
            attention_mask=torch.ones((1, total), dtype=torch.long),
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        nxt = int(out.logits[0, -1].float().argmax())
        out_tokens.append(nxt)
        step_ids = torch.tensor([[nxt]], dtype=torch.long)
        total += 1
    return out_tokens
