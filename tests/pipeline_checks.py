"""Assertions the weights tests share."""

from pathlib import Path

import pytest
import torch


def assert_same_weights(actual, expected, dtype=None, parts=("unet", "vae", "text_encoder")):
    """Every tensor of the models equal, bit for bit (after casting `expected` to `dtype`)."""
    for name in parts:
        got, want = getattr(actual, name).state_dict(), getattr(expected, name).state_dict()
        assert got.keys() == want.keys(), name
        for key in want:
            reference = want[key] if dtype is None else want[key].to(dtype)
            assert got[key].dtype == reference.dtype, (name, key)
            assert torch.equal(got[key], reference), (name, key)


def assert_one_clear_line(error: pytest.ExceptionInfo, path: Path, *fragments: str):
    message = str(error.value)
    assert "\n" not in message, message
    assert message.startswith(str(path)), message
    for fragment in fragments:
        assert fragment in message, message
    chained = error.value.__cause__ or (None if error.value.__suppress_context__ else error.value.__context__)
    assert chained is None  # no "during handling of the above exception" traceback
