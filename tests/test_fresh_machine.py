"""A process started at the repository root, or as `python bench/<script>.py`, imports the installed
packages, not our folders: nothing of ours that sits on such a process's sys.path shadows one.

Our top-level folders without code of their own in `__init__.py` are namespace portions: an
installed regular package of the same name wins over them (Hugging Face's `kernels`, which
transformers imports whenever it is installed, against our `kernels/`), while setuptools' editable
finder still maps `lmpress.<folder>` to them."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import distribution, packages_distributions

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")


def _installed_top_level() -> set[str]:
    return set(packages_distributions()) | set(sys.stdlib_module_names)


def _importable_names(folder: str) -> dict[str, str]:
    """{module name: path} of what `import name` finds in `folder` as a regular package or a module."""
    out = {}
    for entry in os.listdir(folder):
        path = os.path.join(folder, entry)
        if entry.endswith(".py"):
            out[entry[:-3]] = path
        elif os.path.isfile(os.path.join(path, "__init__.py")):
            out[entry] = path
    return out


@pytest.mark.parametrize("folder", [ROOT, BENCH, os.path.join(ROOT, "examples")], ids=["root", "bench", "examples"])
def test_nothing_of_ours_on_sys_path_has_an_installed_packages_name(folder):
    if not os.path.isdir(folder):
        pytest.skip(f"{folder} does not exist")
    clash = {name: path for name, path in _importable_names(folder).items() if name in _installed_top_level()}
    assert not clash, (f"{clash} shadow installed top-level packages for processes started in {folder}: rename them "
                       "(or, for a top-level folder with an empty __init__.py, delete that file)")


def test_transformers_and_lmpress_import_in_a_process_started_at_the_repository_root():
    # transformers imports Hugging Face's `kernels` whenever it is installed: it must be, or this proves nothing
    assert distribution("kernels").version, "pip install kernels (a dev dependency): this test needs it installed"
    code = ("import kernels, transformers.activations, transformers.models.llama.modeling_llama, lmpress.compress, "
            "lmpress.kernels.linear, lmpress.eval.ppl; "
            "import os; assert 'site-packages' in kernels.__file__, kernels.__file__; print('ok')")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def _help(script: str) -> tuple[str, int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    proc = subprocess.run([sys.executable, os.path.join("bench", script), "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    return script, proc.returncode if "usage" in out.lower() else -1, out[-1500:]


def test_every_bench_script_starts():
    scripts = sorted(f for f in os.listdir(BENCH) if f.endswith(".py") and not f.startswith("_"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        failed = [(s, out) for s, rc, out in pool.map(_help, scripts) if rc != 0]
    assert not failed, "\n\n".join(f"python bench/{s} --help:\n{out}" for s, out in failed)
