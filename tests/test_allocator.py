"""`keep_freed_memory`: freed blocks stay in the process for the next step to reuse (glibc only)."""
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc',
                                reason='mallopt thresholds are glibc settings')

# the resident set (MiB) given back when a written 64 MiB tensor is freed
GIVEN_BACK = '''
import sys, torch

def rss_mb():
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmRSS:')) / 1024

if sys.argv[1] == 'keep':
    from xcit.allocator import keep_freed_memory
    assert keep_freed_memory()
block = torch.ones(16 << 20)
held = rss_mb()
del block
print(held - rss_mb())
'''


def _given_back_mb(mode: str) -> float:
    proc = subprocess.run([sys.executable, '-c', GIVEN_BACK, mode], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return float(proc.stdout.split()[-1])


def test_freed_memory_is_kept_for_reuse():
    assert _given_back_mb('default') > 48  # glibc unmaps a block this large when it is freed: the next step faults it in again
    assert _given_back_mb('keep') < 4
