"""Precision names and the dtype rules every part of minidream follows.

The names are the ones users type (`--dtype fp16`, `train.mixed_precision=bf16`); this is the
only table that turns them into torch dtypes.
"""

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NO_MIXED_PRECISION = "no"  # train.mixed_precision's name for plain fp32


def dtype_named(name: str) -> torch.dtype:
    """The torch dtype of a precision name ("no" is fp32, as train.mixed_precision spells it)."""
    if name == NO_MIXED_PRECISION:
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def vae_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """The VAE's dtype beside models of `dtype`: fp32 for fp16, since SD's VAE decoder overflows
    fp16 (the black or NaN images of fp16 pipelines); bf16 has fp32's range and stays bf16."""
    return torch.float32 if dtype == torch.float16 else dtype
