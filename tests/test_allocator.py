"""`retain_freed_memory`: after it, memory freed and allocated again is not faulted in again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Each run is a fresh interpreter: the thresholds are process-wide and cannot be taken back.
CHURN = r"""
import resource, sys
if sys.argv[1] == "retain":
    from workers.allocator import retain_freed_memory
    assert retain_freed_memory()
def churn():  # what a forward pass does to the heap: big blocks, written, all freed at the end
    blocks = [bytearray(3 << 20) for _ in range(8)]
    del blocks
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", CHURN, mode], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return int(done.stdout.strip())


def glibc() -> bool:
    import ctypes

    return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")


@pytest.mark.skipif(not glibc(), reason="the thresholds are glibc's")
def test_freed_memory_is_reused_without_page_faults() -> None:
    # 20 rounds of 24 MiB: glibc's defaults return it to the kernel each round (~6000 faults a
    # round); retained, the pages stay mapped and nothing faults.
    default, retained = page_faults("default"), page_faults("retain")
    assert default > 20 * 1000
    assert retained < 200


def test_a_c_library_other_than_glibc_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers import allocator

    class Musl:  # no gnu_get_libc_version, no mallopt: nothing to call
        pass

    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda _name: Musl())
    assert allocator.retain_freed_memory() is False
