"""Click options derived from the declarations they stand for: ``EngineOptions`` for the engine,
plus the sampling options `run` and `profile` share."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from storage.errors import FlashinferError

from flashinfer_local.runtime.options import EngineOptions, cli_fields
from flashinfer_local.units import parse_size


def _click_type(f):
    t = str(f.type)
    if f.metadata["choices"]:
        return click.Choice(list(f.metadata["choices"]))
    if f.metadata["unit"] == "bytes":
        return str                      # a size in real units, parsed by parse_size
    return float if "float" in t else int if "int" in t else str


def engine_options(fn=None, *, only: tuple[str, ...] | None = None):
    """Add one click option per CLI field of EngineOptions (help, default and choices from it);
    ``only``: just these fields (``engine_options(only=(...))`` as a decorator)."""
    if fn is None:
        return lambda f: engine_options(f, only=only)
    for f in reversed(cli_fields()):
        if only is not None and f.name not in only:
            continue
        default = f.default if f.metadata["unit"] != "bytes" or f.default is None else f"{f.default}B"
        fn = click.option(EngineOptions.label(f.name), f.name, type=_click_type(f), default=default,
                          show_default=default is not None, help=f.metadata["help"])(fn)
    return fn


def take_engine_options(kwargs: dict) -> EngineOptions:
    """Remove the engine options from a command's keyword arguments -> EngineOptions."""
    values = {}
    for f in cli_fields():
        if f.name not in kwargs:
            continue
        v = kwargs.pop(f.name)
        values[f.name] = parse_size(v) if f.metadata["unit"] == "bytes" and v is not None else v
    return EngineOptions(**values)


def sampling_options(fn):
    for opt in reversed([
            click.option("--temperature", default=0.7, show_default=True, help="0 is greedy."),
            click.option("--top-p", default=0.95, show_default=True),
            click.option("--top-k", default=40, show_default=True, help="0 turns it off.")]):
        fn = opt(fn)
    return fn


def dtype_option(fn):
    """--dtype: how a checkpoint given as MODEL is converted on first use."""
    return click.option("--dtype", type=click.Choice(["f32", "f16", "int8", "int4"]), default="f16",
                        show_default=True, help="Precision used when MODEL is a checkpoint converted on first use.")(fn)


def prompt_options(fn):
    """--chat and --dtype: how the prompt is wrapped, how a checkpoint is converted on first use."""
    fn = dtype_option(fn)
    return click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")(fn)


def generation_options(max_tokens: int, seed: int | None, seed_help: str):
    """-p/--prompt, -n/--max-tokens, the sampling options and --seed (defaults differ per command)."""
    def apply(fn):
        fn = click.option("--seed", type=int, default=seed, show_default=seed is not None, help=seed_help)(fn)
        fn = sampling_options(fn)
        fn = click.option("-n", "--max-tokens", type=click.IntRange(min=0), default=max_tokens, show_default=True,
                          help="Tokens to generate at most.")(fn)
        fn = click.option("--prompt-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                          help="Read the prompt from this file.")(fn)
        return click.option("-p", "--prompt", default=None, help="Prompt text (- reads it from standard input).")(fn)
    return apply


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """-p TEXT, -p - (standard input) or --prompt-file FILE -> the prompt text."""
    if (prompt is None) == (prompt_file is None):
        raise FlashinferError("give the prompt with -p TEXT, -p - (standard input) or --prompt-file FILE"
                              if prompt is None else "give -p or --prompt-file, not both")
    if prompt_file is not None:
        try:
            return prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise FlashinferError(f"cannot read --prompt-file {prompt_file}: {getattr(e, 'strerror', None) or e}") from None
    if prompt == "-":
        if sys.stdin.isatty():
            click.echo("reading the prompt from standard input (end it with Ctrl-D)", err=True)
        return sys.stdin.read()
    return prompt
