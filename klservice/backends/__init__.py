"""Model backends behind one interface, chosen by name.

`load_backend` imports the concrete backend only when it is called, so importing this
package (as the CLI, the server's request path and the client tests do) never imports
torch, transformers or vLLM.

Example::

    from klservice.backends import load_backend
    backend = load_backend("hf", None)          # the embedded SmolLM2-135M-Instruct on CPU
    backend.info().revision                      # content hash quoted in every response
"""

from __future__ import annotations

from klservice.backends.base import ModelInfo, ReferenceBackend

__all__ = ["KNOWN_BACKENDS", "ModelInfo", "ReferenceBackend", "load_backend"]

KNOWN_BACKENDS = ("hf", "vllm")
"""Backend names `load_backend` accepts."""


def load_backend(
    backend: str,
    model: str | None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: str | None = None,
    max_length: int | None = None,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    progress: bool = True,
) -> ReferenceBackend:
    """Load `model` (a local Hugging Face folder, a hub id already in the local HF cache, or None
    for the embedded default model) into the named backend.

    `cache_dir` is where the embedded model is converted to (see `ensure_default_model`);
    `device` may be "auto" (CUDA if available, else CPU); `max_length` caps the model's own
    context length; `progress` shows conversion and loading progress on stderr.
    `tensor_parallel_size` and `gpu_memory_utilization` are vLLM's (the vllm backend only; hf ignores them).
    """
    if backend not in KNOWN_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known backends: {', '.join(KNOWN_BACKENDS)}")

    from klservice.backends._files import resolve_model_dir
    from klservice.default_model import DEFAULT_MODEL_NAME, ensure_default_model

    if model is None:
        folder, name = ensure_default_model(cache_dir, progress=progress), f"{DEFAULT_MODEL_NAME} (embedded)"
    else:
        folder, name = resolve_model_dir(model), model

    if backend == "hf":
        from klservice.backends.hf import HFBackend

        return HFBackend(folder, name=name, dtype=dtype, device=device, max_length=max_length, progress=progress)
    if backend == "vllm":
        from klservice.backends.vllm import VLLMBackend

        return VLLMBackend(
            folder,
            name=name,
            dtype=dtype,
            device=device,
            max_length=max_length,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            progress=progress,
        )
    raise AssertionError(f"backend {backend!r} is listed in KNOWN_BACKENDS but not wired up")
