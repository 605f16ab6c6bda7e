"""The `flashinfer-local` command line (click): ``app`` holds the group and the commands a user
runs a model with; ``analysis`` adds the ones that measure, plan and tune; ``interactive`` adds
chat and serve, ``models`` pull, list and rm; ``options`` derives the engine's options from
``runtime.options.EngineOptions``.

``entry`` is the console script: it imports the commands inside a guard, so Ctrl-C while the
program starts prints one line; ``main`` (the click group) loads on first use."""
import sys


def _load():
    from flashinfer_local.cli import analysis, interactive, models  # noqa: F401  (register their commands)
    from flashinfer_local.cli.app import main
    return main


def __getattr__(name: str):
    if name == "main":
        return _load()
    raise AttributeError(f"module 'flashinfer_local.cli' has no attribute {name!r}")


def entry() -> None:
    try:
        main = _load()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    main(prog_name="flashinfer-local")


__all__ = ["main", "entry"]
