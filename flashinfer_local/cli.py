"""The `flashinfer-local` command line: run, convert, inspect."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from storage.errors import FlashinferError

from .units import fmt_bytes


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
@click.option("--dtype", type=click.Choice(["f32", "f16"]), default="f16", show_default=True,
              help="Precision of the weights in the bundle.")
@click.option("--force", is_flag=True, help="Replace OUT (only after the new bundle is complete).")
def convert(src: Path, out: Path, dtype: str, force: bool):
    """Convert a checkpoint (HF folder or GGUF file) SRC into a bundle directory OUT."""
    from storage.convert import convert as do_convert
    from storage.reader import Bundle

    from .memory import PeakRSS
    with PeakRSS() as peak:
        path = do_convert(src, out, dtype=dtype, force=force, progress=sys.stderr.isatty())
    b = Bundle(path)
    s = b.sizes()
    click.echo(f"wrote {path}: {fmt_bytes(s['total_bytes'])} (dense {fmt_bytes(s['dense_bytes'])}, "
               f"ffn {fmt_bytes(s['ffn_bytes'])}); peak RSS {fmt_bytes(peak.peak)}")


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
        click.echo(json.dumps({"config": cfg.to_dict(), "sizes": s, "layout": lay.to_dict(),
                               "source": m["source"], "format_version": m["format_version"]}, indent=1))
    else:
        kv = sorted(set(cfg.n_kv_heads))
        click.echo(f"bundle      {b.path}  (format v{m['format_version']}, {m.get('created_by', '?')})")
        click.echo(f"source      {m['source'].get('kind')}: {m['source'].get('name')}")
        click.echo(f"model       {cfg.arch}: {cfg.n_layers} layers, d_model {cfg.d_model}, d_ff {cfg.d_ff}, "
                   f"heads {cfg.n_heads} (kv {kv[0] if len(kv) == 1 else kv}), head_dim {cfg.head_dim}, "
                   f"vocab {cfg.vocab_size}, context {cfg.max_position}"
                   f"{', tied head' if cfg.tie_embeddings else ''}")
        click.echo(f"precision   dense {m['dense']['dtype']} (norms/biases f32), ffn {m['ffn']['dtype']}")
        click.echo(f"size        total {fmt_bytes(s['total_bytes'])}: dense {fmt_bytes(s['dense_bytes'])}, "
                   f"ffn {fmt_bytes(s['ffn_bytes'])}")
        fields = ", ".join(f"{f.name} {f.count}x{f.dtype}@{f.offset}" for f in lay.fields)
        click.echo(f"ffn record  {lay.record_bytes} bytes per neuron ({fields}); "
                   f"padding {lay.padding_bytes} B/record, {fmt_bytes(s['ffn_padding_bytes'])} in all "
                   f"({100 * s['ffn_padding_bytes'] / s['ffn_bytes']:.1f}% of ffn)")
        click.echo(f"kv cache    {fmt_bytes(cfg.kv_bytes_per_token())} per token (f32)")
    if verify:
        bad = b.verify()
        if bad:
            raise FlashinferError(f"checksum mismatch in {', '.join(bad)}: the bundle is corrupted; "
                                  "re-run convert")
        click.echo(f"verify      all {len(m['files'])} checksums match")


@main.command()
@click.argument("model", required=False)
@click.option("-p", "--prompt", required=True, help="Prompt text.")
@click.option("-n", "--max-tokens", default=128, show_default=True, help="Tokens to generate at most.")
@click.option("--temperature", default=0.7, show_default=True, help="0 is greedy.")
@click.option("--top-p", default=0.95, show_default=True)
@click.option("--top-k", default=40, show_default=True, help="0 turns it off.")
@click.option("--seed", type=int, default=None, help="Random seed for sampling.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--dtype", type=click.Choice(["f32", "f16"]), default="f16", show_default=True,
              help="Precision used when MODEL is a checkpoint converted on first use.")
@click.option("--threads", type=int, default=None, help="Compute threads (default: all cores).")
@click.option("--dram-budget", default=None, help="DRAM the engine may hold for the model, e.g. 1.5GiB "
              "(default: no limit). Smaller than the bundle: FFN records stream from the SSD.")
@click.option("--offload", type=click.Choice(["none", "window", "naive"]), default=None,
              help="none: all in DRAM; window: sliding-window cache of SSD records; naive: read every "
              "record every token. Default: none if the bundle fits the budget, else window.")
@click.option("--window", "window_tokens", default=4, show_default=True,
              help="Tokens a neuron stays cached after its last use.")
@click.option("--io-threads", default=8, show_default=True, help="Parallel SSD reads in flight.")
@click.option("--selector", type=click.Choice(["all", "oracle"]), default="all", show_default=True,
              help="Which neurons a token computes. all: exact; oracle: measuring tool (true top "
              "activations from dense weights held outside the budget), not for normal use.")
@click.option("--sparsity", default=0.5, show_default=True, help="Share of neurons the oracle skips.")
@click.option("--context", default=2048, show_default=True,
              help="Longest prompt + generation planned for (sizes the KV cache in the budget).")
@click.option("--stats", is_flag=True, help="Print speed and memory figures to stderr at the end.")
@click.option("--stats-json", type=click.Path(path_type=Path), help="Write the figures as JSON.")
def run(model, prompt, max_tokens, temperature, top_p, top_k, seed, chat, dtype, threads, dram_budget,
        offload, window_tokens, io_threads, selector, sparsity, context, stats, stats_json):
    """Generate text from MODEL (a bundle, an HF folder, a GGUF file; default: SmolLM2-135M-Instruct)."""
    from .engine import Engine
    from .generate import SamplingParams
    from .memory import PeakRSS, rss_bytes
    from .resolve import resolve_model
    from .units import parse_size

    sampling = SamplingParams(temperature, top_p, top_k, seed)
    budget = parse_size(dram_budget) if dram_budget is not None else None
    path = resolve_model(model, dtype=dtype, progress=sys.stderr.isatty())
    baseline = rss_bytes()
    with PeakRSS() as peak:
        eng = Engine(path, threads=threads, offload=offload, dram_budget=budget, window=window_tokens,
                     io_threads=io_threads, selector=selector, sparsity=sparsity, context=context)
        st, text = None, []
        for step in eng.generate(prompt, max_tokens=max_tokens, sampling=sampling, chat=chat):
            click.echo(step.text, nl=False)
            text.append(step.text)
            st = step.stats
        click.echo()
    eng.close()
    if st is None:
        from .generate import GenerationStats
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
