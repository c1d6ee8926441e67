"""Peak dense BF16 tensor FLOP/s per device, for MFU.

Numbers from the vendors' datasheets, dense (the datasheets' headline "with sparsity" figures are twice these).
A device that is not listed gets None: the loop then reports MFU as unknown rather than a ratio against another
card's peak. Not listed on purpose: the A10G (AWS's variant of the A10; NVIDIA publishes no datasheet for it).
"""

from __future__ import annotations

import re

PEAK_BF16_DENSE: tuple[tuple[str, float], ...] = (
    # (pattern in torch.cuda.get_device_name(), FLOP/s); the first match wins, so variants precede their family
    (r"\bH100 NVL\b", 835e12),
    (r"\bH100 PCIE\b", 756e12),
    (r"\bH100\b", 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (r"\bH200 NVL\b", 835e12),
    (r"\bGH200\b", 989e12),
    (r"\bH200\b", 989e12),
    (r"\bB200\b", 2250e12),
    (r"\bA100\b", 312e12),  # SXM4 and PCIe alike ("NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB")
    (r"\bL40S\b", 362e12),
    (r"\bL40\b", 181e12),
    (r"\bL4\b", 121e12),
    (r"\bA10\b", 125e12),  # not the A10G: \b does not match before "G"
)


def peak_flops(device_name: str) -> float | None:
    """Dense BF16 peak FLOP/s of the device named ``device_name`` (torch.cuda.get_device_name); None if unknown."""
    name = device_name.upper()
    for pattern, peak in PEAK_BF16_DENSE:
        if re.search(pattern, name):
            return peak
    return None
