"""Checkpoint folders as the model lifecycle sees them: how much memory one needs, and mixing two of them.

`weight_bytes` reads only the safetensors headers (a few KB per file), so a server can tell
before loading anything whether its models fit their device. `mix_checkpoints` writes the
weights (1 - alpha) * old + alpha * new into a new folder, which any backend then loads like
any other checkpoint (its revision is the content hash of what was written): TR-DPO-style
reference mixing, TRL's ``ref_model_mixup_alpha``, computed exactly as TRL's
``SyncRefModelCallback`` does (``old.mul_(1 - alpha).add_(new, alpha=alpha)``, in the stored
dtype).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from klservice.backends._files import ModelFileError, safetensors_header, weight_files

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per parameter of each compute dtype."""
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
MIB = 1024 * 1024


class CheckpointError(Exception):
    """A checkpoint folder cannot be used as asked (the message says why)."""


def _header(path: Path) -> dict:
    try:
        return safetensors_header(path)[0]
    except ModelFileError as error:
        raise CheckpointError(str(error)) from None


def parameter_count(folder: Path) -> int | None:
    """Parameters stored in the folder's safetensors files (from their headers); None without safetensors."""
    files = [path for path in weight_files(folder) if path.suffix == ".safetensors"]
    if not files:
        return None
    count = 0
    for path in files:
        for tensor in _header(path).values():
            elements = 1
            for dimension in tensor["shape"]:
                elements *= int(dimension)
            count += elements
    return count


def weight_bytes(folder: Path, dtype: str) -> int:
    """Memory the folder's weights take at compute `dtype`: parameters × bytes per parameter (from the
    safetensors headers), else the size of its weight files."""
    count = parameter_count(folder)
    if count is not None:
        return count * DTYPE_BYTES[dtype]
    files = weight_files(folder)
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors or *.bin weight files")
    return sum(path.stat().st_size for path in files)


def mix_checkpoints(old: Path, new: Path, alpha: float, out: Path) -> Path:
    """Write (1 - alpha) * old + alpha * new into the new folder `out` (config and tokenizer from `new`).

    Both folders must hold safetensors weights with the same tensor names and shapes. The sum is
    computed in each tensor's stored dtype, as TRL's SyncRefModelCallback computes it in place.
    """
    import torch
    from safetensors.torch import load_file, save_file

    if not 0.0 <= alpha <= 1.0:
        raise CheckpointError(f"mixup_alpha: {alpha} is not in [0, 1]")
    old_files, new_files = weight_files(old), weight_files(new)
    for folder, files in ((old, old_files), (new, new_files)):
        if not files or any(path.suffix != ".safetensors" for path in files):
            raise CheckpointError(f"mixup_alpha: {folder} has no safetensors weights (mixing reads only safetensors)")
    old_tensors: dict[str, torch.Tensor] = {}
    for path in old_files:
        old_tensors.update(load_file(path))
    mixed: dict[str, torch.Tensor] = {}
    for path in new_files:
        for key, tensor in load_file(path).items():
            previous = old_tensors.pop(key, None)
            if previous is None:
                raise CheckpointError(f"mixup_alpha: tensor {key!r} of {new} is not in the weights now served")
            if previous.shape != tensor.shape:
                raise CheckpointError(
                    f"mixup_alpha: tensor {key!r} has shape {tuple(tensor.shape)} in {new} but "
                    f"{tuple(previous.shape)} in the weights now served"
                )
            if tensor.is_floating_point():
                previous = previous.to(tensor.dtype).mul_(1.0 - alpha).add_(tensor, alpha=alpha)
                mixed[key] = previous
            else:
                mixed[key] = tensor
    if old_tensors:
        raise CheckpointError(
            f"mixup_alpha: {new} lacks {len(old_tensors)} tensor(s) of the weights now served, e.g. {next(iter(old_tensors))!r}"
        )
    out.mkdir(parents=True)
    for item in new.iterdir():
        if item.is_file() and item.suffix not in (".safetensors", ".bin") and not item.name.endswith(".index.json"):
            shutil.copy2(item, out / item.name)
    save_file(mixed, os.fspath(out / "model.safetensors"), metadata={"format": "pt"})
    return out
