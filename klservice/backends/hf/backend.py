"""`HFBackend`: a frozen transformers causal LM scoring a call's sequences in one packed forward.

The data path of one `score()` call, in order:

1. `layout.build_layout`: the call's sequences as one packed row of real tokens. A sequence alone is a
   segment; a group sharing a prompt is the prompt once, then each member's continuation (GRPO's
   responses) at positions continuing from the prompt's end.
2. One forward of the model's body over that row; every attention layer reads the layout through a
   `attention.TreeCall` and attends by the kernel chosen at load (`checks.choose_kernel`). A sequence
   longer than a layer's memory budget runs layer by layer in chunks of rows (`chunking.py`).
3. `head.LMHead`: the output embedding at the scored rows only, block by block, to float32 log-probs.

Where the packed path does not reproduce the model's own forward (checked at load on a probe), the
call runs as one right-padded batch without prompt sharing; where the body and the head cannot be
separated, through the model's full forward (exact, without the memory saving). Either is logged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from klservice.backends._files import LoadGuard, model_revision
from klservice.backends.base import (
    DTYPES, Interrupted, ModelInfo, ReferenceBackend, Scored, TeacherAsk, TeacherOutput, describe_model,
    group_by_prompt, split_shared,
)
from klservice.backends.hf import checks
from klservice.backends.hf.attention import TREE_ATTENTION, TREE_KWARG, Kernel, TreeCall, tree_attention
from klservice.backends.hf.chunking import LayerChunker
from klservice.backends.hf.head import LMHead, sliced_logits
from klservice.backends.hf.layout import CallLayout, build_layout
from klservice.backends.hf.loading import load_model, resolve_device, transformers_progress
from klservice.threads import in_daemon_thread

log = logging.getLogger(__name__)


class HFBackend(ReferenceBackend):
    """A frozen causal LM from a local Hugging Face folder.

    Example::

        backend = HFBackend("/models/SmolLM2-135M-Instruct", dtype="float32", device="cpu")
        ids = np.asarray(backend.tokenizer("The capital of France is Paris").input_ids)
        backend.score([ids], starts=[5]).values  # → [array([-0.258...], dtype=float32)]

    `share_prompts` (default on) lays a group of sequences with the same prompt out as the prompt once,
    followed by the members' continuations (any prompt of at least `min_shared_prompt` tokens).
    `vocab_chunk` rows of the LM head and `token_chunk` scored positions are processed at a time
    (default: `head.head_chunks`). `chunk_tokens` caps the rows a decoder layer computes at once
    (default: sized per call from the model's shape, `chunking.chunk_rows`). `kernel` forces an
    attention kernel by name (``sdpa``, ``varlen``, ``flex``); by default the load-time check picks.
    ``kernel="none"`` runs every call as one right-padded batch without prompt sharing (the fallback
    path, as an escape hatch). `score()` runs what it is given as one call: the caller bounds the
    batch (the server's scheduler plans calls under a token budget).
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
        min_shared_prompt: int = 1,
        chunk_tokens: int | None = None,
        kernel: str | None = None,
        guard: LoadGuard | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if (vocab_chunk is not None and vocab_chunk < 1) or (token_chunk is not None and token_chunk < 1):
            raise ValueError("vocab_chunk and token_chunk must be positive")
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError("chunk_tokens must be positive")
        folder = Path(folder)
        self._device = resolve_device(device)
        self._min_shared_prompt = max(1, min_shared_prompt)
        self._share_prompts = share_prompts
        log.info("loading %s (%s on %s)", folder, dtype, self._device)
        # Hash the files (~0.4 s per GB) while transformers reads them; hashlib releases the GIL. The hash is given
        # up with the load (`guard`: its deadline, a failure here).
        guard = guard or LoadGuard()
        revision = in_daemon_thread(model_revision, folder, guard, name="klservice-hash")
        try:
            with transformers_progress(progress):
                self.tokenizer, model = load_model(folder, dtype, self._device)
            revision = revision.result()
        except BaseException:
            guard.abandon("the load failed")
            raise
        self._model = model
        self._body = model.base_model
        self._interrupted = threading.Event()
        self._positions = 0  # positions fed to the model in this call, padding included (one caller at a time)
        self._head = LMHead(model, self._device, token_chunk, vocab_chunk, check=self._check_interrupted)
        self._vocab_size = self._head.vocab_size
        log.info("LM head in blocks of %d positions x %d vocab rows", self._head.token_chunk, self._head.vocab_chunk)
        self._chunker = LayerChunker(model, chunk_tokens)
        self._watch_layers()
        probe = checks.make_probe(self)
        self._head_on_hidden = True  # the check runs the body (`padded_rows`) and keeps this where it matches
        self._head_on_hidden = checks.head_matches_model(self, probe)
        # The kernels that passed the load-time check, best first; the first serves, the next takes over where it
        # fails while serving. None left: calls run padded, prompts not shared.
        self._kernels: list[Kernel] = []
        if self._head_on_hidden and kernel != "none":
            self._kernels = checks.choose_kernel(self, probe, kernel)
        self._info = describe_model(
            name=name or str(folder),
            revision=revision,
            tokenizer=self.tokenizer,
            model_config=model.config,
            backend="hf",
            dtype=dtype,
            device=str(self._device),
            vocab_size=self._vocab_size,
            max_length=self._max_length(model.config, max_length),
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

    @property
    def packs(self) -> bool:
        """Whether calls run packed with a group's prompt once (no padding): the scheduler then costs a call by the
        tokens it computes (`klservice.scheduler.packed_tokens`)."""
        return bool(self._kernels) and self._share_prompts

    @property
    def kernel(self) -> str | None:
        """The attention kernel of the packed path (None: calls run padded)."""
        return self._kernels[0].name if self._kernels else None

    def score(
        self,
        sequences: Sequence[np.ndarray],
        starts: Sequence[int],
        temperature: float = 1.0,
        prompt_groups: Sequence[Sequence[int]] | None = None,
        teacher: Sequence[TeacherAsk | None] | None = None,
    ) -> Scored:
        assert len(sequences) == len(starts) and temperature > 0
        asks = list(teacher) if teacher is not None and any(ask is not None for ask in teacher) else None
        results = [np.zeros(0, dtype=np.float32) for _ in sequences]
        taught: list[TeacherOutput | None] | None = None if asks is None else [
            None if ask is None else TeacherOutput.empty(ask) for ask in asks]
        todo = [i for i, (seq, start) in enumerate(zip(sequences, starts)) if len(seq) > start]
        if not todo:
            return Scored(results, positions=0, teacher=taught)
        batch = [np.asarray(seq, dtype=np.int64) for seq in sequences]
        starts = [int(s) for s in starts]
        self._positions = 0
        with torch.inference_mode():
            if self._kernels:
                values, teachers, saved = self._score_packed(batch, starts, todo, temperature, prompt_groups, asks)
            else:
                (values, teachers), saved = self._score_padded(batch, starts, todo, temperature, asks), 0
        for i, value in values.items():
            results[i] = value
        for i, output in teachers.items():
            taught[i] = output
        return Scored(results, saved, positions=self._positions, teacher=taught)

    def check_teacher(self, ask: TeacherAsk) -> None:
        """Top-k and candidates are computed in the blocked head, on either path."""

    def interrupt(self) -> None:
        self._interrupted.set()

    def close(self) -> None:
        self._interrupted.set()
        self._model = self._body = self._head = self._chunker = None
        self._kernels = []
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    # -- the packed path -------------------------------------------------------------------

    def layout(self, sequences: list[np.ndarray], starts: list[int], todo: list[int],
               prompt_groups: Sequence[Sequence[int]] | None = None) -> CallLayout:
        """The packed layout of the sequences named in `todo` (each with a token to score)."""
        scored = set(todo)
        if self._share_prompts:
            groups = prompt_groups if prompt_groups is not None else group_by_prompt(sequences, starts)
            shared, alone = split_shared(groups, starts, self._min_shared_prompt)
            shared = [members for members in ([i for i in group if i in scored] for group in shared) if members]
            # A group left with one scored member is a sequence alone.
            alone = [i for i in alone if i in scored] + [group[0] for group in shared if len(group) == 1]
            shared = [group for group in shared if len(group) > 1]
        else:
            shared, alone = [], todo
        return build_layout(sequences, starts, shared, alone, self._device)

    def packed_hidden(self, layout: CallLayout, kernel: Kernel | None = None, chunk_rows: int | None = None
                      ) -> torch.Tensor:
        """[T, hidden] the body's last hidden states over the packed row (`kernel`: the backend's own by default;
        `chunk_rows`: rows per chunk of a layer, by default sized for the call)."""
        call = TreeCall(layout, kernel or self._kernels[0])
        with self._chunker.chunks(call, chunk_rows):
            return self._body(
                input_ids=layout.input_ids, position_ids=layout.position_ids, use_cache=False,
                # A prepared 4D mask is taken as is: transformers builds no [T × T] mask for the packed row.
                attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self._device),
                **{TREE_KWARG: call},
            ).last_hidden_state[0]

    def _score_packed(self, sequences, starts, todo, temperature, prompt_groups, asks):
        layout = self.layout(sequences, starts, todo, prompt_groups)
        hidden = self._packed_hidden_with_fallback(layout)
        self._positions += layout.tokens
        values, teachers = self._head_outputs(hidden, layout.targets, layout.order, layout.counts, temperature, asks,
                                              rows=layout.rows)
        return values, teachers, layout.tokens_saved

    def _packed_hidden_with_fallback(self, layout: CallLayout) -> torch.Tensor:
        """`packed_hidden` with the serving kernel; where it fails (a compilation for a new shape, say), with the next
        kernel that passed at load, which then serves from now on. Running out of memory is the call's failure, not
        the kernel's: it is raised, the kernels left as they are."""
        first_error = None
        for number, kernel in enumerate(self._kernels):
            try:
                hidden = self.packed_hidden(layout, kernel)
            except (Interrupted, MemoryError, torch.cuda.OutOfMemoryError):
                raise
            except Exception as error:  # noqa: BLE001 - tried with the next kernel, raised if none serves
                first_error = first_error or error
                log.warning("attention kernel %s failed on a %d-token call", kernel.name, layout.tokens, exc_info=True)
                continue
            if number:
                log.error("attention kernel %s failed; the %s kernel serves from now on",
                          self._kernels[0].name, kernel.name)
                self._kernels = self._kernels[number:]
            return hidden
        raise first_error

    # -- the padded path (fallback) --------------------------------------------------------

    def padded_rows(self, sequences: list[np.ndarray], starts: list[int]) -> list[torch.Tensor]:
        """One right-padded forward; per sequence, the outputs at positions start-1 .. L-2: hidden states, or logits
        where the body and the head cannot be separated. The last token is only ever a target (position p's output
        scores token p + 1), so it is not fed in.

        No attention mask: under causal attention a token never sees later positions, so padding after every
        real token cannot change a real token's value, and leaving the mask out keeps SDPA on its fused causal
        kernel (1.5× faster at 4k tokens on a CPU than the masked path, which also builds an [L × L] mask)."""
        width = max(len(seq) for seq in sequences) - 1
        ids = np.zeros((len(sequences), width), dtype=np.int64)  # padding id 0: any valid id will do
        for b, seq in enumerate(sequences):
            ids[b, : len(seq) - 1] = seq[:-1]
        self._positions += ids.size
        input_ids = torch.from_numpy(ids).to(self._device)
        position_ids = torch.arange(width, device=self._device).expand(len(sequences), width)
        if self._head_on_hidden:
            out = self._body(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        else:
            out = self._model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        return [out[b, start - 1 : len(seq) - 1] for b, (seq, start) in enumerate(zip(sequences, starts))]

    def _score_padded(self, sequences, starts, todo, temperature, asks):
        rows = self.padded_rows([sequences[i] for i in todo], [starts[i] for i in todo])
        targets = torch.from_numpy(np.concatenate([sequences[i][starts[i] :] for i in todo])).to(self._device)
        logits_fn = self._head.logits if self._head_on_hidden else sliced_logits
        counts = [len(sequences[i]) - starts[i] for i in todo]
        return self._head_outputs(torch.cat(rows), targets, todo, counts, temperature, asks, logits_fn=logits_fn)

    def _head_outputs(self, states, targets, order, counts, temperature, asks, logits_fn=None, rows=None):
        """({sequence: log-probs}, {sequence: TeacherOutput}) of the scored tokens of the sequences in `order`
        (`counts` each, their targets concatenated in that order), from their hidden states (or logits). The tokens
        of sequences asking for teacher outputs go through the head's `teacher`, the others through its plain
        `log_probs`, so a plain sequence's values do not depend on what it shares a call with."""
        edges = np.cumsum(counts)[:-1]
        asking = [i for i in order if asks is not None and asks[i] is not None]
        if not asking:
            values = self._head.log_probs(states, targets, temperature, logits_fn, rows=rows)
            return dict(zip(order, np.split(values.cpu().numpy(), edges))), {}
        device = self._device
        taught = np.repeat([asks is not None and asks[i] is not None for i in order], counts)
        positions = torch.arange(len(targets), device=device) if rows is None else rows  # the row of each target
        values = np.empty(len(targets), dtype=np.float32)
        plain = torch.from_numpy(np.flatnonzero(~taught)).to(device)
        if len(plain):
            values[~taught] = self._head.log_probs(states, targets[plain], temperature, logits_fn,
                                                   rows=positions[plain]).cpu().numpy()
        taught_counts = [count for i, count in zip(order, counts) if asks[i] is not None]
        top_k = np.repeat([asks[i].top_k for i in asking], taught_counts)
        width = max(asks[i].width for i in asking)
        candidates = None
        if width:
            candidates = np.full((len(top_k), width), -1, dtype=np.int64)
            offset = 0
            for i, count in zip(asking, taught_counts):
                if asks[i].width:
                    candidates[offset : offset + count, : asks[i].width] = asks[i].candidates
                offset += count
        chosen = torch.from_numpy(np.flatnonzero(taught)).to(device)
        scores = self._head.teacher(
            states, targets[chosen], temperature, torch.from_numpy(top_k).to(device),
            None if candidates is None else torch.from_numpy(candidates).to(device), logits_fn, rows=positions[chosen],
        )
        values[taught] = scores.logprobs.cpu().numpy()
        taught_edges = np.cumsum(taught_counts)[:-1]
        parts = {name: np.split(getattr(scores, name).cpu().numpy(), taught_edges)
                 for name in ("top_ids", "top_logprobs", "candidate_logprobs", "rest_logmass")}
        teachers = {}
        for position, i in enumerate(asking):
            ask = asks[i]
            teachers[i] = TeacherOutput(
                top_ids=parts["top_ids"][position][:, : ask.top_k].astype(np.int32),
                top_logprobs=parts["top_logprobs"][position][:, : ask.top_k],
                candidate_logprobs=parts["candidate_logprobs"][position][:, : ask.width],
                rest_logmass=parts["rest_logmass"][position],
            )
        return dict(zip(order, np.split(values, edges))), teachers

    # -- interruption ----------------------------------------------------------------------

    def _watch_layers(self) -> None:
        """Check for `interrupt()` before every decoder layer (and every block of the head): a forward then stops
        within one layer's time, whatever the batch."""
        for layer in self._chunker.layers:
            layer.register_forward_pre_hook(lambda module, args: self._check_interrupted())

    def _check_interrupted(self) -> None:
        if self._interrupted.is_set():
            raise Interrupted("the forward was interrupted: the server is stopping")


def register_tree_attention() -> None:
    """Make `TREE_ATTENTION` known to transformers (idempotent): its attention function, and SDPA's mask for the
    padded calls that run through it."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(TREE_ATTENTION, tree_attention)
    AttentionMaskInterface.register(TREE_ATTENTION, sdpa_mask)
