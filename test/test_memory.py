"""keep_large_buffers: frame-sized buffers freed and allocated again no longer page-fault
(counted by the kernel: minor faults of a fresh process, with and without the setting)."""
from __future__ import annotations

import subprocess
import sys

import pytest

SNIPPET = """
import resource, sys
import numpy as np
from bevfusion_ros.runtime.memory import keep_large_buffers
if sys.argv[1] == "keep":
    assert keep_large_buffers()
def churn():
    for _ in range(5):                             # five frames of six 1600x900 rgb8 images
        images = [np.empty(4_320_000, np.uint8) for _ in range(6)]
        for image in images:
            image.fill(1)                          # touch every page
        del images, image
churn()                                            # warm up
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def minor_faults(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", SNIPPET, mode], capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_frame_buffers_are_reused_without_page_faults():
    pages_per_churn = 5 * 6 * 4_320_000 // 4096
    assert minor_faults("default") > pages_per_churn // 4      # freed images go back to the kernel
    assert minor_faults("keep") < pages_per_churn // 20        # the heap keeps and reuses them
