"""KL regularisation for RL on language models: estimator values and exact gradient coefficients.

Every per-token KL term a trainer can build from its policy log-probs ``logp``, the
reference log-probs ``ref`` and (off-policy) the behaviour log-probs ``old`` has a
gradient of the form ``c_t * grad(logp_t)``. This module computes that *gradient
coefficient* ``c`` for any implementation choice, so a trainer reproduces the exact
gradient with the surrogate ``beta * sum(stopgrad(c) * logp)`` (see `surrogate_loss`),
and it reports how far the choice is from the principled coefficient.

Layout: flat arrays over the scored tokens of a batch, sequence after sequence, plus
``lengths`` (scored tokens per sequence). Inputs may be numpy arrays or torch tensors
(CPU or CUDA); the outputs have the same type and device. Math is done in float64 when
``logprobs`` is float64, else in float32.

Example::

    >>> import numpy as np
    >>> from klservice_client import kl
    >>> logp = np.array([-1.0, -2.0, -0.5]); ref = np.array([-1.2, -1.5, -0.5])
    >>> out = kl.compute_kl(logp, ref, lengths=[2, 1], spec="grpo_k3_as_loss")
    >>> out.coef.round(4)            # 1 - exp(-delta), delta = logp - ref
    array([ 0.1813, -0.6487,  0.    ])

Numerics: ``k3`` and the ``k3`` coefficients use ``expm1``; exponents are clamped to
``[-MAX_EXPONENT, MAX_EXPONENT]`` (80, finite in float32) and every clamp is counted in
`KLDiagnostics.num_clamped`. Inside that range nothing is clamped.

The formulas are those of "Rethinking KL Regularization in RLHF" (arXiv 2510.01555);
the aggregation levels and truncated importance sampling go slightly beyond the paper
and are documented on `KLSpec`.

Distillation (a served teacher's top-k or candidate log-probs and the rest of its mass):
`distillation_divergence` gives forward KL, reverse KL and GKD's generalised JSD on the
truncated support, with their exact gradients, and `distillation_surrogate` the loss that
has that gradient (see `klservice_client._distill`).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
from typing import Any, Mapping, Sequence

import numpy as np

from klservice_client._arrays import is_torch, ops_for
from klservice_client._distill import (
    KINDS as DISTILLATION_KINDS, DistillationDivergence, distillation_divergence, distillation_surrogate, rest_logmass,
)

__all__ = [
    "DISTILLATION_KINDS",
    "DistillationDivergence",
    "distillation_divergence",
    "distillation_surrogate",
    "rest_logmass",
    "Aggregation",
    "Estimator",
    "ImportanceSampling",
    "KLDiagnostics",
    "KLInputError",
    "KLResult",
    "KLSpec",
    "MAX_EXPONENT",
    "Mode",
    "PRESETS",
    "Preset",
    "compute_kl",
    "estimator_values",
    "importance_weights",
    "k1",
    "k2",
    "k3",
    "resolve_spec",
    "surrogate_loss",
]

#: Exponent arguments are clamped to [-MAX_EXPONENT, MAX_EXPONENT]; exp(80) ~ 5.5e34 is finite in float32.
MAX_EXPONENT = 80.0


class KLInputError(ValueError):
    """Bad input to the KL library (a spec, arrays or lengths): the message names the argument.

    A `ValueError`, so callers that catch ValueError see no change; the server maps exactly
    this type (not every ValueError) to INVALID_ARGUMENT.
    """


class Estimator(str, enum.Enum):
    """Schulman's estimators of KL(pi_theta || pi_ref) from one sample, as functions of delta = logp - ref."""

    K1 = "k1"  #: delta
    K2 = "k2"  #: delta**2 / 2
    K3 = "k3"  #: exp(-delta) - 1 + delta


class Mode(str, enum.Enum):
    """How the trainer uses the estimator."""

    IN_REWARD = "in_reward"  #: k_n is a detached penalty (a reward term): c = k_n
    AS_LOSS = "as_loss"  #: k_n is a loss term and is differentiated: c = d k_n / d logp


class Aggregation(str, enum.Enum):
    """Granularity the estimator is applied at."""

    TOKEN = "token"  #: k_n(delta_t) per token
    SEQUENCE = "sequence"  #: k_n(Delta) with Delta = sum_t delta_t; every token of the sequence gets that c
    REWARD_TO_GO = "reward_to_go"  #: IN_REWARD only: c_t = sum_{t' >= t} k_n(delta_t')


class ImportanceSampling(str, enum.Enum):
    """Importance weight correcting for samples drawn from pi_old instead of pi_theta."""

    NONE = "none"  #: no correction (right only on-policy)
    TOKEN = "token"  #: w_t = exp(logp_t - old_t)
    SEQUENCE = "sequence"  #: W = exp(sum_t (logp_t - old_t)), shared by the tokens of a sequence


@dataclasses.dataclass(frozen=True)
class KLSpec:
    """One KL implementation: which estimator, how it enters the loss, at what granularity, with what IS.

    The coefficient ``c`` it yields, per scored token (``w`` is the importance weight of
    ``importance_sampling``, ``w_bar = min(w, truncation)``, ``x`` is ``delta_t`` for TOKEN
    and ``Delta`` for SEQUENCE aggregation):

    - IN_REWARD: ``c = w_bar * k_n(x)`` (REWARD_TO_GO: ``w_bar_t * sum_{t'>=t} k_n(delta_t')``).
    - AS_LOSS with a detached weight, loss ``stopgrad(w_bar) * k_n``: ``c = w_bar * k_n'(x)``.
    - AS_LOSS with ``differentiable_weight=True``, loss ``w_bar * k_n`` with gradient flowing
      through the weight too: ``c = w_bar * k_n'(x) + [w < C] * w * K`` where ``K`` is the
      value the weight multiplies (``k_n(x)``, or for SEQUENCE weights on TOKEN aggregation
      the sequence sum of ``k_n(delta_t)``).

    Invalid combinations raise ValueError: AS_LOSS with REWARD_TO_GO; TOKEN importance
    sampling with SEQUENCE aggregation (a sequence-level estimate needs a sequence weight);
    ``truncation`` or ``differentiable_weight`` without importance sampling;
    ``differentiable_weight`` with IN_REWARD (a reward is detached).
    """

    estimator: Estimator = Estimator.K2
    mode: Mode = Mode.AS_LOSS
    aggregation: Aggregation = Aggregation.TOKEN
    importance_sampling: ImportanceSampling = ImportanceSampling.NONE
    #: C in w_bar = min(w, C) ("truncated IS"); None = no truncation.
    truncation: float | None = None
    #: AS_LOSS only: the loss multiplies k_n by the weight *with* its gradient (w * k_n, not stopgrad(w) * k_n).
    differentiable_weight: bool = False

    def __post_init__(self) -> None:
        for field, kind in (
            ("estimator", Estimator),
            ("mode", Mode),
            ("aggregation", Aggregation),
            ("importance_sampling", ImportanceSampling),
        ):
            object.__setattr__(self, field, _enum_value(kind, getattr(self, field), field))
        if self.mode is Mode.AS_LOSS and self.aggregation is Aggregation.REWARD_TO_GO:
            raise KLInputError("spec: aggregation=reward_to_go is only valid with mode=in_reward, not as_loss")
        if self.importance_sampling is ImportanceSampling.TOKEN and self.aggregation is Aggregation.SEQUENCE:
            raise KLInputError(
                "spec: aggregation=sequence needs importance_sampling=sequence (or none), not token"
            )
        if self.truncation is not None:
            if self.importance_sampling is ImportanceSampling.NONE:
                raise KLInputError("spec: truncation is set but importance_sampling=none")
            is_number = isinstance(self.truncation, (int, float)) and not isinstance(self.truncation, bool)
            if not (is_number and math.isfinite(self.truncation) and self.truncation > 0):
                raise KLInputError(f"spec: truncation must be a finite number > 0, got {self.truncation!r}")
            object.__setattr__(self, "truncation", float(self.truncation))
        if self.differentiable_weight:
            if self.mode is not Mode.AS_LOSS:
                raise KLInputError("spec: differentiable_weight needs mode=as_loss (a reward is detached)")
            if self.importance_sampling is ImportanceSampling.NONE:
                raise KLInputError("spec: differentiable_weight is set but importance_sampling=none")

    @property
    def needs_old_logprobs(self) -> bool:
        return self.importance_sampling is not ImportanceSampling.NONE

    def describe(self) -> str:
        """A short human-readable form, e.g. ``k3 as_loss token IS=token(C=10, differentiable)``."""
        text = f"{self.estimator.value} {self.mode.value} {self.aggregation.value}"
        if self.importance_sampling is not ImportanceSampling.NONE:
            extra = [f"C={self.truncation:g}"] if self.truncation is not None else []
            extra += ["differentiable"] if self.differentiable_weight else []
            text += f" IS={self.importance_sampling.value}" + (f"({', '.join(extra)})" if extra else "")
        return text


def _enum_value(kind: type[enum.Enum], value: Any, field: str, owner: str = "spec: "):
    if isinstance(value, kind):
        return value
    try:
        return kind(str(value).lower())
    except ValueError:
        known = ", ".join(member.value for member in kind)
        raise KLInputError(f"{owner}unknown {field} {value!r}; expected one of: {known}") from None


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named KLSpec reproducing what a public trainer does."""

    name: str
    spec: KLSpec
    #: The loss term it reproduces, as the trainer writes it (delta = logp - ref, w = exp(logp - old)).
    loss: str
    #: One line: who does this and when to use it.
    summary: str


def _preset(name: str, loss: str, summary: str, **spec: Any) -> tuple[str, Preset]:
    return name, Preset(name=name, spec=KLSpec(**spec), loss=loss, summary=summary)


#: Named presets (read-only mapping name -> Preset). The gradient coefficient of each is in its `loss`.
PRESETS: Mapping[str, Preset] = types.MappingProxyType(
    dict(
        [
            _preset(
                "principled",
                "stopgrad-free k2 = delta**2/2 as loss  ->  c = delta",
                "The principled reverse-KL gradient for on-policy samples; use it by default.",
                estimator="k2",
                mode="as_loss",
            ),
            _preset(
                "principled_off_policy",
                "stopgrad(w) * k2 as loss  ->  c = w * delta",
                "The principled reverse-KL gradient for off-policy samples (several updates per rollout, async rollouts).",
                estimator="k2",
                mode="as_loss",
                importance_sampling="token",
            ),
            _preset(
                "ppo_k1_in_reward",
                "reward -= beta * delta (detached), per token  ->  c = delta",
                "PPO-style KL as a per-token reward penalty; gradient-equivalent to principled on-policy. OpenRLHF (its default, kl_estimator=k1) also clamps delta to +-10 and spreads the penalty over returns / GAE.",
                estimator="k1",
                mode="in_reward",
            ),
            _preset(
                "ppo_k1_reward_to_go",
                "returns include sum_{t'>=t} delta_t' (gamma = 1)  ->  c_t = sum_{t'>=t} delta_t'",
                "KL penalty in the reward propagated as reward-to-go: the causal sequence-level reverse-KL gradient.",
                estimator="k1",
                mode="in_reward",
                aggregation="reward_to_go",
            ),
            _preset(
                "on_policy_distillation",
                "advantage_t = -(logp_t - ref_t) with the teacher as ref, per token, discount 0  ->  c = delta",
                "On-policy distillation (Thinking Machines' recipe, Tinker cookbook): the served model is the teacher, the student samples; per-token reverse KL to the teacher, no reward-to-go. The same coefficient as ppo_k1_in_reward.",
                # The same spec as ppo_k1_in_reward: k1 of the student's own tokens, detached, each
                # token on its own (token aggregation is the discount 0 of the recipe).
                estimator="k1",
                mode="in_reward",
            ),
            _preset(
                "grpo_k3_as_loss",
                "k3 = exp(-delta) - 1 + delta as loss  ->  c = 1 - exp(-delta)",
                "GRPO paper; TRL 1.16 with use_bias_correction_kl=False; verl low_var_kl except where verl clamps (k3 > 10: c = 0 there). Biased (exploding for delta < 0): use to reproduce, not to choose.",
                estimator="k3",
                mode="as_loss",
            ),
            _preset(
                "verl_k3_plus",
                "value k3, gradient of k2 (straight-through)  ->  c = delta",
                "verl 'k3+' / 'low_var_kl+' (verl versions with PR #6058): the k3 value with the k2 gradient; principled on-policy.",
                estimator="k2",
                mode="as_loss",
            ),
            _preset(
                "trl_bias_corrected_k3",
                "w * k3 as loss, gradient through w  ->  c = w * delta",
                "TRL 1.16 default (use_bias_correction_kl=True, token-level ratio), slime --use-unbiased-kl with k3, DeepSeek-V3.2: principled off-policy.",
                estimator="k3",
                mode="as_loss",
                importance_sampling="token",
                differentiable_weight=True,
            ),
            _preset(
                "openrlhf_unbiased_k2",
                "stopgrad(min(w, 10)) * k2 as loss  ->  c = min(w, 10) * delta",
                "OpenRLHF --algo.kl.unbiased_gradient (gradient sg(min(w, C)) * delta for any estimator; C = 10 here): principled off-policy with truncated weights.",
                estimator="k2",
                mode="as_loss",
                importance_sampling="token",
                truncation=10.0,
            ),
        ]
    )
)


def resolve_spec(spec: KLSpec | str | None) -> KLSpec:
    """A KLSpec from a KLSpec, a preset name, or None (the ``principled`` preset)."""
    if spec is None:
        return PRESETS["principled"].spec
    if isinstance(spec, KLSpec):
        return spec
    if isinstance(spec, str):
        try:
            return PRESETS[spec].spec
        except KeyError:
            raise KLInputError(f"spec: unknown preset {spec!r}; known presets: {', '.join(PRESETS)}") from None
    raise TypeError(f"spec: expected a KLSpec or a preset name, got {type(spec).__name__}")


# ---------------------------------------------------------------------------------------
# Estimators. Each works element-wise on numpy arrays and torch tensors.


def k1(delta):
    """k1 = delta: unbiased for KL(pi_theta || pi_ref), can be negative, high variance."""
    return delta


def k2(delta):
    """k2 = delta**2 / 2: non-negative, biased, low variance."""
    return 0.5 * delta * delta


def k3(delta):
    """k3 = exp(-delta) - 1 + delta, via expm1: non-negative, unbiased, low variance.

    The exponent is clamped at MAX_EXPONENT (delta < -80), where float32 would overflow.
    """
    ops = ops_for(delta)
    return ops.expm1(ops.minimum(-delta, MAX_EXPONENT)) + delta


def _value(estimator: Estimator, x, ops):
    if estimator is Estimator.K1:
        return x
    if estimator is Estimator.K2:
        return 0.5 * x * x
    return ops.expm1(ops.minimum(-x, MAX_EXPONENT)) + x


def _derivative(estimator: Estimator, x, ops):
    """d k_n / d logp at delta = x."""
    if estimator is Estimator.K1:
        return ops.full_like(x, 1.0)
    if estimator is Estimator.K2:
        return x
    return -ops.expm1(ops.minimum(-x, MAX_EXPONENT))


def _value_plus_derivative(estimator: Estimator, x, ops):
    """k_n(x) + k_n'(x) in closed form (for k3 it is exactly x: no cancellation of two exponentials)."""
    if estimator is Estimator.K1:
        return x + 1.0
    if estimator is Estimator.K2:
        return 0.5 * x * x + x
    return x


# ---------------------------------------------------------------------------------------
# Results.


@dataclasses.dataclass(frozen=True)
class KLDiagnostics:
    """Per-batch summary of a KL computation (plain floats, for logs and Prometheus)."""

    num_sequences: int
    num_tokens: int
    #: Means over scored tokens.
    k1_mean_per_token: float
    k2_mean_per_token: float
    k3_mean_per_token: float
    #: Means over sequences of the per-sequence sums (a sequence-level KL estimate).
    k1_mean_per_sequence: float
    k2_mean_per_sequence: float
    k3_mean_per_sequence: float
    #: Importance weights before truncation, at the spec's level (token level when the spec has no
    #: IS but old log-probs were given); 1.0 when no old log-probs were given.
    is_weight_mean: float
    is_weight_max: float
    #: Fraction of weights above the truncation C (0 without truncation).
    is_truncated_fraction: float
    #: mean(c - c*) and mean(|c - c*|) over tokens, c* the principled coefficient (see `compute_kl`).
    coef_bias_mean: float
    coef_bias_abs_mean: float
    #: Per-token exponent arguments clamped to +-MAX_EXPONENT: delta < -80 in k3, log-weights > 80, and
    #: (k3 with SEQUENCE aggregation) tokens of sequences with Delta < -80. Zero inside that range.
    num_clamped: int


@dataclasses.dataclass(frozen=True)
class KLResult:
    """Per-token outputs (same library, device and length as the inputs) and diagnostics."""

    k1: Any
    k2: Any
    k3: Any
    #: The gradient coefficient of the requested implementation.
    coef: Any
    #: The principled coefficient for the same aggregation and sampling.
    coef_principled: Any
    diagnostics: KLDiagnostics


# ---------------------------------------------------------------------------------------
# Input checks.


def _is_real(array) -> bool:
    """Integer or floating point (not bool, complex or object) for numpy arrays and torch tensors."""
    if is_torch(array):
        return not array.dtype.is_complex and str(array.dtype) != "torch.bool"
    return array.dtype.kind in "fiu"


def _prepare(logprobs, ref_logprobs, lengths, old_logprobs):
    """Validate and convert inputs to one library / device / float dtype. Returns (ops, logp, ref, old, lengths)."""
    arrays = {"logprobs": logprobs, "ref_logprobs": ref_logprobs, "old_logprobs": old_logprobs}
    torch_like = next((a for a in arrays.values() if is_torch(a)), None)
    ops = ops_for(torch_like) if torch_like is not None else ops_for(np.zeros(0))
    like = torch_like

    def as_float(name, value):
        if value is None:
            return None
        try:
            array = ops.asarray(value, like=like)
        except (TypeError, ValueError) as error:
            raise KLInputError(f"{name}: not a numeric array ({error})") from None
        if not _is_real(array):
            raise KLInputError(f"{name}: expected real numbers, got dtype {array.dtype}")
        if array.ndim != 1:
            raise KLInputError(f"{name}: expected a flat 1-D array over scored tokens, got shape {tuple(array.shape)}")
        return array

    converted = {name: as_float(name, value) for name, value in arrays.items()}
    dtype = ops.float_dtype(converted["logprobs"])
    converted = {
        name: (None if a is None else ops.asarray(a, dtype=dtype, like=like)) for name, a in converted.items()
    }

    lengths_array = np.asarray(lengths.cpu() if is_torch(lengths) else lengths)
    if lengths_array.ndim != 1:
        raise KLInputError(f"lengths: expected a 1-D sequence of per-sequence token counts, got shape {lengths_array.shape}")
    if lengths_array.size and not np.issubdtype(lengths_array.dtype, np.integer):
        if not np.all(np.mod(lengths_array, 1) == 0):
            raise KLInputError("lengths: expected integers")
    lengths_array = lengths_array.astype(np.int64)
    negative = np.flatnonzero(lengths_array < 0)
    if negative.size:
        raise KLInputError(f"lengths: sequence {negative[0]} has negative length {lengths_array[negative[0]]}")
    total = int(lengths_array.sum())
    ends = np.cumsum(lengths_array)
    for name, array in converted.items():
        if array is None:
            continue
        if len(array) != total:
            raise KLInputError(
                f"{name}: has {len(array)} tokens but lengths sum to {total} "
                f"({len(lengths_array)} sequences)"
            )
        bad = ~ops.isfinite(array)
        if ops.any(bad):
            index = ops.first_true(bad)
            sequence = int(np.searchsorted(ends, index, side="right"))
            position = index - (int(ends[sequence - 1]) if sequence else 0)
            value = ops.to_float(array[index])
            raise KLInputError(
                f"{name}: non-finite value {value} at sequence {sequence}, scored token {position} (flat index {index})"
            )
    return ops, converted["logprobs"], converted["ref_logprobs"], converted["old_logprobs"], ops.lengths(lengths_array, like=like)


# ---------------------------------------------------------------------------------------
# The computation.


def estimator_values(logprobs, ref_logprobs) -> tuple[Any, Any, Any]:
    """(k1, k2, k3) per token for delta = logprobs - ref_logprobs (same type as the inputs)."""
    delta = logprobs - ref_logprobs
    return k1(delta), k2(delta), k3(delta)


def importance_weights(logprobs, old_logprobs, lengths, level: ImportanceSampling | str = "token"):
    """Per-token importance weights ``w_t = exp(logp_t - old_t)`` (level ``token``) or the
    sequence weight ``W = exp(sum_t (logp_t - old_t))`` repeated over the sequence's tokens
    (level ``sequence``). Log-weights are clamped at MAX_EXPONENT. Truncation is applied by
    `compute_kl`, which also reports how many weights it cut.
    """
    level = _enum_value(ImportanceSampling, level, "level", owner="level: ")
    if level is ImportanceSampling.NONE:
        raise KLInputError("level: importance weights need level token or sequence, not none")
    ops, logp, _, old, lengths = _prepare(logprobs, logprobs, lengths, old_logprobs)
    if old is None:
        raise KLInputError("old_logprobs: required for importance weights")
    log_w, _ = _log_weights(ops, logp - old, lengths, level)
    return ops.exp(log_w)


def _log_weights(ops, log_ratio, lengths, level: ImportanceSampling):
    """Per-token log-weights at `level` (clamped at MAX_EXPONENT) and the number of clamped entries."""
    if level is ImportanceSampling.SEQUENCE:
        log_w = ops.repeat(ops.segment_sum(log_ratio, lengths), lengths)
    else:
        log_w = log_ratio
    clamped = log_w > MAX_EXPONENT
    return ops.minimum(log_w, MAX_EXPONENT), clamped


def compute_kl(
    logprobs,
    ref_logprobs,
    lengths: Sequence[int],
    spec: KLSpec | str | None = None,
    old_logprobs=None,
) -> KLResult:
    """Estimator values, the gradient coefficient of ``spec`` and diagnostics for one batch.

    Args:
        logprobs: current policy log-probs of the scored tokens (values; flat over the batch).
        ref_logprobs: reference log-probs of the same tokens, at the same temperature.
        lengths: scored tokens per sequence; must sum to the number of tokens.
        spec: a KLSpec, a preset name from PRESETS, or None for ``principled``.
        old_logprobs: log-probs under the behaviour policy that sampled the tokens; required
            when the spec uses importance sampling, optional otherwise (then only used for the
            diagnostics and the principled coefficient).

    The principled coefficient ``coef_principled`` (c*) is the reverse-KL gradient for the
    spec's aggregation, importance-weighted with untruncated weights when ``old_logprobs``
    is given: TOKEN ``w_t * delta_t`` (``W * delta_t`` when the spec asks for SEQUENCE
    importance sampling); SEQUENCE ``W * Delta``; REWARD_TO_GO ``W * sum_{t'>=t} delta_t'``
    (always the sequence weight W, whatever the spec's importance sampling). The
    diagnostics' bias compares ``coef`` with it.

    Raises:
        ValueError: naming the argument (and the sequence) for inconsistent lengths,
            non-finite values, unknown names or an invalid spec.
    """
    spec = resolve_spec(spec)
    ops, logp, ref, old, lengths_t = _prepare(logprobs, ref_logprobs, lengths, old_logprobs)
    if spec.needs_old_logprobs and old is None:
        raise KLInputError(
            f"old_logprobs: importance_sampling={spec.importance_sampling.value} needs the behaviour policy's log-probs"
        )

    delta = logp - ref
    num_clamped = int(ops.to_float((delta < -MAX_EXPONENT).sum()))
    values = (k1(delta), k2(delta), k3(delta))

    # Importance weights: at the spec's level, or token level for diagnostics when the spec has none.
    weight_level = spec.importance_sampling
    if weight_level is ImportanceSampling.NONE and old is not None:
        weight_level = ImportanceSampling.TOKEN
    if old is not None:
        log_w, clamped = _log_weights(ops, logp - old, lengths_t, weight_level)
        num_clamped += int(ops.to_float(clamped.sum()))
        weights = ops.exp(log_w)
    else:
        weights = None

    # x: the estimator's argument per token (delta_t, or the sequence's Delta repeated).
    if spec.aggregation is Aggregation.SEQUENCE:
        x = ops.repeat(ops.segment_sum(delta, lengths_t), lengths_t)
        if spec.estimator is Estimator.K3:
            num_clamped += int(ops.to_float((x < -MAX_EXPONENT).sum()))
    else:
        x = delta

    coef = _coefficient(spec, ops, delta, x, weights if spec.needs_old_logprobs else None, lengths_t)
    # c* of a sequence-level objective (SEQUENCE, REWARD_TO_GO) needs the sequence weight W whatever
    # the spec's IS level: w_t * Delta or w_t * sum_{t'>=t} delta_t' would weight only one token of
    # a sequence that pi_old sampled whole.
    principled_weights = weights
    if old is not None and spec.aggregation is not Aggregation.TOKEN and weight_level is not ImportanceSampling.SEQUENCE:
        log_w, clamped = _log_weights(ops, logp - old, lengths_t, ImportanceSampling.SEQUENCE)
        num_clamped += int(ops.to_float(clamped.sum()))
        principled_weights = ops.exp(log_w)
    principled = _principled(spec.aggregation, ops, delta, principled_weights, lengths_t)

    diagnostics = _diagnostics(ops, spec, values, lengths_t, weights, coef, principled, num_clamped)
    return KLResult(
        k1=values[0], k2=values[1], k3=values[2], coef=coef, coef_principled=principled, diagnostics=diagnostics
    )


def _coefficient(spec: KLSpec, ops, delta, x, weights, lengths):
    if spec.mode is Mode.IN_REWARD:
        base = _value(spec.estimator, x, ops)
        if spec.aggregation is Aggregation.REWARD_TO_GO:
            base = ops.reverse_cumsum(base, lengths)
        return base if weights is None else _truncate(ops, weights, spec.truncation) * base

    derivative = _derivative(spec.estimator, x, ops)
    if weights is None:
        return derivative
    truncated = _truncate(ops, weights, spec.truncation)
    if not spec.differentiable_weight:
        return truncated * derivative
    # Gradient through the weight: d(w_bar * K)/d logp_t = w_bar * k' + [w < C] * w * K.
    if spec.importance_sampling is ImportanceSampling.SEQUENCE and spec.aggregation is Aggregation.TOKEN:
        # K = the sequence sum of k_n(delta); k' + K computed without subtracting k_n(delta_t) from the sum.
        values = _value(spec.estimator, delta, ops)
        others = ops.repeat(ops.segment_sum(values, lengths), lengths) - values
        untruncated = weights * (_value_plus_derivative(spec.estimator, delta, ops) + others)
    else:
        untruncated = weights * _value_plus_derivative(spec.estimator, x, ops)
    if spec.truncation is None:
        return untruncated
    return ops.where(weights < spec.truncation, untruncated, spec.truncation * derivative)


def _truncate(ops, weights, truncation):
    return weights if truncation is None else ops.minimum(weights, truncation)


def _principled(aggregation: Aggregation, ops, delta, weights, lengths):
    """c* for the aggregation; `weights` are untruncated (token or sequence level) or None on-policy."""
    if aggregation is Aggregation.TOKEN:
        base = delta
    elif aggregation is Aggregation.SEQUENCE:
        base = ops.repeat(ops.segment_sum(delta, lengths), lengths)
    else:
        base = ops.reverse_cumsum(delta, lengths)
    return base if weights is None else weights * base


def _float64(ops):
    return ops.torch.float64 if hasattr(ops, "torch") else np.float64


def _diagnostics(ops, spec, values, lengths, weights, coef, principled, num_clamped) -> KLDiagnostics:
    num_tokens = int(coef.shape[0])
    num_sequences = int(lengths.shape[0])

    # Means are accumulated in float64: float32 values that are each finite (k3 of a log-ratio near 1e4, an
    # importance weight near e^80) can sum past float32's range, and a summary figure must stay finite.
    def token_mean(x) -> float:
        return ops.sum64(x) / num_tokens if num_tokens else 0.0

    def sequence_mean(x) -> float:
        return ops.sum64(x) / num_sequences if num_sequences else 0.0

    if weights is None or num_tokens == 0:
        w_mean, w_max, truncated = 1.0, 1.0, 0.0
    else:
        w_mean, w_max = token_mean(weights), ops.to_float(weights.max())
        truncated = token_mean(weights > spec.truncation) if spec.truncation is not None else 0.0
    difference = ops.asarray(coef, dtype=_float64(ops)) - ops.asarray(principled, dtype=_float64(ops))
    return KLDiagnostics(
        num_sequences=num_sequences,
        num_tokens=num_tokens,
        k1_mean_per_token=token_mean(values[0]),
        k2_mean_per_token=token_mean(values[1]),
        k3_mean_per_token=token_mean(values[2]),
        k1_mean_per_sequence=sequence_mean(values[0]),
        k2_mean_per_sequence=sequence_mean(values[1]),
        k3_mean_per_sequence=sequence_mean(values[2]),
        is_weight_mean=w_mean,
        is_weight_max=w_max,
        is_truncated_fraction=truncated,
        coef_bias_mean=token_mean(difference),
        coef_bias_abs_mean=token_mean(ops.abs(difference)),
        num_clamped=num_clamped,
    )


# ---------------------------------------------------------------------------------------
# The trainer's side (torch only).


def surrogate_loss(
    coef,
    logprobs,
    lengths: Sequence[int],
    beta: float = 1.0,
    normalization: str = "token_mean",
    constant: float | None = None,
):
    """The KL surrogate ``beta * sum_t stopgrad(c_t) * logp_t``, normalised like the policy loss.

    ``logprobs`` is the trainer's differentiable torch tensor of policy log-probs (flat over
    scored tokens); ``coef`` the coefficients (numpy or torch; moved to its device). Its
    gradient with respect to ``logprobs`` is exactly ``beta * c`` times the normalisation.

    normalization:
        ``token_mean``: divide by the number of scored tokens in the batch (verl/TRL default).
        ``sequence_mean``: mean over each sequence's tokens, then mean over sequences (GRPO paper).
        ``constant``: divide by ``constant`` (e.g. batch size x max response length, Dr. GRPO).
        ``sum``: no normalisation.

    Example::

        out = client.compute_kl(tokens, prompt_lengths, logprobs=logp.detach(), spec="principled")
        loss = policy_loss + kl.surrogate_loss(out.coef, logp, out.scored_lengths, beta=0.05)
    """
    import torch

    if not isinstance(logprobs, torch.Tensor):
        raise TypeError("logprobs: surrogate_loss needs the trainer's torch tensor (with its autograd graph)")
    coef = torch.as_tensor(coef, device=logprobs.device).to(logprobs.dtype).detach()
    if coef.shape != logprobs.shape or logprobs.ndim != 1:
        raise KLInputError(f"coef: shape {tuple(coef.shape)} does not match logprobs {tuple(logprobs.shape)} (flat 1-D)")
    lengths_t = torch.as_tensor(lengths, dtype=torch.int64, device=logprobs.device)
    if int(lengths_t.sum()) != logprobs.shape[0]:
        raise KLInputError(f"lengths: sum to {int(lengths_t.sum())} but logprobs has {logprobs.shape[0]} tokens")
    per_token = coef * logprobs
    if normalization == "token_mean":
        total = per_token.sum() / max(logprobs.shape[0], 1)
    elif normalization == "sequence_mean":
        ops = ops_for(per_token)
        sums = ops.segment_sum(per_token, lengths_t)
        nonempty = lengths_t > 0
        total = (sums[nonempty] / lengths_t[nonempty]).sum() / max(int(nonempty.sum()), 1)
    elif normalization == "constant":
        if constant is None or not constant > 0:
            raise KLInputError("constant: normalization='constant' needs constant > 0")
        total = per_token.sum() / constant
    elif normalization == "sum":
        total = per_token.sum()
    else:
        raise KLInputError(
            f"normalization: unknown {normalization!r}; expected token_mean, sequence_mean, constant or sum"
        )
    return beta * total
