"""Loading a model folder with transformers: the device, the dtype, and no code from a hub.

transformers 5.25 and later kernelize a model on CUDA unless told not to: layers are replaced by
kernels fetched from the Hugging Face Hub at load time. Offline, that load fails ("... is not
available in the local cache"); online it downloads code at run time and changes the numerics
under the service. `load_model` always passes ``use_kernels=False``: what runs is transformers'
own code and PyTorch's kernels, whatever the version's default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from klservice.backends.base import DTYPES

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}


@contextlib.contextmanager
def transformers_progress(enabled: bool) -> Iterator[None]:
    """Hide transformers' own tqdm bars ("Loading weights", ...) while inside, if not `enabled`."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    if not enabled:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            transformers_logging.enable_progress_bar()


def resolve_device(device: str) -> torch.device:
    """"auto" → cuda:N if CUDA is available, else cpu; "cuda" → the current CUDA device."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def load_model(folder: Path, dtype: str, device: torch.device):
    """(tokenizer, model) of a local folder, the model frozen in `dtype` on `device`, with Hub kernels off."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=TORCH_DTYPES[dtype], device_map=str(device), local_files_only=True, use_kernels=False,
    )
    model.eval()
    model.requires_grad_(False)
    return tokenizer, model
