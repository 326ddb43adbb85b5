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
    from klservice.backends._files import LoadGuard
    from klservice.config import ModelSpec, ServerConfig

__all__ = ["KNOWN_BACKENDS", "ModelInfo", "ReferenceBackend", "load_backend", "model_folder"]

KNOWN_BACKENDS = ("hf", "vllm")
"""Backend names `load_backend` accepts."""


def load_backend(config: "ServerConfig", spec: "ModelSpec | None" = None, *, progress: bool = True,
                 guard: "LoadGuard | None" = None) -> ReferenceBackend:
    """Load one model of a server configuration into its backend.

    `spec` (default: the configuration's first model, `ServerConfig.model_specs`) gives the name, the
    folder (a local Hugging Face folder, a hub id already in the local HF cache, or None for the
    embedded default model), the backend, `dtype`, `device` ("auto": CUDA if available, else CPU) and
    `max_length` (caps the model's own context length). From `config` come `cache_dir` (where the
    embedded model is converted to, see `ensure_default_model`), `share_prompts`, for the vllm backend
    `tensor_parallel_size` and `gpu_memory_utilization`, and for hf `attention_kernel`. `progress`
    shows conversion and loading progress on stderr. `guard` (`klservice.backends._files.LoadGuard`) lets
    the caller give the load up while it reads its files.
    """
    spec = spec if spec is not None else config.model_specs()[0]
    backend = spec.backend
    if backend not in KNOWN_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known backends: {', '.join(KNOWN_BACKENDS)}")
    folder = model_folder(config, spec, progress=progress)
    name = spec.name

    if backend == "hf":
        from klservice.backends.hf import HFBackend

        return HFBackend(
            folder, name=name, dtype=spec.dtype, device=spec.device, max_length=spec.max_length, progress=progress,
            share_prompts=config.share_prompts,
            kernel=None if config.attention_kernel == "auto" else config.attention_kernel, guard=guard,
        )
    if backend == "vllm":
        from klservice.backends.vllm import VLLMBackend

        return VLLMBackend(
            folder,
            name=name,
            dtype=spec.dtype,
            device=spec.device,
            max_length=spec.max_length,
            tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            share_prompts=config.share_prompts,
            progress=progress,
            guard=guard,
        )
    raise AssertionError(f"backend {backend!r} is listed in KNOWN_BACKENDS but not wired up")


def model_folder(config: "ServerConfig", spec: "ModelSpec", *, progress: bool = False):
    """The local folder of a model spec: its path resolved (`resolve_model_dir`), or the embedded model's
    converted folder."""
    from klservice.backends._files import resolve_model_dir
    from klservice.default_model import ensure_default_model

    if spec.path is None:
        return ensure_default_model(config.cache_dir, progress=progress)
    return resolve_model_dir(spec.path)
