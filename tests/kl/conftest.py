"""Shared helpers for the KL math tests: batches with extreme values and loss oracles.

Everything here is written from the definitions in docs/kl-math.md, never from
`klservice_client.kl`'s formulas: the estimators are ``k1 = d``, ``k2 = d**2 / 2`` and
``k3 = exp(-d) - 1 + d`` as torch expressions, and gradients come from torch autograd.

The test modules import these helpers as ``kl_testlib``: this conftest registers itself
under that name, because ``from conftest import ...`` picks up whichever ``conftest``
pytest imported last (tests/conftest.py, tests/backends/conftest.py, ...).
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch

sys.modules["kl_testlib"] = sys.modules[__name__]

ESTIMATORS = ("k1", "k2", "k3")
MODES = ("in_reward", "as_loss")
AGGREGATIONS = ("token", "sequence", "reward_to_go")
IMPORTANCE = ("none", "token", "sequence")
TRUNCATIONS = (None, 2.0)
DIFFERENTIABLE = (False, True)

#: Ragged batch used throughout: a one-token sequence, an empty one and a long one.
LENGTHS = (1, 5, 0, 17, 3)


@dataclass(frozen=True)
class SpecFields:
    """A KLSpec's fields as plain values (so the tests never read them back from kl.py)."""

    estimator: str
    mode: str
    aggregation: str
    importance_sampling: str = "none"
    truncation: float | None = None
    differentiable_weight: bool = False

    def kwargs(self) -> dict:
        return dict(
            estimator=self.estimator,
            mode=self.mode,
            aggregation=self.aggregation,
            importance_sampling=self.importance_sampling,
            truncation=self.truncation,
            differentiable_weight=self.differentiable_weight,
        )

    @property
    def id(self) -> str:
        parts = [self.estimator, self.mode, self.aggregation, f"is={self.importance_sampling}"]
        if self.truncation is not None:
            parts.append(f"C={self.truncation:g}")
        if self.differentiable_weight:
            parts.append("dw")
        return "-".join(parts)


def all_spec_fields() -> list[SpecFields]:
    """Every combination of the six spec fields (valid or not)."""
    return [SpecFields(*combo) for combo in itertools.product(
        ESTIMATORS, MODES, AGGREGATIONS, IMPORTANCE, TRUNCATIONS, DIFFERENTIABLE
    )]


def spans(lengths) -> list[tuple[int, int]]:
    """(start, end) of each sequence in the flat token layout."""
    ends = np.cumsum(lengths)
    return [(int(end - n), int(end)) for n, end in zip(lengths, ends)]


def make_batch(seed: int, lengths=LENGTHS) -> dict[str, np.ndarray]:
    """float64 logp / ref / old over a ragged batch, with extremes the math must survive.

    - log-ratios delta = logp - ref include +-30 (k3(-30) = e^30 ~ 1e13);
    - token log-weights log(w) = logp - old include +-log(1e6) (w ~ 1e6 and 1e-6) and values
      both sides of log(2) (the truncation the tests use);
    - sequence log-weights log(W) are set per sequence to 1e6, 1e-6 and around C = 2;
    - every |Delta| and |log W| stays below 60, so nothing reaches the service's
      exponent clamp (80) and the autograd oracle, which has no clamp, is comparable.
    """
    rng = np.random.default_rng(seed)
    total = int(sum(lengths))
    logp = -rng.exponential(2.0, total)
    delta = rng.normal(0.0, 0.7, total)
    log_w = rng.normal(0.0, 1.0, total)
    # Sequence log-weights, sequence after sequence (LENGTHS: the one-token sequence gets W = w = 1e6,
    # the empty one 1, the long one ~1e-6; 0.5 and ~3 straddle C = 2).
    log_w_targets = [np.log(1e6), np.log(0.5), 0.0, np.log(1e-6) + 0.1 * rng.normal(), np.log(3.0) + 0.1 * rng.normal()]
    for s, (start, end) in enumerate(spans(lengths)):
        n = end - start
        if n >= 3:
            # One token of each longer sequence far on each side (k3's exponential branch and its linear one).
            delta[start + rng.integers(0, n)] = -30.0 + rng.normal(0.0, 0.1)
            delta[start + (rng.integers(1, n) + int(np.argmin(delta[start:end]))) % n] = 30.0 + rng.normal(0.0, 0.1)
            log_w[start + rng.integers(0, n)] = np.log(1e6) * rng.choice([-1.0, 1.0])
        if n:
            # Adjust one token so that log W hits its target.
            fix = start + int(rng.integers(0, n))
            log_w[fix] += log_w_targets[s % len(log_w_targets)] - log_w[start:end].sum()
    ref = logp - delta
    old = logp - log_w
    for start, end in spans(lengths):
        assert abs(delta[start:end].sum()) < 60 and abs(log_w[start:end].sum()) < 60
    return {"logp": logp, "ref": ref, "old": old}


# ---------------------------------------------------------------------------------------
# Estimators from their definitions (torch, differentiable).


def k_value(estimator: str, d):
    """Schulman's k_n(d) written from its definition."""
    if estimator == "k1":
        return d
    if estimator == "k2":
        return d * d / 2
    return torch.exp(-d) - 1 + d


def oracle_terms(fields: SpecFields, logp, ref, old, lengths):
    """The loss of `fields` as a list of scalar torch terms (L = their sum), from the definitions.

    Returns (terms, split_terms). ``terms`` sum to the loss. ``split_terms`` sum to the same
    loss but split every product ``weight * value`` whose factors both carry gradient into
    ``weight * sg(value) + sg(weight) * value``; the sum of the absolute gradients of the split
    terms is the magnitude autograd adds up for each token (used for the tolerance).

    in_reward: L = sum_t sg(r_t) * logp_t, r_t = sg(w_bar) * (k(delta_t) | k(Delta) | sum_{t'>=t} k(delta_t')).
    as_loss:   L = sum over terms of weight * k(arg), arg = delta_t (token) or Delta_s (sequence),
               weight = sg(min(w, C)) or, differentiable, clamp(w, max=C) with its gradient.
    """
    delta = logp - ref
    C = fields.truncation

    def truncate(w):
        return w if C is None else torch.clamp(w, max=C)

    def token_weight(t):
        return torch.exp(logp[t] - old[t])

    def sequence_weight(start, end):
        return torch.exp((logp[start:end] - old[start:end]).sum())

    terms, split = [], []
    for start, end in spans(lengths):
        seq_delta = delta[start:end].sum()
        if fields.mode == "in_reward":
            for t in range(start, end):
                if fields.importance_sampling == "none":
                    weight = torch.ones((), dtype=logp.dtype)
                elif fields.importance_sampling == "token":
                    weight = truncate(token_weight(t))
                else:
                    weight = truncate(sequence_weight(start, end))
                if fields.aggregation == "token":
                    values = [k_value(fields.estimator, delta[t])]
                elif fields.aggregation == "sequence":
                    values = [k_value(fields.estimator, seq_delta)]
                else:  # reward-to-go: one term per later token, so their sizes enter the tolerance
                    values = [k_value(fields.estimator, delta[u]) for u in range(t, end)]
                for value in values:
                    term = (weight * value).detach() * logp[t]
                    terms.append(term)
                    split.append(term)
            continue

        # as_loss
        if fields.aggregation == "token":
            pieces = [(t, k_value(fields.estimator, delta[t])) for t in range(start, end)]
        else:  # one term per sequence
            pieces = [(None, k_value(fields.estimator, seq_delta))] if end > start else []
        for t, value in pieces:
            if fields.importance_sampling == "none":
                terms.append(value)
                split.append(value)
                continue
            if fields.importance_sampling == "token":
                weight = truncate(token_weight(t))
            else:
                weight = truncate(sequence_weight(start, end))
            if fields.differentiable_weight:
                terms.append(weight * value)
                split.extend([weight * value.detach(), weight.detach() * value])
            else:
                terms.append(weight.detach() * value)
                split.append(weight.detach() * value)
    return terms, split


def oracle_gradient(fields: SpecFields, batch: dict, lengths=LENGTHS):
    """(dL/dlogp by autograd, per-token magnitude of what autograd sums), float64 numpy."""
    logp = torch.tensor(batch["logp"], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor(batch["ref"], dtype=torch.float64)
    old = torch.tensor(batch["old"], dtype=torch.float64)
    terms, split = oracle_terms(fields, logp, ref, old, lengths)
    if not terms:
        zeros = np.zeros(len(batch["logp"]))
        return zeros, zeros
    loss = torch.stack(terms).sum()
    (gradient,) = torch.autograd.grad(loss, logp, retain_graph=True)
    magnitude = torch.zeros_like(logp)
    for term in split:
        (g,) = torch.autograd.grad(term, logp, retain_graph=True, allow_unused=True)
        if g is not None:
            magnitude = magnitude + g.abs()
    return gradient.detach().numpy(), magnitude.detach().numpy()


def assert_gradient_close(coef, gradient, magnitude, rtol=1e-6, what=""):
    """|c - g| <= rtol * |g| + 1e-12 * magnitude, token by token.

    Why the second term: autograd computes g by adding per-term contributions that can be
    far larger than g and cancel (for k3 as loss with a differentiable weight,
    w * e^30 ~ 1e13 from the value and -w * e^30 from the derivative add up to w * delta).
    Its own float64 error is then ~1e-16 * magnitude, however exact the service is, so the
    bound scales with the magnitude of *that token's* terms: a batch-wide scale would hide
    errors that leak from one token or sequence into another.
    """
    coef = np.asarray(coef, dtype=np.float64)
    error = np.abs(coef - gradient)
    bound = rtol * np.abs(gradient) + 1e-12 * magnitude + 1e-300
    bad = np.flatnonzero(~(error <= bound))
    assert bad.size == 0, (
        f"{what}: coefficient differs from autograd at tokens {bad.tolist()}: "
        f"coef={coef[bad].tolist()} autograd={gradient[bad].tolist()} magnitude={magnitude[bad].tolist()}"
    )


# ---------------------------------------------------------------------------------------
# Independent numpy references.


def k_reference(estimator: str, d: np.ndarray) -> np.ndarray:
    """k_n in float64, k3 through the series where exp(-d) - 1 + d would cancel."""
    d = np.asarray(d, dtype=np.float64)
    if estimator == "k1":
        return d.copy()
    if estimator == "k2":
        return d * d / 2
    out = np.exp(-d) - 1 + d
    small = np.abs(d) < 1e-2
    ds = d[small]
    # e^-d - 1 + d = d^2/2 - d^3/6 + d^4/24 - d^5/120 + ... (|d| < 0.01: 7 terms are exact to 1e-16 relative)
    out[small] = sum((-ds) ** n / math.factorial(n) for n in range(2, 9))
    return out


def sequence_sums(x: np.ndarray, lengths) -> np.ndarray:
    """Per-sequence sums, with a plain python loop."""
    return np.array([x[a:b].sum() for a, b in spans(lengths)])


def per_token(values_per_sequence, lengths) -> np.ndarray:
    """Per-sequence values repeated over each sequence's tokens, with a plain python loop."""
    out = []
    for value, n in zip(values_per_sequence, lengths):
        out.extend([value] * n)
    return np.array(out, dtype=np.float64)


def tail_sums(x: np.ndarray, lengths) -> np.ndarray:
    """sum_{t' >= t} x_t' within each sequence, summed from the end with a python loop."""
    out = np.zeros(len(x))
    for a, b in spans(lengths):
        running = 0.0
        for t in range(b - 1, a - 1, -1):
            running += x[t]
            out[t] = running
    return out
