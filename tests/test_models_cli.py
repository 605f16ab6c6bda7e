"""Models by name: `list`, `run NAME:DTYPE` (converted into the cache on first use), `rm`, and
`-p -` / `--prompt-file` on the way; the cache is a temporary folder."""
import os
import re
import shutil

from click.testing import CliRunner
from conftest import smollm_gguf

from flashinfer_local.cli import main
from flashinfer_local.workflows.fetch import MODELS


def test_list_run_by_name_and_rm(tmp_path, monkeypatch):
    gguf = smollm_gguf()
    monkeypatch.setenv("FLASHINFER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLASHINFER_MODELS", str(tmp_path / "models"))
    (tmp_path / "models").mkdir()
    os.link(gguf, tmp_path / "models" / gguf.name) if gguf.stat().st_dev == tmp_path.stat().st_dev \
        else shutil.copy(gguf, tmp_path / "models" / gguf.name)
    cli = CliRunner()
    r = cli.invoke(main, ["list"])
    assert r.exit_code == 0, r.output
    rows = {line.split()[0]: line for line in r.output.splitlines()[1:]}
    assert set(MODELS) <= set(rows) and "93.81MiB" in rows["smollm2-135m"] and "not fetched" in rows["gemma3-270m"]

    r = cli.invoke(main, ["run", "smollm2-135m:int8", "-p", "-", "-n", "3", "--temperature", "0"],
                   input="The capital of France is")
    assert r.exit_code == 0, r.output
    (tmp_path / "p.txt").write_text("The capital of France is")
    r2 = cli.invoke(main, ["run", "smollm2-135m:int8", "--prompt-file", str(tmp_path / "p.txt"), "-n", "3",
                           "--temperature", "0"])
    assert r2.exit_code == 0 and r2.output == r.output
    bundles = list((tmp_path / "home" / "bundles").iterdir())
    assert len(bundles) == 1 and "int8" in bundles[0].name
    r = cli.invoke(main, ["list"])
    assert bundles[0].name in r.output and "from smollm2-135m" in r.output
    r = cli.invoke(main, ["run", bundles[0].name, "-p", "hi", "-n", "1"])     # a cached bundle by its name
    assert r.exit_code == 0, r.output

    r = cli.invoke(main, ["rm", "smollm2-135m", "--bundles-only"])
    assert r.exit_code == 0 and "removed bundle" in r.output and (tmp_path / "models" / gguf.name).exists()
    assert not bundles[0].exists()
    r = cli.invoke(main, ["rm", "smollm2-135m"])
    assert r.exit_code == 0 and "removed model" in r.output and not (tmp_path / "models" / gguf.name).exists()
    r = cli.invoke(main, ["rm", "nothing-here"])
    assert r.exit_code == 1 and r.output.startswith("Error: nothing named 'nothing-here'")
    r = cli.invoke(main, ["run", "no-such-model", "-p", "hi"])
    assert r.exit_code == 1 and "known model" in r.output


def test_convert_draws_nothing_when_stderr_is_not_a_terminal(tiny_ckpt, tmp_path, capfd):
    import flashinfer_local as fl
    src = tiny_ckpt("llama")
    capfd.readouterr()                   # (making the checkpoint draws transformers' own bar)
    fl.convert(src, tmp_path / "b")
    assert capfd.readouterr().err == ""


def test_stats_say_n_a_where_there_is_nothing_to_divide(tiny_bundle):
    r = CliRunner().invoke(main, ["run", str(tiny_bundle("llama")), "-p", "hi", "-n", "1", "--stats"])
    assert r.exit_code == 0, r.output
    assert "decode speed n/a" in r.output and not re.search(r"(?<![\d.])0\.0 tok/s", r.output)
