"""calibration.heap: with `map_large_blocks`, large blocks go back to the OS when freed (glibc only)."""
import ctypes.util
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or "libc.so.6" not in (ctypes.util.find_library("c") or ""),
                           reason="glibc's malloc only")

# A walk's pattern: a large block freed (glibc then raises its threshold past it), then large blocks
# interleaved with small ones that stay alive; the large ones are freed. Prints the MiB still held.
SCRIPT = """
import sys, torch
from lmpress.calibration.heap import LARGE_BLOCK, map_large_blocks
if sys.argv[1] == "mapped":
    assert map_large_blocks()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
n = LARGE_BLOCK // 4 + 1024  # floats: just over 16 MiB
first = torch.ones(n + 65536)
del first
before = rss()
large, small = [], []
for _ in range(8):
    large.append(torch.ones(n))
    small.append(torch.ones(1024))
del large
print(rss() - before)
"""


@glibc
def test_large_blocks_are_returned_when_freed():
    held = {mode: float(subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True).stdout)
            for mode in ("mapped", "default")}
    assert held["mapped"] < 16, held  # each block unmapped on free
    assert held["default"] > 100, held  # from the heap, kept behind the small blocks: the case it fixes
