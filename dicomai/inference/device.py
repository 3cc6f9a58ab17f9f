"""Choosing the torch device a worker or a training run uses."""

from __future__ import annotations

import re

from dicomai.errors import ConfigError

# The devices a site can name: a GPU by index, or let the machine decide.
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(setting: str) -> str:
    """`auto` → the first CUDA device if there is one, else `cpu`; `cuda` → `cuda:0`.

    Raises
    ------
    ConfigError
        A device name torch does not take, or a GPU this machine does not have: said at
        start, not when the first job runs.
    """
    text = setting.strip()
    if not DEVICE_PATTERN.match(text):
        raise ConfigError(f"device {setting!r}: use auto, cpu, cuda or cuda:N")
    if text == "cpu":
        return text
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if text == "auto":
        return "cuda:0" if count else "cpu"
    index = int(text.partition(":")[2] or 0)
    if index >= count:
        raise ConfigError(f"device {text}: this machine has {count} usable CUDA GPUs")
    return f"cuda:{index}"
