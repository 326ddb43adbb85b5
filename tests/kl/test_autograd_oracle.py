"""compute_kl's coefficients against torch autograd, for every spec and every preset.

For each combination of (estimator, mode, aggregation, importance sampling, truncation,
differentiable weight) the loss it names is written as a torch expression from its
definition (tests/kl/conftest.py: `oracle_terms`), differentiated with autograd, and
compared with ``coef``. ``coef_principled`` and the estimator values are checked against
independent numpy references.
"""

from __future__ import annotations

import numpy as np
import pytest

from klservice_client import kl

from kl_testlib import (
    LENGTHS,
    SpecFields,
    all_spec_fields,
    assert_gradient_close,
    k_reference,
    make_batch,
    oracle_gradient,
    per_token,
    sequence_sums,
    tail_sums,
)

SEEDS = (0, 1, 2)


def invalid_reasons(f: SpecFields) -> list[str]:
    """Why docs/kl-math.md / KLSpec forbid a combination, as message fragments (empty when valid)."""
    reasons = []
    if f.mode == "as_loss" and f.aggregation == "reward_to_go":
        reasons.append("aggregation=reward_to_go is only valid with mode=in_reward")
    if f.importance_sampling == "token" and f.aggregation == "sequence":
        reasons.append("aggregation=sequence needs importance_sampling=sequence")
    if f.truncation is not None and f.importance_sampling == "none":
        reasons.append("truncation is set but importance_sampling=none")
    if f.differentiable_weight and f.mode == "in_reward":
        reasons.append("differentiable_weight needs mode=as_loss")
    if f.differentiable_weight and f.importance_sampling == "none":
        reasons.append("differentiable_weight is set but importance_sampling=none")
    return reasons


ALL = all_spec_fields()
VALID = [f for f in ALL if not invalid_reasons(f)]
INVALID = [f for f in ALL if invalid_reasons(f)]

#: The presets as their documented losses, written out by hand (not read from PRESETS).
PRESET_FIELDS = {
    "principled": SpecFields("k2", "as_loss", "token"),
    "principled_off_policy": SpecFields("k2", "as_loss", "token", "token"),
    "ppo_k1_in_reward": SpecFields("k1", "in_reward", "token"),
    "ppo_k1_reward_to_go": SpecFields("k1", "in_reward", "reward_to_go"),
    "on_policy_distillation": SpecFields("k1", "in_reward", "token"),
    "grpo_k3_as_loss": SpecFields("k3", "as_loss", "token"),
    "verl_k3_plus": SpecFields("k2", "as_loss", "token"),
    "trl_bias_corrected_k3": SpecFields("k3", "as_loss", "token", "token", None, True),
    "openrlhf_unbiased_k2": SpecFields("k2", "as_loss", "token", "token", 10.0),
}


def test_combination_counts():
    # 3 estimators x 2 modes x 3 aggregations x 3 IS x 2 truncations x 2 weight kinds = 216.
    # Valid per estimator: in_reward has 8 (aggregation, IS) pairs (not token IS + sequence), 5 of
    # them with IS and so with C in {None, 2}: 3 + 5 * 2 = 13; as_loss has 5 pairs (no reward_to_go),
    # 3 with IS and so with C x differentiable: 2 + 3 * 4 = 14. 3 * 27 = 81 valid.
    assert len(ALL) == 216
    assert len(VALID) == 81
    assert len(INVALID) == 135


@pytest.mark.parametrize("fields", INVALID, ids=lambda f: f.id)
def test_invalid_combinations_raise(fields):
    with pytest.raises(ValueError, match="^spec: ") as error:
        kl.KLSpec(**fields.kwargs())
    # The message gives one of the combination's actual faults (the first one checked).
    assert any(reason in str(error.value) for reason in invalid_reasons(fields)), str(error.value)


@pytest.mark.parametrize("fields", VALID, ids=lambda f: f.id)
def test_valid_combinations_construct(fields):
    spec = kl.KLSpec(**fields.kwargs())
    assert spec.needs_old_logprobs == (fields.importance_sampling != "none")


def _principled_reference(fields: SpecFields, batch, lengths, with_old: bool) -> np.ndarray:
    """c* as compute_kl's docstring defines it, built with python loops.

    TOKEN: w_t * delta_t (W * delta_t when the spec uses sequence IS); SEQUENCE: W * Delta;
    REWARD_TO_GO: W * sum_{t'>=t} delta_t'; untruncated weights, none without old log-probs.
    """
    delta = batch["logp"] - batch["ref"]
    if fields.aggregation == "token":
        base = delta
    elif fields.aggregation == "sequence":
        base = per_token(sequence_sums(delta, lengths), lengths)
    else:
        base = tail_sums(delta, lengths)
    if not with_old:
        return base
    log_ratio = batch["logp"] - batch["old"]
    if fields.aggregation == "token" and fields.importance_sampling != "sequence":
        weights = np.exp(log_ratio)
    else:
        weights = per_token(np.exp(sequence_sums(log_ratio, lengths)), lengths)
    return weights * base


def _check(spec, fields: SpecFields, seed: int):
    batch = make_batch(seed)
    gradient, magnitude = oracle_gradient(fields, batch)
    needs_old = fields.importance_sampling != "none"
    runs = [True] if needs_old else [False, True]
    coefs = []
    for with_old in runs:
        out = kl.compute_kl(
            batch["logp"], batch["ref"], list(LENGTHS), spec, old_logprobs=batch["old"] if with_old else None
        )
        assert isinstance(out.coef, np.ndarray) and out.coef.dtype == np.float64
        assert_gradient_close(out.coef, gradient, magnitude, what=f"{fields.id} seed={seed} old={with_old}")
        coefs.append(out.coef)

        principled = _principled_reference(fields, batch, LENGTHS, with_old)
        np.testing.assert_allclose(out.coef_principled, principled, rtol=1e-10, atol=1e-300)

        delta = batch["logp"] - batch["ref"]
        np.testing.assert_array_equal(out.k1, delta)
        np.testing.assert_allclose(out.k2, k_reference("k2", delta), rtol=1e-14)
        np.testing.assert_allclose(out.k3, k_reference("k3", delta), rtol=1e-10)
        assert out.diagnostics.num_clamped == 0
    if len(coefs) == 2:
        # Without importance sampling the coefficient ignores old log-probs (they only feed diagnostics and c*).
        np.testing.assert_array_equal(coefs[0], coefs[1])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fields", VALID, ids=lambda f: f.id)
def test_coefficient_matches_autograd(fields, seed):
    _check(kl.KLSpec(**fields.kwargs()), fields, seed)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(PRESET_FIELDS))
def test_preset_matches_autograd(name, seed):
    fields = PRESET_FIELDS[name]
    assert kl.resolve_spec(name) == kl.KLSpec(**fields.kwargs())
    _check(name, fields, seed)


def test_every_preset_is_covered():
    assert set(kl.PRESETS) == set(PRESET_FIELDS)
    assert kl.resolve_spec(None) == kl.resolve_spec("principled")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_batches_put_weights_on_both_sides_of_truncation(level, seed):
    """The batches really hold weights ~1e6, ~1e-6 and on both sides of C = 2 (else truncation goes untested)."""
    batch = make_batch(seed)
    log_ratio = batch["logp"] - batch["old"]
    if level == "token":
        weights = np.exp(log_ratio)
    else:
        weights = per_token(np.exp(sequence_sums(log_ratio, LENGTHS)), LENGTHS)
    assert (weights > 2.0).any() and (weights < 2.0).any()
    assert weights.max() >= 0.999e6 and weights.min() <= 1e-5


def test_batches_have_extreme_deltas():
    for seed in SEEDS:
        delta = make_batch(seed)["logp"] - make_batch(seed)["ref"]
        assert delta.min() < -29 and delta.max() > 29
