"""Distillation divergences on a truncated support, the rest of the mass as one bucket, with exact gradients.

A teacher served by klservice answers, at each position, the log-probs of a few token ids (its top-k, or the
student's) normalised over the whole vocabulary, and the log of the mass outside them (`ScoreOutput.top_logprobs`,
`.candidate_logprobs`, `.rest_logmass`). Over those K ids plus one "rest" bucket, teacher and student are proper
distributions, and the usual distillation losses are exact divergences between them:

- ``forward``: KL(teacher ‖ student) (GKD's beta = 0, TRL's ``beta=0``);
- ``reverse``: KL(student ‖ teacher) (on-policy distillation; GKD's beta = 1);
- ``jsd``: GKD's generalised Jensen-Shannon divergence, beta·KL(teacher ‖ M) + (1 - beta)·KL(student ‖ M) with
  M = beta·teacher + (1 - beta)·student (TRL's ``_jsd_divergence`` for 0 < beta < 1).

`distillation_divergence` returns each position's value and its exact gradient with respect to the student's logits z: for an
id j of the support, ``grad_support[..., j]``; for any id outside it, ``grad_rest * p_student(j)`` (all ids outside
move the rest bucket alike, so one coefficient per position says it). `distillation_surrogate` turns that into a
torch loss whose gradient is exactly it. Where the support is the whole vocabulary (the rest bucket empty) these
are the full-vocabulary divergences.

Math in float64; numpy arrays or torch tensors in, the same type (and device) out.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from klservice_client._arrays import is_torch

KINDS = ("forward", "reverse", "jsd")
"""The divergences `distillation_divergence` computes."""
REST_FLOOR = -69.0
"""Least log of a rest bucket (about 1e-30 of the mass): a rest rounded to nothing (-inf; a float32 top log-prob of
0.0) would make a divergence infinite and its gradient NaN, where the true rest is merely tiny."""


@dataclasses.dataclass(frozen=True)
class DistillationDivergence:
    """A divergence per position and its exact gradient with respect to the student's logits."""

    value: Any
    """[...]: the divergence at each position."""
    grad_support: Any
    """[..., K]: d value / d z_i for each support id i."""
    grad_rest: Any
    """[...]: c, with d value / d z_j = c · p_student(j) for every id j outside the support."""


def rest_logmass(logprobs, support_mask=None):
    """log(1 - sum(exp(logprobs))) over the last axis (the mass outside a support, from the support's log-probs;
    -inf where they hold all of it). Less exact than the server's `rest_logmass` when the rest is below ~1e-7 of
    the mass: use the latter for a teacher, the student's own logits for a student where possible."""
    values, back = _float64(logprobs)
    if support_mask is not None:
        values = np.where(_float64(support_mask)[0] > 0, values, -np.inf)
    held = np.minimum(_logsumexp(values), 0.0)
    with np.errstate(divide="ignore"):
        return back(np.log(-np.expm1(held)))


def distillation_divergence(student_logprobs, teacher_logprobs, *, student_rest=None, teacher_rest=None, kind: str = "forward",
               beta: float = 0.5, support_mask=None) -> DistillationDivergence:
    """The divergence `kind` (`KINDS`) between teacher and student over K support ids plus the rest bucket.

    `student_logprobs` and `teacher_logprobs` [..., K]: log-probs of the same K distinct ids at each position,
    normalised over the whole vocabulary; `student_rest` and `teacher_rest` [...]: the log of the mass outside
    them (default: from the support, `rest_logmass`), floored at `REST_FLOOR`. `support_mask` [..., K] (optional):
    False marks an entry to leave out (padding; its mass then belongs to the rest). `beta` is the mixture weight of
    ``jsd``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"beta: {beta} must lie strictly between 0 and 1 for jsd (0 is forward, 1 is reverse)")
    q_support, back = _float64(student_logprobs)
    p_support = _float64(teacher_logprobs)[0]
    if q_support.shape != p_support.shape:
        raise ValueError(f"student and teacher log-probs differ in shape: {q_support.shape} and {p_support.shape}")
    mask = np.ones(q_support.shape, dtype=bool) if support_mask is None else _float64(support_mask)[0] > 0
    q_support = np.where(mask, q_support, -np.inf)
    p_support = np.where(mask, p_support, -np.inf)
    q_rest = _float64(student_rest)[0] if student_rest is not None else _float64(rest_logmass(q_support))[0]
    p_rest = _float64(teacher_rest)[0] if teacher_rest is not None else _float64(rest_logmass(p_support))[0]
    q_rest, p_rest = np.maximum(q_rest, REST_FLOOR), np.maximum(p_rest, REST_FLOOR)
    q_log = np.concatenate([q_support, q_rest[..., None]], axis=-1)
    p_log = np.concatenate([p_support, p_rest[..., None]], axis=-1)
    q, p = np.exp(q_log), np.exp(p_log)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if kind == "forward":  # sum p (log p - log q); d/dq = -p / q
            value = np.where(p > 0, p * (p_log - q_log), 0.0).sum(axis=-1)
            dq = np.where(p > 0, -p / q, 0.0)
        elif kind == "reverse":  # sum q (log q - log p); d/dq = log q - log p + 1
            value = np.where(q > 0, q * (q_log - p_log), 0.0).sum(axis=-1)
            dq = np.where(q > 0, q_log - p_log + 1.0, 0.0)
        else:  # beta KL(p || m) + (1 - beta) KL(q || m); d/dq = (1 - beta) (log q - log m)
            m_log = np.logaddexp(np.log(beta) + p_log, np.log1p(-beta) + q_log)
            value = (beta * np.where(p > 0, p * (p_log - m_log), 0.0)
                     + (1.0 - beta) * np.where(q > 0, q * (q_log - m_log), 0.0)).sum(axis=-1)
            dq = np.where(q > 0, (1.0 - beta) * (q_log - m_log), 0.0)
    s, rest = q[..., :-1], q[..., -1]
    g, g_rest = dq[..., :-1], dq[..., -1]
    mean = (s * g).sum(axis=-1)
    grad_support = np.where(mask, s * (g - mean[..., None] - (g_rest * rest)[..., None]), 0.0)
    grad_rest = -mean + g_rest * (1.0 - rest)
    return DistillationDivergence(value=back(value), grad_support=back(grad_support), grad_rest=back(grad_rest))


def distillation_surrogate(student_logits, support_ids, result: DistillationDivergence, weights=None,
                           support_mask=None):
    """A torch scalar whose gradient with respect to `student_logits` ([..., V], the logits the student's
    log-probs came from, temperature applied) is exactly `result`'s, summed over positions (each times
    `weights` [...], e.g. a completion mask over a token count). `support_ids` [..., K]: the support's ids;
    `support_mask`: as given to `distillation_divergence` (a masked entry is in the rest bucket)."""
    import torch

    z = student_logits
    probabilities = torch.softmax(z.detach().double(), dim=-1)
    rest = torch.as_tensor(result.grad_rest, dtype=torch.float64, device=z.device)[..., None]
    grad = probabilities * rest  # every id as if outside the support ...
    ids = torch.as_tensor(support_ids, device=z.device).long()
    own = torch.as_tensor(result.grad_support, dtype=torch.float64, device=z.device) - probabilities.gather(-1, ids) * rest
    if support_mask is not None:  # ... then the support's own: a masked entry (padding) stays in the rest
        own = own * torch.as_tensor(support_mask, device=z.device).to(torch.float64)
    grad = grad.scatter_add(-1, ids, own)
    if weights is not None:
        grad = grad * torch.as_tensor(weights, dtype=torch.float64, device=z.device)[..., None]
    return (grad.to(z.dtype) * z).sum()


def _logsumexp(values: np.ndarray) -> np.ndarray:
    top = np.max(values, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return (np.log(np.exp(values - top).sum(axis=-1, keepdims=True)) + top)[..., 0]


def _float64(values) -> tuple[np.ndarray, Any]:
    """(float64 numpy array, a function turning an array back into the input's type and device)."""
    if is_torch(values):
        import torch

        device, dtype = values.device, values.dtype if values.is_floating_point() else torch.float32
        array = values.detach().cpu().double().numpy()
        return array, lambda out: torch.from_numpy(np.asarray(out)).to(device=device, dtype=dtype)
    array = np.asarray(values, dtype=np.float64)
    return array, lambda out: np.asarray(out, dtype=np.float64)


__all__ = ["DistillationDivergence", "KINDS", "REST_FLOOR", "distillation_divergence", "distillation_surrogate",
           "rest_logmass"]
