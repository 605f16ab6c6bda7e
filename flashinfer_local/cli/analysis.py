"""`profile`, `estimate`, `calibrate` and `eval`: the commands that measure, plan and tune."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from storage.errors import FlashinferError

from flashinfer_local.cli.app import _writable, _write, main
from flashinfer_local.cli.options import (engine_options, generation_options, prompt_options, read_prompt,
                                         take_engine_options)
from flashinfer_local.units import fmt_bytes


@main.command()
@click.argument("model", required=False)
@generation_options(64, 0, "Random seed (fixed by default, so sweep rows generate the same tokens).")
@prompt_options
@engine_options
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for profile.json and the charts (default: ./profile-<model name>).")
@click.option("--sweep", default=None, help="Budgets to compare, each run in a fresh process: "
              "shares of the bundle size or sizes, e.g. 25%,50%,75%,100% or 300MiB,1GiB.")
@click.option("--target-tps", type=float, default=None,
              help="With --sweep: report the smallest budget whose decode reaches this many tokens/s.")
@click.option("--json-only", is_flag=True, hidden=True, help="Write profile.json only, print nothing "
              "(the per-budget runs of --sweep).")
def profile(model, prompt, prompt_file, max_tokens, temperature, top_p, top_k, seed, chat, dtype, out, sweep, target_tps,
            json_only, **engine):
    """Generate from MODEL while recording where the memory goes (RSS over time by owner, per phase),
    SSD bytes read per token and the window cache; writes profile.json and PNG charts to --out.
    With --sweep, compares budgets instead (tokens/s, bytes/token, peak RSS; sweep.json, sweep.png)."""
    from flashinfer_local.runtime.sampling import SamplingParams
    from flashinfer_local.workflows.resolve import resolve_run

    opts = take_engine_options(engine)
    sampling = SamplingParams(temperature, top_p, top_k, seed)
    prompt = read_prompt(prompt, prompt_file)
    if target_tps is not None and sweep is None:
        raise FlashinferError("--target-tps needs --sweep (the budgets to search)")
    if sweep is not None and opts.dram_budget is not None:
        raise FlashinferError("--sweep sets the budgets itself; drop --dram-budget")
    path, opts = resolve_run(model, dtype, opts, progress=sys.stderr.isatty() and not json_only)
    out = out or Path(f"profile-{path.name}")
    _make_dir(out)
    if sweep is not None:
        args = ["-p", prompt, "-n", max_tokens, "--temperature", temperature, "--top-p", top_p, "--top-k", top_k,
                "--seed", seed, *(["--chat"] if chat else []), *opts.to_argv(skip=("dram_budget",))]
        _profile_sweep(path, sweep, target_tps, out, [str(a) for a in args], opts.context)
        return
    from flashinfer_local.measure.profile import profile_generation, report_lines
    echo = None if json_only else (lambda s: click.echo(s, nl=False))
    prof = profile_generation(path, opts, prompt, max_tokens, sampling, chat, on_text=echo)
    d = prof.to_dict()
    _write(out / "profile.json", json.dumps(d, indent=1))
    if json_only:
        return
    click.echo()
    from flashinfer_local.measure.charts import write_profile_charts
    charts = write_profile_charts(d, out)
    for line in report_lines(d):
        click.echo(line)
    click.echo(f"wrote {out / 'profile.json'}, " + ", ".join(p.name for p in charts))


def _make_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FlashinferError(f"cannot create {out}: {e.strerror or e}; choose another --out") from None


def _profile_sweep(path: Path, budgets: str, target_tps, out: Path, child_args: list[str], context: int) -> None:
    from storage.reader import Bundle

    from flashinfer_local.measure.charts import sweep_chart
    from flashinfer_local.measure.sweep import parse_budgets, run_sweep, table_lines
    from flashinfer_local.runtime.budget import minimum_budget
    b = Bundle(path)
    size = b.sizes()["total_bytes"]
    parsed = parse_budgets(budgets, size)
    minimum = minimum_budget(b, min(context, b.config.max_position))
    b.close()
    click.echo(f"sweep over {len(parsed)} budgets (bundle {fmt_bytes(size)}, minimum "
               f"budget {fmt_bytes(minimum)}), one process each", err=True)
    res = run_sweep(path, parsed, minimum, child_args, out, target_tps,
                    on_row=lambda r: click.echo(f"  {r['label']}: {r['status']}", err=True))
    _write(out / "sweep.json", json.dumps(res, indent=1))
    sweep_chart(res, out / "sweep.png")
    for line in table_lines(res):
        click.echo(line)
    click.echo(f"wrote {out / 'sweep.json'}, sweep.png (and each budget's profile.json under {out})")


@main.command()
@click.argument("model", required=False)
@click.option("--context", default=2048, show_default=True, help="Tokens the KV cache is sized for.")
@click.option("--dram-budget", default=None, help="Say how a run with this budget would go, e.g. 1.5GiB.")
@click.option("--draft", default=None, help="A speculative draft model (bundle, HF folder or GGUF; a checkpoint "
              "counts as the int4 bundle it would convert to): its DRAM joins every budget.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
def estimate(model, context, dram_budget, draft, as_json):
    """Estimate from MODEL's config alone (bundle, HF folder or GGUF; nothing is converted or loaded):
    bundle size per precision, dense part, KV cache per token and at --context tokens, the minimum
    --dram-budget, and with --dram-budget whether it runs in DRAM, streams, or does not fit."""
    from flashinfer_local.measure.estimate import estimate as do_estimate
    from flashinfer_local.measure.estimate import load_config, report_lines
    from flashinfer_local.units import parse_size
    from flashinfer_local.measure.estimate import draft_bytes
    from flashinfer_local.workflows.resolve import DRAFT_DTYPE
    cfg, facts = load_config(model)
    extra = 0
    if draft is not None:
        dcfg, dfacts = load_config(draft)
        extra = draft_bytes(dcfg, dfacts.get("dtype") or DRAFT_DTYPE, dfacts["tokenizer_bytes"],
                            min(context, cfg.max_position), dfacts.get("low_codes", {}), dfacts.get("lean_tokenizer", True))
    e = do_estimate(cfg, context, parse_size(dram_budget) if dram_budget is not None else None,
                    facts["tokenizer_bytes"], extra, facts.get("low_codes", {}), facts.get("lean_tokenizer", True))
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
@click.option("--predictor", type=click.Choice(["threshold", "lowrank"]), default="threshold", show_default=True,
              help="threshold: the exact gate from gate rows held in DRAM (a third of the FFN); lowrank: a "
              "rank-r stand-in B(A x) for the gate per layer (data-aware SVD, then fine-tuned), small, but its "
              "1%-quality default is 0.00 on the SwiGLU models measured. Both keep the neurons whose "
              "|act(gate)| (silu, or Gemma's tanh-gelu) passes a calibrated cutoff.")
@click.option("--rank", type=int, default=None, help="lowrank: fixed rank for every layer (default: per "
              "layer, the smallest of 32, 64, 128, 256, 512 reaching --recall, capped where the factors "
              "would take a quarter of the gate rows' bytes).")
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
    _writable(json_out)
    from flashinfer_local.workflows.calibrate import calibrate as do_calibrate
    rep = do_calibrate(bundle, predictor, list(corpus) or None, tokens, target_sparsity, rank, recall_target,
                       seed, max_ppl_increase, progress=sys.stderr.isatty(), threads=threads)
    for line in _calibrate_lines(rep):
        click.echo(line)
    if json_out:
        _write(json_out, json.dumps(rep, indent=1))


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
    if "layer_default_sparsity" in rep:
        out.append("with per-layer shares (least activation mass lost for the same mean):")
        for c in rep["layer_default_curve"]:
            out.append(f"  sparsity {c['sparsity']:.2f}: perplexity {c['perplexity']:.3f} ({100 * c['increase']:+.2f}%)")
    out.append(f"default sparsity {rep['default_sparsity']:.2f} uniform, "
               f"{rep.get('layer_default_sparsity', rep['default_sparsity']):.2f} with per-layer shares (largest with <= "
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
              help="Which calibrated predictor (default: threshold if present).")
@click.option("--gen-tokens", default=128, show_default=True, help="Greedy tokens compared with the exact model.")
@click.option("--threads", type=int, default=None, help="Compute threads (default: all cores).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the results as JSON.")
@click.option("--plot", type=click.Path(path_type=Path), help="PNG: sparsity against perplexity increase and "
              "bytes read per token.")
def eval_cmd(bundle, corpus, tokens, sparsities, predictor, gen_tokens, threads, json_out, plot):
    """Measure what a calibrated predictor costs in quality: perplexity on held-out text and greedy
    agreement with the exact model, per sparsity setting."""
    _writable(json_out)
    _writable(plot)
    from flashinfer_local.measure.evaluate import evaluate, held_out_ids
    from flashinfer_local.runtime.engine import Engine
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
        _write(json_out, json.dumps(res, indent=1))
    if plot:
        from flashinfer_local.measure.charts import quality_chart
        quality_chart(res, plot)
        click.echo(f"wrote {plot}")


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--dram-budget", required=True, help="The DRAM budget the plan is for, e.g. 1GiB (as run's).")
@click.option("--gpu-mem", default=None, help="Memory the device may hold for FFN neurons, e.g. 4GiB "
              "(default: no device tier).")
@click.option("--device", type=click.Choice(["cuda", "mps", "cpu"]), default=None,
              help="The device for --gpu-mem (default cuda); cpu runs torch on the same cores (for tests).")
@click.option("--solver", type=click.Choice(["milp", "greedy"]), default="milp", show_default=True,
              help="milp: the mixed-integer program (HiGHS) over the measured cost model; greedy: hottest "
              "neurons first (PowerInfer's shipped solver). Both objectives are reported.")
@click.option("--measure", is_flag=True, help="Measure the cost model again (else the cached one is used).")
@click.option("--reorder", type=click.Choice(["coact", "frequency"]), default=None,
              help="Also renumber each layer's neurons for long reads (device, then pinned, then a path of "
              "co-active neurons, or by frequency) and rewrite the bundle's records, predictors and plan "
              "(crash-safe).")
@engine_options(only=("selector", "predictor", "sparsity", "layer_shares", "window", "evict", "context", "threads",
                      "io_threads"))
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the plan's report as JSON.")
def plan(bundle, dram_budget, gpu_mem, device, solver, measure, reorder, json_out, **engine):
    """Place BUNDLE's FFN neurons for a DRAM budget: per layer, which are pinned on the device,
    pinned in DRAM, held by the window or streamed; stored in the bundle (run follows it)."""
    from flashinfer_local.units import parse_size
    from flashinfer_local.workflows.plan import make_plan, summary_lines
    _writable(json_out)
    opts = take_engine_options(engine)
    budget, gpu = parse_size(dram_budget), parse_size(gpu_mem) if gpu_mem else 0
    rep = make_plan(bundle, budget, opts, gpu, device, solver, measure, reorder, say=lambda m: click.echo(m, err=True))
    for line in summary_lines(rep):
        click.echo(line)
    if rep.get("reorder"):
        click.echo(f"reordered the neurons ({rep['reorder']['method']}): neuron_order {rep['reorder']['neuron_order']}")
    click.echo(f"wrote {rep['path']}")
    if json_out:
        _write(json_out, json.dumps(rep, indent=1))
