"""The command line: convert, inspect, run, and one-line errors on bad input."""
import json
import shutil

import pytest
from click.testing import CliRunner
from conftest import rewrite_manifest

from flashinfer_local.cli import main
from storage import format as fmt


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r


def one_line_error(r, *needles):
    assert r.exit_code == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    for n in needles:
        assert n in lines[0], r.output


def test_convert_inspect_run(tiny_ckpt, tmp_path):
    out = tmp_path / "bundle"
    r = cli("convert", tiny_ckpt("qwen2"), out, "--dtype", "f16")
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and "peak RSS" in r.output
    r = cli("inspect", out, "--verify")
    assert r.exit_code == 0, r.output
    assert "qwen2" in r.output and "padding" in r.output and "checksums match" in r.output
    sj = tmp_path / "stats.json"
    r = cli("run", out, "-p", "hello there", "-n", "6", "--temperature", "0", "--stats", "--stats-json", sj)
    assert r.exit_code == 0, r.output
    s = json.loads(sj.read_text())
    for k in ("text", "token_ids", "prompt_tokens", "generated_tokens", "prefill_tokens_per_s",
              "decode_tokens_per_s", "peak_rss_bytes"):
        assert k in s
    assert s["generated_tokens"] == len(s["token_ids"]) <= 6
    assert s["peak_rss_bytes"] > 0


def test_run_converts_a_checkpoint_once_into_the_cache(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHINFER_HOME", str(tmp_path / "home"))
    for _ in range(2):
        r = cli("run", tiny_ckpt("llama"), "-p", "abc", "-n", "3", "--seed", "1")
        assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "home" / "bundles").iterdir())) == 1


def test_bad_inputs_give_one_line_errors(tiny_ckpt, tiny_bundle, tmp_path):
    # unknown architecture
    src = shutil.copytree(tiny_ckpt("llama"), tmp_path / "ckpt")
    c = json.loads((src / "config.json").read_text())
    c["model_type"] = "mamba"
    (src / "config.json").write_text(json.dumps(c))
    one_line_error(cli("convert", src, tmp_path / "o1"), "mamba")
    # wrong format version
    b = shutil.copytree(tiny_bundle("llama", "f32"), tmp_path / "b")
    m = json.loads((b / fmt.MANIFEST).read_text())
    m["format_version"] = 7
    rewrite_manifest(b, m)
    one_line_error(cli("inspect", b), "version 7")
    one_line_error(cli("run", b, "-p", "x"), "version 7")
    # truncated records
    b2 = shutil.copytree(tiny_bundle("llama", "f32"), tmp_path / "b2")
    f = b2 / fmt.FFN_FILE
    f.write_bytes(f.read_bytes()[:-4096])
    one_line_error(cli("run", b2, "-p", "x"), "truncated")
    # a file that is neither GGUF nor a folder
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\0" * 100)
    one_line_error(cli("convert", junk, tmp_path / "o2"), "not a GGUF")
    # existing output without --force
    one_line_error(cli("convert", tiny_ckpt("llama"), b2), "--force")
    # bad option values
    one_line_error(cli("run", tiny_bundle("llama", "f32"), "-p", "x", "--top-p", "1.5"), "--top-p")


def test_missing_gguf_tensor_is_one_line_error(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    d, ff, L = 32, 64, 1
    w.add_block_count(L)
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(50)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    toks = [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(50)]
    w.add_token_list(toks)
    w.add_token_types([1] * 50)
    w.add_token_merges([])
    rng = np.random.default_rng(0)
    t = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", t(50, d))
    w.add_tensor("output_norm.weight", t(d))
    w.add_tensor("blk.0.attn_norm.weight", t(d))
    w.add_tensor("blk.0.attn_q.weight", t(d, d))
    w.add_tensor("blk.0.attn_k.weight", t(16, d))
    w.add_tensor("blk.0.attn_v.weight", t(16, d))
    w.add_tensor("blk.0.attn_output.weight", t(d, d))
    w.add_tensor("blk.0.ffn_norm.weight", t(d))
    w.add_tensor("blk.0.ffn_gate.weight", t(ff, d))
    w.add_tensor("blk.0.ffn_down.weight", t(d, ff))   # ffn_up is missing
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = cli("convert", path, tmp_path / "out")
    one_line_error(r, "ffn_up")
    assert not (tmp_path / "out").exists()


def test_engine_options_are_declared_once():
    """Every CLI engine option comes from EngineOptions, and a run's options survive the trip
    through to_argv (how --sweep passes them to its child processes) and back through click."""
    import click

    from flashinfer_local.cli.options import engine_options, take_engine_options
    from flashinfer_local.runtime.options import EngineOptions, cli_fields
    got = {}

    @click.command()
    @engine_options
    def probe(**kw):
        got["opts"] = take_engine_options(kw)

    names = {p.name for p in probe.params}
    assert names == {f.name for f in cli_fields()}
    for cmd in ("run", "profile"):
        assert names <= {p.name for p in main.commands[cmd].params}, cmd
    opts = EngineOptions(threads=2, dram_budget=3 << 30, offload="window", window=2, io_threads=4,
                         evict="frequency", selector="oracle", sparsity=0.25, context=512)
    r = CliRunner().invoke(probe, opts.to_argv())
    assert r.exit_code == 0, r.output
    assert got["opts"] == opts
    r = CliRunner().invoke(probe, [])
    assert got["opts"] == EngineOptions()


def test_bad_counts_and_unwritable_paths_are_one_line_errors(tiny_bundle, tmp_path):
    path = tiny_bundle("llama", "f32")
    r = cli("run", path, "-p", "hi", "-n", "-3")
    assert r.exit_code == 2 and "-3" in r.output and "Traceback" not in r.output, r.output
    r = cli("run", path, "-p", "hi", "-n", "2", "--stats-json", tmp_path / "missing" / "s.json")
    one_line_error(r, "cannot write", "missing")                # refused before generating
    one_line_error(cli("run", path, "-p", "hi", "--window", "0"), "--window 0 must be at least 1")
    r = cli("run", path, "-p", "hi", "--system", "be brief", "-n", "2")      # --system implies --chat
    assert r.exit_code == 0, r.output
    one_line_error(cli("run", path, "-n", "2"), "give the prompt with -p TEXT")
    one_line_error(cli("run", path, "-p", "hi", "--prompt-file", tmp_path / "nope.txt"), "not both")
    one_line_error(cli("run", path, "--prompt-file", tmp_path / "nope.txt"), "cannot read --prompt-file")
    r = cli("run", path, "-p", "hi", "--chat", "--system", "be brief", "-n", "3", "--temperature", "0")
    assert r.exit_code == 0, r.output
    # the library's error speaks of arguments, the CLI's of flags
    one_line_error(cli("run", path, "-p", "hi", "-n", "100", "--context", "16", "--dram-budget", "1GiB"),
                   "--max-tokens", "raise --context")
    from flashinfer_local.runtime.engine import Engine
    from storage.errors import FlashinferError
    with pytest.raises(FlashinferError, match="generate fewer tokens") as e:
        list(Engine(path, context=16, dram_budget=1 << 30).generate("hi", 100))
    assert "--" not in str(e.value)
    from flashinfer_local.runtime.sampling import SamplingParams
    with pytest.raises(FlashinferError) as e:
        SamplingParams(temperature=-1)
    assert str(e.value).startswith("temperature -1") and e.value.cli_message.startswith("--temperature -1")
    one_line_error(cli("run", path, "-p", "hi", "--temperature", "-1"), "--temperature -1.0 must be >= 0")
    one_line_error(cli("run", path, "-p", "hi", "--dram-budget", "12 apples"))


def test_run_with_a_draft(tiny_bundle, tiny_ckpt, tmp_path, monkeypatch):
    """--draft lookup/self/a model: the same greedy text, the speculation line in --stats; bad drafts
    are one-line errors."""
    monkeypatch.setenv("FLASHINFER_HOME", str(tmp_path / "cache"))
    path = tiny_bundle("llama", "f32")
    base = ["run", path, "-p", "hello hello hello", "-n", "12", "--temperature", "0"]
    want = cli(*base)
    assert want.exit_code == 0, want.output
    draft = tiny_bundle("qwen2", "int8")
    for extra in (["--draft", "lookup"], ["--draft", draft, "--draft-tokens", "3"],
                  ["--draft", "self", "--offload", "window", "--context", "64"]):
        r = cli(*base, *extra, "--stats", "--stats-json", tmp_path / "s.json")
        assert r.exit_code == 0, r.output
        assert r.output.splitlines()[0] == want.output.splitlines()[0]
        assert "drafted tokens accepted" in r.output and "tokens per forward" in r.output
        sp = json.loads((tmp_path / "s.json").read_text())["speculation"]
        assert sp["draft"] and 0 <= sp["acceptance_rate"] <= 1
    one_line_error(cli(*base, "--draft", "lookup", "--draft-tokens", "0"), "--draft-tokens 0 must be auto")
    one_line_error(cli(*base, "--draft", "self"), "--offload none; use --offload window")
    one_line_error(cli(*base, "--draft", tmp_path / "nope"), "--draft", "not found")
    r = cli(*base, "--draft", tiny_ckpt("qwen2"))            # a checkpoint converts (int4) on first use
    assert r.exit_code == 0 and r.output.splitlines()[0] == want.output.splitlines()[0], r.output
    assert [p.name.split("-")[1] for p in (tmp_path / "cache" / "bundles").iterdir()] == ["int4"]
