"""`keep_freed_memory`: after it, an activation-sized CPU tensor (16 MB) comes from malloc's heap rather than a
fresh mmap, and a user's own MALLOC_* setting stands. Each case runs in its own interpreter: the options are
process-wide and set once."""

import ctypes
import os
import platform
import subprocess
import sys

import pytest

glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
pytestmark = pytest.mark.skipif(not (glibc and hasattr(ctypes.CDLL(None), "mallinfo2")),
                                reason="glibc's mallopt and mallinfo2 (glibc >= 2.33) only")

# prints whether the options took, then how many mmapped blocks a 16 MB tensor added, before and after the call
PROBE = """
import ctypes, torch
from dsd2.training.executor import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
def mmapped_by_one_map():
    before = libc.mallinfo2().hblks
    t = torch.empty(128 * 32 * 32 * 32)
    after = libc.mallinfo2().hblks
    del t
    return after - before
first = mmapped_by_one_map()
took = keep_freed_memory()
print(took, keep_freed_memory() == took, first, mmapped_by_one_map())
"""


def probe(**env) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**clean, **env},
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_an_activation_sized_tensor_comes_from_the_heap_after_it():
    took, same_again, before, after = probe()
    assert (took, same_again) == ("True", "True")
    assert (before, after) == ("1", "0")  # one fresh mmap by default, none once freed memory is kept


def test_a_users_malloc_setting_stands():
    took, same_again, before, after = probe(MALLOC_TRIM_THRESHOLD_="134217728")
    assert (took, same_again) == ("False", "True")
    assert (before, after) == ("1", "1")
