"""Every engine option, declared once: its default, unit, choices and help.

The CLI's options (``cli.options``), ``profile`` and ``profile --sweep`` (which passes a run's options
on to a child process) are derived from ``EngineOptions``, so a new option is added here and only here.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from storage.errors import OptionError
from storage.window_cache import EVICT

from flashinfer_local.kernels import SMALL_T
from flashinfer_local.runtime.budget import OFFLOAD_MODES
from flashinfer_local.runtime.streaming import MAX_GAP_BYTES

SELECTORS = ("all", "oracle", "predictor")
PREDICTORS = ("threshold", "lowrank")


def _opt(default, help: str, unit: str | None = None, choices: tuple | None = None, flag: str | None = None,
         cli: bool = True):
    """A field of EngineOptions: ``unit`` "bytes" is a size on the CLI (``2GiB``); ``flag`` the CLI
    spelling when it is not the field's name with dashes; ``cli`` False keeps it off the CLI."""
    return field(default=default, metadata={"help": help, "unit": unit, "choices": choices, "flag": flag,
                                            "cli": cli})


@dataclass(frozen=True)
class EngineOptions:
    threads: int | None = _opt(None, "Compute threads (default: all cores, at most 8).")
    dram_budget: int | None = _opt(None, "DRAM the engine may hold for the model, e.g. 1.5GiB (default: no "
                                   "limit). Smaller than the bundle: FFN records stream from the SSD.", unit="bytes")
    offload: str | None = _opt(None, "none: all in DRAM; window: sliding-window cache of SSD records; naive: "
                               "read every record every token. Default: none if the bundle fits the budget, "
                               "else window.", choices=OFFLOAD_MODES)
    window: int = _opt(4, "Tokens a neuron stays cached after its last use.")
    io_threads: int = _opt(8, "Parallel SSD reads in flight.")
    evict: str = _opt("recency", "What the window cache keeps when a token needs more neurons than fit: the "
                      "most recently used (the paper's window), or the most often used ones.", choices=EVICT)
    selector: str = _opt("all", "Which neurons a token computes. all: exact; predictor: what `calibrate` "
                         "stored in the bundle; oracle: measuring tool (true top activations from dense "
                         "weights held outside the budget), not for normal use.", choices=SELECTORS)
    predictor: str | None = _opt(None, "Which calibrated predictor --selector predictor uses (default: "
                                 "threshold if the bundle has it, else lowrank).", choices=PREDICTORS)
    sparsity: float | None = _opt(None, "Share of neurons a token skips (default: the predictor's calibrated "
                                  "default, at most 1% perplexity cost; the oracle: 0.5).")
    layer_shares: str = _opt("auto", "How --selector predictor spreads the sparsity over layers. auto: the "
                             "per-layer shares calibrate allocated (least activation mass lost for the same mean; "
                             "their own calibrated default), where the predictor has them; uniform: every layer "
                             "the same.", choices=("auto", "uniform"))
    draft: str | None = _opt(None, "Speculative decoding: lookup (continue an n-gram found earlier in the "
                             "context), self (the model restricted to the neurons its window holds: no SSD "
                             "reads), or a smaller model with the same tokenizer (a bundle, run in DRAM inside "
                             "--dram-budget). Greedy output is unchanged; sampling keeps the model's "
                             "distribution.")
    draft_tokens: str = _opt("auto", "Tokens drafted per verification, 1-15, or auto (adapts to the recent "
                             "acceptance).")
    placement: str = _opt("auto", "auto: follow the bundle's stored placement (flashinfer-local plan) when "
                          "the FFN streams: its pinned neurons held in DRAM or on the device; none: ignore it.",
                          choices=("auto", "none"))
    prompt_pin: float = _opt(0.0, "Window mode: share of each layer's window rows that, after a prompt of more "
                             f"than {SMALL_T} tokens, hold the neurons that prompt activated most (|activation| "
                             "summed over its tokens) for the generation that follows. Only a choice of what DRAM "
                             "holds: every token still computes what its selector keeps.")
    context: int = _opt(2048, "Longest prompt + generation (the KV cache's size, counted in the budget; a "
                        "longer request is refused, in every mode). At most the model's own context.")
    direct: bool = _opt(True, "Read records with direct I/O (bypassing the page cache).", cli=False)
    read_gap: int = _opt(MAX_GAP_BYTES, "Read through gaps of up to this many bytes between wanted records "
                         "rather than issue another request.", unit="bytes", cli=False)

    def __post_init__(self):
        for f in fields(self):
            v, choices = getattr(self, f.name), f.metadata["choices"]
            if choices and v is not None and v not in choices:
                raise OptionError(f.name, f"{v} is not known (choose {', '.join(choices)})", self.label(f.name))
        at_least_one = {"window": "token", "io_threads": "read", "context": "token", "threads": "thread"}
        for name, unit in at_least_one.items():
            v = getattr(self, name)
            if v is not None and v < 1:
                raise OptionError(name, f"{v} must be at least 1 {unit}", self.label(name))
        if self.dram_budget is not None and self.dram_budget <= 0:
            raise OptionError("dram_budget", f"{self.dram_budget} must be a positive size, e.g. 2GiB",
                              self.label("dram_budget"))
        if self.draft_tokens != "auto":
            k = str(self.draft_tokens)
            if not k.isdigit() or not 1 <= int(k) <= SMALL_T - 1:
                raise OptionError("draft_tokens", f"{self.draft_tokens} must be auto or a whole number from 1 "
                                  f"to {SMALL_T - 1}", self.label("draft_tokens"))
        if not 0 <= self.prompt_pin <= 1:
            raise OptionError("prompt_pin", f"{self.prompt_pin} must be a share from 0 to 1", self.label("prompt_pin"))
        if self.read_gap < 0:
            raise OptionError("read_gap", f"{self.read_gap} must be >= 0 bytes")

    @staticmethod
    def label(name: str) -> str:
        """How an option is named in messages (its CLI flag)."""
        f = next(f for f in fields(EngineOptions) if f.name == name)
        return f.metadata["flag"] or "--" + name.replace("_", "-")

    @classmethod
    def of(cls, options: EngineOptions | dict | None = None, **overrides) -> EngineOptions:
        """Options from an EngineOptions, a dict of field values, or the defaults, with overrides."""
        if isinstance(options, EngineOptions):
            return replace(options, **overrides) if overrides else options
        values = {**(options or {}), **overrides}
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
        return cls(**values)

    def to_argv(self, skip: tuple[str, ...] = ()) -> list[str]:
        """CLI arguments that reproduce these options (those that differ from the defaults)."""
        argv = []
        for f in fields(self):
            v = getattr(self, f.name)
            if not f.metadata["cli"] or f.name in skip or v == f.default or v is None:
                continue
            argv += [self.label(f.name), f"{v}B" if f.metadata["unit"] == "bytes" else str(v)]
        return argv


def cli_fields():
    """The options the CLI shows, in declaration order (``cli.options`` turns them into click options)."""
    return [f for f in fields(EngineOptions) if f.metadata["cli"]]

