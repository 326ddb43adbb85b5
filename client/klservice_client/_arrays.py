"""A tiny array namespace shim so the KL math has one implementation for numpy and torch.

The KL functions only need a dozen element-wise and segment operations. Rather than
depend on a general array-API layer, each operation is written once per library here;
`ops_for(x)` picks the implementation from the type of the input. Torch is never
imported by this module: a torch tensor is recognised by its type's module name, and
torch is imported only once such a tensor has been seen. Torch tensors stay on their
device (CPU or CUDA); nothing is copied to the host except the scalars of diagnostics.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def is_torch(x: Any) -> bool:
    """True for a torch.Tensor, without importing torch."""
    return type(x).__module__.startswith("torch")


class NumpyOps:
    """The operations the KL math needs, for numpy arrays."""

    name = "numpy"

    @staticmethod
    def float_dtype(x):
        return np.float64 if np.asarray(x).dtype == np.float64 else np.float32

    def asarray(self, x, dtype=None, like=None):
        return np.asarray(x, dtype=dtype)

    def lengths(self, lengths, like=None):
        return np.asarray(lengths).astype(np.int64, copy=False)

    exp = staticmethod(np.exp)
    expm1 = staticmethod(np.expm1)
    abs = staticmethod(np.abs)
    isfinite = staticmethod(np.isfinite)
    where = staticmethod(np.where)
    minimum = staticmethod(np.minimum)
    maximum = staticmethod(np.maximum)

    @staticmethod
    def clip(x, lo, hi):
        return np.clip(x, lo, hi)

    @staticmethod
    def full_like(x, value):
        return np.full_like(x, value)

    @staticmethod
    def repeat(values, lengths):
        """values[i] repeated lengths[i] times (per-sequence value → per-token)."""
        return np.repeat(values, lengths)

    @staticmethod
    def segment_sum(x, lengths):
        """Sum of x over each sequence; accumulates in float64."""
        seg = np.repeat(np.arange(len(lengths)), lengths)
        return np.bincount(seg, weights=x, minlength=len(lengths)).astype(x.dtype)

    @staticmethod
    def reverse_cumsum(x, lengths):
        """Within each sequence, out[t] = sum of x[t:] up to the sequence end (float64 accumulation).

        A segmented doubling scan: out[t] only ever adds terms of its own tail. (A batch-wide
        cumsum minus its value at the sequence end cancels catastrophically when a large value,
        e.g. k3 = 1e13 at delta = -30, sits earlier in the batch or the sequence.)
        """
        if len(x) == 0:
            return x
        lengths = np.asarray(lengths, dtype=np.int64)
        # Tokens after t in t's sequence.
        remaining = np.repeat(np.cumsum(lengths), lengths) - 1 - np.arange(len(x))
        out = x.astype(np.float64)
        shift, longest = 1, int(lengths.max())
        while shift < longest:  # invariant: out[t] = sum of x[t : t + shift], cut at the sequence end
            tail = np.zeros_like(out)
            tail[:-shift] = np.where(remaining[:-shift] >= shift, out[shift:], 0.0)
            out = out + tail
            shift *= 2
        return out.astype(x.dtype)

    @staticmethod
    def to_float(x) -> float:
        return float(x)

    @staticmethod
    def sum64(x) -> float:
        """The sum, accumulated in float64 whatever x's dtype (a float32 sum of finite values can overflow)."""
        return float(np.sum(x, dtype=np.float64))

    @staticmethod
    def first_true(mask) -> int:
        """Index of the first True entry (caller ensures there is one)."""
        return int(np.argmax(mask))

    @staticmethod
    def any(mask) -> bool:
        return bool(np.any(mask))


class TorchOps:
    """The same operations for torch tensors, on the tensors' own device."""

    name = "torch"

    def __init__(self):
        import torch

        self.torch = torch

    def float_dtype(self, x):
        return self.torch.float64 if x.dtype == self.torch.float64 else self.torch.float32

    def asarray(self, x, dtype=None, like=None):
        device = like.device if like is not None else None
        return self.torch.as_tensor(x, dtype=dtype, device=device)

    def lengths(self, lengths, like=None):
        device = like.device if like is not None else None
        return self.torch.as_tensor(lengths, dtype=self.torch.int64, device=device)

    def exp(self, x):
        return self.torch.exp(x)

    def expm1(self, x):
        return self.torch.expm1(x)

    def abs(self, x):
        return self.torch.abs(x)

    def isfinite(self, x):
        return self.torch.isfinite(x)

    def where(self, cond, a, b):
        return self.torch.where(cond, a, b)

    def minimum(self, x, value):
        return self.torch.clamp(x, max=value)

    def maximum(self, x, value):
        return self.torch.clamp(x, min=value)

    def clip(self, x, lo, hi):
        return self.torch.clamp(x, lo, hi)

    def full_like(self, x, value):
        return self.torch.full_like(x, value)

    def repeat(self, values, lengths):
        return self.torch.repeat_interleave(values, lengths)

    def segment_sum(self, x, lengths):
        seg = self.torch.repeat_interleave(self.torch.arange(len(lengths), device=x.device), lengths)
        out = self.torch.zeros(len(lengths), dtype=self.torch.float64, device=x.device)
        return out.index_add_(0, seg, x.to(self.torch.float64)).to(x.dtype)

    def reverse_cumsum(self, x, lengths):
        """As NumpyOps.reverse_cumsum: a segmented doubling scan that only adds each token's own tail."""
        torch = self.torch
        if len(x) == 0:
            return x
        remaining = torch.repeat_interleave(torch.cumsum(lengths, 0), lengths) - 1
        remaining = remaining - torch.arange(len(x), device=x.device)
        out = x.to(torch.float64)
        shift, longest = 1, int(lengths.max())
        while shift < longest:  # invariant: out[t] = sum of x[t : t + shift], cut at the sequence end
            tail = torch.zeros_like(out)
            tail[:-shift] = torch.where(remaining[:-shift] >= shift, out[shift:], torch.zeros_like(out[shift:]))
            out = out + tail
            shift *= 2
        return out.to(x.dtype)

    @staticmethod
    def to_float(x) -> float:
        return float(x)

    def sum64(self, x) -> float:
        """The sum, accumulated in float64 whatever x's dtype."""
        return float(x.to(self.torch.float64).sum())

    def first_true(self, mask) -> int:
        return int(self.torch.argmax(mask.to(self.torch.int8)))

    def any(self, mask) -> bool:
        return bool(self.torch.any(mask))


def ops_for(x: Any):
    """The operations matching x's library: TorchOps for torch tensors, else NumpyOps."""
    return TorchOps() if is_torch(x) else NumpyOps()
