import sys

import pytest
import torch

from prunekit.zoo.memory import reset_peak, resident_mib

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def test_peak_follows_an_allocation_and_resets():
    reset_peak()
    before = resident_mib("VmRSS")
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del block
    assert resident_mib("VmHWM") - before > 50
    reset_peak()
    assert resident_mib("VmHWM") - resident_mib("VmRSS") < 50
