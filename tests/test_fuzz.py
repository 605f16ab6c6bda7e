"""A fixed-seed fuzz of what a damaged file can do to the engine (``fuzz_harness``): mutated
copies of a tiny bundle (manifest, headers, weights, tokenizer; in DRAM and streamed), of a tiny
GGUF and of predictor files, each opened, inspected and run in a worker process. Anything but a
clean one-line error, the original's output, or (weight bytes) a damage `inspect --verify` names
fails: tracebacks, crashes, hangs and silent misreads alike. ``python tools/fuzz.py`` runs more."""
import shutil

import fuzz_harness as fh
import pytest
from test_gguf_source import write_tiny_gguf


def _check(results, allowed=fh.GOOD):
    bad = [r for r in results if r["outcome"] not in allowed]
    assert not bad, f"{fh.counts(results)}: " + "; ".join(f"{r['outcome']} {r['what']}: {r['detail'][:160]}"
                                                         for r in bad[:8])


@pytest.mark.parametrize("dtype, engine", [("f32", {}), ("int4", {"offload": "window"})])
def test_damaged_bundles_fail_cleanly_or_not_at_all(tiny_bundle, tmp_path, dtype, engine):
    b = tiny_bundle("llama", dtype)
    items = fh.bundle_mutants(b, tmp_path, 150, seed=11)
    _check(fh.run_all("bundle", items, extra={"reference": str(b), "engine": engine}))


def test_bundles_without_a_manifest_checksum_never_crash(tiny_bundle, tmp_path):
    """Bundles written before manifest.sha256: a damaged manifest that is still a valid description
    of some model can only change the output (counted, allowed); it never crashes, hangs or prints
    a traceback."""
    b = tmp_path / "old"
    shutil.copytree(tiny_bundle("qwen2", "int8"), b)
    (b / "manifest.sha256").unlink()
    res = fh.run_all("bundle", fh.bundle_mutants(b, tmp_path, 150, seed=12),
                     extra={"reference": str(b), "engine": {"offload": "window"}})
    _check(res, fh.GOOD + ("misread",))


def test_damaged_gguf_files_convert_or_fail_cleanly(tmp_path):
    g = tmp_path / "tiny.gguf"
    write_tiny_gguf(g)
    _check(fh.run_all("gguf", fh.gguf_mutants(g, tmp_path, 150, seed=13), extra={"reference": str(g)}))


@pytest.mark.parametrize("kind", ["threshold", "lowrank"])
def test_damaged_predictor_files_fail_cleanly(tiny_bundle, tmp_path, kind):
    from flashinfer_local.workflows.calibrate import calibrate
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle("llama", "f32"), b)
    calibrate(b, kind, tokens=512, seed=0)
    res = fh.run_all("bundle", fh.predictor_mutants(b, kind, tmp_path, 80, seed=14),
                     extra={"reference": str(b), "engine": {"selector": "predictor", "predictor": kind,
                                                            "sparsity": 0.3}})
    _check(res)
