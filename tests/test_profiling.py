import torch

from stitchvm.profiling import measure


def test_cpu_peak_sees_a_transient_allocation():
    def allocate():
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched, then freed
        return x.sum()

    ms, peak = measure(allocate, "cpu", repeats=2)
    assert ms > 0
    assert 50 < peak < 200, peak


def test_cpu_peak_is_small_for_a_small_call():
    _, peak = measure(lambda: torch.ones(16).sum(), "cpu")
    assert peak < 20, peak
