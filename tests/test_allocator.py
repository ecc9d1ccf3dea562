"""cpu_malloc: with reuse, glibc serves large tensors from the heap it keeps (no fresh mmap, so no page faults on
every step's tensors); with system, glibc's defaults. Each case runs in its own process (the setting is global)."""

import subprocess
import sys

import pytest

from enigma_lightning.runtime import allocator
from enigma_lightning.runtime.validate import config_problems

CHECK = """
import sys, torch
from enigma_lightning.runtime import allocator
applied = allocator.configure(sys.argv[1])
for _ in range(2):  # a tensor freed and allocated again: the second one must not be a new mapping either
    before = allocator.mmapped_bytes()
    x = torch.ones(2**24)  # 64 MiB, above glibc's largest mmap threshold (32 MiB)
    grew = allocator.mmapped_bytes() - before
    del x
print(applied, grew)
"""

glibc = pytest.mark.skipif(allocator.mmapped_bytes() is None, reason="glibc's mallinfo2 only")


def _run(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", CHECK, mode], capture_output=True, text=True, check=True)
    applied, grew = out.stdout.split()
    return applied == "True", int(grew)


@glibc
def test_reuse_serves_large_tensors_from_the_heap():
    applied, grew = _run("reuse")
    assert applied
    assert grew < 2**20, f"a 64 MiB tensor still added {grew} mmap-ed bytes"


@glibc
def test_system_keeps_glibc_defaults():
    applied, grew = _run("system")
    assert not applied
    assert grew >= 2**26  # the same tensor is a fresh mapping: what reuse avoids


def test_unknown_mode_names_the_key_and_fix(make_cfg):
    assert config_problems(make_cfg("cpu_malloc=keep")) == [
        "cpu_malloc must be reuse or system; got 'keep'. Set cpu_malloc=reuse"]
    with pytest.raises(ValueError, match="cpu_malloc must be one of"):
        allocator.configure("keep")
