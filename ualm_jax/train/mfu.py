"""Peak FLOP/s per accelerator (dense bf16, no sparsity) for MFU; unknown devices give None."""
from __future__ import annotations

import jax

PEAK_BF16_FLOPS = {  # substring of device_kind (lower case) -> FLOP/s per device
    "h200": 989e12, "h100": 989e12, "gh200": 989e12, "a100": 312e12, "l4": 121e12,
    "tpu v6": 918e12, "tpu v5p": 459e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12,
    "tpu v5": 459e12, "tpu v4": 275e12,
}


def peak_flops_per_device(device=None) -> float | None:
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "").lower()
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in kind:
            return PEAK_BF16_FLOPS[key]
    return None


def mfu(model_flops_per_s: float, n_devices: int, peak: float | None) -> float | None:
    """Model FLOP/s (model/flops.py) over the devices' peak; None when the peak is unknown."""
    if not peak:
        return None
    return model_flops_per_s / (peak * n_devices)
