"""The LM head, applied only where a token is scored, a block of vocabulary rows at a time.

Why not ``model(input_ids).logits``: that materialises a [tokens × vocab] tensor (8k tokens × 49k
vocab = 1.6 GB in float32) although a reference log-prob needs one number per scored token. The
head here takes the body's hidden states at the scored rows only and combines per-block
logsumexps in float32; the target token's logit is picked out of the block that holds it, so the
numerator and the denominator use the same number.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

LogitsFn = Callable[[torch.Tensor, int, int, float], torch.Tensor]
"""float32 logits / temperature of a block of rows, for vocabulary ids [v0, v1)."""

HEAD_BLOCK_OF_CACHE = 8  # on a CPU, one head block is 1/8 of the last-level cache (2-8 MiB measured best)
HEAD_BLOCK_BYTES = (1 << 20, 8 << 20)  # bounds of a CPU head block (float32 logits)
HEAD_MIN_TOKENS = 512  # positions per CPU head block: fewer make the head's matmuls and the Python loop slower
CUDA_HEAD_BLOCK = (2048, 8192)  # positions x vocab rows on a GPU: 64 MiB, large enough to keep kernels busy
FALLBACK_CACHE_BYTES = 32 << 20


class LMHead:
    """The model's output embedding (with Gemma 2/3's soft-capping and Cohere's or Granite's logit scaling, which
    it applies itself), as float32 log-probs of given targets, a [token_chunk × vocab_chunk] block at a time.

    `check` is called before every block (the backend's interrupt check)."""

    def __init__(self, model, device: torch.device, token_chunk: int | None, vocab_chunk: int | None,
                 check: Callable[[], None] = lambda: None):
        head = model.get_output_embeddings()
        self.weight = None if head is None else head.weight
        self.bias = None if head is None else getattr(head, "bias", None)
        config = model.config
        self.vocab_size = config.vocab_size if head is None else head.weight.shape[0]
        auto_tokens, auto_vocab = head_chunks(self.vocab_size, device)
        self.token_chunk, self.vocab_chunk = token_chunk or auto_tokens, vocab_chunk or auto_vocab
        self.softcap = getattr(config, "final_logit_softcapping", None)
        scale, scaling = getattr(config, "logit_scale", None), getattr(config, "logits_scaling", None)
        self.multiplier = float(scale or 1.0) / float(scaling or 1.0)
        self._check = check

    def logits(self, hidden: torch.Tensor, v0: int, v1: int, temperature: float) -> torch.Tensor:
        """float32 logits / temperature of vocab ids [v0, v1) at the given hidden states.

        The matmul runs in the model dtype, like the model's own LM head, then everything is float32.
        """
        bias = None if self.bias is None else self.bias[v0:v1]
        logits = torch.nn.functional.linear(hidden, self.weight[v0:v1], bias).float()
        if self.multiplier != 1.0:  # Cohere's logit_scale, Granite's 1 / logits_scaling
            logits.mul_(self.multiplier)
        if self.softcap:  # Gemma 2/3
            logits = torch.tanh(logits.div_(self.softcap)).mul_(self.softcap)
        if temperature != 1.0:
            logits.div_(temperature)
        return logits

    def _token_blocks(self, states: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor | None):
        """(t0, t1, states of targets t0..t1-1, those targets), `token_chunk` targets at a time; `rows`: the row of
        `states` of each target (gathered a block at a time). Checks for an interruption before each block."""
        count = targets.shape[0]
        assert (rows if rows is not None else states).shape[0] == count
        for t0 in range(0, count, self.token_chunk):
            self._check()
            t1 = min(t0 + self.token_chunk, count)
            yield t0, t1, states[t0:t1] if rows is None else states.index_select(0, rows[t0:t1]), targets[t0:t1]

    def log_probs(self, states: torch.Tensor, targets: torch.Tensor, temperature: float,
                  logits_fn: LogitsFn | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """log softmax(logits / T)[target] per scored token, a [token_chunk × vocab_chunk] block at a time. `states`
        are hidden states (default `logits_fn`: this head) or logits the model computed (`sliced_logits`), one row
        per target, or, with `rows`, the rows of `states` that score each target (gathered a block at a time, so no
        copy of all scored rows is made)."""
        logits_fn = logits_fn or self.logits
        out = torch.empty(targets.shape[0], dtype=torch.float32, device=states.device)
        for t0, t1, block, block_targets in self._token_blocks(states, targets, rows):
            target_logit = torch.zeros(t1 - t0, dtype=torch.float32, device=states.device)
            partial_lse = []
            for v0 in range(0, self.vocab_size, self.vocab_chunk):
                v1 = min(v0 + self.vocab_chunk, self.vocab_size)
                logits = logits_fn(block, v0, v1, temperature)
                target_logit = _pick(logits, block_targets[:, None], v0, v1, target_logit[:, None])[:, 0]
                partial_lse.append(torch.logsumexp(logits, dim=1))
                del logits
            out[t0:t1] = target_logit - torch.logsumexp(torch.stack(partial_lse, dim=1), dim=1)
        return out

    def teacher(self, states: torch.Tensor, targets: torch.Tensor, temperature: float, top_k: torch.Tensor,
                candidates: torch.Tensor | None, logits_fn: LogitsFn | None = None,
                rows: torch.Tensor | None = None) -> "TeacherScores":
        """`log_probs`, plus at each scored position its `top_k` ([S] int64) most likely tokens and the log-probs of
        `candidates` ([S, C] token ids, -1 for none), and the log of the mass outside both (each id counted once):
        all over the whole vocabulary, gathered block by block as the head runs (a running top-k merged across
        vocabulary blocks), so memory per position stays O(top_k + C). The normaliser and the rest are summed in
        float64, so that a rest down to (vocabulary size) x 2^-53 of the mass (5e-12 for 49,152 tokens) is resolved;
        below that it is the sums' rounding, and -inf. Rows are returned `top_k.max()` wide."""
        count = targets.shape[0]
        logits_fn = logits_fn or self.logits
        device = states.device
        width = 0 if candidates is None else candidates.shape[1]
        k = min(int(top_k.max()) if count else 0, self.vocab_size)
        out = TeacherScores(
            logprobs=torch.empty(count, dtype=torch.float32, device=device),
            top_ids=torch.empty(count, k, dtype=torch.int64, device=device),
            top_logprobs=torch.empty(count, k, dtype=torch.float32, device=device),
            candidate_logprobs=torch.empty(count, width, dtype=torch.float32, device=device),
            rest_logmass=torch.empty(count, dtype=torch.float32, device=device),
        )
        earlier_column = torch.ones(width, width, dtype=torch.bool, device=device).tril(-1)  # [c, c']: c' < c
        for t0, t1, block, block_targets in self._token_blocks(states, targets, rows):
            chosen = None if candidates is None else candidates[t0:t1]
            target_logit = torch.zeros(t1 - t0, dtype=torch.float32, device=device)
            top_values = torch.empty(t1 - t0, 0, dtype=torch.float32, device=device)
            top_ids = torch.empty(t1 - t0, 0, dtype=torch.int64, device=device)
            chosen_logit = torch.full((t1 - t0, width), float("-inf"), dtype=torch.float32, device=device)
            partial_lse = []
            for v0 in range(0, self.vocab_size, self.vocab_chunk):
                v1 = min(v0 + self.vocab_chunk, self.vocab_size)
                logits = logits_fn(block, v0, v1, temperature)
                target_logit = _pick(logits, block_targets[:, None], v0, v1, target_logit[:, None])[:, 0]
                partial_lse.append(torch.logsumexp(logits.double(), dim=1))
                if k:
                    values, ids = logits.topk(min(k, v1 - v0), dim=1)
                    top_values, order = torch.cat([top_values, values], dim=1).topk(min(k, top_values.shape[1]
                                                                                         + values.shape[1]), dim=1)
                    top_ids = torch.cat([top_ids, ids + v0], dim=1).gather(1, order)
                if chosen is not None:
                    chosen_logit = _pick(logits, chosen, v0, v1, chosen_logit)
                del logits
            total = torch.logsumexp(torch.stack(partial_lse, dim=1), dim=1)  # float64
            out.logprobs[t0:t1] = (target_logit.double() - total).float()
            out.top_ids[t0:t1] = top_ids
            out.top_logprobs[t0:t1] = (top_values.double() - total[:, None]).float()
            out.candidate_logprobs[t0:t1] = (chosen_logit.double() - total[:, None]).float()
            # The returned ids, each once: the row's own top ids, and the candidates neither among them nor repeated.
            beyond = torch.arange(top_values.shape[1], device=device)[None, :] >= top_k[t0:t1, None]
            held = top_values.double().masked_fill(beyond, float("-inf"))
            if chosen is not None:
                repeated = ((chosen[:, :, None] == top_ids[:, None, :]) & ~beyond[:, None, :]).any(dim=2)
                earlier = (chosen[:, :, None] == chosen[:, None, :]) & earlier_column
                repeated |= earlier.any(dim=2) | (chosen < 0)
                held = torch.cat([held, chosen_logit.double().masked_fill(repeated, float("-inf"))], dim=1)
            held_lse = torch.logsumexp(held, dim=1) if held.shape[1] else torch.full_like(total, float("-inf"))
            held_mass = (held_lse - total).clamp(max=0.0)  # log of the mass of the returned ids
            rest = torch.log(-torch.expm1(held_mass))  # log(1 - that mass)
            # The two float64 sums differ in their last bits even where the returned ids are the whole vocabulary:
            # a rest within their rounding (vocabulary size x 2^-53 of the mass) is no rest.
            rest = rest.masked_fill(-held_mass <= self.vocab_size * _FLOAT64_EPS, float("-inf"))
            out.rest_logmass[t0:t1] = rest.float()
        return out


_FLOAT64_EPS = 2.0**-53
"""Unit roundoff of float64."""


def _pick(logits: torch.Tensor, ids: torch.Tensor, v0: int, v1: int, current: torch.Tensor) -> torch.Tensor:
    """`current` ([rows, n]) with the logits of the `ids` ([rows, n]) that fall in the vocabulary block [v0, v1)
    (whose logits are `logits`, [rows, v1 - v0]) filled in."""
    here = (ids >= v0) & (ids < v1)
    return torch.where(here, logits.gather(1, (ids - v0).clamp(0, v1 - v0 - 1)), current)


@dataclasses.dataclass
class TeacherScores:
    """`LMHead.teacher`'s answer, one row per scored token (tensors on the model's device)."""

    logprobs: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor
    candidate_logprobs: torch.Tensor
    rest_logmass: torch.Tensor


def sliced_logits(logits: torch.Tensor, v0: int, v1: int, temperature: float) -> torch.Tensor:
    """A `LogitsFn` over logits the model already computed (the full-forward fallback)."""
    return logits[:, v0:v1].float() / temperature


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
