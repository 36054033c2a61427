"""The servers' allocator tuning (malloc.py): it must take effect where the servers run (Linux,
glibc), or the app's RSS under load grows with every thread that decoded a large photo
(docs/hardening.md, bench/load_bench.py)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_the_servers_allocator_tuning_takes_effect_on_glibc():
    probe = "from cleanmessy.malloc import give_back_freed_memory as g; print(g())"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"
