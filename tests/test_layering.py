"""Data flows one way: storage -> predictors -> flashinfer_local. A lower layer imports no higher one."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"storage": {"predictors", "flashinfer_local"}, "predictors": {"flashinfer_local"}}


def test_no_upward_imports():
    bad = []
    for pkg, banned in FORBIDDEN.items():
        for f in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                mods = []
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    mods = [node.module or ""]
                bad += [f"{f.relative_to(ROOT)} imports {m}" for m in mods if m.split(".")[0] in banned]
    assert not bad, bad
