"""Model backends behind one interface, chosen by name.

`load_backend` imports the concrete backend only when it is called, so importing this
package (as the CLI, the server's request path and the client tests do) never imports
torch, transformers or vLLM.

Example::

    from klservice.backends import load_backend
    from klservice.config import ServerConfig
    backend = load_backend(ServerConfig())        # the embedded SmolLM2-135M-Instruct, hf backend
    backend.info().revision                       # content hash quoted in every response
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from klservice.backends.base import ModelInfo, ReferenceBackend

if TYPE_CHECKING:
    from klservice.config import ServerConfig

__all__ = ["KNOWN_BACKENDS", "ModelInfo", "ReferenceBackend", "load_backend"]

KNOWN_BACKENDS = ("hf", "vllm")
"""Backend names `load_backend` accepts."""


def load_backend(config: "ServerConfig", *, progress: bool = True) -> ReferenceBackend:
    """Load the model a server configuration names into its backend.

    Reads `config.backend`, `config.model` (a local Hugging Face folder, a hub id already in the
    local HF cache, or None for the embedded default model), `dtype`, `device` ("auto": CUDA if
    available, else CPU), `cache_dir` (where the embedded model is converted to, see
    `ensure_default_model`), `max_length` (caps the model's own context length), and for the
    vllm backend `tensor_parallel_size` and `gpu_memory_utilization`. `progress` shows
    conversion and loading progress on stderr.
    """
    backend, model = config.backend, config.model
    if backend not in KNOWN_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known backends: {', '.join(KNOWN_BACKENDS)}")

    from klservice.backends._files import resolve_model_dir
    from klservice.default_model import DEFAULT_MODEL_NAME, ensure_default_model

    if model is None:
        folder, name = ensure_default_model(config.cache_dir, progress=progress), f"{DEFAULT_MODEL_NAME} (embedded)"
    else:
        folder, name = resolve_model_dir(model), model

    if backend == "hf":
        from klservice.backends.hf import HFBackend

        return HFBackend(
            folder, name=name, dtype=config.dtype, device=config.device, max_length=config.max_length, progress=progress
        )
    if backend == "vllm":
        from klservice.backends.vllm import VLLMBackend

        return VLLMBackend(
            folder,
            name=name,
            dtype=config.dtype,
            device=config.device,
            max_length=config.max_length,
            tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            progress=progress,
        )
    raise AssertionError(f"backend {backend!r} is listed in KNOWN_BACKENDS but not wired up")
