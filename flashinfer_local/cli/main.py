"""The `flashinfer-local` command line: run, convert, inspect, profile, estimate, calibrate, eval."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from storage.errors import FlashinferError

from flashinfer_local.units import fmt_bytes


class _Group(click.Group):
    """Turns every FlashinferError into a one-line message (no traceback) and exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FlashinferError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Group)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="flashinfer-local")
def main(verbose: int):
    """Run language models larger than your DRAM from a bundled store on the SSD."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for name in ("flashinfer_local.resolve", "flashinfer_local.fetch"):   # say what first use does
        logging.getLogger(name).setLevel(min(level, logging.INFO))


@main.command()
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(["f32", "f16", "int8", "int4"]), default="f16", show_default=True,
              help="Precision of the FFN records (int8/int4: groups of 32 values with f16 scales; the "
              "dense part of those bundles stays f16).")
@click.option("--force", is_flag=True, help="Replace OUT (only after the new bundle is complete).")
def convert(src: Path, out: Path, dtype: str, force: bool):
    """Convert a checkpoint (HF folder or GGUF file) SRC into a bundle directory OUT."""
    from storage.convert import convert as do_convert
    from storage.reader import Bundle

    from flashinfer_local.runtime.rss import PeakRSS
    with PeakRSS() as peak:
        path = do_convert(src, out, dtype=dtype, force=force, progress=sys.stderr.isatty())
    b = Bundle(path)
    s = b.sizes()
    click.echo(f"wrote {path}: {fmt_bytes(s['total_bytes'])} (dense {fmt_bytes(s['dense_bytes'])}, "
               f"ffn {fmt_bytes(s['ffn_bytes'])}); peak RSS {fmt_bytes(peak.peak)}")


def _precision(b) -> str:
    """Each part's precision, e.g. 'attention int8, embedding + tied head int8, norms/biases f32;
    ffn int4 (gate q4, up q4, down q8)'; q8/q4 are groups of 32 with f16 scales (q4: and minimums)."""
    qd, dense = set(b.quantized_dense), b.dense_dtype
    attn = "int8" if any(n.startswith("layers.") for n in qd) else dense
    if b.config.tie_embeddings:
        head = f"embedding + tied head {'int8' if 'embed' in qd else dense}"
    else:
        head = f"embedding {dense}, head {'int8' if 'lm_head' in qd else dense}"
    ffn = b.ffn_dtype
    if ffn not in ("f16", "f32"):
        vec = [f for f in b.layout.fields if "." not in f.name and f.name != "up_bias"]
        ffn += " (" + ", ".join(f"{f.name} {f.dtype}" for f in vec) + ")"
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
                                              for k, v in preds.items() if v}}, indent=1))
    else:
        kv = sorted(set(cfg.n_kv_heads))
        click.echo(f"bundle      {b.path}  (format v{m['format_version']}, {m.get('created_by', '?')})")
        click.echo(f"source      {m['source'].get('kind')}: {m['source'].get('name')}")
        click.echo(f"model       {cfg.arch}: {cfg.n_layers} layers, d_model {cfg.d_model}, d_ff {cfg.d_ff}, "
                   f"heads {cfg.n_heads} (kv {kv[0] if len(kv) == 1 else kv}), head_dim {cfg.head_dim}, "
                   f"vocab {cfg.vocab_size}, context {cfg.max_position}"
                   f"{', tied head' if cfg.tie_embeddings else ''}")
        click.echo(f"precision   {_precision(b)}")
        click.echo(f"size        total {fmt_bytes(s['total_bytes'])}: dense {fmt_bytes(s['dense_bytes'])}, "
                   f"ffn {fmt_bytes(s['ffn_bytes'])}")
        fields = ", ".join(f"{f.name} {f.count}x{f.dtype}@{f.offset}" for f in lay.fields)
        click.echo(f"ffn record  {lay.record_bytes} bytes per neuron ({fields}); "
                   f"padding {lay.padding_bytes} B/record, {fmt_bytes(s['ffn_padding_bytes'])} in all "
                   f"({100 * s['ffn_padding_bytes'] / s['ffn_bytes']:.1f}% of ffn)")
        click.echo(f"kv cache    {fmt_bytes(cfg.kv_bytes_per_token())} per token (f32)")
        for line in _predictor_lines(b):
            click.echo(line)
    if verify:
        bad = b.verify()
        if bad:
            raise FlashinferError(f"checksum mismatch in {', '.join(bad)}: the bundle is corrupted; "
                                  "re-run convert")
        click.echo(f"verify      all {len(m['files'])} checksums match")


def _predictor_lines(b) -> list[str]:
    from predictors import store

    from flashinfer_local.runtime.selection import predictor_bytes
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
        out.append(f"predictor   {kind}: {what}; default sparsity {meta['default_sparsity']:.2f}, calibrated on "
                   f"{meta['train_tokens']} tokens")
    if not out:
        out.append("predictor   none (flashinfer-local calibrate BUNDLE adds one)")
    return out


def _options(*decorators):
    """Several click options as one decorator (shared by run and profile)."""
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


SAMPLING_OPTIONS = _options(
    click.option("--temperature", default=0.7, show_default=True, help="0 is greedy."),
    click.option("--top-p", default=0.95, show_default=True),
    click.option("--top-k", default=40, show_default=True, help="0 turns it off."))

ENGINE_OPTIONS = _options(
    click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template."),
    click.option("--dtype", type=click.Choice(["f32", "f16", "int8", "int4"]), default="f16",
                 show_default=True, help="Precision used when MODEL is a checkpoint converted on first use."),
    click.option("--threads", type=int, default=None, help="Compute threads (default: all cores)."),
    click.option("--dram-budget", default=None, help="DRAM the engine may hold for the model, e.g. 1.5GiB "
                 "(default: no limit). Smaller than the bundle: FFN records stream from the SSD."),
    click.option("--offload", type=click.Choice(["none", "window", "naive"]), default=None,
                 help="none: all in DRAM; window: sliding-window cache of SSD records; naive: read every "
                 "record every token. Default: none if the bundle fits the budget, else window."),
    click.option("--window", "window_tokens", default=4, show_default=True,
                 help="Tokens a neuron stays cached after its last use."),
    click.option("--io-threads", default=8, show_default=True, help="Parallel SSD reads in flight."),
    click.option("--evict", type=click.Choice(["recency", "frequency"]), default="recency",
                 show_default=True, help="What the window cache keeps when a token needs more neurons than "
                 "fit: the most recently used (the paper's window), or the most often used ones."),
    click.option("--selector", type=click.Choice(["all", "predictor", "oracle"]), default="all",
                 show_default=True, help="Which neurons a token computes. all: exact; predictor: what "
                 "`calibrate` stored in the bundle; oracle: measuring tool (true top activations from "
                 "dense weights held outside the budget), not for normal use."),
    click.option("--predictor", type=click.Choice(["lowrank", "threshold"]), default=None,
                 help="Which calibrated predictor --selector predictor uses (default: lowrank if the "
                 "bundle has it, else threshold)."),
    click.option("--sparsity", type=float, default=None, help="Share of neurons a token skips (default: "
                 "the predictor's calibrated default, at most 1%% perplexity cost; the oracle: 0.5)."),
    click.option("--context", default=2048, show_default=True,
                 help="Longest prompt + generation planned for (sizes the KV cache in the budget)."))


@main.command()
@click.argument("model", required=False)
@click.option("-p", "--prompt", required=True, help="Prompt text.")
@click.option("-n", "--max-tokens", default=128, show_default=True, help="Tokens to generate at most.")
@SAMPLING_OPTIONS
@click.option("--seed", type=int, default=None, help="Random seed for sampling.")
@ENGINE_OPTIONS
@click.option("--stats", is_flag=True, help="Print speed and memory figures to stderr at the end.")
@click.option("--stats-json", type=click.Path(path_type=Path), help="Write the figures as JSON.")
def run(model, prompt, max_tokens, temperature, top_p, top_k, seed, chat, dtype, threads, dram_budget,
        offload, window_tokens, io_threads, evict, selector, predictor, sparsity, context, stats, stats_json):
    """Generate text from MODEL (a bundle, an HF folder, a GGUF file; default: SmolLM2-135M-Instruct)."""
    from flashinfer_local.runtime.engine import Engine
    from flashinfer_local.runtime.sampling import SamplingParams
    from flashinfer_local.runtime.rss import PeakRSS, rss_bytes
    from flashinfer_local.workflows.resolve import resolve_model
    from flashinfer_local.units import parse_size

    sampling = SamplingParams(temperature, top_p, top_k, seed)
    budget = parse_size(dram_budget) if dram_budget is not None else None
    path = resolve_model(model, dtype=dtype, progress=sys.stderr.isatty())
    baseline = rss_bytes()
    with PeakRSS() as peak:
        eng = Engine(path, threads=threads, offload=offload, dram_budget=budget, window=window_tokens,
                     io_threads=io_threads, evict=evict, selector=selector, sparsity=sparsity, context=context,
                     predictor=predictor)
        st, text = None, []
        for step in eng.generate(prompt, max_tokens=max_tokens, sampling=sampling, chat=chat):
            click.echo(step.text, nl=False)
            text.append(step.text)
            st = step.stats
        click.echo()
    eng.close()
    if st is None:
        from flashinfer_local.runtime.sampling import GenerationStats
        st = GenerationStats(prompt_tokens=len(eng.encode_prompt(prompt, chat)))
    st.peak_rss_bytes = peak.peak
    baseline = eng.runtime_baseline_bytes
    out = {"model": str(path), "text": "".join(text), **st.to_dict(), "runtime_baseline_bytes": baseline,
           "peak_rss_above_baseline_bytes": st.peak_rss_bytes - baseline}
    if stats:
        click.echo(f"prompt {st.prompt_tokens} tokens, {st.prefill_tokens_per_s:.1f} tok/s | generated "
                   f"{st.generated_tokens} tokens, {st.decode_tokens_per_s:.1f} tok/s | peak RSS "
                   f"{fmt_bytes(st.peak_rss_bytes)} ({fmt_bytes(st.peak_rss_bytes - baseline)} above the "
                   f"runtime's {fmt_bytes(baseline)})", err=True)
        x = st.extra
        if x.get("offload") in ("window", "naive"):
            ms = x["ms_per_token"]
            click.echo(f"offload {x['offload']} ({x['selector']}), budget "
                       f"{fmt_bytes(budget) if budget else 'unlimited'}: dense {fmt_bytes(x['dense_bytes'])}, "
                       f"window cache {fmt_bytes(x['window_cache_bytes'])} ({x['cache_rows_per_layer']} "
                       f"rows/layer), buffers {fmt_bytes(x['buffer_bytes'])}, KV {fmt_bytes(x['kv_cache_bytes'])}"
                       f" | read {fmt_bytes(x['flash_bytes_per_token'])}/token in {x['read_ops']} reads of "
                       f"{fmt_bytes(x['mean_read_bytes'])} | cache hit rate {100 * x['cache_hit_rate']:.1f}% | "
                       f"ms/token: I/O wait {ms['io_wait']:.1f}, bookkeeping {ms['bookkeeping']:.1f}, "
                       f"compute {ms['compute']:.1f}, selection {ms['selection']:.1f}", err=True)
    if stats_json:
        stats_json.write_text(json.dumps(out, indent=1))


@main.command()
@click.argument("model", required=False)
@click.option("-p", "--prompt", required=True, help="Prompt text.")
@click.option("-n", "--max-tokens", default=64, show_default=True, help="Tokens to generate at most.")
@SAMPLING_OPTIONS
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed (fixed by default, so sweep rows generate the same tokens).")
@ENGINE_OPTIONS
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for profile.json and the charts (default: ./profile-<model name>).")
@click.option("--sweep", default=None, help="Budgets to compare, each run in a fresh process: "
              "shares of the bundle size or sizes, e.g. 25%,50%,75%,100% or 300MiB,1GiB.")
@click.option("--target-tps", type=float, default=None,
              help="With --sweep: report the smallest budget whose decode reaches this many tokens/s.")
@click.option("--json-only", is_flag=True, hidden=True, help="Write profile.json only, print nothing "
              "(the per-budget runs of --sweep).")
def profile(model, prompt, max_tokens, temperature, top_p, top_k, seed, chat, dtype, threads, dram_budget,
            offload, window_tokens, io_threads, evict, selector, predictor, sparsity, context, out, sweep,
            target_tps, json_only):
    """Generate from MODEL while recording where the memory goes (RSS over time by owner, per phase),
    SSD bytes read per token and the window cache; writes profile.json and PNG charts to --out.
    With --sweep, compares budgets instead (tokens/s, bytes/token, peak RSS; sweep.json, sweep.png)."""
    from flashinfer_local.runtime.sampling import SamplingParams
    from flashinfer_local.workflows.resolve import resolve_model
    from flashinfer_local.units import parse_size

    sampling = SamplingParams(temperature, top_p, top_k, seed)
    path = resolve_model(model, dtype=dtype, progress=sys.stderr.isatty() and not json_only)
    if target_tps is not None and sweep is None:
        raise FlashinferError("--target-tps needs --sweep (the budgets to search)")
    if sweep is not None and dram_budget is not None:
        raise FlashinferError("--sweep sets the budgets itself; drop --dram-budget")
    out = out or Path(f"profile-{path.name}")
    out.mkdir(parents=True, exist_ok=True)
    if sweep is not None:
        _profile_sweep(path, sweep, target_tps, out, prompt=prompt, max_tokens=max_tokens,
                       temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, chat=chat,
                       threads=threads, offload=offload, window=window_tokens, io_threads=io_threads,
                       evict=evict, selector=selector, predictor=predictor, sparsity=sparsity,
                       context=context)
        return
    from flashinfer_local.measure.profile import profile_generation, report_lines
    options = {"threads": threads, "offload": offload, "window": window_tokens, "io_threads": io_threads,
               "evict": evict, "selector": selector, "predictor": predictor, "sparsity": sparsity,
               "context": context,
               "dram_budget": parse_size(dram_budget) if dram_budget is not None else None}
    echo = None if json_only else (lambda s: click.echo(s, nl=False))
    prof = profile_generation(path, options, prompt, max_tokens, sampling, chat, on_text=echo)
    d = prof.to_dict()
    (out / "profile.json").write_text(json.dumps(d, indent=1))
    if json_only:
        return
    click.echo()
    from flashinfer_local.measure.charts import write_profile_charts
    charts = write_profile_charts(d, out)
    for line in report_lines(d):
        click.echo(line)
    click.echo(f"wrote {out / 'profile.json'}, " + ", ".join(p.name for p in charts))


def _profile_sweep(path: Path, budgets: str, target_tps, out: Path, **run) -> None:
    from storage.reader import Bundle

    from flashinfer_local.runtime.budget import minimum_budget
    from flashinfer_local.measure.charts import sweep_chart
    from flashinfer_local.measure.sweep import parse_budgets, run_sweep, table_lines
    b = Bundle(path)
    parsed = parse_budgets(budgets, b.sizes()["total_bytes"])
    minimum = minimum_budget(b, min(run["context"], b.config.max_position))
    b.close()
    args = ["-p", run["prompt"], "-n", run["max_tokens"], "--temperature", run["temperature"], "--top-p",
            run["top_p"], "--top-k", run["top_k"], "--seed", run["seed"], "--window", run["window"],
            "--io-threads", run["io_threads"], "--evict", run["evict"], "--selector", run["selector"],
            "--context", run["context"]]
    args += ["--sparsity", run["sparsity"]] if run["sparsity"] is not None else []
    args += ["--predictor", run["predictor"]] if run["predictor"] else []
    args += ["--chat"] if run["chat"] else []
    args += ["--threads", run["threads"]] if run["threads"] else []
    args += ["--offload", run["offload"]] if run["offload"] else []
    click.echo(f"sweep over {len(parsed)} budgets (bundle {fmt_bytes(b.sizes()['total_bytes'])}, minimum "
               f"budget {fmt_bytes(minimum)}), one process each", err=True)
    res = run_sweep(path, parsed, minimum, [str(a) for a in args], out, target_tps,
                    on_row=lambda r: click.echo(f"  {r['label']}: {r['status']}", err=True))
    (out / "sweep.json").write_text(json.dumps(res, indent=1))
    sweep_chart(res, out / "sweep.png")
    for line in table_lines(res):
        click.echo(line)
    click.echo(f"wrote {out / 'sweep.json'}, sweep.png (and each budget's profile.json under {out})")


@main.command()
@click.argument("model", required=False)
@click.option("--context", default=2048, show_default=True, help="Tokens the KV cache is sized for.")
@click.option("--dram-budget", default=None, help="Say how a run with this budget would go, e.g. 1.5GiB.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
def estimate(model, context, dram_budget, as_json):
    """Estimate from MODEL's config alone (bundle, HF folder or GGUF; nothing is converted or loaded):
    bundle size per precision, dense part, KV cache per token and at --context tokens, the minimum
    --dram-budget, and with --dram-budget whether it runs in DRAM, streams, or does not fit."""
    from flashinfer_local.measure.estimate import estimate as do_estimate
    from flashinfer_local.measure.estimate import load_config, report_lines
    from flashinfer_local.units import parse_size
    cfg, facts = load_config(model)
    e = do_estimate(cfg, context, parse_size(dram_budget) if dram_budget is not None else None,
                    facts["tokenizer_bytes"])
    if as_json:
        click.echo(json.dumps({"source": {k: v for k, v in facts.items() if k != "bundle"}, **e}, indent=1))
        return
    for line in report_lines(e, facts):
        click.echo(line)


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--corpus", "corpus", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text file(s) to calibrate on (default: the Python standard library's docstrings and "
              "sources, see the README).")
@click.option("--tokens", default=4096, show_default=True, help="Calibration tokens (the last 1/8 is held "
              "out to measure recall and pick the default sparsity).")
@click.option("--target-sparsity", default=0.5, show_default=True,
              help="Share of neurons counted inactive when training and reporting recall.")
@click.option("--predictor", type=click.Choice(["lowrank", "threshold"]), default="lowrank", show_default=True,
              help="lowrank: trained sigma(B(A x)) per layer, small; threshold: exact gate from gate rows "
              "held in DRAM (a third of the FFN) and a calibrated cutoff.")
@click.option("--rank", type=int, default=None, help="lowrank: fixed rank for every layer (default: per "
              "layer, the smallest of 16..512 reaching --recall).")
@click.option("--recall", "recall_target", default=0.95, show_default=True,
              help="lowrank: share of the active neurons' activation mass the predictor must keep.")
@click.option("--max-ppl-increase", default=0.01, show_default=True,
              help="The default sparsity stored is the largest whose validation perplexity rises at most this.")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="Compute threads (default: all cores).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the report as JSON.")
def calibrate(bundle, corpus, tokens, target_sparsity, predictor, rank, recall_target, max_ppl_increase, seed,
              threads, json_out):
    """Fit a sparsity predictor for BUNDLE on real text and store it in the bundle (atomically)."""
    from flashinfer_local.workflows.calibrate import calibrate as do_calibrate
    rep = do_calibrate(bundle, predictor, list(corpus) or None, tokens, target_sparsity, rank, recall_target,
                       seed, max_ppl_increase, progress=sys.stderr.isatty(), threads=threads)
    for line in _calibrate_lines(rep):
        click.echo(line)
    if json_out:
        json_out.write_text(json.dumps(rep, indent=1))


def _calibrate_lines(rep: dict) -> list[str]:
    import numpy as np
    lay = rep["layers"]
    out = [f"{rep['kind']} predictor: {rep['train_tokens']} training + {rep['val_tokens']} validation tokens "
           f"({rep['corpus'] if isinstance(rep['corpus'], str) else ', '.join(rep['corpus'])}), target "
           f"sparsity {rep['target_sparsity']:.2f}, {rep['calibrate_s']:.0f} s"]
    out.append("layer  rank  recall  precision  fit s  predictor ms/token")
    for r in lay:
        out.append(f"{r['layer']:>5}  {r['rank'] if r['rank'] else '-':>4}  {r['recall']:.3f}   {r['precision']:.3f}"
                   f"      {r['fit_s']:>5.1f}  {r['predict_ms']:.3f}")
    out.append(f"mean recall {np.mean([r['recall'] for r in lay]):.3f}, precision "
               f"{np.mean([r['precision'] for r in lay]):.3f}, predictor {sum(r['predict_ms'] for r in lay):.1f} "
               f"ms/token in all; validation perplexity exact "
               f"{rep['exact_val_perplexity']:.3f}")
    for c in rep["default_curve"]:
        out.append(f"  sparsity {c['sparsity']:.2f}: perplexity {c['perplexity']:.3f} ({100 * c['increase']:+.2f}%)")
    out.append(f"default sparsity {rep['default_sparsity']:.2f} (largest with <= "
               f"{100 * rep['max_ppl_increase']:.0f}% perplexity increase); wrote {rep['path']}")
    return out


@main.command(name="eval")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--corpus", "corpus", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Held-out text file(s) (default: standard-library text not used by calibrate).")
@click.option("--tokens", default=1024, show_default=True, help="Held-out tokens scored.")
@click.option("--sparsity", "sparsities", multiple=True, type=float,
              help="Settings to measure (repeatable; default: 0.3 to 0.7 and the calibrated default).")
@click.option("--predictor", type=click.Choice(["lowrank", "threshold"]), default=None,
              help="Which calibrated predictor (default: lowrank if present).")
@click.option("--gen-tokens", default=128, show_default=True, help="Greedy tokens compared with the exact model.")
@click.option("--threads", type=int, default=None, help="Compute threads (default: all cores).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the results as JSON.")
@click.option("--plot", type=click.Path(path_type=Path), help="PNG: sparsity against perplexity increase and "
              "bytes read per token.")
def eval_cmd(bundle, corpus, tokens, sparsities, predictor, gen_tokens, threads, json_out, plot):
    """Measure what a calibrated predictor costs in quality: perplexity on held-out text and greedy
    agreement with the exact model, per sparsity setting."""
    from flashinfer_local.runtime.engine import Engine
    from flashinfer_local.measure.evaluate import evaluate, held_out_ids
    eng = Engine(bundle, threads=threads, offload="none", selector="predictor", predictor=predictor)
    default = eng.selector.meta["default_sparsity"]
    settings = sorted(set(sparsities) if sparsities else {0.3, 0.4, 0.5, 0.6, 0.7, default})
    parts = held_out_ids(eng.tokenizer, list(corpus) or None, tokens)
    click.echo(f"{eng.selector.kind} predictor on {bundle.name}: {', '.join(f'{k} {len(v)}' for k, v in parts.items())}"
               f" held-out tokens, {gen_tokens} greedy tokens; default sparsity {default:.2f}")
    click.echo("sparsity  ppl increase  agreement  identical prefix  kept  read/token  predictor ms/token (% of token)")

    def show(r):
        click.echo(f"{r['sparsity']:>8.2f}  {100 * r['ppl_increase']['all']:>+11.2f}%  {r['agreement']:>9.3f}  "
                   f"{r['identical_prefix']:>16}  {r['kept_share']:.2f}  {fmt_bytes(r['bytes_per_token']):>10}  "
                   f"{r['predictor_ms_per_token']:.2f} ({100 * r['predictor_share_of_dram_token']:.1f}%)")
    res = evaluate(eng, settings, parts, gen_tokens=gen_tokens, on_step=show)
    eng.close()
    res["bundle"] = str(bundle)
    click.echo(f"exact perplexity {', '.join(f'{k} {v:.3f}' for k, v in res['exact_perplexity'].items())}; "
               f"reading every record: {fmt_bytes(res['all_bytes_per_token'])}/token")
    if json_out:
        json_out.write_text(json.dumps(res, indent=1))
    if plot:
        from flashinfer_local.measure.charts import quality_chart
        quality_chart(res, plot)
        click.echo(f"wrote {plot}")
