"""dz_bench.peaks: the one table of published peaks, and the device-name match its readers rely on."""
import pytest

from dz_bench.peaks import PEAKS, dense_peak_flops, peak_for


@pytest.mark.parametrize("name,bf16", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA B200", 2.25e15), ("NVIDIA GB200", 2.5e15),          # a GB200 is not a B200: the longest key wins
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12),
])
def test_devices_are_found_by_the_longest_key_in_their_name(name, bf16):
    assert dense_peak_flops(name) == pytest.approx(bf16)


def test_unknown_devices_and_missing_fp8_give_none():
    assert peak_for("Some Future GPU") is None and dense_peak_flops("Some Future GPU") is None
    assert dense_peak_flops("NVIDIA A100-SXM4-80GB", "fp8") is None
    assert dense_peak_flops("NVIDIA H100 80GB HBM3", "fp8") == pytest.approx(1979e12)
    with pytest.raises(ValueError, match="precision"):
        dense_peak_flops("NVIDIA H100 80GB HBM3", "fp4")


def test_the_readers_use_the_table():
    from dz_bench.cases.stacked import project_gb200

    assert project_gb200(250.0) == pytest.approx(250.0 * 989 / 2500)
    assert PEAKS["GB200"].bf16_flops > PEAKS["B200"].bf16_flops
