"""Bad input is refused with a ValueError whose message names the argument (and the sequence)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from klservice_client import kl

LENGTHS = [2, 0, 3]


def batch(n=5):
    logp = -np.linspace(0.5, 2.5, n)
    return {"logprobs": logp, "ref_logprobs": logp - 0.1, "old_logprobs": logp + 0.05}


def call(arrays, lengths=LENGTHS, spec="principled_off_policy", as_torch=False):
    if as_torch:
        arrays = {k: None if v is None else torch.as_tensor(v) for k, v in arrays.items()}
    return kl.compute_kl(arrays["logprobs"], arrays["ref_logprobs"], lengths, spec, old_logprobs=arrays["old_logprobs"])


@pytest.mark.parametrize("as_torch", [False, True])
@pytest.mark.parametrize("name", ["logprobs", "ref_logprobs", "old_logprobs"])
def test_array_length_mismatch(name, as_torch):
    arrays = batch()
    arrays[name] = arrays[name][:4]
    with pytest.raises(ValueError, match=rf"^{name}: has 4 tokens but lengths sum to 5 \(3 sequences\)$"):
        call(arrays, as_torch=as_torch)


def test_lengths_not_summing_to_token_count():
    with pytest.raises(ValueError, match=r"^logprobs: has 5 tokens but lengths sum to 6 \(3 sequences\)$"):
        call(batch(), lengths=[2, 1, 3])
    with pytest.raises(ValueError, match=r"^logprobs: has 5 tokens but lengths sum to 4 \(2 sequences\)$"):
        call(batch(), lengths=[2, 2])


@pytest.mark.parametrize("as_torch", [False, True])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["logprobs", "ref_logprobs", "old_logprobs"])
@pytest.mark.parametrize(("flat", "sequence", "position"), [(0, 0, 0), (1, 0, 1), (2, 2, 0), (4, 2, 2)])
def test_non_finite_values_name_argument_sequence_and_position(name, bad, flat, sequence, position, as_torch):
    arrays = batch()
    arrays[name] = arrays[name].copy()
    arrays[name][flat] = bad
    pattern = rf"^{name}: non-finite value {re.escape(str(float(bad)))} at sequence {sequence}, scored token {position} \(flat index {flat}\)$"
    with pytest.raises(ValueError, match=pattern):
        call(arrays, as_torch=as_torch)


def test_first_non_finite_value_is_reported():
    arrays = batch()
    arrays["ref_logprobs"] = arrays["ref_logprobs"].copy()
    arrays["ref_logprobs"][[3, 4]] = np.nan
    with pytest.raises(ValueError, match=r"ref_logprobs: .* at sequence 2, scored token 1 \(flat index 3\)"):
        call(arrays)


def test_logprobs_checked_before_ref():
    arrays = batch()
    for name in arrays:
        arrays[name] = arrays[name].copy()
        arrays[name][1] = np.nan
    with pytest.raises(ValueError, match=r"^logprobs: non-finite"):
        call(arrays)


def test_negative_length_names_the_sequence():
    with pytest.raises(ValueError, match=r"^lengths: sequence 1 has negative length -1$"):
        call(batch(), lengths=[3, -1, 3])


@pytest.mark.parametrize("lengths", [[[2, 3]], np.array([[2, 0, 3]])])
def test_lengths_must_be_flat(lengths):
    with pytest.raises(ValueError, match=r"^lengths: expected a 1-D sequence of per-sequence token counts, got shape"):
        call(batch(), lengths=lengths)


def test_lengths_must_be_integers():
    with pytest.raises(ValueError, match=r"^lengths: expected integers$"):
        call(batch(), lengths=[2.5, 2.5])
    call(batch(), lengths=[2.0, 0.0, 3.0])  # integral floats are fine


@pytest.mark.parametrize("name", ["logprobs", "ref_logprobs", "old_logprobs"])
def test_two_dimensional_arrays(name):
    arrays = batch(6)
    arrays[name] = arrays[name].reshape(2, 3)
    with pytest.raises(ValueError, match=rf"^{name}: expected a flat 1-D array over scored tokens, got shape \(2, 3\)$"):
        call(arrays, lengths=[3, 3])


def test_scalar_array():
    with pytest.raises(ValueError, match=r"^logprobs: expected a flat 1-D array over scored tokens, got shape \(\)$"):
        kl.compute_kl(np.float64(0.0), np.zeros(1), [1])


@pytest.mark.parametrize("name", ["pricipled", "PRINCIPLED", "k3", ""])
def test_unknown_preset(name):
    with pytest.raises(ValueError, match=rf"^spec: unknown preset {re.escape(repr(name))}; known presets: principled, "):
        call(batch(), spec=name)
    with pytest.raises(ValueError, match=r"^spec: unknown preset"):
        kl.resolve_spec(name)


def test_spec_of_wrong_type():
    with pytest.raises(TypeError, match=r"^spec: expected a KLSpec or a preset name, got int$"):
        kl.resolve_spec(3)


@pytest.mark.parametrize(
    ("field", "value", "known"),
    [
        ("estimator", "k4", "k1, k2, k3"),
        ("mode", "in_loss", "in_reward, as_loss"),
        ("aggregation", "batch", "token, sequence, reward_to_go"),
        ("importance_sampling", "yes", "none, token, sequence"),
    ],
)
def test_unknown_enum_values(field, value, known):
    with pytest.raises(ValueError, match=rf"^spec: unknown {field} '{value}'; expected one of: {known}$"):
        kl.KLSpec(**{field: value})


def test_enum_values_are_case_insensitive_strings():
    assert kl.KLSpec(estimator="K3", mode="AS_LOSS") == kl.KLSpec(estimator=kl.Estimator.K3, mode=kl.Mode.AS_LOSS)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(mode="as_loss", aggregation="reward_to_go"),
         r"^spec: aggregation=reward_to_go is only valid with mode=in_reward, not as_loss$"),
        (dict(mode="in_reward", aggregation="sequence", importance_sampling="token"),
         r"^spec: aggregation=sequence needs importance_sampling=sequence \(or none\), not token$"),
        (dict(importance_sampling="none", truncation=2.0), r"^spec: truncation is set but importance_sampling=none$"),
        (dict(importance_sampling="none", differentiable_weight=True),
         r"^spec: differentiable_weight is set but importance_sampling=none$"),
        (dict(mode="in_reward", importance_sampling="token", differentiable_weight=True),
         r"^spec: differentiable_weight needs mode=as_loss \(a reward is detached\)$"),
        (dict(importance_sampling="token", truncation=0.0), r"^spec: truncation must be a finite number > 0, got 0.0$"),
        (dict(importance_sampling="token", truncation=-1.0), r"^spec: truncation must be a finite number > 0, got -1.0$"),
        (dict(importance_sampling="token", truncation=float("inf")), r"^spec: truncation must be a finite number > 0, got inf$"),
        (dict(importance_sampling="token", truncation=float("nan")), r"^spec: truncation must be a finite number > 0, got nan$"),
        (dict(importance_sampling="token", truncation="10"), r"^spec: truncation must be a finite number > 0, got '10'$"),
    ],
)
def test_invalid_spec_combinations(fields, message):
    with pytest.raises(ValueError, match=message):
        kl.KLSpec(**fields)


@pytest.mark.parametrize(
    ("spec", "level"),
    [("principled_off_policy", "token"), ("trl_bias_corrected_k3", "token"), ("openrlhf_unbiased_k2", "token"),
     (kl.KLSpec(importance_sampling="sequence"), "sequence")],
)
def test_importance_sampling_without_old_logprobs(spec, level):
    arrays = batch()
    arrays["old_logprobs"] = None
    with pytest.raises(ValueError, match=rf"^old_logprobs: importance_sampling={level} needs the behaviour policy's log-probs$"):
        call(arrays, spec=spec)


def test_importance_weights_bad_input():
    logp = batch()["logprobs"]
    with pytest.raises(ValueError, match=r"^old_logprobs: required for importance weights$"):
        kl.importance_weights(logp, None, LENGTHS)
    with pytest.raises(ValueError, match=r"^level: importance weights need level token or sequence, not none$"):
        kl.importance_weights(logp, logp, LENGTHS, "none")
    with pytest.raises(ValueError, match=r"unknown level 'tok'; expected one of: none, token, sequence$"):
        kl.importance_weights(logp, logp, LENGTHS, "tok")
    with pytest.raises(ValueError, match=r"^old_logprobs: has 4 tokens but lengths sum to 5"):
        kl.importance_weights(logp, logp[:4], LENGTHS)
    bad = logp.copy()
    bad[2] = np.nan
    with pytest.raises(ValueError, match=r"^old_logprobs: non-finite value nan at sequence 2, scored token 0"):
        kl.importance_weights(logp, bad, LENGTHS)


def test_surrogate_loss_bad_input():
    logp = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(TypeError, match=r"^logprobs: surrogate_loss needs the trainer's torch tensor"):
        kl.surrogate_loss(np.zeros(5), np.zeros(5), LENGTHS)
    with pytest.raises(ValueError, match=r"^coef: shape \(4,\) does not match logprobs \(5,\)"):
        kl.surrogate_loss(np.zeros(4), logp, LENGTHS)
    with pytest.raises(ValueError, match=r"^lengths: sum to 4 but logprobs has 5 tokens$"):
        kl.surrogate_loss(np.zeros(5), logp, [2, 2])
    with pytest.raises(ValueError, match=r"^normalization: unknown 'mean'; expected token_mean, sequence_mean, constant or sum$"):
        kl.surrogate_loss(np.zeros(5), logp, LENGTHS, normalization="mean")
    for constant in (None, 0.0, -3.0):
        with pytest.raises(ValueError, match=r"^constant: normalization='constant' needs constant > 0$"):
            kl.surrogate_loss(np.zeros(5), logp, LENGTHS, normalization="constant", constant=constant)


@pytest.mark.parametrize(
    "values",
    [np.array(["a", "b"]), np.array([True, False]), np.array([1 + 1j, 2])],
    ids=["strings", "bools", "complex"],
)
def test_non_real_logprobs_are_named(values):
    with pytest.raises(ValueError, match=r"^logprobs: expected real numbers, got dtype"):
        kl.compute_kl(values, np.zeros(2), [2])


def test_boolean_truncation_is_refused():
    with pytest.raises(ValueError, match=r"spec: truncation must be a finite number > 0, got True"):
        kl.KLSpec(importance_sampling="token", truncation=True)


@pytest.mark.parametrize("policy, reference, behaviour", [(0.0, -10.0, -1e4), (-1e4, 0.0, -1e4)])
@pytest.mark.parametrize("preset", sorted(kl.PRESETS))
def test_float32_diagnostics_are_accumulated_in_float64_and_stay_finite(preset, policy, reference, behaviour):
    """7,000 float32 tokens at the ends of the server's accepted range (an importance weight of e^80 times a
    log-ratio of 10; k3 of a log-ratio of -1e4, clamped at e^80): each per-token value is finite in float32, and
    so is every diagnostic, whose float32 sums used to overflow to inf."""
    logprobs, ref, old = (np.full(7000, value, np.float32) for value in (policy, reference, behaviour))
    result = kl.compute_kl(logprobs, ref, [500] * 14, preset, old)  # 14 sequences of 500, as a server takes them
    assert all(np.isfinite(getattr(result, name)).all() for name in ("k1", "k2", "k3", "coef", "coef_principled"))
    assert all(np.isfinite(getattr(result.diagnostics, f)) for f in result.diagnostics.__dataclass_fields__)
    assert result.diagnostics.k3_mean_per_token == pytest.approx(float(np.mean(result.k3, dtype=np.float64)), rel=1e-6)
