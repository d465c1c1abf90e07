"""janus.memory: large buffers come from the reusable heap once keep_freed_memory ran."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_MMAPPED_BYTES = """
import ctypes, sys, torch
from janus.memory import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
print(keep_freed_memory())
before = libc.mallinfo2().hblkhd
x = torch.ones(64 << 20, dtype=torch.uint8)
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("keep", ["1", "0"])
def test_keep_freed_memory_serves_large_buffers_from_the_heap(keep):
    """A 64 MB buffer comes from the heap (reused after free, no fresh page faults) once
    keep_freed_memory ran, and from its own mmap when JANUS_KEEP_FREED_MEMORY=0 turns it off."""
    env = {**os.environ, "JANUS_KEEP_FREED_MEMORY": keep}
    done = subprocess.run([sys.executable, "-c", _MMAPPED_BYTES], env=env, capture_output=True, text=True, check=True)
    what, mmapped = done.stdout.split("\n")[:2]
    if keep == "1":
        assert what == "glibc: freed memory kept for reuse" and int(mmapped) == 0
    else:
        assert what.startswith("unchanged") and int(mmapped) >= 64 << 20


def test_training_bounds_the_onednn_primitive_cache_unless_the_user_set_it(monkeypatch):
    from janus.config import TrainConfig
    from janus.memory import ONEDNN_CACHE_CAPACITY
    from janus.train import setup_env

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    setup_env(TrainConfig(device="cpu"))
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(ONEDNN_CACHE_CAPACITY)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")
    setup_env(TrainConfig(device="cpu"))
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "512"
