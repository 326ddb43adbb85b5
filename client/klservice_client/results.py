"""What the clients return: per-token arrays flat over scored tokens, viewable per sequence or padded.

`ScoreOutput` (Score), `KLOutput` (ComputeKL), and for `stream_kl` the input `KLItem` and the
output `KLStreamResult`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from klservice_client import kl
from klservice_client._arrays import is_torch
from klservice_client.errors import KLServiceError

__all__ = ["KLItem", "KLOutput", "KLStreamResult", "ScoreOutput"]


class _Ragged:
    """Flat per-token arrays over scored tokens plus `scored_lengths`, viewable ragged or padded."""

    scored_lengths: np.ndarray

    def ragged(self, name: str) -> list:
        """The array `name` split per sequence."""
        values = getattr(self, name)
        offsets = np.cumsum(np.asarray(self.scored_lengths))[:-1].tolist()
        if is_torch(values):
            return list(values.tensor_split(offsets))
        return np.split(values, offsets)

    def padded(self, name: str, pad_value: float = 0.0):
        """(values [num_sequences, max_scored], mask) with right padding; torch if the array is torch."""
        values = getattr(self, name)
        lengths = np.asarray(self.scored_lengths)
        width = int(lengths.max()) if lengths.size else 0
        mask = np.arange(width)[None, :] < lengths[:, None]
        if is_torch(values):
            import torch

            mask_t = torch.as_tensor(mask, device=values.device)
            out = torch.full(mask.shape, pad_value, dtype=values.dtype, device=values.device)
            out[mask_t] = values
            return out, mask_t
        out = np.full(mask.shape, pad_value, dtype=values.dtype)
        out[mask] = values
        return out, mask


@dataclasses.dataclass(frozen=True)
class ScoreOutput(_Ragged):
    """Reference log-probs of the scored tokens (flat; `ragged()` / `padded()` to reshape), and the teacher outputs
    asked for (`KLClient.score(top_k=..., candidate_ids=...)`), one row per scored token, every log-prob over the
    whole vocabulary at the request's temperature."""

    ref_logprobs: Any
    scored_lengths: np.ndarray
    model: str
    revision: str
    generation: int = 0
    """How many loads the model name had seen when it answered (ModelInfo.generation)."""
    top_ids: Any = None
    """int32 [scored, top_k]: the most likely token ids at each position, most likely first (with top_k)."""
    top_logprobs: Any = None
    """float32 [scored, top_k]: their log-probs (with top_k)."""
    candidate_logprobs: Any = None
    """float32 [scored, C]: the log-probs of the candidate ids (with candidate_ids)."""
    rest_logmass: Any = None
    """float32 [scored]: log of the mass outside the top ids and the candidates, each counted once (-inf where they
    hold all of it): the tail bucket of a truncated distribution (with either)."""


@dataclasses.dataclass(frozen=True)
class KLOutput(_Ragged):
    """ComputeKL results: per-token arrays (flat over scored tokens), batch diagnostics, and the teacher outputs asked
    for."""

    ref_logprobs: Any
    k1: Any
    k2: Any
    k3: Any
    coef: Any
    coef_principled: Any
    scored_lengths: np.ndarray
    diagnostics: kl.KLDiagnostics
    spec: str
    model: str
    revision: str
    generation: int = 0
    """How many loads the model name had seen when it answered (ModelInfo.generation)."""
    top_ids: Any = None
    """The teacher outputs asked for with `compute_kl(top_k=..., candidate_ids=...)`, as `ScoreOutput`'s."""
    top_logprobs: Any = None
    candidate_logprobs: Any = None
    rest_logmass: Any = None


@dataclasses.dataclass(frozen=True)
class KLItem:
    """One ComputeKL request of a `stream_kl` stream: the arguments of `KLClient.compute_kl`, and a `key`.

    `key` (any value; default: the item's position in the stream, from 0) comes back with the
    item's `KLStreamResult`, since results arrive in completion order.
    """

    sequences: Any
    prompt_lengths: Any
    logprobs: Any
    old_logprobs: Any = None
    spec: kl.KLSpec | str | None = None
    temperature: float = 1.0
    model: str | None = None
    """The model by name; None: the client's model (its `model=`, else the server's default)."""
    as_torch: bool = False
    key: Any = None
    revision: str | None = None
    """The revision the item must be scored by (None: the client's pin for its model, if any)."""
    top_k: int = 0
    """Teacher outputs with the item's KL values, as in `KLClient.compute_kl`."""
    candidate_ids: Any = None


@dataclasses.dataclass(frozen=True)
class KLStreamResult:
    """The answer to one `KLItem`: its `output`, or the typed `error` it failed with (the stream goes on)."""

    key: Any
    output: KLOutput | None = None
    error: KLServiceError | None = None

    def result(self) -> KLOutput:
        """The output, or raise the item's error (an `InvalidArgument` naming the field, ...)."""
        if self.error is not None:
            raise self.error
        assert self.output is not None
        return self.output
