"""The per-device peak used for MFU (training/flops.py). CUDA cannot run on the test machine, so only the device-name
string that torch.cuda.get_device_name() returns is faked here (names as the drivers report them); the loop's own use
of it (training/loop._peak) runs on GPUs only (bench/pretrain_mfu.py)."""

from __future__ import annotations

import pytest

from training.flops import peak_flops


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),  # SXM5
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100-PCIE-40GB", 312e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA A10", 125e12),
])
def test_known_devices_get_their_dense_bf16_peak(name, peak):
    assert peak_flops(name) == peak


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA GeForce RTX 4090", "Tesla T4", "AMD Instinct MI300X", ""])
def test_unknown_devices_get_none_not_another_cards_peak(name):
    assert peak_flops(name) is None
