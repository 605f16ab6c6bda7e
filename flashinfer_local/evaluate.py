"""Quality measurements: perplexity on held-out text and greedy agreement with a reference model.

The default corpus needs no download: real prose and real code from the Python standard library
that every install carries (module docstrings as prose, module sources as code), picked by a fixed
list of modules so that every run on the same Python version scores the same text.
"""
from __future__ import annotations

import ast
import math
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F

from storage.errors import FlashinferError

# stdlib modules whose text is used; CALIBRATION for fitting, HELD_OUT for scoring (disjoint)
CALIBRATION_MODULES = ("argparse", "collections/__init__", "dataclasses", "difflib", "email/message",
                       "functools", "inspect", "json/decoder", "logging/__init__", "pathlib",
                       "pickle", "shutil", "subprocess", "tarfile", "threading", "typing")
HELD_OUT_MODULES = ("textwrap", "fractions", "heapq", "calendar", "statistics", "gettext",
                    "string", "bisect")


def _stdlib_file(module: str) -> Path:
    p = Path(sysconfig.get_paths()["stdlib"]) / f"{module}.py"
    if not p.exists():
        raise FlashinferError(f"the standard library file {p} is missing; pass --corpus FILE instead")
    return p


def _docstrings(source: str) -> list[str]:
    """Module, class and function docstrings of ``source``, longest-first within the module."""
    tree = ast.parse(source)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 200:
                out.append(doc)
    return out


def stdlib_corpus(modules=HELD_OUT_MODULES) -> dict[str, str]:
    """{"prose": docstrings, "code": sources} of the given stdlib modules."""
    prose, code = [], []
    for m in modules:
        src = _stdlib_file(m).read_text(encoding="utf-8")
        prose.extend(_docstrings(src))
        code.append(src)
    return {"prose": "\n\n".join(prose), "code": "\n\n".join(code)}


@torch.inference_mode()
def perplexity(engine, ids: list[int], window: int = 256, max_windows: int | None = None) -> dict:
    """exp(mean next-token NLL) of ``ids`` scored in consecutive windows of ``window`` tokens, each
    from an empty cache (the first token of a window is context only)."""
    if len(ids) < 2:
        raise FlashinferError("the evaluation text is shorter than 2 tokens")
    nll, n = 0.0, 0
    starts = range(0, len(ids) - 1, window)
    for k, a in enumerate(starts):
        if max_windows is not None and k >= max_windows:
            break
        chunk = ids[a:a + window + 1]
        if len(chunk) < 2:
            break
        logits = engine.logits(chunk[:-1])                                     # [t, vocab]
        nll += F.cross_entropy(logits.float(), torch.tensor(chunk[1:]), reduction="sum").item()
        n += len(chunk) - 1
    return {"perplexity": math.exp(nll / n), "nll": nll / n, "tokens": n}
