"""The Hugging Face transformers backend: reference log-probs with torch, on CPU or CUDA.

Why it does not just call ``model(input_ids).logits``: that materialises a
[tokens × vocab] tensor (8k tokens × 49k vocab = 1.6 GB in float32) although a reference
log-prob needs one number per scored token. Instead the backend runs the model's body for
hidden states, applies the output embedding only at the scored positions, a block of vocab
rows at a time, and combines per-block logsumexps in float32; the target token's logit is
picked out of the block that holds it, so numerator and denominator use the same number.

Batches are right-padded without an attention mask: under causal attention a token never
sees later positions, so padding placed after every real token cannot change a real
token's value, and leaving the mask out keeps SDPA on its fused ``is_causal`` kernel
(measured 1.5× faster at 4k tokens on this CPU than the masked path, which also builds an
[L × L] mask). Position ids are passed explicitly.

Sequences of one call that share their prompt (the tokens before their start, at least
`min_shared_prompt` of them; GRPO's group of responses to one prompt) are run as the
prompt once, then all continuations on copies of its KV cache
(``batch_repeat_interleave``): the prompt's compute is paid once per group instead of
once per sequence (2× faster on GRPO-shaped work on this 2-core CPU: 2 prompts × 8
responses of 256 + 128 tokens, SmolLM2), with the same values.

At load time the backend checks on a short probe that "body, then head" reproduces the
model's own logits (this covers logit soft-capping and scaling, which it applies itself
for Gemma 2/3, Cohere and Granite) and that the shared-prompt path reproduces the plain
one; an architecture that fails a check is served without that optimisation (through its
full forward, exact but without the memory saving; or without prompt sharing), with a
warning.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from klservice.backends._files import model_revision
from klservice.backends.base import (
    DTYPES, Interrupted, ModelInfo, ReferenceBackend, Scored, describe_model, group_by_prompt, probe_tokens,
    split_shared,
)

log = logging.getLogger(__name__)

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}

# Signature of a function giving float32 logits / temperature for a block of rows and vocab ids [v0, v1).
LogitsFn = Callable[[torch.Tensor, int, int, float], torch.Tensor]


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


class HFBackend(ReferenceBackend):
    """A frozen causal LM from a local Hugging Face folder.

    Example::

        backend = HFBackend("/models/SmolLM2-135M-Instruct", dtype="float32", device="cpu")
        ids = np.asarray(backend.tokenizer("The capital of France is Paris").input_ids)
        backend.score([ids], starts=[5]).values  # → [array([-0.258...], dtype=float32)]

    `vocab_chunk` rows of the LM head and `token_chunk` scored positions are processed at a
    time, so the logits scratch is at most token_chunk × vocab_chunk float32 values (64 MiB
    with the defaults) whatever the vocabulary and batch size. `score()` runs the sequences
    it is given as one padded forward (plus two per group sharing a prompt): the caller
    bounds the batch (the engine packs length-sorted sequences under a token budget).

    `share_prompts` defaults to on for CPU and off for CUDA: each group costs two extra
    forwards, and on a GPU a small model's forward is bound by kernel launches, not by
    tokens (SmolLM2-sized on an H100: ~30 ms per forward whether 256 or 12k tokens; sharing
    made GRPO-shaped work 5× slower there, while on this CPU it made it 2× faster). Paying
    off on GPUs needs all groups batched into two forwards, which this does not do yet.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        name: str | None = None,
        dtype: str = "float32",
        device: str = "auto",
        max_length: int | None = None,
        progress: bool = True,
        vocab_chunk: int = 8192,
        token_chunk: int = 2048,
        share_prompts: bool | None = None,
        min_shared_prompt: int = 16,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if vocab_chunk < 1 or token_chunk < 1:
            raise ValueError("vocab_chunk and token_chunk must be positive")
        folder = Path(folder)
        self._device = resolve_device(device)
        self._vocab_chunk = vocab_chunk
        self._token_chunk = token_chunk
        self._min_shared_prompt = min_shared_prompt
        log.info("loading %s (%s on %s)", folder, dtype, self._device)
        # Hash the files (~0.4 s per GB) while transformers reads them; hashlib releases the GIL.
        with ThreadPoolExecutor(max_workers=1) as pool:
            revision = pool.submit(model_revision, folder)
            with transformers_progress(progress):
                self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
                model = AutoModelForCausalLM.from_pretrained(
                    folder, dtype=TORCH_DTYPES[dtype], device_map=str(self._device), local_files_only=True
                )
            revision = revision.result()
        model.eval()
        model.requires_grad_(False)
        self._model = model
        self._body = model.base_model
        self._interrupted = threading.Event()
        self._watch_layers(model)
        # transformers 5 renamed the KV cache argument and output from past_key_values to cache.
        parameters = inspect.signature(self._body.forward).parameters
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        head = model.get_output_embeddings()
        self._head_weight = None if head is None else head.weight
        self._head_bias = None if head is None else getattr(head, "bias", None)
        config = model.config
        self._vocab_size = config.vocab_size if head is None else head.weight.shape[0]
        self._softcap = getattr(config, "final_logit_softcapping", None)
        scale, scaling = getattr(config, "logit_scale", None), getattr(config, "logits_scaling", None)
        self._logit_multiplier = float(scale or 1.0) / float(scaling or 1.0)
        self._head_on_hidden = self._head_matches_model()
        if share_prompts is None:  # see the class docstring
            share_prompts = self._device.type == "cpu"
        self._share_prompts = share_prompts and self._head_on_hidden and self._prompt_sharing_matches()
        self._info = describe_model(
            name=name or str(folder),
            revision=revision,
            tokenizer=self.tokenizer,
            model_config=config,
            backend="hf",
            dtype=dtype,
            device=str(self._device),
            vocab_size=self._vocab_size,
            max_length=self._max_length(config, max_length),
        )

    def _max_length(self, config, user_limit: int | None) -> int:
        """min(config.max_position_embeddings, user limit); the tokenizer's limit if the config has none."""
        limits = [x for x in (getattr(config, "max_position_embeddings", None), user_limit) if x]
        if not limits and self.tokenizer.model_max_length < 10_000_000:  # transformers' "no limit" is 1e30
            limits = [self.tokenizer.model_max_length]
        if not limits:
            raise ValueError("the model declares no context length; pass max_length")
        return int(min(limits))

    def info(self) -> ModelInfo:
        return self._info

    def score(
        self,
        sequences: Sequence[np.ndarray],
        starts: Sequence[int],
        temperature: float = 1.0,
        prompt_groups: Sequence[Sequence[int]] | None = None,
    ) -> Scored:
        assert len(sequences) == len(starts) and temperature > 0
        results = [np.zeros(0, dtype=np.float32) for _ in sequences]
        todo = [i for i, (seq, start) in enumerate(zip(sequences, starts)) if len(seq) > start]
        if not todo:
            return Scored(results)
        if self._share_prompts:
            groups = prompt_groups if prompt_groups is not None else group_by_prompt(sequences, starts)
            shared, alone = split_shared(groups, starts, self._min_shared_prompt)
        else:
            shared, alone = [], list(range(len(sequences)))
        scored = set(todo)  # a sequence with nothing to score takes no part in a forward
        shared = [[i for i in group if i in scored] for group in shared]
        alone = [i for i in alone if i in scored]
        batch = [np.asarray(seq, dtype=np.int64) for seq in sequences]
        with torch.inference_mode():
            values, saved = self._score_batch(batch, [int(s) for s in starts], shared, alone, temperature)
        for i, value in values.items():
            results[i] = value
        return Scored(results, saved)

    def interrupt(self) -> None:
        self._interrupted.set()

    def close(self) -> None:
        self._interrupted.set()
        self._model = self._body = self._head_weight = self._head_bias = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    # -- internals -------------------------------------------------------------------------

    def _watch_layers(self, model) -> None:
        """Check for `interrupt()` before every decoder layer (and every block of the head): a forward then stops
        within one layer's time, whatever the batch. The layers are the body's longest ModuleList."""
        lists = [m for m in model.base_model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
        layers = max(lists, key=len) if lists else [model.base_model]
        for layer in layers:
            layer.register_forward_pre_hook(lambda module, args: self._check_interrupted())

    def _check_interrupted(self) -> None:
        if self._interrupted.is_set():
            raise Interrupted("the forward was interrupted: the server is stopping")

    def _score_batch(
        self, sequences: list[np.ndarray], starts: list[int], shared: list[list[int]], alone: list[int],
        temperature: float,
    ) -> tuple[dict[int, np.ndarray], int]:
        """({index: values}, tokens saved) for the sequences named in `shared` (groups whose prompt is computed
        once) and `alone`: hidden states (or logits) at their scored positions, then one pass of the head."""
        rows: dict[int, torch.Tensor] = {}
        if alone:
            for i, value in zip(alone, self._padded_rows([sequences[i] for i in alone], [starts[i] for i in alone])):
                rows[i] = value
        saved = 0
        for group in (group for group in shared if group):
            prompt = sequences[group[0]][: starts[group[0]]]
            saved += (len(group) - 1) * len(prompt)
            for i, value in zip(group, self._shared_prompt_rows(prompt, [sequences[i] for i in group])):
                rows[i] = value
        order = list(rows)
        for i in order:
            assert 1 <= starts[i] < len(sequences[i])
        targets = torch.from_numpy(np.concatenate([sequences[i][starts[i] :] for i in order]))
        logits_fn = self._head_logits if self._head_on_hidden else _slice_logits
        values = self._log_probs(torch.cat([rows[i] for i in order]), targets.to(self._device), temperature, logits_fn)
        counts = [len(sequences[i]) - starts[i] for i in order]
        return dict(zip(order, np.split(values.cpu().numpy(), np.cumsum(counts)[:-1]))), saved

    def _padded_rows(self, sequences: list[np.ndarray], starts: list[int]) -> list[torch.Tensor]:
        """One right-padded forward; per sequence, the outputs at positions start-1 .. L-2.

        The outputs are hidden states, or logits in the full-forward fallback. The last token is
        only ever a target (position p's output scores token p + 1), so it is not fed in.
        """
        width = max(len(seq) for seq in sequences) - 1
        ids = np.zeros((len(sequences), width), dtype=np.int64)  # padding id 0: any valid id will do
        for b, seq in enumerate(sequences):
            ids[b, : len(seq) - 1] = seq[:-1]
        input_ids = torch.from_numpy(ids).to(self._device)
        position_ids = torch.arange(width, device=self._device).expand(len(sequences), width)
        if self._head_on_hidden:
            out = self._body(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        else:
            out = self._model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        return [out[b, start - 1 : len(seq) - 1] for b, (seq, start) in enumerate(zip(sequences, starts))]

    def _shared_prompt_rows(self, prompt: np.ndarray, sequences: list[np.ndarray]) -> list[torch.Tensor]:
        """Like `_padded_rows` for sequences that all start with `prompt` and are scored from its end.

        The prompt runs once; its last hidden state scores every sequence's first target, and
        the continuations (right-padded) run together on copies of the prompt's KV cache.
        """
        length = len(prompt)
        prompt_ids = torch.from_numpy(prompt).to(self._device).unsqueeze(0)
        positions = torch.arange(length, device=self._device).unsqueeze(0)
        out = self._body(input_ids=prompt_ids, position_ids=positions, use_cache=True)
        first = out.last_hidden_state[0, length - 1 :]
        width = max(len(seq) for seq in sequences) - 1 - length  # inputs at positions length .. L-2
        if width == 0:
            return [first] * len(sequences)
        cache = out[self._cache_kwarg]
        cache.batch_repeat_interleave(len(sequences))
        ids = np.zeros((len(sequences), width), dtype=np.int64)
        for b, seq in enumerate(sequences):
            ids[b, : len(seq) - 1 - length] = seq[length:-1]
        input_ids = torch.from_numpy(ids).to(self._device)
        position_ids = torch.arange(length, length + width, device=self._device).expand(len(sequences), width)
        on_cache = {self._cache_kwarg: cache, "use_cache": True}
        hidden = self._body(input_ids=input_ids, position_ids=position_ids, **on_cache).last_hidden_state
        return [torch.cat([first, hidden[b, : len(seq) - 1 - length]]) for b, seq in enumerate(sequences)]

    def _head_logits(self, hidden: torch.Tensor, v0: int, v1: int, temperature: float) -> torch.Tensor:
        """float32 logits / temperature of vocab ids [v0, v1) at the given hidden states.

        The matmul runs in the model dtype, like the model's own LM head, then everything is float32.
        """
        bias = None if self._head_bias is None else self._head_bias[v0:v1]
        logits = torch.nn.functional.linear(hidden, self._head_weight[v0:v1], bias).float()
        if self._logit_multiplier != 1.0:  # Cohere's logit_scale, Granite's 1 / logits_scaling
            logits.mul_(self._logit_multiplier)
        if self._softcap:  # Gemma 2/3
            logits = torch.tanh(logits.div_(self._softcap)).mul_(self._softcap)
        if temperature != 1.0:
            logits.div_(temperature)
        return logits

    def _log_probs(
        self, rows: torch.Tensor, targets: torch.Tensor, temperature: float, logits_fn: LogitsFn
    ) -> torch.Tensor:
        """log softmax(logits / T)[target] per row, a [token_chunk × vocab_chunk] block at a time."""
        assert rows.shape[0] == targets.shape[0]
        out = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
        for t0 in range(0, rows.shape[0], self._token_chunk):
            self._check_interrupted()
            block, block_targets = rows[t0 : t0 + self._token_chunk], targets[t0 : t0 + self._token_chunk]
            target_logit = torch.zeros(block.shape[0], dtype=torch.float32, device=rows.device)
            partial_lse = []
            for v0 in range(0, self._vocab_size, self._vocab_chunk):
                v1 = min(v0 + self._vocab_chunk, self._vocab_size)
                logits = logits_fn(block, v0, v1, temperature)
                in_block = (block_targets >= v0) & (block_targets < v1)
                picked = logits.gather(1, (block_targets - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)).squeeze(1)
                target_logit = torch.where(in_block, picked, target_logit)
                partial_lse.append(torch.logsumexp(logits, dim=1))
                del logits
            out[t0 : t0 + block.shape[0]] = target_logit - torch.logsumexp(torch.stack(partial_lse, dim=1), dim=1)
        return out

    def _head_matches_model(self) -> bool:
        """Whether body + our head reproduce the model's own logits on a short probe sequence."""
        name = type(self._model).__name__
        if self._head_weight is None or self._body is self._model:
            log.warning("%s: no separable body/LM head; serving through the full forward", name)
            return False
        probe = torch.from_numpy(self._probe()).to(self._device).unsqueeze(0)
        positions = torch.arange(probe.shape[1], device=self._device).unsqueeze(0)
        try:
            with torch.inference_mode():
                expected = self._model(input_ids=probe, position_ids=positions, use_cache=False).logits[0]
                hidden = self._body(input_ids=probe, position_ids=positions, use_cache=False).last_hidden_state[0]
                actual = self._head_logits(hidden, 0, self._vocab_size, 1.0)
        except Exception:  # an architecture whose body does not take these arguments
            log.warning("%s: body forward failed; serving through the full forward", name, exc_info=True)
            return False
        if not self._agree(actual, expected):
            log.warning(
                "%s: body + LM head differ from the model's logits; serving through the full forward "
                "(exact, but it materialises full-vocab logits)",
                name,
            )
            return False
        return True

    def _prompt_sharing_matches(self) -> bool:
        """Whether prompt once + continuations on its KV cache gives the plain forward's hidden states."""
        name = type(self._model).__name__
        probe = self._probe()
        sequences, starts = [probe, probe[:9]], [6, 6]
        try:
            with torch.inference_mode():
                expected = torch.cat(self._padded_rows(sequences, starts))
                actual = torch.cat(self._shared_prompt_rows(probe[:6], sequences))
        except Exception:
            log.warning("%s: KV-cache continuation failed; prompts are not shared", name, exc_info=True)
            return False
        if not self._agree(actual, expected):
            log.warning("%s: KV-cache continuation differs from the plain forward; prompts are not shared", name)
            return False
        return True

    def _probe(self) -> np.ndarray:
        """12 fixed, spread-out token ids for the load-time checks."""
        return probe_tokens(self._vocab_size)

    def _agree(self, actual: torch.Tensor, expected: torch.Tensor) -> bool:
        """Equal up to rounding: relative 1e-4 in float32, 2e-2 in 16-bit dtypes."""
        actual, expected = actual.float(), expected.float()
        relative = 1e-4 if self._head_weight.dtype == torch.float32 else 2e-2
        return (actual - expected).abs().max().item() <= relative * max(1.0, expected.abs().max().item())

def _slice_logits(logits: torch.Tensor, v0: int, v1: int, temperature: float) -> torch.Tensor:
    """LogitsFn over logits the model already computed (the full-forward fallback)."""
    return logits[:, v0:v1].float() / temperature
