"""Data flows one way: storage -> predictors -> flashinfer_local, and inside flashinfer_local the
per-token code (kernels, models, runtime) imports nothing from the code that measures it, runs
workflows or parses the command line. A lower layer imports no higher one."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "flashinfer_local"
HIGHER = {f"{PKG}.measure", f"{PKG}.workflows", f"{PKG}.server", f"{PKG}.cli"}
FORBIDDEN = {
    "storage": {"predictors", PKG},
    "predictors": {PKG},
    f"{PKG}/kernels": {f"{PKG}.runtime", f"{PKG}.models"} | HIGHER,
    f"{PKG}/models": {f"{PKG}.runtime"} | HIGHER,
    f"{PKG}/runtime": HIGHER,
    f"{PKG}/measure": {f"{PKG}.cli"},
    f"{PKG}/workflows": {f"{PKG}.cli", f"{PKG}.server"},
    f"{PKG}/server": {f"{PKG}.cli"},
}
MAX_LINES = 500


def _imports(f: Path) -> list[str]:
    mods = []
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            mods += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            mods.append(node.module or "")
        elif isinstance(node, ast.ImportFrom):          # relative: resolve against the file's package
            base = f.relative_to(ROOT).parent.parts[:len(f.relative_to(ROOT).parent.parts) - node.level + 1]
            mods.append(".".join(base + ((node.module,) if node.module else ())))
    return mods


def test_no_upward_imports():
    bad = []
    for where, banned in FORBIDDEN.items():
        for f in (ROOT / where).rglob("*.py"):
            bad += [f"{f.relative_to(ROOT)} imports {m}" for m in _imports(f)
                    if any(m == b or m.startswith(b + ".") for b in banned)]
    assert not bad, bad


def test_modules_stay_small():
    big = [f"{f.relative_to(ROOT)}: {n} lines" for d in ("flashinfer_local", "storage", "predictors")
           for f in (ROOT / d).rglob("*.py") if (n := len(f.read_text().splitlines())) > MAX_LINES]
    assert not big, big
