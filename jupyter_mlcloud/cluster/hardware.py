"""What accelerators this machine has, asked without ever raising."""

from __future__ import annotations

import os


def gpu_count() -> int:
    """Number of NVIDIA GPUs NVML sees here, honouring ``CUDA_VISIBLE_DEVICES``.

    Returns 0 on machines without the NVIDIA driver or library, so callers can
    fall back to CPU clusters instead of failing the way ``LocalCUDACluster`` does.
    """
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no library, no driver, no device: all mean "no GPU"
        return 0
    try:
        found = int(pynvml.nvmlDeviceGetCount())
    except Exception:
        found = 0
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return found
    entries = [v for v in visible.split(",") if v.strip() and v.strip() != "-1"]
    return min(found, len(entries))
