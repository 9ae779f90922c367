"""Counting host reads of tensor values, for tests that a piece of the step never makes the host wait."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value on the host (aten._local_scalar_dense, behind .item(),
    bool(t), float(t) and torch's internal reads): on a GPU each one waits for the device."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))
