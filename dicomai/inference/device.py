"""Choosing the torch device a worker runs on."""

from __future__ import annotations


def resolve_device(setting: str) -> str:
    """`auto` → the first CUDA device if there is one, else `cpu`; anything else as given."""
    if setting != "auto":
        return setting
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"
