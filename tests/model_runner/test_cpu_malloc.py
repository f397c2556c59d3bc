"""The CPU engine process keeps freed activation memory: glibc's settings, checked directly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A fresh process: where a 24 MiB tensor (a 2,048-token MLP activation) is placed, and how
# much heap stays mapped once it is freed, from glibc's own counters.
SCRIPT = """
import ctypes, json, sys
import torch
from model_runner.cpu_malloc import keep_freed_memory

FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
          "fordblks", "keepcost")
libc = ctypes.CDLL("libc.so.6")
if hasattr(libc, "mallinfo2"):
    class Info(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in FIELDS]
    mallinfo = libc.mallinfo2
else:
    class Info(ctypes.Structure):
        _fields_ = [(f, ctypes.c_int) for f in FIELDS]
    mallinfo = libc.mallinfo
mallinfo.restype = Info
applied = keep_freed_memory() if sys.argv[1] == "tuned" else None
before = mallinfo()
t = torch.empty(6 << 20).fill_(1.0)
during = mallinfo()
del t
after = mallinfo()
print(json.dumps({
    "applied": applied,
    "mmapped": during.hblkhd - before.hblkhd,
    "heap_kept": after.arena - before.arena,
}))
"""
MIB = 1 << 20


def placement(mode: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_activations_come_from_the_heap_and_stay_mapped():
    default, tuned = placement("default"), placement("tuned")
    # glibc's defaults: a fresh mmap, unmapped again on free (faulted in anew next step).
    assert default["mmapped"] >= 20 * MIB and default["heap_kept"] < 4 * MIB
    assert tuned["applied"] is True
    assert tuned["mmapped"] == 0
    assert tuned["heap_kept"] >= 20 * MIB
