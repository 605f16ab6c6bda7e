"""The bundle on disk: layout, alignment, records, checksums, atomic writes."""
import json
import shutil

import numpy as np
import pytest
from conftest import rewrite_manifest
import torch
from safetensors import safe_open

from storage import format as fmt
from storage.convert import convert
from storage.errors import BundleError, CheckpointError, FlashinferError
from storage.reader import Bundle


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_records_hold_each_neurons_weights(tiny_ckpt, tiny_bundle, arch, dtype):
    b = Bundle(tiny_bundle(arch, dtype))
    cfg, lay = b.config, b.layout
    assert lay.record_bytes % fmt.RECORD_ALIGN == 0
    ckpt = tiny_ckpt(arch)
    with safe_open(next(ckpt.glob("*.safetensors")), "pt") as f:
        names = {k.split("layers.1.")[-1]: k for k in f.keys() if "layers.1." in k}
        if arch == "opt":
            up, down = f.get_tensor(names["fc1.weight"]), f.get_tensor(names["fc2.weight"])
            bias = f.get_tensor(names["fc1.bias"])
        else:
            up, down = f.get_tensor(names["mlp.up_proj.weight"]), f.get_tensor(names["mlp.down_proj.weight"])
            gate = f.get_tensor(names["mlp.gate_proj.weight"])
    rec = b.read_ffn_layer(1)
    assert rec.shape == (cfg.d_ff, lay.record_bytes)
    tol = 0 if dtype == "f32" else 1e-3
    np.testing.assert_allclose(b.field(rec, "up"), up.numpy(), atol=tol)
    np.testing.assert_allclose(b.field(rec, "down"), down.numpy().T, atol=tol)   # column i of down
    if arch == "opt":
        np.testing.assert_allclose(b.field(rec, "up_bias")[:, 0], bias.numpy(), atol=tol)
    else:
        np.testing.assert_allclose(b.field(rec, "gate"), gate.numpy(), atol=tol)
    assert not rec[:, lay.payload_bytes:].any()   # padding is zeros


def test_layer_tensors_are_4k_aligned_and_contiguous(tiny_bundle):
    b = Bundle(tiny_bundle("llama", "f16"))
    for i in range(b.config.n_layers):
        off = b.ffn_offset(i)
        assert off % fmt.TENSOR_ALIGN == 0
        with open(b.ffn_path, "rb") as f:   # the bytes at the offset are the layer's records
            f.seek(off)
            raw = np.frombuffer(f.read(b.layout.record_bytes * 3), np.uint8).reshape(3, -1)
        np.testing.assert_array_equal(raw, b.read_ffn_layer(i)[:3])


def test_manifest_and_checksums(tiny_bundle):
    path = tiny_bundle("qwen2", "f32")
    m = json.loads((path / fmt.MANIFEST).read_text())
    assert m["format"] == fmt.FORMAT_NAME and m["format_version"] == fmt.FORMAT_VERSION
    assert set(m["files"]) == {fmt.DENSE_FILE, fmt.FFN_FILE, fmt.TOKENIZER_FILE}
    assert m["source"]["kind"] == "hf"
    assert Bundle(path).verify() == []


def test_verify_detects_flipped_byte(tiny_bundle, tmp_path):
    path = shutil.copytree(tiny_bundle("llama", "f32"), tmp_path / "b")
    f = path / fmt.FFN_FILE
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))
    assert Bundle(path).verify() == [fmt.FFN_FILE]


def test_truncated_bundle_is_refused(tiny_bundle, tmp_path):
    path = shutil.copytree(tiny_bundle("llama", "f32"), tmp_path / "b")
    f = path / fmt.FFN_FILE
    f.write_bytes(f.read_bytes()[:-5000])
    with pytest.raises(BundleError, match="truncated"):
        Bundle(path)


def test_wrong_format_version_is_refused(tiny_bundle, tmp_path):
    path = shutil.copytree(tiny_bundle("llama", "f32"), tmp_path / "b")
    m = json.loads((path / fmt.MANIFEST).read_text())
    m["format_version"] = 99
    rewrite_manifest(path, m)
    with pytest.raises(BundleError, match="version 99"):
        Bundle(path)


def test_unknown_architecture_is_refused(tiny_ckpt, tmp_path):
    src = shutil.copytree(tiny_ckpt("llama"), tmp_path / "ckpt")
    c = json.loads((src / "config.json").read_text())
    c["model_type"] = "gpt_neox"
    (src / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="gpt_neox"):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_truncated_checkpoint_is_refused(tiny_ckpt, tmp_path):
    src = shutil.copytree(tiny_ckpt("llama"), tmp_path / "ckpt")
    st = next(src.glob("*.safetensors"))
    st.write_bytes(st.read_bytes()[:-4096])
    with pytest.raises(CheckpointError):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_interrupted_convert_leaves_nothing_and_keeps_existing(tiny_ckpt, tiny_bundle, tmp_path, monkeypatch):
    out = shutil.copytree(tiny_bundle("llama", "f32"), tmp_path / "b")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    from storage import hf_source
    calls = {"n": 0}
    real = hf_source.HFSource.load

    def flaky(self, name):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt
        return real(self, name)
    monkeypatch.setattr(hf_source.HFSource, "load", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_ckpt("llama"), out, force=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["b"]      # no partial directory left


def test_existing_out_needs_force(tiny_ckpt, tiny_bundle, tmp_path):
    out = shutil.copytree(tiny_bundle("llama", "f32"), tmp_path / "b")
    with pytest.raises(FlashinferError, match="--force"):
        convert(tiny_ckpt("llama"), out, progress=False)
    convert(tiny_ckpt("llama"), out, dtype="f16", force=True, progress=False)
    assert Bundle(out).ffn_dtype == "f16"


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_f16_bundle_close_to_f32(tiny_bundle, arch):
    """Prefill (f16 weights upcast) and decode (f16 matrix-vector) both stay close to f32."""
    from flashinfer_local.runtime.engine import Engine
    ids = list(range(3, 20))
    e32, e16 = Engine(tiny_bundle(arch, "f32")), Engine(tiny_bundle(arch, "f16"))
    a, b = e32.logits(ids), e16.logits(ids)
    assert torch.allclose(a, b, atol=2e-2 * a.abs().max())
    c32, c16 = e32.new_cache(len(ids)), e16.new_cache(len(ids))
    for pos, t in enumerate(ids):        # one token at a time: the decode path
        a = e32.forward(torch.tensor([t]), pos, c32)
        b = e16.forward(torch.tensor([t]), pos, c16)
        assert torch.allclose(a, b, atol=2e-2 * a.abs().max())


def test_a_bundle_replaced_while_open_keeps_reading_its_own_files(tiny_ckpt, tiny_bundle, tmp_path):
    """`convert --force` swaps a bundle under a process that has it open: the process keeps its own
    files (held open), never the new ones."""
    import numpy as np
    path = shutil.copytree(tiny_bundle("llama", "f32"), tmp_path / "b")
    b = Bundle(path)
    emb, rec = np.array(b.dense("embed")), b.read_ffn_layer(0)
    convert(tiny_ckpt("llama"), path, dtype="int8", force=True, progress=False)
    assert Bundle(path).ffn_dtype == "int8"
    np.testing.assert_array_equal(b.dense("embed"), emb)
    np.testing.assert_array_equal(b.read_ffn_layer(0), rec)
    assert b.verify() == []
    b.close()


def test_an_open_retries_when_the_manifest_changes_under_it(tiny_bundle, tmp_path, monkeypatch):
    path = shutil.copytree(tiny_bundle("llama", "f32"), tmp_path / "b")
    real, calls = fmt.load_manifest, {"n": 0}

    def swapping(p):
        calls["n"] += 1
        m = real(p)
        return {**m, "created": "a moment later"} if calls["n"] == 2 else m   # the 2nd read sees a swap
    monkeypatch.setattr(fmt, "load_manifest", swapping)
    b = Bundle(path)
    assert calls["n"] == 4 and b.config.n_layers > 0           # opened twice, checked twice
    b.close()


def test_what_a_killed_convert_left_is_cleaned_up(tiny_ckpt, tiny_bundle, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle("llama", "f32"), tmp_path / ".b.old-999999999")      # killed between renames
    (tmp_path / ".b.partial-999999998").mkdir()                                       # killed while writing
    (tmp_path / ".b.partial-999999998" / "dense.safetensors").write_bytes(b"x" * 100)
    convert(tiny_ckpt("llama"), out, dtype="f32", force=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert Bundle(out).verify() == []


def test_a_damaged_gguf_vocabulary_is_a_checkpoint_error():
    from storage.gguf_tokenizer import build_tokenizer_json
    tokens = [chr(c) for c in range(97, 123)]
    with pytest.raises(CheckpointError, match="do not fit together"):
        build_tokenizer_json("gpt2", "default", tokens, None, ["a zz"], "tiny.gguf")
