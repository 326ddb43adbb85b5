"""The identities of docs/kl-math.md, and the diagnostics against numbers computed here.

Each identity is checked twice: between compute_kl outputs (two implementations give the
same coefficient) and against a closed form computed in the test from logp, ref and old.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from klservice_client import kl

from kl_testlib import LENGTHS, k_reference, make_batch, per_token, sequence_sums, tail_sums

SEEDS = (0, 1, 2)


def run(batch, spec, with_old=True, lengths=LENGTHS):
    return kl.compute_kl(
        batch["logp"], batch["ref"], list(lengths), spec, old_logprobs=batch["old"] if with_old else None
    )


def spec(**fields) -> kl.KLSpec:
    return kl.KLSpec(**fields)


def token_weights(batch):
    return np.exp(batch["logp"] - batch["old"])


def sequence_weights(batch, lengths=LENGTHS):
    return per_token(np.exp(sequence_sums(batch["logp"] - batch["old"], lengths)), lengths)


def deltas(batch):
    return batch["logp"] - batch["ref"]


# ---------------------------------------------------------------------------------------
# Gradient identities.


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_k2_as_loss_equals_k1_in_reward_on_policy(seed, aggregation):
    batch = make_batch(seed)
    as_loss = run(batch, spec(estimator="k2", mode="as_loss", aggregation=aggregation), with_old=False)
    in_reward = run(batch, spec(estimator="k1", mode="in_reward", aggregation=aggregation), with_old=False)
    np.testing.assert_array_equal(as_loss.coef, in_reward.coef)
    expected = deltas(batch) if aggregation == "token" else per_token(sequence_sums(deltas(batch), LENGTHS), LENGTHS)
    np.testing.assert_allclose(as_loss.coef, expected, rtol=1e-12, atol=1e-12)
    # And both equal the principled coefficient: zero bias.
    np.testing.assert_allclose(as_loss.coef, as_loss.coef_principled, rtol=1e-12, atol=1e-12)
    assert as_loss.diagnostics.coef_bias_abs_mean <= 1e-12


def test_k2_as_loss_equals_k1_in_reward_by_autograd():
    """The identity itself, independently of the service: d(sum k2(delta))/dlogp = delta."""
    batch = make_batch(0)
    logp = torch.tensor(batch["logp"], requires_grad=True)
    ref = torch.tensor(batch["ref"])
    (grad_k2,) = torch.autograd.grad(((logp - ref) ** 2 / 2).sum(), logp)
    (grad_k1_reward,) = torch.autograd.grad(((logp - ref).detach() * logp).sum(), logp)
    torch.testing.assert_close(grad_k2, grad_k1_reward, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_presets_principled_on_policy_agree(seed):
    batch = make_batch(seed)
    expected = deltas(batch)
    for name in ("principled", "ppo_k1_in_reward", "on_policy_distillation", "verl_k3_plus"):
        out = run(batch, name, with_old=False)
        np.testing.assert_allclose(out.coef, expected, rtol=1e-12, atol=1e-12, err_msg=name)
    # verl's k3+ logs the k3 value but takes k2's gradient.
    np.testing.assert_allclose(run(batch, "verl_k3_plus").k3, k_reference("k3", expected), rtol=1e-10)


@pytest.mark.parametrize("seed", SEEDS)
def test_differentiable_w_times_k3_is_principled_off_policy(seed):
    """L = w * k3 with the gradient through w: c = w * (k3 + 1 - e^-delta) = w * delta."""
    batch = make_batch(seed)
    expected = token_weights(batch) * deltas(batch)
    trl = run(batch, "trl_bias_corrected_k3")
    principled = run(batch, "principled_off_policy")
    np.testing.assert_allclose(trl.coef, expected, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(principled.coef, expected, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(trl.coef, trl.coef_principled, rtol=1e-12, atol=1e-300)
    assert trl.diagnostics.coef_bias_abs_mean <= 1e-9 * np.abs(expected).mean()


@pytest.mark.parametrize("seed", SEEDS)
def test_detached_w_times_k2_is_principled_off_policy(seed):
    batch = make_batch(seed)
    out = run(batch, spec(estimator="k2", mode="as_loss", importance_sampling="token"))
    np.testing.assert_allclose(out.coef, token_weights(batch) * deltas(batch), rtol=1e-12, atol=1e-300)
    np.testing.assert_array_equal(out.coef, run(batch, "principled_off_policy").coef)


@pytest.mark.parametrize("seed", SEEDS)
def test_differentiable_w_times_k1(seed):
    """w * k1 with the gradient through w: c = w * (delta + 1) (unbiased: E_old[w grad logp] = 0)."""
    batch = make_batch(seed)
    out = run(batch, spec(estimator="k1", mode="as_loss", importance_sampling="token", differentiable_weight=True))
    np.testing.assert_allclose(out.coef, token_weights(batch) * (deltas(batch) + 1), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("seed", SEEDS)
def test_sequence_k3_with_differentiable_sequence_weight_is_W_Delta(seed):
    batch = make_batch(seed)
    out = run(
        batch,
        spec(estimator="k3", mode="as_loss", aggregation="sequence", importance_sampling="sequence",
             differentiable_weight=True),
    )
    expected = sequence_weights(batch) * per_token(sequence_sums(deltas(batch), LENGTHS), LENGTHS)
    np.testing.assert_allclose(out.coef, expected, rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(out.coef, out.coef_principled, rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize("seed", SEEDS)
def test_unweighted_as_loss_off_policy_is_not_principled(seed):
    """Without a weight, off-policy k2 as loss gives delta, not w * delta: the diagnostics show it."""
    batch = make_batch(seed)
    out = run(batch, "principled")  # no IS, but old log-probs given: c* is w * delta
    np.testing.assert_allclose(out.coef_principled, token_weights(batch) * deltas(batch), rtol=1e-12, atol=1e-300)
    assert out.diagnostics.coef_bias_abs_mean > 0.1


def test_k3_as_loss_coefficient_shape():
    """c = 1 - e^-delta: exponential for delta < 0, saturating at 1 for delta > 0 (docs/kl-math.md)."""
    delta = np.linspace(-5, 5, 101)
    out = kl.compute_kl(delta, np.zeros_like(delta), [delta.size], "grpo_k3_as_loss")
    np.testing.assert_allclose(out.coef, 1 - np.exp(-delta), rtol=1e-12, atol=1e-15)
    assert out.coef.max() < 1 and out.coef.min() < -100


# ---------------------------------------------------------------------------------------
# Diagnostics.

DIAGNOSTIC_SPECS = [
    "principled",
    "grpo_k3_as_loss",
    "ppo_k1_reward_to_go",
    "principled_off_policy",
    "trl_bias_corrected_k3",
    "openrlhf_unbiased_k2",
    dict(estimator="k3", mode="as_loss", aggregation="sequence", importance_sampling="sequence", truncation=2.0),
    dict(estimator="k2", mode="in_reward", aggregation="reward_to_go", importance_sampling="sequence", truncation=2.0),
    dict(estimator="k3", mode="as_loss", importance_sampling="sequence", truncation=2.0, differentiable_weight=True),
    dict(estimator="k1", mode="in_reward", aggregation="sequence"),
]


def _expected_coefficient(fields: dict, batch) -> tuple[np.ndarray, np.ndarray]:
    """The coefficient of `fields` in closed form (docs/kl-math.md's table), numpy, python loops for sequences.

    Also returns the magnitude of the terms it adds per token: w * (k' + K) for k3 adds
    w * (1 - e^-x) and w * (e^-x - 1 + x), ~1e13 each at x = -30, so its float64 error is
    ~1e-16 of that, not of the (much smaller) result.
    """
    d = deltas(batch)
    est, mode = fields["estimator"], fields["mode"]
    aggregation = fields.get("aggregation", "token")
    level = fields.get("importance_sampling", "none")
    C = fields.get("truncation")
    x = d if aggregation != "sequence" else per_token(sequence_sums(d, LENGTHS), LENGTHS)
    value = k_reference(est, x)
    derivative = {"k1": np.ones_like(x), "k2": x, "k3": 1 - np.exp(-x)}[est]
    w = {"none": np.ones_like(d), "token": token_weights(batch), "sequence": sequence_weights(batch)}[level]
    w_bar = w if C is None else np.minimum(w, C)
    if mode == "in_reward":
        if aggregation == "reward_to_go":
            return w_bar * tail_sums(value, LENGTHS), w_bar * tail_sums(np.abs(value), LENGTHS)
        return w_bar * value, np.abs(w_bar * value)
    if not fields.get("differentiable_weight"):
        return w_bar * derivative, np.abs(w_bar * derivative)
    # d(min(w, C) * K)/dlogp: K = value (or, sequence weight on tokens, the sequence sum of k(delta_t)).
    K = value if not (level == "sequence" and aggregation == "token") else per_token(sequence_sums(value, LENGTHS), LENGTHS)
    untruncated = w < (C if C is not None else np.inf)
    coef = np.where(untruncated, w * (derivative + K), w_bar * derivative)
    return coef, np.where(untruncated, w * (np.abs(derivative) + np.abs(K)), np.abs(w_bar * derivative))


def _spec_fields(entry) -> dict:
    if isinstance(entry, dict):
        return entry
    preset = {
        "principled": dict(estimator="k2", mode="as_loss"),
        "grpo_k3_as_loss": dict(estimator="k3", mode="as_loss"),
        "ppo_k1_reward_to_go": dict(estimator="k1", mode="in_reward", aggregation="reward_to_go"),
        "principled_off_policy": dict(estimator="k2", mode="as_loss", importance_sampling="token"),
        "trl_bias_corrected_k3": dict(estimator="k3", mode="as_loss", importance_sampling="token", differentiable_weight=True),
        "openrlhf_unbiased_k2": dict(estimator="k2", mode="as_loss", importance_sampling="token", truncation=10.0),
    }
    return preset[entry]


DIAGNOSTIC_CASES = [
    pytest.param(entry, with_old, id=(entry if isinstance(entry, str) else "-".join(map(str, entry.values())))
                 + ("-old" if with_old else "-on_policy"))
    for entry in DIAGNOSTIC_SPECS
    for with_old in (False, True)
    if with_old or _spec_fields(entry).get("importance_sampling", "none") == "none"
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("entry", "with_old"), DIAGNOSTIC_CASES)
def test_diagnostics(entry, with_old, seed):
    fields = _spec_fields(entry)
    level = fields.get("importance_sampling", "none")
    batch = make_batch(seed)
    out = run(batch, entry if isinstance(entry, str) else kl.KLSpec(**fields), with_old=with_old)
    diag = out.diagnostics
    d = deltas(batch)
    n_tokens, n_sequences = len(d), len(LENGTHS)
    assert (diag.num_tokens, diag.num_sequences) == (n_tokens, n_sequences)

    values = {"k1": d, "k2": k_reference("k2", d), "k3": k_reference("k3", d)}
    for name, v in values.items():
        assert getattr(diag, f"{name}_mean_per_token") == pytest.approx(v.sum() / n_tokens, rel=1e-10)
        assert getattr(diag, f"{name}_mean_per_sequence") == pytest.approx(sequence_sums(v, LENGTHS).mean(), rel=1e-10)

    # Weights before truncation, at the spec's level (token level when the spec has none but old is given).
    if with_old:
        w = sequence_weights(batch) if level == "sequence" else token_weights(batch)
        assert diag.is_weight_mean == pytest.approx(w.mean(), rel=1e-12)
        assert diag.is_weight_max == pytest.approx(w.max(), rel=1e-12)
        C = fields.get("truncation")
        assert diag.is_truncated_fraction == pytest.approx(0.0 if C is None else np.mean(w > C), abs=1e-15)
        if C is not None:
            assert 0 < diag.is_truncated_fraction < 1
    else:
        assert (diag.is_weight_mean, diag.is_weight_max, diag.is_truncated_fraction) == (1.0, 1.0, 0.0)

    # Bias of the coefficient against c*, both built here.
    coef, magnitude = _expected_coefficient(fields, batch)
    assert np.all(np.abs(out.coef - coef) <= 1e-9 * np.abs(coef) + 1e-13 * magnitude)
    aggregation = fields.get("aggregation", "token")
    base = {"token": d, "sequence": per_token(sequence_sums(d, LENGTHS), LENGTHS), "reward_to_go": tail_sums(d, LENGTHS)}[aggregation]
    if not with_old:
        principled = base
    elif aggregation == "token" and level != "sequence":
        principled = token_weights(batch) * base
    else:
        principled = sequence_weights(batch) * base
    difference = coef - principled
    # Absolute slack: the float64 error of the reference's own terms (see _expected_coefficient).
    slack = 1e-13 * (magnitude + np.abs(principled)).mean()
    assert diag.coef_bias_mean == pytest.approx(difference.mean(), rel=1e-9, abs=slack)
    assert diag.coef_bias_abs_mean == pytest.approx(np.abs(difference).mean(), rel=1e-9, abs=slack)
    assert diag.num_clamped == 0


def test_diagnostics_empty_batch():
    out = kl.compute_kl(np.zeros(0), np.zeros(0), [], "principled_off_policy", old_logprobs=np.zeros(0))
    assert out.coef.shape == (0,)
    diag = out.diagnostics
    assert (diag.num_tokens, diag.num_sequences, diag.k3_mean_per_token, diag.coef_bias_abs_mean) == (0, 0, 0.0, 0.0)


# ---------------------------------------------------------------------------------------
# Clamping.


@pytest.mark.parametrize("name", sorted(kl.PRESETS))
def test_nothing_clamped_up_to_80(name):
    delta = np.array([-80.0, -79.5, 0.0, 1e-12, 80.0])
    logp = np.full(5, -1.0)
    out = kl.compute_kl(logp, logp - delta, [2, 3], name, old_logprobs=logp - np.array([15.0, -15.0, 0.0, 30.0, -30.0]))
    assert out.diagnostics.num_clamped == 0
    assert out.k3[0] == pytest.approx(np.exp(80.0) - 81.0, rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(kl.PRESETS))
def test_clamped_beyond_80_counted_and_finite(name, dtype):
    delta = np.array([-300.0, -81.0, 0.5, 120.0])
    logp = np.full(4, -1.0)
    log_w = np.array([0.0, 100.0, -200.0, 0.1])
    out = kl.compute_kl(
        logp.astype(dtype), (logp - delta).astype(dtype), [2, 2], name, old_logprobs=(logp - log_w).astype(dtype)
    )
    # Two deltas below -80 in k3 (always computed) and a log-weight above 80.
    assert out.diagnostics.num_clamped >= 3
    for field in ("k1", "k2", "k3", "coef", "coef_principled"):
        assert np.isfinite(getattr(out, field)).all(), field
        assert getattr(out, field).dtype == dtype
    assert all(np.isfinite(v) for v in vars(out.diagnostics).values())


def test_sequence_k3_counts_clamped_sequence_delta():
    """Delta < -80 over a sequence whose tokens are each inside the range."""
    delta = np.array([-50.0, -40.0, 1.0])
    s = kl.KLSpec(estimator="k3", mode="as_loss", aggregation="sequence")
    out = kl.compute_kl(np.zeros(3), -delta, [2, 1], s)
    assert out.diagnostics.num_clamped == 2  # both tokens of the first sequence
    assert np.isfinite(out.coef).all()
    assert out.coef[0] == pytest.approx(-np.expm1(80.0), rel=1e-12)


# ---------------------------------------------------------------------------------------
# Regressions.


@pytest.mark.parametrize("as_torch", [False, True])
def test_reward_to_go_is_not_perturbed_by_large_values_elsewhere(as_torch):
    """k3(-30) ~ 1e13 earlier in the batch (or in the sequence) must not cancel away a small tail sum.

    (A batch-wide cumsum minus its value at the sequence end lost ~1e-3 absolute here: 7% of
    the later sequence's reward-to-go.)
    """
    logp = np.array([-31.0, -1.0, -2.0, -1.3, -1.1])
    ref = np.array([-1.0, -1.1, -1.9, -1.2, -1.0])
    lengths = [3, 2]
    spec = kl.KLSpec(estimator="k3", mode="in_reward", aggregation="reward_to_go")
    out = kl.compute_kl(torch.tensor(logp) if as_torch else logp, ref, lengths, spec)
    expected = tail_sums(k_reference("k3", logp - ref), lengths)
    np.testing.assert_allclose(np.asarray(out.coef), expected, rtol=1e-12)


def test_sequence_level_principled_coefficient_uses_the_sequence_weight():
    """c* for SEQUENCE / REWARD_TO_GO objectives is W * (Delta | tail sum), whatever the spec's IS level."""
    batch = make_batch(0)
    W = sequence_weights(batch)
    d = deltas(batch)
    for fields, base in [
        (dict(estimator="k2", mode="as_loss", aggregation="sequence"), per_token(sequence_sums(d, LENGTHS), LENGTHS)),
        (dict(estimator="k1", mode="in_reward", aggregation="reward_to_go"), tail_sums(d, LENGTHS)),
        (dict(estimator="k1", mode="in_reward", aggregation="reward_to_go", importance_sampling="token"),
         tail_sums(d, LENGTHS)),
    ]:
        out = run(batch, kl.KLSpec(**fields))
        np.testing.assert_allclose(out.coef_principled, W * base, rtol=1e-12, atol=1e-300, err_msg=str(fields))
