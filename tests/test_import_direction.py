"""Imports flow one way: cli -> compress -> {quant, prune, calibration} -> kernels; eval knows nothing of
compress; kernels take from quant only its vocabulary and pure maths (KERNEL_VOCABULARY), and those
modules import nothing of lmpress outside that set (so the runtime never pulls in a stage).

The test fails on any import against the direction; `test_an_added_upward_import_is_caught` shows it
does on a tree with one added."""
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
# quant's vocabulary (schemes) and pure tensor maths (qparams and fake-quant, FP grids, Hadamard matrices, KV quantization
# and ZipCache's mixed-bit codes and saliency, the Q/K scaling around RoPE that the attention applies online, COMET's
# 4/8-bit activation groups)
KERNEL_VOCABULARY = {"lmpress.quant.scheme", "lmpress.quant.primitives", "lmpress.quant.fp", "lmpress.quant.hadamard",
                     "lmpress.quant.fmpq",
                     "lmpress.quant.kv_cache", "lmpress.quant.zipcache", "lmpress.quant.rope_scale"}


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


def vocabulary_imports(root: str = ROOT) -> set[tuple[str, str]]:
    """(file, module) for every lmpress import of a KERNEL_VOCABULARY module outside that set."""
    found = set()
    for mod in KERNEL_VOCABULARY:
        path = os.path.join(root, *mod.split(".")[1:]) + ".py"
        if os.path.exists(path):
            found |= {(os.path.relpath(path, root), m) for m in _imports(path, root) - KERNEL_VOCABULARY}
    return found


def test_no_upward_import():
    found = upward_imports()
    assert not found, f"imports against the direction cli -> compress -> {{quant, prune, calibration}} -> kernels: {sorted(found)}"
    found = vocabulary_imports()
    assert not found, f"quant modules the runtime may import must import only each other: {sorted(found)}"


def test_an_added_upward_import_is_caught(tmp_path):
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
    (tmp_path / "kernels" / "x.py").write_text("from lmpress.compress import save\nfrom lmpress.quant.scheme import QuantArgs\n")
    (tmp_path / "eval" / "y.py").write_text("import lmpress.compress.checkpoint\nfrom lmpress.kernels.linear import PackedLinear\n")
    (tmp_path / "quant" / "z.py").write_text("from ..compress import recipe\nfrom .scheme import QuantArgs\n")
    (tmp_path / "quant" / "kv_cache.py").write_text("from .primitives import fake_quantize\nfrom .rotate import rotation_matrix\n")
    assert vocabulary_imports(str(tmp_path)) == {("quant/kv_cache.py", "lmpress.quant.rotate")}
    assert upward_imports(str(tmp_path)) == {("kernels/x.py", "lmpress.compress"), ("eval/y.py", "lmpress.compress.checkpoint"),
                                             ("quant/z.py", "lmpress.compress")}
