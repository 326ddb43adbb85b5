"""The Hugging Face transformers backend: reference log-probs with torch, on CPU or CUDA.

Why it does not just call ``model(input_ids).logits``: that materialises a
[tokens × vocab] tensor (8k tokens × 49k vocab = 1.6 GB in float32) although a reference
log-prob needs one number per scored token. Instead the backend runs the model's body for
hidden states, applies the output embedding only at the scored positions, a block of vocab
rows at a time, and combines per-block logsumexps in float32; the target token's logit is
picked out of the block that holds it, so numerator and denominator use the same number.

Sequences that share no prompt are right-padded (or, with ``pack=True``, packed: their
real tokens concatenated into one row, each at its own position ids, with attention kept
within each sequence by `packed_attention`, causal SDPA per sequence with no [T × T] mask,
so the linear layers see no padding). Padded batches carry no attention mask: under causal attention a token never sees later positions, so
padding placed after every real token cannot change a real token's value, and leaving the
mask out keeps SDPA on its fused ``is_causal`` kernel (measured 1.5× faster at 4k tokens on
this CPU than the masked path, which also builds an [L × L] mask). Position ids are passed
explicitly.

Sequences of one call that share their prompt (the tokens before their start, at least
`min_shared_prompt` of them; GRPO's group of responses to one prompt) are run as the
prompt once, then all continuations on copies of its KV cache: the prompt's compute is
paid once per group instead of once per sequence, with the same values. All groups of a
call go together: one forward over all their prompts (right-padded), one over all their
continuations (each member on its group's cache rows, ``batch_select_indices``; an
attention mask hides a shorter prompt's padding), so the number of forwards does not
grow with the number of groups, which matters where a forward is launch-bound (GPUs).

At load time the backend checks on a short probe that "body, then head" reproduces the
model's own logits (this covers logit soft-capping and scaling, which it applies itself
for Gemma 2/3, Cohere and Granite) and that the shared-prompt and packed paths reproduce
the plain one; an architecture that fails a check is served without that optimisation (through its
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

PACKED_ATTENTION = "klservice_packed"
"""The attention implementation a packing backend sets on its model (`packed_attention`, registered with
transformers' AttentionInterface under this name)."""


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
    time, so the logits scratch is at most token_chunk × vocab_chunk float32 values whatever
    the vocabulary and batch size; by default `head_chunks` sizes the block from the
    vocabulary and the CPU's last-level cache (1-8 MiB; 64 MiB on a GPU). `score()` runs the sequences
    it is given as one padded forward (plus two for all groups sharing a prompt): the caller
    bounds the batch (the engine packs length-sorted sequences under a token budget).

    `pack` (default off; `klservice serve --pack-sequences`) runs the sequences of a call that share
    no prompt as one row of their real tokens (`packed_attention`) instead of a padded batch. On
    this 2-core CPU that was 1.07× faster than padded calls split at 25% padding on mixed lengths;
    each sequence's values then equal its forward alone exactly, and differ from a padded batch's
    by float32 rounding (up to 2e-5 on SmolLM2's log-probs), which is more than the 1e-5 the
    framework integrations are held to against their own padded references, so it is not the
    default. On CUDA in float16/bfloat16 the packed row is attended by one FlashAttention varlen
    kernel (`flash_varlen`) instead of one SDPA call per sequence.

    `share_prompts` (default on) computes each group's shared prompt once: all prompts of a
    call in one forward, all continuations in a second on copies of their KV cache, so a call
    costs at most three forwards (its unshared sequences, the prompts, the continuations)
    whatever its number of groups (a sliding-window model past its window: two per distinct
    prompt length). On this 2-core CPU that made GRPO-shaped work 2× faster
    than the plain forward; one pair of forwards per group, as before, was 5× slower than
    the plain forward on an H100 for a SmolLM2-sized model, whose forwards are bound by
    kernel launches there.
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
        vocab_chunk: int | None = None,
        token_chunk: int | None = None,
        share_prompts: bool = True,
        min_shared_prompt: int = 16,
        pack: bool = False,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if (vocab_chunk is not None and vocab_chunk < 1) or (token_chunk is not None and token_chunk < 1):
            raise ValueError("vocab_chunk and token_chunk must be positive")
        folder = Path(folder)
        self._device = resolve_device(device)
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
        self._positions = 0  # token positions fed to the model in this call, padding included (one caller at a time)
        # transformers 5 renamed the KV cache argument and output from past_key_values to cache.
        parameters = inspect.signature(self._body.forward).parameters
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        head = model.get_output_embeddings()
        self._head_weight = None if head is None else head.weight
        self._head_bias = None if head is None else getattr(head, "bias", None)
        config = model.config
        self._vocab_size = config.vocab_size if head is None else head.weight.shape[0]
        auto_tokens, auto_vocab = head_chunks(self._vocab_size, self._device)
        self._token_chunk, self._vocab_chunk = token_chunk or auto_tokens, vocab_chunk or auto_vocab
        log.info("LM head in blocks of %d positions x %d vocab rows", self._token_chunk, self._vocab_chunk)
        self._softcap = getattr(config, "final_logit_softcapping", None)
        scale, scaling = getattr(config, "logit_scale", None), getattr(config, "logits_scaling", None)
        self._logit_multiplier = float(scale or 1.0) / float(scaling or 1.0)
        self._sliding_window = _sliding_window(config)
        self._head_on_hidden = self._head_matches_model()
        self._pack = pack and self._packing_matches()  # first: sharing is then checked as it will be served
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
            return Scored(results, positions=0)
        if self._share_prompts:
            groups = prompt_groups if prompt_groups is not None else group_by_prompt(sequences, starts)
            shared, alone = split_shared(groups, starts, self._min_shared_prompt)
        else:
            shared, alone = [], list(range(len(sequences)))
        scored = set(todo)  # a sequence with nothing to score takes no part in a forward
        shared = [[i for i in group if i in scored] for group in shared]
        alone = [i for i in alone if i in scored]
        batch = [np.asarray(seq, dtype=np.int64) for seq in sequences]
        self._positions = 0
        with torch.inference_mode():
            values, saved = self._score_batch(batch, [int(s) for s in starts], shared, alone, temperature)
        for i, value in values.items():
            results[i] = value
        return Scored(results, saved, positions=self._positions)

    @property
    def packs(self) -> bool:
        return self._pack and self._head_on_hidden

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

    def _count(self, ids: np.ndarray) -> None:
        """Count a forward's input positions (`ids`, padding included)."""
        self._positions += ids.size

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
            rows_of = self._packed_rows if self.packs else self._padded_rows
            for i, value in zip(alone, rows_of([sequences[i] for i in alone], [starts[i] for i in alone])):
                rows[i] = value
        shared = [group for group in shared if group]
        saved = sum((len(group) - 1) * starts[group[0]] for group in shared)
        for together in self._sharing_batches(shared, sequences, starts):
            prompts = [sequences[group[0]][: starts[group[0]]] for group in together]
            members = [[sequences[i] for i in group] for group in together]
            for group, values in zip(together, self._shared_prompt_rows(prompts, members)):
                rows.update(zip(group, values))
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
        self._count(ids)
        input_ids = torch.from_numpy(ids).to(self._device)
        position_ids = torch.arange(width, device=self._device).expand(len(sequences), width)
        if self._head_on_hidden:
            out = self._body(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        else:
            out = self._model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        return [out[b, start - 1 : len(seq) - 1] for b, (seq, start) in enumerate(zip(sequences, starts))]

    def _packed_rows(self, sequences: list[np.ndarray], starts: list[int]) -> list[torch.Tensor]:
        """Like `_padded_rows`, without padding: the sequences' inputs concatenated into one row, each at its own
        positions, with attention kept within each sequence (`packed_attention`). The model's linear layers see
        only real tokens."""
        inputs = [seq[:-1] for seq in sequences]
        lengths = [len(x) for x in inputs]
        device = self._device
        flat = np.concatenate(inputs)
        self._count(flat)
        ids = torch.from_numpy(flat).to(device).unsqueeze(0)
        positions = torch.from_numpy(np.concatenate([np.arange(n) for n in lengths])).to(device).unsqueeze(0)
        bounds = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)).to(device)
        out = self._body(
            input_ids=ids, position_ids=positions, use_cache=False,
            # A prepared 4D mask is taken as is, so transformers builds no [T × T] mask for the packed row;
            # `packed_attention` ignores it and keeps attention within the bounds.
            attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device),
            cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=max(lengths), max_length_k=max(lengths),
        ).last_hidden_state[0]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        return [out[offset + start - 1 : offset + len(seq) - 1] for offset, seq, start in zip(offsets, sequences, starts)]

    def _sharing_batches(
        self, shared: list[list[int]], sequences: list[np.ndarray], starts: list[int]
    ) -> list[list[list[int]]]:
        """The shared-prompt groups, in sets whose prompts run together (`_shared_prompt_rows`): all of them in one,
        unless a sliding window could reach across a shorter prompt's padding. Sliding-window masks count cache
        slots, and padding puts a shorter prompt's continuation further from its prompt in the cache than in the
        sequence; so when the padded length reaches the window, groups run together only with groups whose prompts
        have their length (no padding, slots are positions)."""
        if not shared:
            return []
        longest_prompt = max(starts[group[0]] for group in shared)
        longest_continuation = max(len(sequences[i]) - 1 - starts[i] for group in shared for i in group)
        window = self._sliding_window
        if window is None or (window and longest_prompt + longest_continuation <= window):
            return [shared]
        by_length: dict[int, list[list[int]]] = {}
        for group in shared:
            by_length.setdefault(starts[group[0]], []).append(group)
        return list(by_length.values())

    def _shared_prompt_rows(
        self, prompts: list[np.ndarray], groups: list[list[np.ndarray]]
    ) -> list[list[torch.Tensor]]:
        """Like `_padded_rows` for groups of sequences, group g's all starting with `prompts[g]` and scored from its
        end: two forwards for all groups together, whatever their number.

        1. The prompts, right-padded to the longest, in one forward with a KV cache. Each prompt's last hidden state
           scores its sequences' first targets (padding after a prompt cannot change it: causal attention).
        2. The cache rows are copied to the groups' members (`batch_select_indices`), and all continuations,
           right-padded, run in one forward on it at their own positions (a member of group g continues at position
           len(prompts[g])). The attention mask hides the cache slots of a shorter prompt's padding.
        """
        device = self._device
        lengths = [len(prompt) for prompt in prompts]
        longest = max(lengths)
        ids = np.zeros((len(prompts), longest), dtype=np.int64)
        for g, prompt in enumerate(prompts):
            ids[g, : lengths[g]] = prompt
        self._count(ids)
        positions = torch.arange(longest, device=device).expand(len(prompts), longest)
        out = self._body(input_ids=torch.from_numpy(ids).to(device), position_ids=positions, use_cache=True)
        firsts = [out.last_hidden_state[g, length - 1 : length] for g, length in enumerate(lengths)]
        rows: list[list[torch.Tensor]] = [[firsts[g]] * len(group) for g, group in enumerate(groups)]
        # Members with a continuation to run (a one-token response is scored by its prompt's last state alone).
        members = [(g, m, seq) for g, group in enumerate(groups) for m, seq in enumerate(group) if len(seq) - 1 > lengths[g]]
        if not members:
            return rows
        width = max(len(seq) - 1 - lengths[g] for g, _, seq in members)  # continuation inputs: positions len .. L-2
        cache = out[self._cache_kwarg]
        cache.batch_select_indices(torch.tensor([g for g, _, _ in members], device=device))
        ids = np.zeros((len(members), width), dtype=np.int64)
        position_ids = np.zeros((len(members), width), dtype=np.int64)
        mask = np.ones((len(members), longest + width), dtype=np.int64)
        for b, (g, _, seq) in enumerate(members):
            ids[b, : len(seq) - 1 - lengths[g]] = seq[lengths[g] : -1]
            position_ids[b] = np.arange(lengths[g], lengths[g] + width)
            mask[b, lengths[g] : longest] = 0  # the padding after a shorter prompt, in the cache
        self._count(ids)
        on_cache = {self._cache_kwarg: cache, "use_cache": True}
        if min(lengths) < longest:  # prompts of one length leave no hole: SDPA keeps its plain causal kernel
            on_cache["attention_mask"] = torch.from_numpy(mask).to(device)
        hidden = self._body(
            input_ids=torch.from_numpy(ids).to(device), position_ids=torch.from_numpy(position_ids).to(device),
            **on_cache,
        ).last_hidden_state
        for b, (g, m, seq) in enumerate(members):
            rows[g][m] = torch.cat([firsts[g], hidden[b, : len(seq) - 1 - lengths[g]]])
        return rows

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
        # Two groups with prompts of different lengths (the masked path), one of them with members of two lengths.
        groups = [[probe, probe[:9]], [probe[:8], probe[:11]]]
        starts = [6, 6, 4, 4]
        try:
            with torch.inference_mode():
                expected = torch.cat(self._padded_rows([seq for group in groups for seq in group], starts))
                rows = self._shared_prompt_rows([probe[:6], probe[:4]], groups)
                actual = torch.cat([row for group in rows for row in group])
        except Exception:
            log.warning("%s: KV-cache continuation failed; prompts are not shared", name, exc_info=True)
            return False
        if not self._agree(actual, expected):
            log.warning("%s: KV-cache continuation differs from the plain forward; prompts are not shared", name)
            return False
        return True

    def _packing_matches(self) -> bool:
        """Whether packed sequences (`_packed_rows`) give the padded forward's hidden states. Switches the model to
        `PACKED_ATTENTION` (which runs SDPA as before on every other path), and back if the check fails."""
        name = type(self._model).__name__
        if not self._head_on_hidden or self._model.config._attn_implementation != "sdpa":
            log.info("%s: attention is not SDPA; sequences are padded, not packed", name)
            return False
        if self._sliding_window is not None:
            log.info("%s: sliding-window or chunked attention; sequences are padded, not packed", name)
            return False
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask

        AttentionInterface.register(PACKED_ATTENTION, packed_attention)
        AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
        probe = self._probe()
        sequences, starts = [probe, probe[:5], probe[:9]], [1, 2, 4]
        try:
            with torch.inference_mode():
                expected = torch.cat(self._padded_rows(sequences, starts))
                self._model.set_attn_implementation(PACKED_ATTENTION)
                actual = torch.cat(self._packed_rows(sequences, starts))
                again = torch.cat(self._padded_rows(sequences, starts))  # the other paths are unchanged
        except Exception:
            log.warning("%s: packed forward failed; sequences are padded", name, exc_info=True)
            self._model.set_attn_implementation("sdpa")
            return False
        if not (self._agree(actual, expected) and self._agree(again, expected)):
            log.warning("%s: packed forward differs from the padded one; sequences are padded", name)
            self._model.set_attn_implementation("sdpa")
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

def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """A transformers attention function (`PACKED_ATTENTION`): for a packed row (``cu_seq_lens_q`` given: the
    sequences' bounds in it), causal attention within each sequence, so no position attends across a bound and
    no [T × T] mask or score matrix is built; for any other call, transformers' own SDPA attention.

    The packed row is attended in the variable-length layout ([T, heads, d], bounds as cumulative lengths):
    by PyTorch's FlashAttention varlen kernel (`torch.nn.attention.varlen`) on a CUDA device in float16 or
    bfloat16, where one kernel covers every sequence; elsewhere by `varlen_sdpa`, causal SDPA per sequence.

    query [1, heads, T, d]; key and value [1, kv_heads, T, d]. Returns ([1, T, heads, d], None), as SDPA's does.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    query, key, value = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, heads, d]
    attend = flash_varlen if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) else varlen_sdpa
    out = attend(query, key, value, bounds, kwargs.get("max_length_q"), scaling)
    return out.unsqueeze(0), None


def varlen_sdpa(query, key, value, bounds: torch.Tensor, longest: int | None, scale: float | None) -> torch.Tensor:
    """Causal attention within each sequence of a packed row: one SDPA call per sequence.

    query [T, heads, d], key and value [T, kv_heads, d] (grouped-query heads are shared), `bounds` the
    cumulative lengths [0, n1, n1 + n2, ...]; `longest` is unused (the signature is `flash_varlen`'s).
    Returns [T, heads, d].
    """
    groups = query.shape[1] // key.shape[1]
    out = torch.empty_like(query)
    edges = bounds.tolist()
    for start, end in zip(edges[:-1], edges[1:]):
        q, k, v = (x[start:end].transpose(0, 1) for x in (query, key, value))  # [heads, n, d]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(0, 1)
    return out


def flash_varlen(query, key, value, bounds: torch.Tensor, longest: int | None, scale: float | None) -> torch.Tensor:
    """`varlen_sdpa` as one FlashAttention varlen kernel (CUDA, float16/bfloat16): window (-1, 0) is causal.

    A GPU or PyTorch build without the kernel raises here, which the backend's load-time packing check
    turns into padded calls.
    """
    from torch.nn.attention.varlen import varlen_attn

    bounds = bounds.to(device=query.device, dtype=torch.int32)
    if longest is None:
        longest = int((bounds[1:] - bounds[:-1]).max())
    return varlen_attn(
        query.contiguous(), key.contiguous(), value.contiguous(), bounds, bounds, longest, longest, scale=scale,
        window_size=(-1, 0), enable_gqa=key.shape[1] != query.shape[1],
    )


HEAD_BLOCK_OF_CACHE = 8  # on a CPU, one head block is 1/8 of the last-level cache (2-8 MiB measured best)
HEAD_BLOCK_BYTES = (1 << 20, 8 << 20)  # bounds of a CPU head block (float32 logits)
HEAD_MIN_TOKENS = 512  # positions per CPU head block: fewer make the head's matmuls and the Python loop slower
CUDA_HEAD_BLOCK = (2048, 8192)  # positions x vocab rows on a GPU: 64 MiB, large enough to keep kernels busy
FALLBACK_CACHE_BYTES = 32 << 20


def head_chunks(vocab_size: int, device: torch.device, cache_bytes: int | None = None) -> tuple[int, int]:
    """(token_chunk, vocab_chunk) of the LM head's blocks, from the vocabulary and the CPU's cache.

    On a CPU the head is bound by memory traffic: each [positions × vocab rows] float32 block of
    logits is written by the matmul, then read twice by logsumexp (which also writes a temporary
    of its size). A block that stays in the last-level cache is much faster: on a 2-core AMD EPYC
    (32 MiB L3), SmolLM2-135M's head over 4,096 positions took 1.9-2.5 s with 2-8 MiB blocks and
    3.0-3.2 s with the 64 MiB blocks used before, and a smaller block is also less memory on top
    of the model. So a block is 1/8 of the cache (1-8 MiB), `HEAD_MIN_TOKENS` positions deep, and
    the vocabulary is cut into equal pieces that fill it. On a GPU, blocks are `CUDA_HEAD_BLOCK`.
    """
    if device.type == "cpu":
        cache = cache_bytes or last_level_cache_bytes() or FALLBACK_CACHE_BYTES
        block = min(max(cache // HEAD_BLOCK_OF_CACHE, HEAD_BLOCK_BYTES[0]), HEAD_BLOCK_BYTES[1])
        vocab_rows = max(1, block // (4 * HEAD_MIN_TOKENS))
    else:
        block, vocab_rows = CUDA_HEAD_BLOCK[0] * CUDA_HEAD_BLOCK[1] * 4, CUDA_HEAD_BLOCK[1]
    pieces = -(-vocab_size // vocab_rows)
    vocab_rows = -(-vocab_size // pieces)  # equal pieces: no small last piece
    return max(1, block // (4 * vocab_rows)), vocab_rows


def last_level_cache_bytes() -> int | None:
    """The largest data cache of CPU 0 as Linux reports it (/sys/devices/system/cpu/cpu0/cache), or None."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            sizes.append(_cache_size((index / "size").read_text()))
        except (OSError, ValueError):
            continue
    return max(sizes, default=None)


def _cache_size(text: str) -> int:
    """Bytes of a sysfs cache size: "32768K", "1M", "512"."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def _sliding_window(config) -> int | None:
    """The attention window of the model's sliding-window layers, None if it has none (Qwen2 declares a window but
    uses it only with `use_sliding_window`; `layer_types`, where given, says which layers slide). 0 for attention
    that is neither full nor sliding (Llama 4's chunked attention, any layer type not known here): nothing is
    packed then, and prompt groups run together only with prompts of their own length."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None) or ()
    if getattr(text, "attention_chunk_size", None) or any(
        str(kind) not in ("full_attention", "sliding_attention") for kind in layer_types
    ):
        return 0
    window = getattr(text, "sliding_window", None)
    if not window or getattr(text, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None and not any("sliding" in str(kind) for kind in layer_types):
        return None
    return int(window)


def _slice_logits(logits: torch.Tensor, v0: int, v1: int, temperature: float) -> torch.Tensor:
    """LogitsFn over logits the model already computed (the full-forward fallback)."""
    return logits[:, v0:v1].float() / temperature
