"""The number format a worker runs its networks in: fp32, or bf16/fp16 under autocast."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from dicomai.config import Precision
from dicomai.errors import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs `device`'s matrix products and convolutions in; None for fp32.

    ``auto`` is bf16 on a CUDA GPU that has it (fp32's range, so nothing overflows; tensor
    cores), fp16 on an older GPU, and fp32 on a CPU: there fp16 ran ResNet-50 2.5x slower
    than fp32 and bf16 no faster on this machine's 2 cores (AMD EPYC, avx512_bf16), while
    on a CPU with AMX an administrator may choose bf16.

    Raises
    ------
    ConfigError
        For fp16 on a device other than CUDA, where autocast does not speed it up.
    """
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"[worker] precision fp16 needs a CUDA device, not {device}")
    return _DTYPES.get(precision)


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast to `dtype` on `device`'s type; nothing when `dtype` is None."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
