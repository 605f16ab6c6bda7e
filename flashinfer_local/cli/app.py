"""The `flashinfer-local` command line: the group, and convert, inspect, run (``cli.analysis`` adds
profile, estimate, calibrate and eval)."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import click

from storage.errors import FlashinferError
from storage.format import CONVERT_DTYPES

from flashinfer_local.cli.interrupt import StopOnInterrupt
from flashinfer_local.cli.options import (engine_options, generation_options, prompt_options, read_prompt,
                                         take_engine_options)
from flashinfer_local.units import fmt_bytes


class _Group(click.Group):
    """Turns every FlashinferError into a one-line message (no traceback) and exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FlashinferError as e:
            raise click.ClickException(e.cli_message) from None


@click.group(cls=_Group)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="flashinfer-local")
def main(verbose: int):
    """Run language models larger than your DRAM from a bundled store on the SSD."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for name in ("flashinfer_local.workflows", "storage.convert"):   # say what first use does
        logging.getLogger(name).setLevel(min(level, logging.INFO))


@main.command()
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(list(CONVERT_DTYPES)), default="f16", show_default=True,
              help="Precision: f32/f16 keep the checkpoint's values; int8 and int4 quantize the FFN "
              "records and the attention, head and embedding matrices in groups of 32 with f16 scales "
              "(int4: records at 4 bits, a down column at 5 or 8 where that costs no bytes, each matrix at "
              "4 or 5 bits where the checkpoint stores it in 4 or in 5-6, else 8); int4-q8 keeps the "
              "down columns and those matrices at 8 bits (larger, nearer f16 for checkpoints stored above "
              "4 bits).")
@click.option("--gate-split", is_flag=True,
              help="Store the gate rows as dense matrices (q8, f32 in an f32 bundle) and records of up and "
              "down only: the threshold predictor scores with the gate the engine computes anyway and a kept "
              "neuron reads a third fewer bytes (gated models; format version 4).")
@click.option("--force", is_flag=True, help="Replace OUT (only after the new bundle is complete).")
def convert(src: Path, out: Path, dtype: str, gate_split: bool, force: bool):
    """Convert a checkpoint (HF folder or GGUF file) SRC into a bundle directory OUT."""
    from storage.convert import convert as do_convert
    from storage.reader import Bundle

    from flashinfer_local.runtime.rss import PeakRSS
    with PeakRSS() as peak:
        path = do_convert(src, out, dtype=dtype, force=force, progress=sys.stderr.isatty(), gate_split=gate_split)
    b = Bundle(path)
    s = b.sizes()
    click.echo(f"wrote {path}: {fmt_bytes(s['total_bytes'])} (dense {fmt_bytes(s['dense_bytes'])}, "
               f"ffn {fmt_bytes(s['ffn_bytes'])}); peak RSS {fmt_bytes(peak.peak)}")


def _precision(b) -> str:
    """Each part's precision, e.g. 'attention q4, embedding + tied head q4, norms/biases f32;
    ffn int4 (gate q4, up q4, down q8)'; q8/q5/q4 are groups of 32 with f16 scales (q5/q4: and minimums)."""
    qd, dense = b.quantized_dense, b.dense_dtype
    kinds = sorted({v for n, v in qd.items() if n.startswith("layers.") and not n.endswith(".gate")}, reverse=True)
    attn = "/".join(kinds) + (" (by the checkpoint's tensors)" if len(kinds) > 1 else "") if kinds else dense
    if b.config.tie_embeddings:
        head = f"embedding + tied head {qd.get('embed', dense)}"
    else:
        head = f"embedding {qd.get('embed', dense)}, head {qd.get('lm_head', dense)}"
    ffn = b.ffn_dtype
    if ffn not in ("f16", "f32"):
        ffn += " (" + ", ".join(f"{n} {b.layout.field(n).dtype}" for n in b.layout.vectors) + ")"
    if b.gate_split:
        ffn += f", gate split out as dense {qd.get('layers.0.gate', dense)} matrices"
    return f"attention {attn}, {head}, norms/biases f32; ffn {ffn}"


@main.command()
@click.argument("bundle", type=click.Path(exists=True, path_type=Path))
@click.option("--verify", is_flag=True, help="Recompute and check every file's sha256.")
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
def inspect(bundle: Path, verify: bool, as_json: bool):
    """Show a bundle's config, sizes per part and FFN record layout."""
    from storage.reader import Bundle
    b = Bundle(bundle)
    cfg, s, lay, m = b.config, b.sizes(), b.layout, b.manifest
    if as_json:
        from predictors import store
        preds = {k: store.read_meta(b.path, k) for k in store.available(b.path)}
        click.echo(json.dumps({"config": cfg.to_dict(), "sizes": s, "layout": lay.to_dict(),
                               "source": m["source"], "format_version": m["format_version"],
                               "predictors": {k: {"default_sparsity": v["default_sparsity"],
                                                  "ranks": [r.get("rank") for r in v["layers"]]}
                                              for k, v in preds.items() if v},
                               "placement": _placement_facts(b)}, indent=1))
    else:
        kv = sorted(set(cfg.n_kv_heads))
        click.echo(f"bundle      {b.path}  (format v{m['format_version']}, {m.get('created_by', '?')})")
        click.echo(f"source      {m['source'].get('kind')}: {m['source'].get('name')}")
        click.echo(f"model       {cfg.arch}: {cfg.n_layers} layers, d_model {cfg.d_model}, d_ff {cfg.d_ff}, "
                   f"heads {cfg.n_heads} (kv {kv[0] if len(kv) == 1 else kv}), head_dim {cfg.head_dim}, "
                   f"vocab {cfg.vocab_size}, context {cfg.max_position}"
                   f"{', tied head' if cfg.tie_embeddings else ''}")
        if cfg.layer_map:
            click.echo(f"recursion   {cfg.depth} layer positions run the {cfg.n_layers} stored layers "
                       f"{' '.join(map(str, cfg.layer_map))}")
        click.echo(f"precision   {_precision(b)}")
        click.echo(f"size        total {fmt_bytes(s['total_bytes'])}: dense {fmt_bytes(s['dense_bytes'])}, "
                   f"ffn {fmt_bytes(s['ffn_bytes'])}")
        fields = ", ".join(f"{f.name} {f.count}x{f.dtype}@{f.offset}" for f in lay.fields)
        click.echo(f"ffn record  {lay.record_bytes} bytes per neuron ({fields}); "
                   f"padding {lay.padding_bytes} B/record, {fmt_bytes(s['ffn_padding_bytes'])} in all "
                   f"({100 * s['ffn_padding_bytes'] / s['ffn_bytes']:.1f}% of ffn)")
        click.echo(f"kv cache    {fmt_bytes(cfg.kv_bytes_per_token())} per token (f16)"
                   + (f"; {sum(cfg.window(i) is not None for i in cfg.stack)} of {cfg.depth} layers attend to the last "
                      f"{cfg.sliding_window} tokens (a ring of that many)" if cfg.sliding_layers else ""))
        for line in _predictor_lines(b) + _placement_lines(b):
            click.echo(line)
    if verify:
        bad = b.verify()
        if bad:
            raise FlashinferError(f"checksum mismatch in {', '.join(bad)}: the bundle is corrupted; "
                                  "re-run convert")
        click.echo(f"verify      all {len(m['files'])} checksums match")


def _placement_facts(b) -> dict | None:
    """The stored placement's figures, checked (``stale``/``error`` say why run would refuse it)."""
    from predictors import plan_file
    if not plan_file.plan_path(b.path).exists():
        return None
    try:
        _, _, meta = plan_file.load(b.path, b.manifest, b.config.n_layers, b.config.d_ff)
    except FlashinferError as e:
        return {"error": str(e)}
    tot = {"device_neurons": sum(r["device"] for r in meta["layers"]),
           "pinned_neurons": sum(r["pinned"] for r in meta["layers"]),
           "window_rows": sum(r["window_rows"] for r in meta["layers"])}
    return {k: meta[k] for k in ("solver", "dram_budget", "device", "gpu_mem", "selector", "predictor", "sparsity",
                                 "objective_ms", "greedy_objective_ms", "predicted_tokens_per_s")} | tot


def _placement_lines(b) -> list[str]:
    f = _placement_facts(b)
    if f is None:
        return ["placement   none (flashinfer-local plan BUNDLE --dram-budget SIZE adds one)"]
    if "error" in f:
        return [f"placement   refused: {f['error']}"]
    dev = f", {f['device_neurons']} on {f['device']}" if f["device"] != "none" else ""
    return [f"placement   {f['solver']} for --dram-budget {fmt_bytes(f['dram_budget'])}: {f['pinned_neurons']} neurons pinned "
            f"in DRAM, {f['window_rows']} window rows{dev}; selector {f['selector']}"
            + (f" ({f['predictor']} at {f['sparsity']:.2f})" if f["predictor"] else "")
            + f"; expected {f['predicted_tokens_per_s']:.2f} tok/s (greedy {1000 / f['greedy_objective_ms']:.2f})"]


def _predictor_lines(b) -> list[str]:
    from predictors import store

    from flashinfer_local.runtime.budget import predictor_bytes
    out = []
    for kind in store.KINDS:
        if not store.predictor_path(b.path, kind).exists():
            continue
        meta = store.read_meta(b.path, kind)
        if meta is None:
            out.append(f"predictor   {kind}: unreadable file; re-run calibrate")
            continue
        ranks = sorted({r["rank"] for r in meta["layers"] if r.get("rank")})
        dram = predictor_bytes(b, kind)
        what = (f"gate rows held in DRAM, {fmt_bytes(dram)} (counted in --dram-budget)" if kind == "threshold"
                else f"rank {ranks[0] if len(ranks) == 1 else f'{ranks[0]}-{ranks[-1]}'}, {fmt_bytes(dram)} in DRAM")
        layer = (f" ({meta['layer_default_sparsity']:.2f} with per-layer shares)"
                 if "layer_default_sparsity" in meta else "")
        out.append(f"predictor   {kind}: {what}; default sparsity {meta['default_sparsity']:.2f}{layer}, calibrated on "
                   f"{meta['train_tokens']} tokens")
    if not out:
        out.append("predictor   none (flashinfer-local calibrate BUNDLE adds one)")
    return out


@main.command()
@click.argument("model", required=False)
@generation_options(128, None, "Random seed for sampling.")
@click.option("--stop", multiple=True, help="Stop when the text reaches this string (repeatable; not printed).")
@click.option("--system", default=None, help="A system message before the prompt (implies --chat).")
@prompt_options
@engine_options
@click.option("--stats", is_flag=True, help="Print speed and memory figures to stderr at the end.")
@click.option("--stats-json", type=click.Path(path_type=Path), help="Write the figures as JSON.")
def run(model, prompt, prompt_file, max_tokens, temperature, top_p, top_k, seed, stop, system, chat, dtype, stats,
        stats_json, **engine):
    """Generate text from MODEL: a bundle, an HF folder, a GGUF file, or a known model's name
    (NAME or NAME:DTYPE, fetched and converted on first use; default: smollm2-135m). Ctrl-C stops
    the generation and prints its figures."""
    from flashinfer_local.runtime.engine import Engine
    from flashinfer_local.runtime.rss import PeakRSS
    from flashinfer_local.runtime.sampling import GenerationStats, SamplingParams
    from flashinfer_local.workflows.resolve import resolve_run

    opts = take_engine_options(engine)
    sampling = SamplingParams(temperature, top_p, top_k, seed)
    prompt = read_prompt(prompt, prompt_file)
    if system is not None:
        chat = True
        prompt = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    _writable(stats_json)
    path, opts = resolve_run(model, dtype, opts, progress=sys.stderr.isatty())
    with PeakRSS() as peak:
        eng = Engine(path, opts)
        st, text = None, []
        with StopOnInterrupt() as intr:
            t0, first = time.perf_counter(), None      # time to first token: tokenizing, prefill, a sample
            gen = eng.generate(prompt, max_tokens=max_tokens, sampling=sampling, chat=chat, stop=stop)
            for step in gen:
                first = first or time.perf_counter() - t0
                click.echo(step.text, nl=False)
                text.append(step.text)
                st = step.stats
                if intr.hit:
                    break
            gen.close()
        click.echo()
    eng.close()
    if st is None:
        st = GenerationStats(prompt_tokens=len(eng.encode_prompt(prompt, chat)))
    st.peak_rss_bytes = peak.peak
    baseline = eng.runtime_baseline_bytes
    out = {"model": str(path), "text": "".join(text), **st.to_dict(), "runtime_baseline_bytes": baseline,
           "peak_rss_above_baseline_bytes": st.peak_rss_bytes - baseline, "interrupted": intr.hit,
           "time_to_first_token_s": first}
    if intr.hit:
        click.echo(f"[stopped by Ctrl-C after {st.generated_tokens} tokens]", err=True)
    if stats or intr.hit:
        for line in _stats_lines(st, baseline, opts.dram_budget):
            click.echo(line, err=True)
    if stats_json:
        _write(stats_json, json.dumps(out, indent=1))
    if intr.hit:
        sys.exit(130)


def _rate(tokens: int, seconds: float) -> str:
    """'in 35 ms, 114.3 tok/s' (a rate only where there is a time to divide by)."""
    if not tokens or seconds <= 0:
        return "n/a"
    return f"{1000 * seconds:.0f} ms, {tokens / seconds:.1f} tok/s"


def _stats_lines(st, baseline: int, budget: int | None) -> list[str]:
    computed = st.prompt_tokens - st.cached_tokens
    cached = f", {st.cached_tokens} from the cache" if st.cached_tokens else ""
    decode = (f"{st.decode_tokens_per_s:.1f} tok/s ({1000 * st.decode_s / st.decode_tokens:.1f} ms/token)"
              if st.decode_tokens else "decode speed n/a (the first token comes from the prefill)")
    lines = [f"prompt {st.prompt_tokens} tokens{cached}: {_rate(computed, st.prefill_s)} | generated "
             f"{st.generated_tokens} tokens, {decode} | peak RSS "
             f"{fmt_bytes(st.peak_rss_bytes)} ({fmt_bytes(st.peak_rss_bytes - baseline)} above the "
             f"runtime's {fmt_bytes(baseline)})"]
    x = st.extra
    if st.draft:
        sp = st.speculation()
        lines.append(f"draft {st.draft}: {sp['accepted_tokens']}/{sp['drafted_tokens']} drafted tokens accepted "
                     f"({100 * sp['acceptance_rate']:.0f}%), {sp['tokens_per_forward']:.2f} tokens per forward | "
                     f"ms/token: draft {sp['draft_ms_per_token']:.1f}, verify {sp['verify_ms_per_token']:.1f}"
                     + (f" | draft holds {fmt_bytes(x['draft_bytes'])}" if x.get("draft_bytes") else ""))
    if x.get("offload") in ("window", "naive"):
        ms = x["ms_per_token"]
        lines.append(f"offload {x['offload']} ({x['selector']}), budget "
                     f"{fmt_bytes(budget) if budget else 'unlimited'}: dense {fmt_bytes(x['dense_bytes'])}, "
                     f"window cache {fmt_bytes(x['window_cache_bytes'])} ({x['cache_rows_per_layer']} "
                     f"rows/layer{_placed_text(x)}), buffers {fmt_bytes(x['buffer_bytes'])}, KV "
                     f"{fmt_bytes(x['kv_cache_bytes'])}"
                     f" | per decode token: read {fmt_bytes(x['flash_bytes_per_token'])} in "
                     f"{x['read_ops_per_token']:.1f} reads of {fmt_bytes(x['decode_mean_read_bytes'])} | cache hit "
                     f"rate {100 * x['cache_hit_rate']:.1f}% | ms/token: I/O wait {ms['io_wait']:.1f}, bookkeeping "
                     f"{ms['bookkeeping']:.1f}, compute {ms['compute']:.1f}, selection {ms['selection']:.1f}")
    return lines


def _placed_text(x: dict) -> str:
    p = x.get("placement")
    if not p:
        return ""
    dev = f", {p['device_neurons']} on {p['device']}" if p["device_neurons"] else ""
    return f"; placement {p['solver']}: {p['pinned_neurons']} pinned{dev}"


def _writable(path: Path | None) -> None:
    """Refuse an output file that cannot be written before any work is done."""
    if path is None:
        return
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK) or path.is_dir():
        why = "is a folder" if path.is_dir() else f"its folder {parent} does not exist or is not writable"
        raise FlashinferError(f"cannot write {path}: {why}; choose another path")


def _write(path: Path, text: str) -> None:
    """Write a report file whole or not at all (a temporary beside it, renamed), turning an
    unwritable path or a full disk into a one-line error."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        raise FlashinferError(f"cannot write {path}: {e.strerror or e}; choose another path") from None
    finally:
        tmp.unlink(missing_ok=True)


