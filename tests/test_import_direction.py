"""Imports flow one way: cli -> compress -> {quant, prune, calibration} -> kernels; eval knows nothing of
compress; kernels take from quant only its vocabulary and pure primitives (scheme, primitives, hadamard).

The upward imports that exist today are listed in KNOWN (issue 20 removes them): the test fails on any
new one, and on a listed one that is gone (delete it from KNOWN, so it cannot come back)."""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("cli", "compress", "quant", "prune", "calibration", "kernels", "eval")
ALLOWED = {  # package -> the lmpress packages it may import
    "cli": set(PACKAGES),
    "compress": {"quant", "prune", "calibration", "kernels", "eval"},
    "quant": {"kernels"},
    "prune": {"quant", "kernels"},
    "calibration": {"quant", "kernels"},
    "eval": {"calibration", "kernels", "quant"},
    "kernels": set(),
}
KERNEL_VOCABULARY = {"lmpress.quant.scheme", "lmpress.quant.primitives", "lmpress.quant.hadamard"}
KNOWN = {  # (file, imported module): upward imports found on 2026-12-04, to be removed by issue 20
    ("calibration/layerwise.py", "lmpress.compress.arch"),
    ("kernels/kv_cache.py", "lmpress.compress.arch"),
    ("kernels/kv_cache.py", "lmpress.quant.attention"),
    ("kernels/kv_cache.py", "lmpress.quant.kv_cache"),
    ("kernels/kv_quant.py", "lmpress.quant.kv_cache"),
    ("kernels/linear.py", "lmpress.quant.sim"),
}


def _imports(path: str, root: str) -> set[str]:
    """The lmpress modules `path` imports, relative imports resolved against its package."""
    rel = os.path.relpath(path, root)[:-3].split(os.sep)  # e.g. ["compress", "stages", "gptq"]
    package = ["lmpress", *(rel[:-1] if rel[-1] != "__init__" else rel[:-1])]
    tree = ast.parse(open(path).read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - (node.level - 1)]
            out.add(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("lmpress.")}


def upward_imports(root: str = ROOT) -> set[tuple[str, str]]:
    """(file, module) for every import of another lmpress package that the direction forbids."""
    found = set()
    for pkg in PACKAGES:
        for folder, _, files in os.walk(os.path.join(root, pkg)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(folder, f)
                for mod in _imports(path, root):
                    target = mod.split(".")[1]
                    if target == pkg or target in ALLOWED[pkg]:
                        continue
                    if pkg == "kernels" and mod in KERNEL_VOCABULARY:
                        continue
                    found.add((os.path.relpath(path, root), mod))
    return found


def test_no_new_upward_import():
    found = upward_imports()
    new, gone = found - KNOWN, KNOWN - found
    assert not new, f"imports against the direction cli -> compress -> {{quant, prune, calibration}} -> kernels: {sorted(new)}"
    assert not gone, f"these upward imports are gone: delete them from KNOWN so they cannot come back: {sorted(gone)}"


def test_an_added_upward_import_is_caught(tmp_path):
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
    (tmp_path / "kernels" / "x.py").write_text("from lmpress.compress import save\nfrom lmpress.quant.scheme import QuantArgs\n")
    (tmp_path / "eval" / "y.py").write_text("import lmpress.compress.checkpoint\nfrom lmpress.kernels.linear import PackedLinear\n")
    (tmp_path / "quant" / "z.py").write_text("from ..compress import recipe\nfrom .scheme import QuantArgs\n")
    assert upward_imports(str(tmp_path)) == {("kernels/x.py", "lmpress.compress"), ("eval/y.py", "lmpress.compress.checkpoint"),
                                             ("quant/z.py", "lmpress.compress")}
