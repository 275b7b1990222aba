"""Published peak figures per GPU: dense tensor-core FLOP/s and memory bandwidth. The one table the benchmarks (MFU,
roofline projections) and the trainer (MFU) read; nothing here is measured.

Every figure is the vendor's datasheet figure for ONE GPU, dense (datasheets print the 2:4-sparse figure, twice the
dense one, with a footnote; the dense figure is half of it):
- H100 SXM5 / H100 NVL / H100 PCIe: NVIDIA H100 Tensor Core GPU datasheet: bf16 1,979 / 1,671 / 1,513 and FP8
  3,958 / 3,341 / 3,026 TFLOP/s with sparsity; memory 3.35 / 3.9 / 2.0 TB/s. GH200 carries the H100 SXM compute
  (its memory bandwidth depends on the HBM3 or HBM3e variant, so none is given).
- H200 SXM / H200 NVL: NVIDIA H200 datasheet: the H100 SXM / NVL compute; HBM3e 4.8 TB/s.
- B200 (HGX B200, 1,000 W): NVIDIA HGX B200 datasheet, per GPU: bf16 4.5 / FP8 9 PFLOP/s with sparsity, so
  2.25 / 4.5 dense; HBM3e 7.7 TB/s (62 TB/s over 8 GPUs).
- GB200 (GB200 NVL72, up to 1,200 W per GPU): NVIDIA GB200 NVL72 datasheet, "individual Blackwell GPU": bf16 5 /
  FP8 10 PFLOP/s with sparsity, so 2.5 / 5 dense; HBM3e 8 TB/s. (Not the B200's 2.25: the GB200's GPUs run at a
  higher power limit. The paper's Table 1 GB200 column ran on GB200 GPUs.)
- A100: NVIDIA A100 datasheet: bf16 312 TFLOP/s dense, no FP8.
- L40S: NVIDIA L40S datasheet: bf16 362 / FP8 733 TFLOP/s dense.
- L4: NVIDIA L4 datasheet: bf16 242 / FP8 485 TFLOP/s with sparsity, so 121 / 242 dense.
- A10G (AWS G5): AWS's published figure for its A10G variant, bf16 70 TFLOP/s dense, no FP8.
Memory bandwidth is given for the GPUs this project targets (H100, H200, B200, GB200) and left None elsewhere.

A device is found by its CUDA name (`torch.cuda.get_device_name`): the longest key contained in the name wins, so
"NVIDIA GB200" is a GB200 (not a B200), "NVIDIA GH200 480GB" a GH200 (not an H200), "NVIDIA H100 PCIe" a PCIe card.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DevicePeak", "PEAKS", "peak_for", "dense_peak_flops"]


@dataclass(frozen=True)
class DevicePeak:
    """One GPU's published dense peaks: bf16 and FP8 tensor-core FLOP/s (None where the GPU has no FP8 tensor
    cores), and memory bandwidth in bytes/s (None where the table gives none)."""
    bf16_flops: float
    fp8_flops: float | None
    mem_bytes_per_s: float | None


T, P = 1e12, 1e15
PEAKS: dict[str, DevicePeak] = {
    "H100": DevicePeak(989 * T, 1979 * T, 3.35e12),             # H100 SXM5
    "H100 NVL": DevicePeak(835 * T, 1670 * T, 3.9e12),
    "H100 PCIe": DevicePeak(756 * T, 1513 * T, 2.0e12),
    "GH200": DevicePeak(989 * T, 1979 * T, None),
    "H200": DevicePeak(989 * T, 1979 * T, 4.8e12),              # H200 SXM
    "H200 NVL": DevicePeak(835 * T, 1670 * T, 4.8e12),
    "B200": DevicePeak(2.25 * P, 4.5 * P, 7.7e12),              # HGX B200
    "GB200": DevicePeak(2.5 * P, 5.0 * P, 8.0e12),              # GB200 NVL72, per GPU
    "A100": DevicePeak(312 * T, None, None),
    "L40S": DevicePeak(362 * T, 733 * T, None),
    "L4": DevicePeak(121 * T, 242 * T, None),
    "A10G": DevicePeak(70 * T, None, None),
}


def peak_for(device_name: str) -> DevicePeak | None:
    """The peaks of the GPU whose CUDA name is `device_name` (None when the table does not know it)."""
    keys = [k for k in PEAKS if k.lower() in device_name.lower()]
    return PEAKS[max(keys, key=len)] if keys else None


def dense_peak_flops(device_name: str, precision: str = "bf16") -> float | None:
    """Dense peak FLOP/s of a GPU by its CUDA name, for 'bf16' or 'fp8' (None when unknown)."""
    if precision not in ("bf16", "fp8"):
        raise ValueError(f"precision must be 'bf16' or 'fp8', got {precision!r}")
    peak = peak_for(device_name)
    if peak is None:
        return None
    return peak.bf16_flops if precision == "bf16" else peak.fp8_flops
