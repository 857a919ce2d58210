"""Run a test file's `triton`-marked tests in a subprocess under TRITON_INTERPRET=1.

`@triton.jit` decides at decoration time whether it compiles or interprets, so the Triton
tests cannot flip the interpreter on inside the main pytest process: each kernel test file
re-runs its own `-m triton` tests in a child process with the variable set."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_triton_tests_in_interpreter(test_file: str, **env_extra: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", **env_extra}
    cmd = [sys.executable, "-m", "pytest", test_file, "-m", "triton", "-q", "-p", "no:cacheprovider", "-x"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    assert proc.returncode == 0, f"triton tests of {os.path.basename(test_file)} failed under TRITON_INTERPRET=1:\n{tail}"
    assert " passed" in tail and " failed" not in tail, tail
