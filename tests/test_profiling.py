import torch

from stitchvm.profiling import measure

# No RSS windows (upper bounds on VmHWM) and no timing bounds: on a shared machine they measure the neighbours.
# What stays is behaviour: the types, and that a transient allocation the call makes is seen in its peak.


def test_cpu_peak_sees_a_transient_allocation():
    def allocate():
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched, then freed
        return x.sum()

    ms, peak = measure(allocate, "cpu", repeats=2)
    assert isinstance(ms, float) and ms > 0
    # None where /proc/self/clear_refs cannot be written; otherwise the 64 MiB the call touched is in the peak
    assert peak is None or (isinstance(peak, float) and peak > 50), peak


def test_cpu_peak_is_small_for_a_small_call():
    ms, peak = measure(lambda: torch.ones(16).sum(), "cpu")
    assert isinstance(ms, float) and ms > 0
    assert peak is None or (isinstance(peak, float) and peak >= 0), peak
